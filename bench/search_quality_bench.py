"""Search-quality benchmark: what users feel when they search a layer by text.

For each validation split of the default recipe (RSSCN7, UC Merced, AID; the images the model did
not train on):
  1. build a georeferenced mosaic GeoTIFF: the images in a shuffled grid, 256 x 256 pixels each,
     0.3 m pixels, in UTM zone 11N (EPSG:32611);
  2. index it with the real backend (a server subprocess over gRPC), tiles resampled so one model
     input covers one image (0.6 m for a 128 px model), as when a user picks a target resolution;
  3. run one natural-language query per class (bench/search_queries.json: worded like a user,
     not the class name);
  4. report precision@10 and average precision per class and overall. A hit counts when the centre
     of its footprint lies on an image of the query's class. Queries go through the backend's default
     (each averaged over phrasings like "an aerial photo of QUERY."); the same queries embedded as
     typed (`raw_query`) are the peer in the same run, and so are the default queries with query
     expansion from their 3 best tiles (`SearchRequest.expand` 3), and the mosaic indexed again with
     each tile's four rotations averaged (`IndexRasterRequest.views` 4), with both index times; the
     default queries ranked by the embeddings alone (`SearchRequest.keyword_weight` 0: no keyword
     matching against the tiles' captions, which the backend's default adds); and
     the class map's own names as queries ("storage tanks", "mobile home park"): the gap between
     those and the worded queries is what wording costs, since the images are the same.
Target: mean precision@10 >= 0.7. Needs ../shared/data; uses the bundled checkpoint (or --checkpoint).
"""
from __future__ import annotations

import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import save_results

NAME = "search_quality"
SETS = ("rsscn7", "ucm", "aid")      # the validation sets searched, each as its own mosaic
RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
QUERIES = Path(__file__).resolve().parent / "search_queries.json"
RECIPE = REPO / "training" / "recipes" / "default.json"
CHIP = 256
PIXEL = 0.3
ORIGIN = (400000.0, 3800000.0)   # UTM 11N, southern California
TARGET_P10 = 0.7
VIEWS_PEER = 4      # also indexed with the four rotations of each tile averaged (IndexRasterRequest.views)
EXPAND_PEER = 3     # also searched with query expansion from the 3 best tiles (SearchRequest.expand)


def validation_records(recipe: Path = RECIPE, seed: int = 0) -> dict[str, list]:
    """{set name: validation Records with classes}, exactly the split training held out."""
    from training import recipe as recipes

    sources = recipes.sources_from_args(str(recipe), [], [], [], [], 0)
    _, val = recipes.build_sources(sources, seed=seed)
    return {name: vs["records"] for name, vs in val.items() if vs["kind"] == "zero-shot"}


def build_mosaic(records: list, path: Path, seed: int = 0) -> tuple[Path, np.ndarray]:
    """A GeoTIFF of the images in a shuffled square grid; returns it and the class key of each cell
    ([rows, cols], "" for empty cells)."""
    from osgeo import gdal, osr
    from PIL import Image

    order = list(records)
    random.Random(seed).shuffle(order)
    side = int(np.ceil(np.sqrt(len(order))))
    classes = np.full((side, side), "", dtype=object)
    ds = gdal.GetDriverByName("GTiff").Create(str(path), side * CHIP, side * CHIP, 3, gdal.GDT_Byte,
                                              ["TILED=YES", "COMPRESS=DEFLATE"])
    ds.SetGeoTransform((ORIGIN[0], PIXEL, 0.0, ORIGIN[1], 0.0, -PIXEL))
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(32611)
    ds.SetSpatialRef(srs)
    for i, record in enumerate(order):
        r, c = divmod(i, side)
        with Image.open(record.image) as im:
            chip = np.asarray(im.convert("RGB").resize((CHIP, CHIP), Image.Resampling.BICUBIC))
        for b in range(3):
            ds.GetRasterBand(b + 1).WriteArray(chip[:, :, b], c * CHIP, r * CHIP)
        classes[r, c] = record.class_name
    ds = None
    return path, classes


def class_at(classes: np.ndarray, x: float, y: float) -> str:
    col = int((x - ORIGIN[0]) / (CHIP * PIXEL))
    row = int((ORIGIN[1] - y) / (CHIP * PIXEL))
    if 0 <= row < classes.shape[0] and 0 <= col < classes.shape[1]:
        return classes[row, col]
    return ""


def average_precision(relevant: list[bool], total_relevant: int) -> float:
    hits, score = 0, 0.0
    for rank, ok in enumerate(relevant, 1):
        if ok:
            hits += 1
            score += hits / rank
    return score / total_relevant if total_relevant else 0.0


def class_name_queries(set_name: str) -> dict[str, str]:
    """{class key: the first human name of the set's bundled class map}."""
    from training.evaluate import load_classnames

    return {k: v[0] for k, v in load_classnames(set_name).items()}


def evaluate_set(stub, pb, name: str, records: list, queries: dict, work: Path, views: int = VIEWS_PEER,
                 class_queries: dict | None = None) -> dict:
    mosaic, classes = build_mosaic(records, work / f"{name}_mosaic.tif")
    # tiles resampled so that one model input covers one chip, whatever the model's input size
    tile = stub.GetInfo(pb.GetInfoRequest()).image_size

    def index(n_views: int):
        t = time.perf_counter()
        request = pb.IndexRasterRequest(source=pb.RasterSource(path=str(mosaic)), target_resolution=CHIP * PIXEL / tile,
                                        force=True, views=n_views)
        return list(stub.IndexRaster(request))[-1].result, time.perf_counter() - t

    done, seconds = index(1)
    n_tiles = done.tile_count
    # the backend's default (the query averaged over phrasings) and, as its peer in the same run, the
    # query embedded as typed
    out = {"images": len(records), "tiles": n_tiles, "index_seconds": seconds,
           **search_precision(stub, pb, queries, classes, done.raster_id, n_tiles, raw_query=False),
           "raw_query": search_precision(stub, pb, queries, classes, done.raster_id, n_tiles, raw_query=True),
           # the same queries ranked by the embeddings alone (no keyword matching against tile captions)
           "no_keywords": search_precision(stub, pb, queries, classes, done.raster_id, n_tiles, raw_query=False,
                                           keyword_weight=0.0),
           "expanded": {"expand": EXPAND_PEER, **search_precision(stub, pb, queries, classes, done.raster_id, n_tiles,
                                                                  raw_query=False, expand=EXPAND_PEER)}}
    if class_queries:
        out["class_names"] = search_precision(stub, pb, class_queries, classes, done.raster_id, n_tiles, raw_query=False)
    if views > 1:   # the same mosaic indexed with several views per tile (IndexRasterRequest.views)
        done, seconds = index(views)
        out["views"] = {"views": views, "index_seconds": seconds,
                        **search_precision(stub, pb, queries, classes, done.raster_id, done.tile_count, raw_query=False)}
    return out


def search_precision(stub, pb, queries: dict, classes: np.ndarray, raster_id: str, n_tiles: int,
                     raw_query: bool, expand: int = 0, keyword_weight: float | None = None) -> dict:
    """P@10 and AP of each class's query over every tile of the mosaic, and their means (`expand`:
    SearchRequest.expand, 0 = none; `keyword_weight`: SearchRequest.keyword_weight, None = the
    server's default)."""
    per_class = {}
    for key, query in queries.items():
        total = int((classes == key).sum())
        if total == 0:
            continue
        request = pb.SearchRequest(query=query, k=min(n_tiles, 1000), raster_ids=[raster_id], raw_query=raw_query,
                                   expand=expand)
        if keyword_weight is not None:
            request.keyword_weight = keyword_weight
        hits = stub.Search(request).hits
        relevant = []
        for h in hits:
            cx, cy = (h.bounds.xmin + h.bounds.xmax) / 2, (h.bounds.ymin + h.bounds.ymax) / 2
            relevant.append(class_at(classes, cx, cy) == key)
        # every tile is ranked, so the relevant tiles are those of the ranking that lie on the class
        per_class[key] = {"query": query, "images": total, "relevant_tiles": int(sum(relevant)),
                          "p_at_10": float(np.mean(relevant[:10])), "ap": average_precision(relevant, sum(relevant))}
    return {"classes": len(per_class), "mean_p_at_10": float(np.mean([v["p_at_10"] for v in per_class.values()])),
            "map": float(np.mean([v["ap"] for v in per_class.values()])), "per_class": per_class}


def run(checkpoint: Path | None = None, out_dir: Path | None = RESULTS_DIR, sets=None, echo=print) -> dict:
    from backend.defaults import BUNDLED_CHECKPOINT
    from backend.rpc import skyprompt_pb2 as pb

    from .backend_bench import _Server

    checkpoint = Path(checkpoint or BUNDLED_CHECKPOINT)
    queries = json.loads(QUERIES.read_text())
    val = validation_records()
    work = Path(tempfile.mkdtemp(prefix="skyprompt-search-quality-"))
    server = _Server(checkpoint, work / "data", work)
    results = {"checkpoint": str(checkpoint), "sets": {}}
    try:
        for name in sets or [n for n in SETS if n in val]:
            t = time.perf_counter()
            results["sets"][name] = evaluate_set(server.stub, pb, name, val[name], queries[name], work,
                                                 class_queries=class_name_queries(name))
            results["sets"][name]["seconds"] = time.perf_counter() - t
            r = results["sets"][name]
            echo(f"{name}: {r['images']} images, mean P@10 {r['mean_p_at_10']:.3f}, mAP {r['map']:.3f} "
                 f"(no keyword matching: {r['no_keywords']['mean_p_at_10']:.3f}, {r['no_keywords']['map']:.3f}; "
                 f"query as typed: {r['raw_query']['mean_p_at_10']:.3f}, {r['raw_query']['map']:.3f}; "
                 f"expanded from {r['expanded']['expand']} tiles: {r['expanded']['mean_p_at_10']:.3f}, "
                 f"{r['expanded']['map']:.3f}; "
                 f"{r['views']['views']} views: {r['views']['mean_p_at_10']:.3f}, {r['views']['map']:.3f}; "
                 f"class names as queries: {r['class_names']['mean_p_at_10']:.3f}, {r['class_names']['map']:.3f})")
    finally:
        server.stop()
    overall = [r["mean_p_at_10"] for r in results["sets"].values()]
    results["targets"] = [{"target": f"mean precision@10 >= {TARGET_P10} on every set",
                           "result": "PASS" if overall and min(overall) >= TARGET_P10 else "FAIL"}]
    save_results(results, NAME, out_dir)
    echo(report(results))
    shutil.rmtree(work, ignore_errors=True)     # rasters, index, server log: kept only when the run fails
    return results


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def report(results: dict) -> str:
    lines = ["| set | images | classes | mean P@10 | mAP | no keyword matching: P@10 | mAP | P@10 ratio "
             "| query as typed: P@10 | mAP | P@10 ratio "
             "| expanded from N tiles: P@10 | mAP | P@10 ratio "
             "| N views per tile: P@10 | mAP | P@10 ratio | index time ratio "
             "| class names as queries: P@10 | mAP | P@10 ratio |",
             "|" + "---|" * 21]
    for name, r in results["sets"].items():
        raw, x, v, c = r["raw_query"], r.get("expanded"), r.get("views"), r.get("class_names")
        nk = r.get("no_keywords")
        row = (f"| {name} | {r['images']} | {r['classes']} | {r['mean_p_at_10']:.3f} | {r['map']:.3f} |")
        row += (f" {nk['mean_p_at_10']:.3f} | {nk['map']:.3f} | {_ratio(r['mean_p_at_10'], nk['mean_p_at_10'])} |"
                if nk else " - | - | - |")
        row += f" {raw['mean_p_at_10']:.3f} | {raw['map']:.3f} | {_ratio(r['mean_p_at_10'], raw['mean_p_at_10'])} |"
        row += (f" {x['expand']}: {x['mean_p_at_10']:.3f} | {x['map']:.3f} | {_ratio(x['mean_p_at_10'], r['mean_p_at_10'])} |"
                if x else " - | - | - |")
        row += (f" {v['views']}: {v['mean_p_at_10']:.3f} | {v['map']:.3f} | {_ratio(v['mean_p_at_10'], r['mean_p_at_10'])} "
                f"| {_ratio(v['index_seconds'], r['index_seconds'])} |" if v else " - | - | - | - |")
        row += (f" {c['mean_p_at_10']:.3f} | {c['map']:.3f} | {_ratio(c['mean_p_at_10'], r['mean_p_at_10'])} |"
                if c else " - | - | - |")
        lines.append(row)
    lines.append("")
    for name, r in results["sets"].items():
        worst = sorted(r["per_class"].items(), key=lambda kv: kv[1]["ap"])[:3]
        lines.append(f"{name} weakest: " + "; ".join(f"{k} \"{v['query']}\" P@10 {v['p_at_10']:.1f} AP {v['ap']:.2f}"
                                                      for k, v in worst))
    lines += [f"{t['result']:>4}  {t['target']}" for t in results["targets"]]
    return "\n".join(lines)


def main(args) -> dict | None:
    from backend.defaults import BUNDLED_CHECKPOINT
    if not (REPO.parent / "shared" / "data").is_dir() or not (BUNDLED_CHECKPOINT / "model.safetensors").exists():
        print("search quality: skipped (needs ../shared/data and the bundled checkpoint)")
        return None
    # a smoke run (--quick) searches the UC Merced mosaic only, the smallest of the three
    sets = getattr(args, "search_sets", None) or ("ucm" if getattr(args, "quick", False) else None)
    # the names as bench.run checked them ("ucm, aid" has a space to strip), not split again by hand
    return run(out_dir=getattr(args, "results_dir", RESULTS_DIR), sets=check_sets(sets, "--search-sets") if sets else None)


def add_arguments(parser) -> None:
    g = parser.add_argument_group("search quality benchmark")
    g.add_argument("--search-sets", default=None, metavar="SETS",
                   help="comma-separated: rsscn7,ucm,aid (default: all three; ucm with --quick)")


def check_sets(sets: str | None, option: str = "--sets") -> list[str]:
    """The comma-separated set names (all of SETS when None, the option not given); BenchError names an
    unknown one, or an option given that names none ('' as ',')."""
    from . import names_option

    return names_option(",".join(SETS) if sets is None else sets, option, SETS, "set")


def check_inputs(checkpoint, sets, out_dir) -> list[str]:
    """The sets to run, once the checkpoint, the shared data and `out_dir` are there to run them:
    BenchError names what is wrong before the server starts."""
    from backend.defaults import BUNDLED_CHECKPOINT

    from . import BenchError, check_results_dir

    names = check_sets(sets)
    folder = Path(checkpoint or BUNDLED_CHECKPOINT)
    if not (folder / "model.safetensors").is_file():
        raise BenchError(f"--checkpoint {folder}: not a checkpoint folder (no model.safetensors in it)")
    data = REPO.parent / "shared" / "data"
    missing = [n for n in names if not (data / n).is_dir()]
    if missing:
        raise BenchError(f"the validation images of {', '.join(missing)} are not in {data} (see its README)")
    check_results_dir(out_dir)
    return names


if __name__ == "__main__":
    import argparse

    from . import checked_or_exit

    parser = argparse.ArgumentParser(prog="python -m bench.search_quality_bench",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint folder to search with (default: the bundled one)")
    parser.add_argument("--sets", default=None, help="comma-separated: rsscn7,ucm,aid (default: all three)")
    parser.add_argument("--results-dir", default=str(RESULTS_DIR),
                        help="where search_quality.json is written (default: %(default)s)")
    a = parser.parse_args()
    chosen = checked_or_exit(check_inputs, a.checkpoint, a.sets, Path(a.results_dir))
    run(checkpoint=a.checkpoint, out_dir=Path(a.results_dir), sets=chosen)
    sys.exit(0)
