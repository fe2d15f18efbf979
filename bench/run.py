"""Run SkyPrompt's benchmarks: every `bench/<name>_bench.py` module, or one with `--only <name>`.

A benchmark module has `NAME`, `main(args) -> dict` (prints its tables, writes
`<results-dir>/<name>.json`) and optionally `add_arguments(parser)` for its own options.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path

import bench
from bench import check_results_dir, checked_or_exit, preset_names

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def discover() -> dict[str, str]:
    """{benchmark name: module name} for every bench/*_bench.py."""
    return {m.name.removesuffix("_bench"): f"bench.{m.name}"
            for m in pkgutil.iter_modules(bench.__path__) if m.name.endswith("_bench")}


def main(argv: list[str] | None = None) -> int:
    found = discover()
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(found), help="run only this benchmark")
    parser.add_argument("--quick", action="store_true", help="fewer iterations and sizes (smoke runs; noisier numbers)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR,
                        help="where the JSON results go (default: bench/results)")
    modules = {name: importlib.import_module(mod) for name, mod in sorted(found.items())}
    for module in modules.values():
        if hasattr(module, "add_arguments"):
            module.add_arguments(parser)
    args = parser.parse_args(argv)
    checked_or_exit(check_arguments, args)
    for name, module in modules.items():
        if args.only in (None, name):
            print(f"== {name} benchmark ==", flush=True)
            module.main(args)
    return 0


def check_arguments(args) -> None:
    """What can be checked before any benchmark runs (a long run would fail at its end, or one that
    measures nothing would replace good results): the results folder, the model presets and search
    sets named (none named is refused too), the index sizes."""
    from bench.index_bench import check_sizes
    from bench.search_quality_bench import check_sets

    check_results_dir(args.results_dir)
    if getattr(args, "search_sets", None) is not None:
        check_sets(args.search_sets, "--search-sets")
    for option in ("presets", "training_presets"):
        if getattr(args, option, None) is not None:
            preset_names(getattr(args, option), f"--{option.replace('_', '-')}")
    if getattr(args, "index_sizes", None) is not None:
        check_sizes(args.index_sizes, "--index-sizes")


def run_one(name: str, argv: list[str] | None = None) -> int:
    """`python -m bench.<name>_bench [options]`: bench.run with --only <name>."""
    return main(["--only", name, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
