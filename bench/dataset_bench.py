"""Dataset-builder benchmark: tiles/s of `build_dataset landmarks` and pairs/s of `build_dataset filter`
on this CPU, and the landmarks builder on a local 2-worker Ray runtime against 1 and 2 local
processes, as ratios, on the same work in the same run.

The landmarks input is a raster made here (a real GeoTIFF, 2048 x 2048 px in UTM, 256 px tiles)
with synthetic map features (a grid of named points, roads and land-use polygons in EPSG:4326);
the filter input is the shared UCM images with their captions (skipped without ../shared/data).
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from osgeo import ogr, osr

from . import save_results, write_geotiff

NAME = "dataset"
REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
UCM = REPO.parent / "shared" / "data" / "ucm"


def make_inputs(folder: Path, side: int) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    raster = write_geotiff(folder / "bench.tif", rng.integers(0, 255, (3, side, side), dtype=np.uint8),
                           origin=(500000.0, 4500000.0), epsg=32633)
    utm = osr.SpatialReference()
    utm.ImportFromEPSG(32633)
    wgs = osr.SpatialReference()
    wgs.ImportFromEPSG(4326)
    for s in (utm, wgs):
        s.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    ct = osr.CoordinateTransformation(utm, wgs)
    vectors = folder / "features.gpkg"
    out = ogr.GetDriverByName("GPKG").CreateDataSource(str(vectors))
    layer = out.CreateLayer("features", wgs, ogr.wkbUnknown)
    for name in ("name", "amenity", "highway", "landuse"):
        layer.CreateField(ogr.FieldDefn(name, ogr.OFTString))
    extent = side * 0.5
    layer.StartTransaction()
    for i in range(400):
        x, y = 500000 + rng.uniform(0, extent), 4500000 - rng.uniform(0, extent)
        f = ogr.Feature(layer.GetLayerDefn())
        kind = i % 3
        if kind == 0:
            g = ogr.CreateGeometryFromWkt(f"POINT ({x} {y})")
            f.SetField("name", f"Place {i}")
            f.SetField("amenity", "school")
        elif kind == 1:
            g = ogr.CreateGeometryFromWkt(f"LINESTRING ({x} {y}, {x + 300} {y - 40})")
            f.SetField("highway", "residential")
        else:
            g = ogr.CreateGeometryFromWkt(f"POLYGON (({x} {y}, {x + 200} {y}, {x + 200} {y - 200}, {x} {y - 200}, {x} {y}))")
            f.SetField("landuse", "farmland")
        g.Transform(ct)
        f.SetGeometry(g)
        layer.CreateFeature(f)
    layer.CommitTransaction()
    out = None
    return raster, vectors


def _landmarks(raster: Path, vectors: Path, out: Path, extra: list[str]) -> tuple[float, dict]:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "training.build_dataset", "landmarks", "--raster", str(raster),
                        "--features", str(vectors), "--out", str(out), "--tile-size", "256", "--unit-tiles", "8",
                        *extra], cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-2000:])
    return seconds, json.loads((out / "summary.json").read_text())


def run(quick: bool = False, out_dir: Path | None = RESULTS_DIR, echo=print, ray: bool = True,
        side: int | None = None, filter_pairs: int | None = None, two_processes: bool = True) -> dict:
    side = side or (1024 if quick else 2048)
    filter_pairs = filter_pairs or (200 if quick else 1000)
    results: dict = {"raster_px": side, "tile_px": 256, "landmarks": {}, "filter": None}
    with tempfile.TemporaryDirectory(prefix="skyprompt-dsbench-") as tmp:
        tmp = Path(tmp)
        raster, vectors = make_inputs(tmp, side)
        engines = [("local, 1 process", ["--workers", "1"])]
        if two_processes:
            engines.append(("local, 2 processes", ["--workers", "2"]))
        try:
            import ray.data as _ray_data  # noqa: F401 - bound apart: `ray` is this function's flag

            if ray:
                engines.append(("ray, 2 workers (local runtime)", ["--engine", "ray", "--workers", "2"]))
        except ImportError:
            echo("ray[data] is not installed: the Ray row is skipped")
        for label, extra in engines:
            seconds, summary = _landmarks(raster, vectors, tmp / label.replace(" ", "_").replace(",", ""), extra)
            results["landmarks"][label] = {"seconds": round(seconds, 2), "tiles": summary["tiles_seen"],
                                           "kept": summary["kept"], "tiles_per_s": round(summary["tiles_seen"] / seconds, 2)}
        base = results["landmarks"]["local, 1 process"]["tiles_per_s"]
        echo(f"\nlandmarks builder, {side}x{side} px raster, 256 px tiles (whole command, start-up included)")
        echo(f"{'engine':34}{'tiles':>7}{'kept':>7}{'s':>8}{'tiles/s':>9}{'vs 1 proc':>11}")
        for label, r in results["landmarks"].items():
            r["ratio_vs_1_process"] = round(r["tiles_per_s"] / base, 2)
            echo(f"{label:34}{r['tiles']:7d}{r['kept']:7d}{r['seconds']:8.1f}{r['tiles_per_s']:9.2f}"
                 f"{r['ratio_vs_1_process']:10.2f}x")
        if (UCM / "captions.jsonl").is_file():
            rows = [json.loads(line) for line in (UCM / "captions.jsonl").read_text().splitlines()]
            rows = rows[:filter_pairs]
            manifest = tmp / "pairs.jsonl"
            manifest.write_text("\n".join(json.dumps({"image": str(UCM / r["image"]), "text": r["captions"][0]})
                                          for r in rows) + "\n")
            t0 = time.perf_counter()
            p = subprocess.run([sys.executable, "-m", "training.build_dataset", "filter", "--manifest", str(manifest),
                                "--out", str(tmp / "filtered")], cwd=REPO, capture_output=True, text=True)
            seconds = time.perf_counter() - t0
            if p.returncode != 0:
                raise RuntimeError(p.stderr[-2000:])
            report = json.loads((tmp / "filtered" / "report.json").read_text())
            results["filter"] = {"pairs": report["counts"]["seen"], "seconds": round(seconds, 2),
                                 "pairs_per_s": round(report["counts"]["seen"] / seconds, 2),
                                 "pairs_per_s_excluding_startup": report["pairs_per_second"]}
            f = results["filter"]
            echo(f"\nfilter, {f['pairs']} UCM pairs, bundled checkpoint on CPU: {f['pairs_per_s']:.1f} pairs/s "
                 f"(whole command), {f['pairs_per_s_excluding_startup']:.1f} pairs/s once the model is loaded")
        else:
            echo(f"\nfilter: skipped ({UCM} not found)")
    save_results(results, NAME, out_dir)
    return results


def main(args) -> dict:
    return run(quick=getattr(args, "quick", False), out_dir=getattr(args, "results_dir", RESULTS_DIR))


if __name__ == "__main__":      # `python -m bench.<name>_bench [bench.run's options]`
    import sys

    from bench.run import run_one

    sys.exit(run_one(NAME))
