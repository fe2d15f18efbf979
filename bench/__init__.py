"""SkyPrompt benchmarks: `python -m bench.run` (or `make bench`); see bench/README.md."""


def save_results(results: dict, name: str, out_dir) -> None:
    """Write `<out_dir>/<name>.json` (nothing when out_dir is None)."""
    if out_dir is None:
        return
    import json
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
