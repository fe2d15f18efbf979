"""Build training data: captioned tiles from imagery + map features, and remote-sensing pairs
filtered out of web image/text pairs.

    python -m training.build_dataset landmarks --raster ortho.tif --features city.osm.pbf --out data/landmarks
    python -m training.build_dataset filter --shards 'web/{000000..000099}.tar' --eval-folder ../shared/data/ucm/images \\
        --checkpoint backend/checkpoints/default --out data/rs-web

Writes OUT/shards/*.tar (WebDataset: key.jpg, key.txt, key.json with footprint, CRS, source raster
and the features used), OUT/manifest.jsonl (one line per kept tile: key, caption, extent, crs,
raster, shard) and OUT/summary.json (tiles seen, kept, skipped and why; caption length and
vocabulary). Train on it with `python -m training.train --shards 'OUT/shards/*.tar'`.

Resumable: a re-run skips finished units (one raster, --unit-tiles tiles of its grid). Parallel:
--workers local processes, or --engine ray to run the same units as Ray Data tasks on a Ray
cluster (--ray-address; default a local runtime).
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from backend.files import file_in_the_way

from .datasets import landmarks as LM


def _landmarks_parser(sub) -> None:
    p = sub.add_parser("landmarks", help="imagery + vector features -> captioned tiles",
                       description=LM.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--raster", action="append", required=True, metavar="R", help="a GDAL raster (repeatable)")
    p.add_argument("--features", action="append", required=True, metavar="F",
                   help="an OGR vector source: GeoPackage, GeoJSON, Shapefile, OSM .osm/.pbf (repeatable)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--layer", action="append", dest="layers", metavar="NAME",
                   help="only these layers of the vector sources (repeatable; default all; OSM: points, lines, "
                        "multilinestrings, multipolygons, other_relations)")
    p.add_argument("--where", metavar="SQL", help="attribute filter on the vector layers")
    p.add_argument("--mapping", action="append", default=[], metavar="FILE",
                   help=f"extra tag -> phrase rules, tried before the default ({LM.DEFAULT_MAPPING.name}); "
                        "format: TAG<TAB>PHRASE<TAB>KIND (object|line|cover), TAG key=value or key=* (any value, "
                        "put in PHRASE as {value}); a GIS field of your own needs one, e.g. for a field named "
                        "class: class=*<TAB>a {value}<TAB>object")
    p.add_argument("--tile-size", type=int, default=256, metavar="PX", help="tile side in pixels (default: %(default)s)")
    p.add_argument("--overlap", type=float, default=0.0, help="tile overlap fraction, 0 or more and under 0.9 (default: %(default)s)")
    p.add_argument("--resolution", type=float, default=None, metavar="M",
                   help="ground resolution in map units per pixel (default: the raster's)")
    p.add_argument("--min-valid", type=float, default=0.9,
                   help="skip tiles with less than this fraction of valid (not nodata/alpha) pixels (default: %(default)s)")
    p.add_argument("--min-cover", type=float, default=0.3,
                   help="an area feature counts when it covers this share of a tile (default: %(default)s)")
    p.add_argument("--max-object", type=float, default=0.25,
                   help="...or lies inside it and is smaller than this share (default: %(default)s)")
    p.add_argument("--min-line", type=float, default=0.5,
                   help="a line counts with this many tile sides of length inside the tile (default: %(default)s)")
    p.add_argument("--captioner", metavar="CMD|module:function",
                   help="caption with your own model: a command that reads the tile's JSON on stdin and prints "
                        "the caption, or a Python function; default: the built-in templates. CMD is the path "
                        "of a program (spaces and all), or a command line split as a shell splits it: quote a "
                        "path with spaces inside it, e.g. --captioner \"'/data/my tools/cap.sh' --flag\"")
    p.add_argument("--bands", nargs=3, type=int, metavar=("RED", "GREEN", "BLUE"),
                   help="1-based bands to read as red, green, blue, e.g. 3 2 1 for a sensor stored "
                        "blue-green-red-NIR (default: the bands marked red/green/blue, else the first three, "
                        "with a note naming them when four or more mark no colour)")
    p.add_argument("--unit-tiles", type=int, default=256, metavar="N", help="tiles per unit of work/shard (default: %(default)s)")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="local processes (default: %(default)s)")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local processes, or Ray Data tasks (default: %(default)s)")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: start a local runtime)")


def _filter_parser(sub) -> None:
    from .datasets import web_filter as WF      # imports torch: only when the subcommand is built

    p = sub.add_parser("filter", help="web image/text pairs -> remote-sensing pairs",
                       description=WF.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", action="append", default=[], metavar="PATTERN",
                   help="WebDataset shards (key.jpg/png + key.txt or key.json): paths, globs or {000..009} ranges")
    p.add_argument("--manifest", metavar="FILE.jsonl",
                   help='pairs as JSON lines {"image": path relative to the file, "text" or "caption": "...", or '
                        '"captions": [...]}')
    p.add_argument("--checkpoint", default="backend/checkpoints/default", help="scoring model (default: %(default)s)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder: shards/ and report.json")
    p.add_argument("--eval-folder", action="append", default=[], dest="eval_folders", metavar="DIR",
                   help="drop pairs whose image matches (exactly or by perceptual hash) any image here (repeatable)")
    p.add_argument("--image-threshold", type=float, default=0.0,
                   help="least zero-shot overhead-imagery probability (default: %(default)s, off: the bundled "
                        "checkpoint saw only overhead imagery in training and barely tells ground-level photos "
                        "apart; set it, e.g. 0.5, with a checkpoint trained on broader data; scores.jsonl has "
                        "every pair's scores for choosing)")
    p.add_argument("--text-threshold", type=float, default=0.2,
                   help="least share of remote-sensing words in the text (default: %(default)s)")
    p.add_argument("--dup-distance", type=int, default=4,
                   help="perceptual-hash bits within which two images are the same (0..7, default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: %(default)s)")
    p.add_argument("--shard-size", type=int, default=1000, help="kept pairs per output shard (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.build_dataset", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{landmarks,filter}")
    _landmarks_parser(sub)
    _filter_parser(sub)
    return p


def _ray_unit(cfg, unit: dict) -> dict:
    """One unit as a Ray task. A BuildError raised in a task reaches the driver as a Ray traceback:
    it comes back as data instead, and every row has the same two string columns (stats as JSON)."""
    try:
        return {"stats": json.dumps(LM.run_unit(cfg, unit)), "error": ""}
    except LM.BuildError as e:
        return {"stats": "", "error": str(e)}


# a worker process's own state: whether it is running a unit, and whether Ctrl-C has been pressed
_worker = {"running": False, "interrupted": False}


def _worker_start() -> None:
    """Ctrl-C reaches the workers too (the terminal signals the whole process group). A worker stops
    the unit it runs, and from then on refuses the units already queued to it: cancel_futures cannot
    take those back, and it would run each to the end, after the user asked to stop."""
    def on_interrupt(signum, frame):
        _worker["interrupted"] = True
        if _worker["running"]:
            raise KeyboardInterrupt

    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:   # a run started to ignore it (`&`, nohup) still does
        signal.signal(signal.SIGINT, on_interrupt)


def _worker_unit(cfg, unit: dict) -> dict:
    if _worker["interrupted"]:
        raise KeyboardInterrupt
    _worker["running"] = True
    try:
        return LM.run_unit(cfg, unit)
    finally:
        _worker["running"] = False


def _run_units(units: list[dict], cfg, engine: str, workers: int, ray_address: str | None) -> list[dict]:
    from tqdm import tqdm

    if engine == "ray":
        import ray

        ray.init(address=ray_address, ignore_reinit_error=True, log_to_driver=False,
                 include_dashboard=False, num_cpus=None if ray_address else max(1, workers))
        try:
            import ray.data

            ds = ray.data.from_items(units, override_num_blocks=max(1, len(units)))
            rows = ds.map(lambda u: _ray_unit(cfg, u), num_cpus=1).take_all()
        finally:
            ray.shutdown()
        errors = [r["error"] for r in rows if r["error"]]
        if errors:
            raise LM.BuildError(errors[0])
        return [json.loads(r["stats"]) for r in rows]
    if workers <= 1:
        return [LM.run_unit(cfg, u) for u in tqdm(units, desc="units", unit="unit")]
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(workers, initializer=_worker_start)
    try:
        futures = [pool.submit(_worker_unit, cfg, u) for u in units]
        return [f.result() for f in tqdm(futures, desc="units", unit="unit")]
    finally:
        # on Ctrl-C or a unit's failure, the units not started yet are dropped rather than run to
        # the end first (hours, on a real job); those running finish or stop with their worker
        pool.shutdown(wait=True, cancel_futures=True)


def landmarks(args) -> dict:
    for name in ("tile_size", "unit_tiles", "workers"):
        if getattr(args, name) < 1:
            raise LM.BuildError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("min_valid", "min_cover", "max_object"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise LM.BuildError(f"--{name.replace('_', '-')} must be between 0 and 1")
    if not 0.0 <= args.overlap < 0.9:
        raise LM.BuildError("--overlap must be in [0, 0.9)")
    if args.resolution is not None and not 0 <= args.resolution < float("inf"):
        raise LM.BuildError(f"--resolution {args.resolution} must be a ground size above 0, in the raster's map units "
                            "per pixel, or 0 (or left out) for the raster's own")
    if args.min_line < 0:
        raise LM.BuildError(f"--min-line {args.min_line} must be 0 or more")
    if args.bands and min(args.bands) < 1:
        raise LM.BuildError(f"--bands {' '.join(map(str, args.bands))}: band numbers start at 1")
    for path in args.features:
        if not Path(path).exists():
            raise LM.BuildError(f"vector source {path} does not exist")
    cfg = LM.LandmarksConfig(rasters=args.raster, features=args.features, out=args.out, layers=args.layers,
                             where=args.where, mapping=args.mapping, tile_size=args.tile_size, overlap=args.overlap,
                             resolution=args.resolution or None, min_valid=args.min_valid,
                             thresholds=LM.Thresholds(args.min_cover, args.max_object, args.min_line),
                             captioner=args.captioner, unit_tiles=args.unit_tiles, bands=args.bands)
    rules = LM.rules_for(cfg)                        # bad mapping files fail here, before any work
    LM.check_same_settings(cfg)                      # and a folder of another run's settings
    LM.load_captioner(cfg.captioner)
    read = {}
    for path in cfg.features:
        read[path] = LM.read_features(path, rules, cfg.layers, cfg.where)
        groups = read[path][0]
        for layer, srs, feats in groups:
            _, note = LM.features_crs(cfg, path, layer, srs, feats)
            if note:
                print(f"note: {note}", file=sys.stderr)
    units, problems, notes = LM.plan_units(cfg)
    if problems and not units:
        raise LM.BuildError(f"none of the {len(problems)} raster(s) could be read: "
                            + "; ".join(p["error"] for p in problems[:3]) + ("; ..." if len(problems) > 3 else ""))
    for p in problems:
        print(f"skipping unreadable raster {p['raster']}: {p['error']}", file=sys.stderr)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    counts = LM.count_features(cfg, read, units)
    why = _nothing_to_tile(counts)
    if why:
        raise LM.BuildError(why)
    pending = [u for u in units if not LM._done(Path(cfg.out), u)]
    if len(pending) < len(units):
        print(f"{len(units) - len(pending)} of {len(units)} units already done: skipped", file=sys.stderr)
    results = _run_units(pending, cfg, args.engine, args.workers, args.ray_address)
    # units whose raster failed while being read: skipped like the unreadable rasters above (not done,
    # so a re-run tries them again)
    failed = [r["unreadable"] for r in results if "unreadable" in r]
    for p in failed:
        print(f"skipping unreadable raster {p['raster']} (tiles {p['tiles'][0]}-{p['tiles'][1] - 1} of its grid): "
              f"{p['error']}", file=sys.stderr)
    problems += failed
    done = [u for u in units if LM._done(Path(cfg.out), u)]
    if failed and not done:
        raise LM.BuildError("no raster could be read: " + "; ".join(p["error"] for p in problems[:3])
                            + ("; ..." if len(problems) > 3 else ""))
    summary = LM.summarize(cfg, done, problems, counts)
    empty = summary["skipped"]["skipped_empty_caption"]
    if summary["kept"] == 0 and empty:
        raise LM.BuildError(f"no tile was kept: the captioner gave an empty caption for all {empty} tiles with "
                            "features; check that --captioner prints a caption for a tile's JSON, then build into "
                            "a new --out (the units built here count as done and are not built again)")
    if summary["kept"] == 0:
        usable = sum(c["usable"] for c in counts.values())
        raise LM.BuildError(f"no tile was kept: {usable} feature(s) lie on the rasters, but none counts for a "
                            f"tile of {cfg.tile_size} px (an area must cover --min-cover of it or lie inside "
                            "it, smaller than --max-object; a line run --min-line tile sides inside it), or "
                            f"they lie on tiles of nodata ({summary['skipped']['skipped_nodata']} tiles); lower "
                            "the thresholds or --tile-size, into a new --out" + _unmatched(counts))
    return summary


def _unmatched(counts: dict) -> str:
    """The word on features with no name that match no caption rule, or ''."""
    n = sum(c["no_rule"] for c in counts.values())
    return (f"; {n} feature(s) have no name and match no caption rule: a field of your own needs a --mapping "
            "line, e.g. 'class=*<TAB>a {value}<TAB>object' for a field named class (the rules: "
            f"{LM.DEFAULT_MAPPING.name}; see --mapping)") if n else ""


def _nothing_to_tile(counts: dict) -> str:
    """Why no tile can have a feature (none read, none captioned, none on the rasters), or ''."""
    total = {k: sum(c[k] for c in counts.values()) for k in ("read", "no_rule", "usable", "off_raster")}
    sources = ", ".join(counts)
    if total["read"] == 0:
        return (f"no feature was read from {sources}: it is empty, or --layer/--where select nothing; give a "
                "source with features")
    if total["usable"] + total["off_raster"] == 0:
        return f"none of the {total['read']} feature(s) read from {sources} can be captioned" + _unmatched(counts)
    if total["usable"] == 0:
        return (f"none of the {total['off_raster']} feature(s) with a caption from {sources} lies on the rasters "
                "once reprojected to their CRS: check that the vector sources overlap the rasters (their "
                "extents, and the CRS each layer says it is in)")
    return ""


def web_filter(args) -> dict:
    from .datasets import web_filter as WF

    if not args.shards and not args.manifest:
        raise LM.BuildError("give --shards or --manifest: the pairs to filter")
    if args.manifest and not Path(args.manifest).is_file():
        raise LM.BuildError(f"manifest {args.manifest} does not exist")
    for name in ("image_threshold", "text_threshold"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise LM.BuildError(f"--{name.replace('_', '-')} must be between 0 and 1")
    if not 0 <= args.dup_distance <= 7:
        raise LM.BuildError("--dup-distance must be 0..7")
    for name in ("batch_size", "shard_size"):
        if getattr(args, name) < 1:
            raise LM.BuildError(f"--{name.replace('_', '-')} must be at least 1")
    if args.shards:
        from .data import DataError, check_shards_exist, expand_urls
        try:    # before the model loads: a typo in a path is reported at once
            check_shards_exist(expand_urls(args.shards))
        except DataError as e:
            raise LM.BuildError(str(e)) from None
    if args.manifest:
        try:    # every line and image, before the model loads: not after the pairs above a bad line are scored
            WF.check_manifest(args.manifest)
        except ValueError as e:
            raise LM.BuildError(str(e)) from None
    if not Path(args.checkpoint).is_dir():
        raise LM.BuildError(f"checkpoint {args.checkpoint} does not exist")
    cfg = WF.FilterConfig(checkpoint=args.checkpoint, out=args.out, shards=args.shards, manifest=args.manifest,
                          eval_folders=args.eval_folders, image_threshold=args.image_threshold,
                          text_threshold=args.text_threshold, dup_distance=args.dup_distance,
                          batch_size=args.batch_size, shard_size=args.shard_size, device=args.device)
    try:
        return WF.run_filter(cfg)
    except ValueError as e:
        raise LM.BuildError(str(e)) from None


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        blocking = file_in_the_way(args.out)
        if blocking is not None:
            raise LM.BuildError(f"--out {args.out}: {blocking} is a file; give a folder (new, or an earlier run's to "
                                "resume)")
        if args.command == "filter":
            report = web_filter(args)
            c = report["counts"]
            print(f"kept {c['kept']} of {c['seen']} pairs (image score {c['low_image_score']}, text score "
                  f"{c['low_text_score']}, duplicates {c['duplicate']}, evaluation matches {c['eval_match']}, "
                  f"unreadable {c['unreadable']}) -> {args.out}")
            return 0
        summary = landmarks(args)
    except LM.BuildError as e:
        print(f"{parser.prog} {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        done = ("partial outputs are left in --out; a re-run replaces them, starting from the first pair"
                if args.command == "filter" else "finished units are kept; run again to resume")
        print(f"{parser.prog} {args.command}: interrupted ({done})", file=sys.stderr)
        return 130
    skipped = summary["skipped"]
    print(f"kept {summary['kept']} of {summary['tiles_seen']} tiles (nodata {skipped['skipped_nodata']}, no features "
          f"{skipped['skipped_no_features']}, empty captions {skipped['skipped_empty_caption']}); "
          f"{summary['shards']} shard(s), vocabulary {summary['vocabulary']} words -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
