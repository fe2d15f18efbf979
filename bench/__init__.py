"""SkyPrompt benchmarks: `python -m bench.run` (or `make bench`); see bench/README.md."""


class BenchError(Exception):
    """A benchmark's arguments or inputs are wrong: one line for the user, exit status 2."""


def check_results_dir(out_dir):
    """`out_dir` made and written to once now, before any benchmark runs: one that cannot take the
    results would otherwise be found after the whole run. BenchError names it."""
    import os
    from pathlib import Path

    out = Path(out_dir)
    probe = out / f".write-test-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise BenchError(f"--results-dir {out_dir}: cannot write results there ({e.strerror or e}); "
                         "give a writable folder") from None
    return out


def checked_or_exit(check, *args):
    """check(*args), or its BenchError as one line on stderr and exit status 2: a benchmark command
    line refuses its arguments before any work."""
    import sys

    try:
        return check(*args)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def save_results(results: dict, name: str, out_dir) -> None:
    """Write `<out_dir>/<name>.json` atomically (nothing when out_dir is None)."""
    if out_dir is None:
        return
    import json
    from pathlib import Path

    from backend.files import write_text_atomically

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # whole or not at all: a run killed or failing midway (a full disk) leaves the earlier file as it was
    write_text_atomically(out / f"{name}.json", json.dumps(results, indent=2) + "\n")


def names_option(value, option: str, known, noun: str) -> list[str]:
    """The names of a comma-separated option (spaces around a name stripped): BenchError when it names
    none ('' or ',': a run that would measure nothing) or a `noun` not in `known`, with the names accepted."""
    names = [n.strip() for n in str(value or "").split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise BenchError(f"{option}: unknown {noun}(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    if not names:
        raise BenchError(f"{option}: {value!r} names no {noun}; give one or more of {', '.join(known)}, "
                         "comma-separated")
    return names


def preset_names(value, option: str) -> list[str]:
    """The model presets a comma-separated option names (see names_option)."""
    from backend.model import PRESETS

    return names_option(value, option, list(PRESETS), "preset")


def write_geotiff(path, data, origin: tuple[float, float], pixel: float = 0.5, epsg: int = 32633,
                  options: tuple = ()):
    """A tiled GeoTIFF of bands `data` [bands, rows, cols] (its dtype: uint8, uint16, ...), north-up,
    `pixel` map units per pixel, top-left corner at `origin` in EPSG:`epsg` (benchmark inputs: real
    rasters, real CRSs); `options` adds GTiff creation options ("COMPRESS=DEFLATE")."""
    from osgeo import gdal, gdal_array, osr

    bands, rows, cols = data.shape
    kind = gdal_array.NumericTypeCodeToGDALTypeCode(data.dtype)
    ds = gdal.GetDriverByName("GTiff").Create(str(path), cols, rows, bands, kind, ["TILED=YES", *options])
    ds.SetGeoTransform((origin[0], pixel, 0.0, origin[1], 0.0, -pixel))
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(epsg)
    ds.SetSpatialRef(srs)
    for i in range(bands):
        ds.GetRasterBand(i + 1).WriteArray(data[i])
    ds = None
    return path
