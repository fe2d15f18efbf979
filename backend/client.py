"""`python -m backend client ...`: talk to a running SkyPrompt server from the command line.

Human-readable output by default, `--json` for scripts (shapes documented in README). Any error
exits non-zero with the server's message on stderr.
"""
from __future__ import annotations

import argparse
import errno
import json
import math
import os
import re
import signal
import sys
import tempfile
import traceback
from collections import Counter
from pathlib import Path

if __name__ == "__main__":
    # run as `python -m backend.client`: gRPC's own log lines quiet, as `python -m backend client`
    # has them (read by gRPC when it is first imported, just below)
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import grpc  # noqa: E402

from .defaults import (SAN_EXAMPLE, BUSY, DEFAULT_MIN_VALID, LONLAT_CRS, VIEW_COUNTS, VIEW_HELP, Limits, check_min_valid,
                       check_target_resolution, check_tile_overlap, token_problem)
from .files import move_without_replacing, reader_stopped_reading, staged_file, write_bytes_atomically
from .rpc import skyprompt_pb2 as pb
from .rpc import skyprompt_pb2_grpc as pb_grpc

SERVER_ENV = "SKYPROMPT_SERVER"
TOKEN_ENV = "SKYPROMPT_TOKEN"
MAX_MESSAGE = 256 * 1024 * 1024


class ClientError(Exception):
    pass


class UsageError(ClientError):
    """An option given wrongly: exit status 2, as argparse's own checks have."""


def connect(server: str, tls_ca: str | None = None) -> grpc.Channel:
    options = [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)]
    if tls_ca is not None:
        root = Path(tls_ca).read_bytes() if tls_ca else None
        if root is not None and b"-----BEGIN CERTIFICATE-----" not in root:
            raise ValueError(f"--tls-ca {tls_ca} is not a PEM certificate (it has no -----BEGIN CERTIFICATE----- "
                             "line): give the server's certificate, or its CA's")
        return grpc.secure_channel(server, grpc.ssl_channel_credentials(root_certificates=root), options=options)
    return grpc.insecure_channel(server, options=options)


def _metadata(token: str | None):
    return (("authorization", f"Bearer {token}"),) if token else ()


def _extent(values, crs: str) -> pb.Extent | None:
    if not values:
        if crs:   # an --extent-crs alone says the user meant an extent that is not there
            raise UsageError(f"--extent-crs {crs} is the CRS of --extent: give --extent XMIN YMIN XMAX YMAX "
                              "too, or leave --extent-crs out")
        return None
    xmin, ymin, xmax, ymax = values
    if xmin == xmax or ymin >= ymax:    # all zeros would reach the server as no extent at all: the whole index
        # XMIN past XMAX is an extent across 180 degrees, which only longitudes can be
        degrees = (not crs or crs.upper() in LONLAT_CRS) and all(abs(x) <= 360 for x in (xmin, xmax)) and \
            all(abs(y) <= 90 for y in (ymin, ymax))
        xs = "XMIN not XMAX (XMIN past XMAX is an extent across 180 degrees)" if degrees else "XMIN below XMAX"
        raise UsageError(f"--extent {given_numbers(values)} has no area: give XMIN YMIN XMAX YMAX with YMIN below "
                         f"YMAX and {xs}")
    return pb.Extent(xmin=xmin, ymin=ymin, xmax=xmax, ymax=ymax, crs=crs or "")


def given_numbers(values) -> str:
    """Numbers as the user typed them (to 15 digits), not rounded to 6 as %g does: 4311660, not 4.31166e+06."""
    return " ".join(f"{v:.15g}" for v in values)


def _polygon_box(wkt: str | None) -> list[float] | None:
    """The box round --within's polygon, the extent that holds it when --extent is not given."""
    if not wkt:
        return None
    import shapely

    try:
        shape = shapely.from_wkt(wkt)
    except shapely.errors.GEOSException as e:
        raise UsageError(f"--within is not WKT ({e}): give a polygon, e.g. 'POLYGON((x1 y1, x2 y2, x3 y3, x1 y1))'")
    if shape.is_empty:
        raise UsageError("--within is an empty geometry: give a polygon with its corners")
    if shape.geom_type != "Polygon" or not shape.area > 0:
        # its box would be no extent to hold it, and the word would be about an --extent not given
        raise UsageError(f"--within must be one POLYGON with an area, not {shape.wkt[:60]}: give the area's "
                         "corners, e.g. 'POLYGON((x1 y1, x2 y2, x3 y3, x1 y1))'")
    return list(shape.bounds)


def _the_short_way(wkt: str) -> str:
    """A longitude/latitude --within polygon with an edge more than 180 degrees long taken the short
    way, across 180 degrees (its longitudes then run on past 180), as --extent's xmin > xmax is: it
    went the long way round, a band round the globe that left out the area meant."""
    import numpy as np      # here, as shapely: the client's other commands start without them
    import shapely

    try:
        shape = shapely.from_wkt(wkt)
    except shapely.errors.GEOSException:
        return wkt      # said by _polygon_box, or by the server
    if shape.geom_type != "Polygon" or shape.is_empty or len(shape.interiors):
        return wkt
    ring = np.asarray(shape.exterior.coords, dtype=float)
    steps = np.diff(ring[:, 0])
    if not (np.abs(steps) > 180.0).any():
        return wkt
    unwrapped = ring.copy()
    unwrapped[:, 0] = np.unwrap(ring[:, 0], period=360.0)
    if unwrapped[:, 0].min() < -180.0:
        unwrapped[:, 0] += 360.0
    west, _, east, _ = shape.bounds
    width = np.ptp(unwrapped[:, 0])
    # only a polygon nearly round the globe whose short way is a small area (corners typed either side
    # of 180): one 200 degrees wide, a polar cap (whose ring would no longer close), or one ending on
    # 180 itself is meant as written
    if not (east - west > 270.0 and width < 90.0 and abs(unwrapped[-1, 0] - unwrapped[0, 0]) < 1e-9):
        return wkt
    turned = shapely.Polygon(unwrapped)
    return turned.wkt if turned.is_valid and turned.area > 0 else wkt


def _box(b) -> list[float]:
    return [b.xmin, b.ymin, b.xmax, b.ymax]


def _lonlat_box(message) -> list[float] | None:
    """A message's bounds_wgs84, or None where the server sent none (a CRS without longitude/latitude)."""
    return _box(message.bounds_wgs84) if message.HasField("bounds_wgs84") else None


def _with_bands(request, args):
    """`request` with its BandMapping from --bands / --stretch when given (else the server's choice)."""
    bands, stretch = getattr(args, "bands", None), getattr(args, "stretch", None)
    if bands is None and stretch is None:
        return request
    if bands is not None and min(bands) < 1:
        raise UsageError(f"--bands {' '.join(map(str, bands))}: band numbers start at 1")
    mapping = pb.BandMapping()
    if bands is not None:
        mapping.red, mapping.green, mapping.blue = bands
    if stretch is not None:
        low, high = stretch
        if not (0 <= low < high <= 100):
            raise UsageError(f"--stretch {low:g} {high:g}: give LOW then HIGH, percentiles with 0 <= LOW < HIGH <= 100")
        mapping.stretch_low_percent, mapping.stretch_high_percent = stretch
    request.bands.CopyFrom(mapping)
    return request


def server_path(path: str) -> str:
    """A raster path as the server gets it: absolute, since the server resolves paths on its own
    machine and "./x.tif" means ours; a GDAL virtual or remote name (/vsizip/..., http://...) as
    given, for the server to name as one (made absolute, "http://h/x.tif" became a local path)."""
    if not path.strip():
        raise UsageError("a raster path is empty: give the path of a raster file")
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:      # a file name in another encoding, which the request's text cannot carry
        raise ClientError(f"raster path {path!r} is not valid UTF-8, and requests carry paths as UTF-8: rename "
                          "the file (or the folder that has such a name)") from None
    if path.startswith("/vsi") or "://" in path:
        return path
    return os.path.abspath(path)


def _source(path: str) -> pb.RasterSource:
    return pb.RasterSource(path=server_path(path))


def _print_json(value) -> None:
    print(json.dumps(value, indent=2))


# ---- commands ---------------------------------------------------------------------------------

def cmd_info(stub, args) -> int:
    info = stub.GetInfo(pb.GetInfoRequest(), metadata=_metadata(args.token), timeout=args.timeout)
    data = {
        "server_version": info.server_version, "api_version": info.api_version, "model_name": info.model_name,
        "model_preset": info.model_preset, "checkpoint_hash": info.checkpoint_hash, "device": info.device,
        "image_size": info.image_size, "patch_size": info.patch_size, "embed_dim": info.embed_dim,
        "capabilities": list(info.capabilities),
        "index": {"rasters": info.index_stats.raster_count, "tiles": info.index_stats.tile_count,
                  "disk_bytes": info.index_stats.disk_bytes, "ann_active": info.index_stats.ann_active},
        "default_sao_window": info.default_sao_window.size, "default_tile_overlap": info.default_tile_overlap,
        "default_edge_radius": info.default_edge_radius, "default_index_views": info.default_index_views,
        "default_search_expand": info.default_search_expand, "default_keyword_weight": round(info.default_keyword_weight, 6),
        "limits": {f.name: getattr(info.limits, f.name) for f in info.limits.DESCRIPTOR.fields},
    }
    if args.json:
        _print_json(data)
    else:
        print(f"SkyPrompt {data['server_version']} ({data['api_version']}) at {args.server}")
        print(f"model: {data['model_name']} {data['model_preset']} on {data['device']}, "
              f"{data['image_size']}px tiles, checkpoint {data['checkpoint_hash'][:12]}")
        print(f"index: {data['index']['rasters']} rasters, {data['index']['tiles']} tiles, "
              f"{data['index']['disk_bytes'] / 1e6:.1f} MB")
        print(f"index defaults: tile overlap {data['default_tile_overlap']:g}, "
              f"{data['default_index_views']} view(s) per tile")
        expand = data["default_search_expand"]
        weight = data["default_keyword_weight"]
        print(f"search defaults: query expansion {f'from the {expand} best tiles' if expand else 'off'}, "
              f"keyword matching {f'weight {weight:g}' if weight else 'off'}")
        print(f"segment defaults: SAO window {data['default_sao_window']} patches, "
              f"edge refinement radius {data['default_edge_radius']} px")
    return 0


def cmd_index(stub, args) -> int:
    # checked once here, not refused by the server once a raster
    try:
        if args.overlap is not None:
            check_tile_overlap(args.overlap, "--overlap")
        if args.resolution is not None:
            check_target_resolution(args.resolution, "--resolution")
        if args.min_valid is not None:
            check_min_valid(args.min_valid, "--min-valid")
    except ValueError as e:
        raise UsageError(str(e)) from None
    results: list[dict] = []
    try:
        failed = _index_each(stub, args, results)
    finally:
        # rasters indexed before a failure (or Ctrl-C) stay indexed: a script still gets their JSON
        if args.json:
            _print_json(results)
    if failed:
        print(f"skyprompt client: {failed} of {len(args.rasters)} rasters could not be indexed", file=sys.stderr)
        return 1
    return 0


# failures of the connection or the whole server, not of one raster: the next raster would fail the same
# way (index and remove stop there)
STOP_INDEXING = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.CANCELLED)


def stops_all(e: grpc.RpcError) -> bool:
    """Whether a failed call is the connection's or the whole server's: one of STOP_INDEXING, or a
    server busy with as many long calls as it takes (RESOURCE_EXHAUSTED, "the server is busy")."""
    return e.code() in STOP_INDEXING or (e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                                        and (e.details() or "").startswith(BUSY))


def _index_each(stub, args, results: list[dict]) -> int:
    """Index every raster of args.rasters, appending an item per raster to `results` (a "failed" one
    for a raster that failed, which does not stop the rest). Returns how many failed."""
    failed = 0
    for path in args.rasters:
        request = _with_bands(pb.IndexRasterRequest(force=args.force, target_resolution=args.resolution or 0.0), args)
        if args.overlap is not None:
            request.tile_overlap = args.overlap
        if args.views is not None:
            request.views = args.views
        if args.min_valid is not None:
            request.min_valid_fraction = args.min_valid
        try:
            request.source.CopyFrom(_source(path))
            final = _index_one(stub, args, request, path)
        except grpc.RpcError as e:
            if stops_all(e):
                raise
            error = f"{e.code().name}: {rpc_error_detail(e, args)}"
        except ClientError as e:
            error = str(e)
        else:
            error = None
        if error is not None:
            failed += 1
            results.append({"raster_path": request.source.path or path, "raster_name": os.path.basename(path),
                            "outcome": "failed", "error": error})
            print(f"skyprompt client: {path}: {error}", file=sys.stderr)
            continue
        outcome = pb.IndexOutcome.Name(final.outcome).removeprefix("INDEX_OUTCOME_").lower()
        item = {"raster_id": final.raster_id, "raster_path": final.raster_path, "raster_name": final.raster_name,
                "outcome": outcome, "tile_count": final.tile_count, "tiles_skipped": final.tiles_skipped,
                "width": final.width, "height": final.height, "band_count": final.band_count,
                "crs": final.crs.authid or final.crs.wkt, "bounds": _box(final.bounds),
                "bounds_wgs84": _lonlat_box(final), "seconds": round(final.seconds, 3), "band_note": final.band_note}
        results.append(item)
        if not args.json:
            print(f"{item['raster_name']}: {outcome}, {item['tile_count']} tiles "
                  f"({item['tiles_skipped']} skipped as empty), id {item['raster_id']}, {item['seconds']:.1f} s")
            _print_band_note(final.band_note)
    return failed


NOTES_SHOWN = 5     # notes of one kind a search prints before it counts the rest


def crs_text(crs: str) -> str:
    """A CRS as a line of text shows it: its id ("EPSG:32611"), or for one without (JSON keeps its
    whole WKT) the name the WKT gives it, where the WKT filled a screen on every line."""
    match = re.match(r"\s*[A-Z_0-9]+\[\s*\"([^\"]*)\"", crs)
    return f"{match.group(1) or 'unnamed'!r} (a CRS with no EPSG code)" if match else crs


def _print_band_note(note: str) -> None:
    """The server's word on colour bands it had to guess (IndexResult/SegmentResult/CaptionResponse
    band_note), on stderr as the other notes."""
    if note:
        sys.stdout.flush()      # after the answer it is about, where both streams share a terminal or file
        print(f"note: {note}", file=sys.stderr)


def _index_one(stub, args, request, path: str):
    """The IndexResult of one IndexRaster call, with a progress bar in text mode."""
    bar = None
    final = None
    try:
        for progress in stub.IndexRaster(request, metadata=_metadata(args.token), timeout=args.timeout):
            if progress.done:
                final = progress.result
            elif progress.stage == pb.INDEX_STAGE_QUEUED and not args.json:
                print(f"{os.path.basename(path)}: {progress.message}", file=sys.stderr)
            elif not args.json and progress.tiles_total:
                if bar is None:
                    from tqdm import tqdm
                    bar = tqdm(total=progress.tiles_total, desc=os.path.basename(path), unit="tile", file=sys.stderr)
                bar.update(progress.tiles_done - bar.n)
        if bar is not None:
            bar.update(bar.total - bar.n)
    finally:
        if bar is not None:
            bar.close()
    if final is None:
        raise ClientError(f"the server ended the IndexRaster stream for {path} without a result")
    return final


def unfamiliar_words(words) -> list[dict]:
    """UnfamiliarWord messages as JSON objects."""
    return [{"word": w.word, "close_spellings": list(w.close_spellings)} for w in words]


def unfamiliar_note(words) -> str:
    """What to tell a user about UnfamiliarWord messages (the plugin's operations.unfamiliar_note says the same)."""
    listed = ", ".join(f"'{w.word}'" + (f" (close in spelling: {', '.join(repr(c) for c in w.close_spellings)})"
                                        if w.close_spellings else "") for w in words)
    return (f"the model rarely or never saw {listed} in training and can hardly follow "
            f"{'it' if len(words) == 1 else 'them'}; other words for the same thing may work better")


THUMBNAIL_NAME = re.compile(r"\d{3,}_tile\d+\.png")     # "001_tile42.png", as cmd_search names them


def _clear_thumbnails(folder: Path) -> int:
    """Remove the thumbnails an earlier search wrote in `folder` (only files named as this client names
    them), so its PNGs are this search's alone, not mixed with more of an earlier one. How many."""
    removed = 0
    for old in folder.glob("*_tile*.png"):
        if THUMBNAIL_NAME.fullmatch(old.name) and old.is_file():
            old.unlink()
            removed += 1
    return removed


def cmd_search(stub, args) -> int:
    for name in ("k", "expand", "like_tile"):
        if (getattr(args, name) or 0) < 0:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)} must be 0 or more")
    # a blank QUERY goes to the server, which says what is wrong with it; none at all is told here
    if bool(args.query) == (args.like_tile is not None):
        raise UsageError("give what to look for as QUERY, or --like-tile ID for tiles like one tile (not both)")
    request = pb.SearchRequest(query=args.query, k=args.k, raster_ids=args.raster_id,
                               raster_paths=[server_path(p) for p in args.raster],
                               include_thumbnails=bool(args.thumbnails), raw_query=args.raw_query)
    if args.within and (args.extent_crs or "EPSG:4326").upper() in LONLAT_CRS:
        args.within = _the_short_way(args.within)
    extent = _extent(args.extent or _polygon_box(args.within), args.extent_crs)
    if extent is not None:
        request.extent.CopyFrom(extent)
    request.extent_polygon_wkt = args.within or ""
    if args.thumbnails:
        try:    # before the search: a path that cannot be a folder is told now, naming the option
            Path(args.thumbnails).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"--thumbnails {args.thumbnails}: cannot make that folder ({e.strerror or e}); "
                              "give a folder for the PNGs") from None
        # written in now, before the search: a folder that takes no file lost the answer after it
        _check_writable_folder("--thumbnails", args.thumbnails, Path(args.thumbnails).resolve())
    if args.min_score is not None:
        request.min_score = args.min_score
    if args.expand is not None:
        request.expand = args.expand
    if args.keyword_weight is not None:
        request.keyword_weight = args.keyword_weight
    if args.like_tile is not None:
        request.like_tile_id = args.like_tile
    what = repr(args.query) if args.like_tile is None else f"tiles like tile {args.like_tile}"
    response = stub.Search(request, metadata=_metadata(args.token), timeout=args.timeout)
    replaced = _clear_thumbnails(Path(args.thumbnails)) if args.thumbnails else 0
    hits = []
    for rank, hit in enumerate(response.hits, 1):
        item = {"rank": rank, "score": round(hit.score, 6), "raster": hit.raster_path, "raster_id": hit.raster_id,
                "raster_name": hit.raster_name, "tile_id": hit.tile_id,
                "window": [hit.window.x_off, hit.window.y_off, hit.window.width, hit.window.height],
                "crs": hit.crs.authid or hit.crs.wkt, "extent": _box(hit.bounds),
                "bounds_wgs84": _lonlat_box(hit), "footprint_wkt": hit.footprint_wkt,
                "keyword_score": round(hit.keyword_score, 6), "caption": hit.caption,
                "changed_on_disk": hit.changed_on_disk, "file_state": _file_state(hit)}
        if args.thumbnails and hit.thumbnail_png:
            target = Path(args.thumbnails) / f"{rank:03d}_tile{hit.tile_id}.png"
            try:    # staged, so a failure leaves no half PNG
                write_bytes_atomically(target, hit.thumbnail_png)
            except OSError as e:
                done = sum("thumbnail" in h for h in hits)
                raise output_failure("--thumbnails", args.thumbnails, e, kept=f"{target.name} and those after it were "
                                     f"not saved" + (f", the {done} before it were" if done else "")) from None
            item["thumbnail"] = str(target.resolve())
        elif args.thumbnails and hit.thumbnail_error:
            item["thumbnail_error"] = hit.thumbnail_error
        hits.append(item)
    saved = [h["thumbnail"] for h in hits if "thumbnail" in h]
    if args.json:
        _print_json({"query": args.query, "like_tile_id": args.like_tile, "results": hits, "tiles_searched": response.tiles_searched,
                     "approximate": response.approximate, "seconds": round(response.seconds, 4),
                     "unfamiliar_words": unfamiliar_words(response.unfamiliar_words),
                     "unsearchable_rasters": [{"raster_id": r.raster_id, "raster": r.raster_path,
                                               "raster_name": r.raster_name, "reason": r.reason}
                                              for r in response.unsearchable_rasters]})
    else:
        print(f"{len(hits)} hit{'' if len(hits) == 1 else 's'} for {what} among {response.tiles_searched} tiles "
              f"({response.seconds * 1000:.1f} ms{', approximate' if response.approximate else ''})")
        for h in hits:
            b = h["extent"]
            # the tile id is what --like-tile takes; coordinates to 10 digits (degrees need decimals)
            print(f"{h['rank']:3d}. {h['score']:.3f}  {h['raster_name']} (raster id {h['raster_id']})  "
                  f"tile {h['tile_id']}  window {h['window']}  "
                  f"[{b[0]:.10g}, {b[1]:.10g}, {b[2]:.10g}, {b[3]:.10g}] {crs_text(h['crs'])}")
            if h["caption"]:
                matched = f" (keywords +{h['keyword_score']:.3f})" if h["keyword_score"] else ""
                print(f"       {h['caption']}{matched}")
        if saved:
            print(f"thumbnails saved in {Path(args.thumbnails).resolve()}"
                  + (f" (the {replaced} of an earlier search removed)" if replaced else ""))
        if response.unfamiliar_words:
            print(f"note: {unfamiliar_note(response.unfamiliar_words)}", file=sys.stderr)
    if extent is not None and not response.hits and args.min_score is None and not response.unsearchable_rasters:
        filtered = bool(args.raster or args.raster_id)
        print(f"note: {empty_extent_note(args.extent, args.extent_crs, within=bool(args.within), filtered=filtered)}",
              file=sys.stderr)
    left_out = response.unsearchable_rasters
    for r in left_out[:NOTES_SHOWN]:     # on stderr with --json too: hits are missing from the answer
        where = f" ({r.raster_path or 'raster id ' + r.raster_id})" if r.raster_path or r.raster_id else ""
        print(f"note: not searched: {r.raster_name}{where}: {r.reason}", file=sys.stderr)
    rest = sum(max(1, r.raster_count) for r in left_out[NOTES_SHOWN:])
    if rest:     # after a checkpoint change, every raster indexed: a screenful a search
        print(f"note: ... and {rest} more rasters not searched (`client list --all` shows each)", file=sys.stderr)
    stale = Counter(h.changed_on_disk for h in response.hits if h.changed_on_disk)
    for reason, count in stale.items():
        print(f"note: {count} of {len(hits)} hits show a raster as it was when indexed: {reason}", file=sys.stderr)
    if args.thumbnails:
        # (a raster changed since indexing has no thumbnails, for the reason just given)
        missing = Counter(h.thumbnail_error for h in response.hits if h.thumbnail_error and h.thumbnail_error not in stale)
        for reason, count in missing.items():
            print(f"note: no thumbnail for {count} of {len(hits)} hits: {reason}", file=sys.stderr)
    return 0


def empty_extent_note(values, crs: str, within: bool = False, filtered: bool = False) -> str:
    """Why a search in --extent (or --within, `within`) found no tile at all, and, for
    longitude/latitude, the swap to try. `filtered`: the search kept to the rasters given (--raster,
    --raster-id), whose tiles are then the ones said to lie elsewhere, not the whole index's."""
    crs = crs or "EPSG:4326"
    which = "no tile of the rasters given (--raster, --raster-id)" if filtered else "no indexed tile"
    if not values:
        return f"{which} lies in the --within polygon ({crs}); `client list` shows each indexed raster's extent"
    note = f"{which} lies in --extent {given_numbers(values)} ({crs})" + (
        " and the --within polygon" if within else "")
    xmin, ymin, xmax, ymax = values
    swapped = (ymin, xmin, ymax, xmax)
    if crs.upper() in LONLAT_CRS and swapped != tuple(values) and all(-90 <= v <= 90 for v in (xmin, xmax)):
        note += (f"; longitude comes first: if these numbers are latitude first, give --extent "
                 f"{ymin:g} {xmin:g} {ymax:g} {xmax:g}")
    return note + "; `client list` shows each indexed raster's extent"


POLYGON_DRIVERS = {".gpkg": "GPKG", ".geojson": "GeoJSON", ".json": "GeoJSON"}


def _polygon_output_ext(path: str) -> str:
    """The file's extension when write_polygons can write such a file, else ClientError."""
    ext = Path(path).suffix.lower()
    if ext not in POLYGON_DRIVERS:
        raise UsageError(f"--output {path}: use a .gpkg, .geojson or .json file name")
    if Path(path).is_dir():
        raise UsageError(f"--output {path} is a folder; give a file name")
    return ext


def _locked(path) -> bool:
    """Whether `path` is an SQLite database (a GeoPackage is one) that another program holds locked."""
    import sqlite3

    try:
        with open(path, "rb") as handle:
            if handle.read(16) != b"SQLite format 3\x00":
                return False
        db = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True, timeout=0.1)
    except (OSError, sqlite3.Error):
        return False
    try:
        db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return False
    except sqlite3.OperationalError as e:
        return "locked" in str(e)
    finally:
        db.close()


def _not_a_geopackage(path, before_the_work: bool) -> ClientError:
    """An --output GDAL cannot open as a GeoPackage: a database another program holds locked (exit 1),
    or no GeoPackage at all, which before the work is an option given wrongly (exit 2)."""
    if _locked(path):
        return ClientError(f"--output {path} cannot be opened now: another program holds it locked; close it "
                           "there, or give another file name")
    return (UsageError if before_the_work else ClientError)(
        f"--output {path} exists and is not a GeoPackage; give a new file name")


def check_polygon_output(path: str) -> str:
    """The file's extension when write_polygons can write it, else ClientError (asked before the work)."""
    ext = _polygon_output_ext(path)
    _check_output_folder("--output", path)
    if ext == ".gpkg" and Path(path).exists() and _open_gpkg(path, update=False) is None:
        raise _not_a_geopackage(path, before_the_work=True)
    if ext == ".gpkg" and Path(path).exists() and not os.access(path, os.W_OK):
        raise UsageError(f"--output {path}: this GeoPackage cannot be written to (permission denied); give another "
                         "file name, or make it writable")
    if ext != ".gpkg" and Path(path).exists():
        # a GeoJSON holds one layer: writing would replace the user's file, not add to it
        raise UsageError(f"--output {path} exists; give a new file name, or a .gpkg to add a layer to")
    return ext


def _open_gpkg(path, update: bool):
    """An existing GeoPackage opened for vector layers (one holding only raster tiles too), or None."""
    from osgeo import gdal

    from .raster import _gdal_exceptions

    # read-only, a GeoPackage with no vector table opens as a raster only
    flags = gdal.OF_VECTOR | (gdal.OF_UPDATE if update else gdal.OF_RASTER)
    with _gdal_exceptions():
        try:
            return gdal.OpenEx(str(path), flags, allowed_drivers=["GPKG"])
        except RuntimeError:
            return None


def write_polygons(path: str, results: list[pb.SegmentResult], lonlat: bool | None = None) -> tuple[int, str]:
    """Polygons of every prompt into a GeoPackage (.gpkg) or GeoJSON (.geojson/.json) in the raster's
    CRS (stage_polygons), put in place: (polygons written, layer name). A file that appeared at
    `path` meanwhile is not replaced: ClientError naming where the polygons were kept."""
    written, name, staged = stage_polygons(path, results, lonlat)
    if staged is not None:
        kept = place_output("--output", staged, Path(path))
        if kept != Path(path):
            raise ClientError(appeared_note("--output", path, kept))
    return written, name


def stage_polygons(path: str, results: list[pb.SegmentResult],
                   lonlat: bool | None = None) -> tuple[int, str, Path | None]:
    """Polygons of every prompt for a GeoPackage (.gpkg) or GeoJSON (.geojson/.json) in the raster's
    CRS: (polygons written, layer name, the staged file to put at `path` with place_output). A new file
    is made in memory and staged beside `path` by one write the client checks, so a failure (a full
    disk) leaves no half file and is said, naming the file: GDAL's writers let a failed write pass.
    An existing GeoPackage keeps its other layers: the polygons go into a new layer ("skyprompt",
    else "skyprompt (2)", ...), added in place in one transaction (nothing staged), which a failure
    rolls back."""
    from osgeo import gdal, ogr

    from .raster import _gdal_exceptions

    ext = _polygon_output_ext(path)
    if lonlat is None:      # the caller's answer of geojson_in_lonlat, where it has one
        lonlat = ext != ".gpkg" and geojson_in_lonlat(path, results)
    target = Path(path).resolve()
    if ext == ".gpkg" and target.exists():
        written, name = _add_gpkg_layer(path, target, results)
        return written, name, None
    name = "skyprompt"
    memory = f"/vsimem/skyprompt-{os.getpid()}-{id(results)}{ext}"
    try:
        with _gdal_exceptions():
            ds = ogr.GetDriverByName(POLYGON_DRIVERS[ext]).CreateDataSource(memory)
            written = _write_layer(ds, name, results, options=["RFC7946=YES"] if lonlat else [])
            ds = None  # noqa: F841 - closing writes the file
            handle = gdal.VSIFOpenL(memory, "rb")
            try:
                data = bytes(gdal.VSIFReadL(1, gdal.VSIStatL(memory).size, handle))
            finally:
                gdal.VSIFCloseL(handle)
    finally:
        gdal.Unlink(memory)
    try:
        return written, name, staged_file(Path(path), data)
    except OSError as e:
        raise output_failure("--output", path, e) from None


def _add_gpkg_layer(path: str, target: Path, results: list[pb.SegmentResult]) -> tuple[int, str]:
    """The polygons as a new layer of the existing GeoPackage `target`, in place, in one transaction:
    the user's layers stay, and a GeoPackage open elsewhere (QGIS keeps a write-ahead log beside it)
    is written through SQLite, not replaced under it. A failure rolls the layer back."""
    from osgeo import gdal

    from .raster import _gdal_exceptions

    ds = _open_gpkg(target, update=True)
    if ds is None:
        if _open_gpkg(target, update=False) is not None:
            raise ClientError(f"--output {path}: this GeoPackage cannot be opened for writing; give another "
                              "file name, or make it writable")
        raise _not_a_geopackage(path, before_the_work=False)
    contents = ds.ExecuteSQL("SELECT table_name FROM gpkg_contents")    # raster tables' names too
    taken = {row.GetField(0).casefold() for row in contents}
    ds.ReleaseResultSet(contents)
    name, n = "skyprompt", 1
    while name.casefold() in taken:            # GeoPackage layer names ignore case
        n += 1
        name = f"skyprompt ({n})"
    failure = None
    with _gdal_exceptions():
        try:
            ds.StartTransaction()
            written = _write_layer(ds, name, results, own_transaction=False)
            # the layer's spatial index and triggers, which GDAL makes as it closes, made now, in the
            # transaction: a failure there (a full disk) rolls back with the rest, and is said
            ds.FlushCache()
            ds.CommitTransaction()
        except BaseException as e:
            failure = e
    # rolled back and closed without exceptions, which a data source's closing raised as a warning:
    # SQLite may have rolled back by itself (a full disk), and closing a layer the rollback took
    # tries to make its index again; the first error is the one to tell. (The failed call's frames
    # hold the layer, and with it the data source, open.)
    gdal.PushErrorHandler("CPLQuietErrorHandler")
    try:
        gdal.ErrorReset()
        if failure is not None:
            ds.RollbackTransaction()
            traceback.clear_frames(failure.__traceback__)
        ds = None  # noqa: F841 - closing writes the file
        closing = gdal.GetLastErrorMsg() if gdal.GetLastErrorType() >= gdal.CE_Failure else ""
    finally:
        gdal.PopErrorHandler()
    if isinstance(failure, RuntimeError):
        raise ClientError(f"--output {path}: {_sqlite_cause(str(failure))}; the layer {name!r} was "
                          "not added, and the GeoPackage's other layers are as they were") from None
    if failure is None and closing:     # committed: the layer is in the file, whatever closing said
        raise ClientError(f"--output {path}: the layer {name!r} was added, but closing the file reported: "
                          f"{_sqlite_cause(closing)}; check the file in a GIS") from None
    if failure is not None:
        raise failure
    return written, name


def _sqlite_cause(text: str) -> str:
    """What a GDAL error from SQLite says went wrong, without the SQL statement it quotes (kilobytes)."""
    text = text.strip()
    cause = text.rpartition(" failed: ")[2] if " failed: " in text else text
    if "disk is full" in cause:
        return f"the disk is full ({cause})"
    if "disk I/O error" in cause:
        return f"the file could not be written ({cause}; is the disk full?)"
    return cause.splitlines()[0][:200]


# what a failed write of an output says, by errno
WRITE_FAILURES = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
                  errno.EFBIG: "the file would pass the largest size allowed here", errno.EROFS: "the disk is read-only",
                  errno.EIO: "the disk could not be written (an input/output error)"}


def output_failure(option: str, path, e: OSError, kept: str = "nothing was written") -> ClientError:
    """A failed write of an output as one line naming the option, the file and the cause."""
    cause = WRITE_FAILURES.get(e.errno, "it could not be written")
    return ClientError(f"{option} {path}: {cause} ({e.strerror or e}); {kept}")


def place_output(option: str, staged: Path, target: Path) -> Path:
    """Move the staged output to `target`, never replacing a file there: one that appeared while the
    server worked (another program, or another client given the same name) stays, and the output is
    kept beside it as "NAME (2).EXT" (or 3, ...). Where it went."""
    candidate, n = target, 1
    while True:
        try:
            move_without_replacing(staged, candidate)
            return candidate
        except FileExistsError:
            n += 1
            candidate = target.with_name(f"{target.stem} ({n}){target.suffix}")
        except OSError as e:
            staged.unlink(missing_ok=True)      # the staged copy is no output either
            raise output_failure(option, target, e, kept="it was not written") from None


def appeared_note(option: str, path, kept: Path) -> str:
    """Why an output is not where it was asked for."""
    return (f"{option} {path} appeared while the server worked (another program or client wrote it) and was left "
            f"as it is; this output was saved as {kept} instead")


def _polygon_srs(results: list[pb.SegmentResult]):
    """The raster's CRS the polygons are in (x east, y north), or None when the answer names none."""
    from osgeo import osr

    if not (results and results[0].crs.wkt):
        return None
    from .raster import crs_authid

    srs = osr.SpatialReference()
    srs.ImportFromWkt(results[0].crs.wkt)
    authid = crs_authid(srs)
    if authid.startswith("EPSG:") and not srs.GetAuthorityCode(None):
        # a WKT without its id that GDAL recognises (WKT1 files often lack it): the layer gets the EPSG
        # definition, which a GeoJSON names (its writer names no CRS without an id) as the answer does
        srs = osr.SpatialReference()
        srs.ImportFromEPSG(int(authid.partition(":")[2]))
    srs.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    return srs


def geojson_in_lonlat(path: str, results: list[pb.SegmentResult]) -> bool:
    """Whether GeoJSON --output `path` gets the polygons in longitude/latitude (RFC 7946) instead of
    the raster's CRS: GDAL's GeoJSON writer names a CRS only by its EPSG code, and without one the
    file named none, so every reader took the raster's metres for WGS 84 degrees. ClientError when
    the CRS has no transform to longitude/latitude either (a local engineering CRS)."""
    from osgeo import osr

    from .raster import crs_authid

    srs = _polygon_srs(results)
    if srs is None or crs_authid(srs):
        return False
    wgs84 = osr.SpatialReference()
    wgs84.ImportFromEPSG(4326)
    wgs84.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    try:
        transform = None if srs.IsLocal() else osr.CoordinateTransformation(srs, wgs84)
    except RuntimeError:
        transform = None
    if transform is None:
        raise ClientError(f"--output {path}: GeoJSON can name no CRS but an EPSG one, and the raster's CRS "
                          f"({results[0].crs.authid or srs.GetName() or 'unnamed'}) is a local one with no "
                          "longitude/latitude; give a .gpkg file name, which keeps any CRS")
    return True


def _write_layer(ds, name: str, results: list[pb.SegmentResult], own_transaction: bool = True,
                 options: list[str] | None = None) -> int:
    """One polygon layer `name` in the open data source: a feature per polygon of every prompt
    (in a layer transaction of its own unless the caller holds the data source's)."""
    from osgeo import ogr

    written = 0
    srs = _polygon_srs(results)
    # multi: a region whose pixels touch only at corners is one feature of several parts
    layer = ds.CreateLayer(name, srs=srs, geom_type=ogr.wkbMultiPolygon, options=options or [])
    for field, kind in (("prompt", ogr.OFTString), ("score", ogr.OFTReal), ("max_score", ogr.OFTReal),
                        ("area", ogr.OFTReal), ("area_m2", ogr.OFTReal)):
        layer.CreateField(ogr.FieldDefn(field, kind))
    if own_transaction:
        layer.StartTransaction()
    for result in results:
        for polygon in result.polygons:
            feature = ogr.Feature(layer.GetLayerDefn())
            feature.SetField("prompt", result.prompt)
            feature.SetField("score", float(polygon.score))
            feature.SetField("max_score", float(polygon.max_score))
            feature.SetField("area", float(polygon.area))
            feature.SetField("area_m2", float(polygon.area_m2))
            feature.SetGeometry(ogr.ForceToMultiPolygon(ogr.CreateGeometryFromWkb(bytes(polygon.wkb))))
            layer.CreateFeature(feature)
            written += 1
    if own_transaction:
        layer.CommitTransaction()
    return written


def unmeasured_polygons(results: list[pb.SegmentResult]) -> int:
    """Polygons with no known ground area (area_m2 0 for a positive area, as where the raster's CRS
    has no transform to longitude/latitude): a minimum area in square metres keeps them."""
    return sum(1 for result in results for polygon in result.polygons if polygon.area_m2 <= 0 < polygon.area)


MIN_AREA_CAPABILITY = "min_area_m2"


def _check_output_folder(option: str, path: str) -> None:
    """ClientError unless the folder an output goes in exists: it is not made for it, so a mistyped
    folder is said before the work instead of made, with the file lost in it."""
    if os.path.islink(path) and not os.path.exists(path):
        raise UsageError(f"{option} {path} is a link to {os.readlink(path)}, which does not exist; give another "
                         "path, or remove the link")
    folder = Path(path).resolve().parent
    if not folder.is_dir():
        raise UsageError(f"{option} {path}: its folder does not exist; make it first, or give another path")
    _check_writable_folder(option, path, folder)


def _check_writable_folder(option: str, given: str, folder: Path) -> None:
    """UsageError naming `option` and what was `given` for it unless a file can be made in `folder`."""
    try:    # by writing there: permission bits do not tell for root, nor on a read-only or special file system
        with tempfile.TemporaryFile(dir=folder, prefix=".skyprompt-check-"):
            pass
    except OSError as e:
        where = "this folder" if folder == Path(given).resolve() else f"its folder {folder}"
        raise UsageError(f"{option} {given}: {where} cannot be written in ({e.strerror or e}); give "
                         "another path") from None


def relevance_map_paths(stem: str, prompts: int) -> list[Path]:
    """Where --relevance-map STEM saves each prompt's map: STEM itself for one prompt, else
    STEM_0.tif, STEM_1.tif, ... (numbered in prompt order)."""
    path = Path(stem)
    return [path] if prompts == 1 else [path.with_name(f"{path.stem}_{i}{path.suffix}") for i in range(prompts)]


def check_relevance_map_outputs(stem: str, prompts: int) -> None:
    """ClientError, before any work, for relevance-map files that could not be written as asked."""
    if Path(stem).suffix.lower() not in (".tif", ".tiff"):
        raise UsageError(f"--relevance-map {stem}: the maps are GeoTIFFs; give a name ending in .tif")
    _check_output_folder("--relevance-map", stem)
    taken = [str(p) for p in relevance_map_paths(stem, prompts) if os.path.lexists(p)]   # a dangling link too
    if taken:
        raise UsageError(f"--relevance-map: {', '.join(taken)} exist(s); give a new name (files are never replaced)")


def cmd_segment(stub, args) -> int:
    # outputs are checked before the server works, not after
    if args.output:
        check_polygon_output(args.output)
    if args.relevance_map:
        check_relevance_map_outputs(args.relevance_map, len(args.prompt))
    if not math.isfinite(args.min_area) or args.min_area < 0:
        raise UsageError(f"--min-area {args.min_area:g}: give 0 or a positive area in square metres")
    if args.threshold is not None and not (math.isfinite(args.threshold) and 0.0 <= args.threshold <= 1.0):
        raise UsageError(f"--threshold {args.threshold:g} must be a relevance in [0, 1]")
    if args.edge_radius is not None and args.edge_radius < 0:
        raise UsageError(f"--edge-radius {args.edge_radius} must be 0 (no edge refinement) or a radius in pixels")
    if args.window < 0:
        raise UsageError(f"--window {args.window} must be 0 (the server's) or an odd number of patches (1, 3, 5, ...)")
    if args.resolution is not None:
        try:
            check_target_resolution(args.resolution, "--resolution")
        except ValueError as e:
            raise UsageError(str(e)) from None
    if args.min_area > 0:
        info = stub.GetInfo(pb.GetInfoRequest(), metadata=_metadata(args.token), timeout=args.timeout)
        if MIN_AREA_CAPABILITY not in info.capabilities:
            # an older server ignores the field it does not know: every small polygon would come back
            raise ClientError(f"the server at {args.server} does not apply --min-area (it predates "
                              "SegmentRequest.min_area_m2): update it, or leave --min-area out")
    # min_area_m2, not min_area: that one is in map units squared (square degrees on a lon/lat raster)
    request = pb.SegmentRequest(source=_source(args.raster), prompts=args.prompt, min_area_m2=args.min_area,
                                include_wkt=args.json, return_relevance_map=bool(args.relevance_map),
                                target_resolution=args.resolution or 0.0, raw_prompts=args.raw_prompts)
    _with_bands(request, args)
    extent = _extent(args.extent, args.extent_crs)
    if extent is not None:
        request.extent.CopyFrom(extent)
    if args.threshold is not None:
        request.threshold = args.threshold
    if args.window:
        request.sao_window.size = args.window
    if args.edge_radius is not None:
        request.edge_radius = args.edge_radius
    results = []
    bar = None
    try:
        for event in stub.Segment(request, metadata=_metadata(args.token), timeout=args.timeout):
            if event.HasField("result"):
                results.append(event.result)
            elif not args.json and event.progress.tiles_total:
                if bar is None:
                    from tqdm import tqdm
                    bar = tqdm(total=event.progress.tiles_total, desc="segment", unit="tile", file=sys.stderr)
                bar.update(event.progress.tiles_done - bar.n)
    finally:
        if bar is not None:     # also on a failure: its message then starts a line of its own
            bar.close()
    unmeasured = unmeasured_polygons(results) if args.min_area > 0 else 0
    if unmeasured:
        print(f"note: {unmeasured} polygon(s) have no known area in square metres (as where the raster's CRS has no "
              f"longitude/latitude) and were kept whatever their size", file=sys.stderr)
    lonlat = bool(args.output) and _polygon_output_ext(args.output) != ".gpkg" and geojson_in_lonlat(args.output, results)
    # the maps are staged beside their names and put in place with the polygons once all are written:
    # a failure leaves neither, nor half of the maps
    staged, moved = [], []
    try:
        if args.relevance_map:
            targets = relevance_map_paths(args.relevance_map, len(args.prompt))
            for r in results:
                try:
                    staged.append(("--relevance-map", staged_file(targets[r.prompt_index], r.relevance_map_tiff),
                                   targets[r.prompt_index]))
                except OSError as e:
                    raise output_failure("--relevance-map", targets[r.prompt_index], e) from None
        written, layer_name, polygons = stage_polygons(args.output, results, lonlat) if args.output else (0, None, None)
        if polygons is not None:
            staged.insert(0, ("--output", polygons, Path(args.output)))
        placed = {}
        for option, tmp, target in staged:
            placed[target] = place_output(option, tmp, target)
            if placed[target] != target:
                moved.append(appeared_note(option, target, placed[target]))
    finally:
        for _, tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    relevance_maps = [str(placed[target].resolve()) for option, _, target in staged if option == "--relevance-map"]
    output = placed.get(Path(args.output), Path(args.output)) if args.output else None
    out = {"raster": os.path.abspath(args.raster), "output": str(output.resolve()) if output else None,
           "layer": layer_name, "output_crs": "EPSG:4326" if lonlat else None,
           "crs": (results[0].crs.authid or results[0].crs.wkt) if results else "", "polygons_written": written,
           "band_note": results[0].band_note if results else "",
           "results": [
               {"prompt": r.prompt, "prompt_index": r.prompt_index, "extent": _box(r.extent),
                "max_relevance": round(r.max_relevance, 6), "dropped_small": r.dropped_small,
                "unfamiliar_words": unfamiliar_words(r.unfamiliar_words),
                "polygons": [{"score": round(p.score, 6), "max_score": round(p.max_score, 6), "area": p.area,
                              "area_m2": p.area_m2, "bounds": _box(p.bounds), "wkt": p.wkt} for p in r.polygons]}
               for r in results]}
    if args.json:
        _print_json(out)
    else:
        for r in out["results"]:
            area = sum(p["area"] for p in r["polygons"])
            known = r["polygons"] and all(p["area_m2"] > 0 for p in r["polygons"])  # 0: no ground area
            area_m2 = f" ({sum(p['area_m2'] for p in r['polygons']):.1f} m^2)" if known else ""
            dropped = f", {r['dropped_small']} smaller than --min-area dropped" if r["dropped_small"] else ""
            # to 4 significant digits: square degrees of a longitude/latitude raster are tiny numbers
            print(f"{r['prompt']!r}: {len(r['polygons'])} polygons, total area {area:.4g} map units^2"
                  f"{area_m2}, max relevance {r['max_relevance']:.2f}{dropped}")
        for r in results:
            if r.unfamiliar_words:
                print(f"note: {unfamiliar_note(r.unfamiliar_words)}", file=sys.stderr)
        _print_band_note(out["band_note"])
        if args.output:
            crs = ("EPSG:4326, longitude/latitude: GeoJSON names no CRS without an EPSG code, and the raster's "
                   "has none; a .gpkg keeps it") if lonlat else crs_text(out["crs"])
            print(f"wrote {written} polygons to {out['output']}, layer {layer_name!r} ({crs})")
        if relevance_maps:
            print(f"relevance map(s) saved: {', '.join(relevance_maps)}")
    for note in moved:      # after the answer, which names where each output went
        sys.stdout.flush()
        print(f"skyprompt client: {note}", file=sys.stderr)
    return 1 if moved else 0


def cmd_caption(stub, args) -> int:
    if args.max_len is not None and args.max_len < 1:
        raise UsageError(f"--max-len {args.max_len} must be at least 1")
    if args.beam < 1:
        raise UsageError(f"--beam {args.beam} must be at least 1")
    request = _with_bands(pb.CaptionRequest(source=_source(args.raster), max_len=args.max_len or 0, beam_size=args.beam),
                          args)
    extent = _extent(args.extent, args.extent_crs)
    if extent is not None:
        request.extent.CopyFrom(extent)
    response = stub.Caption(request, metadata=_metadata(args.token), timeout=args.timeout)
    if args.json:
        _print_json({"caption": response.caption, "mean_log_prob": response.mean_log_prob,
                     "extent": _box(response.extent), "crs": response.crs.authid or response.crs.wkt,
                     "seconds": round(response.seconds, 3), "band_note": response.band_note})
    else:
        print(response.caption)
        _print_band_note(response.band_note)
    return 0


def cmd_remove(stub, args) -> int:
    """Remove each of args.rasters; one that fails (not indexed, a typo) is reported and the rest are
    still removed, as `index` goes on past a raster that fails."""
    removed, failed = [], 0
    for item in args.rasters:
        # digits are an id, unless a file here has that name (a raster called "2020")
        by_id = item.isascii() and item.isdigit() and not os.path.exists(item)
        try:
            request = pb.RemoveRasterRequest(raster_id=item) if by_id else \
                pb.RemoveRasterRequest(raster_path=server_path(item))
            r = stub.RemoveRaster(request, metadata=_metadata(args.token), timeout=args.timeout)
        except (grpc.RpcError, ClientError) as e:
            if isinstance(e, grpc.RpcError) and stops_all(e):
                raise
            failed += 1
            error = f"{e.code().name}: {rpc_error_detail(e, args)}" if isinstance(e, grpc.RpcError) else str(e)
            removed.append({"raster": item, "outcome": "failed", "error": error})
            print(f"skyprompt client: {item}: {error}", file=sys.stderr)
            continue
        removed.append({"raster_id": r.raster_id, "raster_name": r.raster_name, "tiles_removed": r.tiles_removed,
                        "indexing_stopped": r.indexing_stopped, "outcome": "removed"})
        if args.json:
            continue
        if r.raster_id:
            print(f"removed {r.raster_name} (id {r.raster_id}, {r.tiles_removed} tiles) from the index"
                  + ("; the indexing of it under way was stopped" if r.indexing_stopped else ""))
        else:
            print(f"stopped the indexing of {r.raster_name} under way; it had no tiles in the index yet")
    if args.json:
        _print_json(removed)
    if failed:
        print(f"skyprompt client: {failed} of {len(args.rasters)} rasters could not be removed", file=sys.stderr)
        return 1
    return 0


def _file_state(message) -> str:
    """FileState as JSON words: "unchanged", "changed", "missing", "pixels" ("unspecified" from an
    older server, or for a hit whose raster was removed while the search ran)."""
    return pb.FileState.Name(message.file_state).removeprefix("FILE_STATE_").lower()


def cmd_list(stub, args) -> int:
    response = stub.ListRasters(pb.ListRastersRequest(all_checkpoints=args.all), metadata=_metadata(args.token),
                                timeout=args.timeout)
    rasters = [{"raster_id": r.raster_id, "raster_path": r.raster_path, "raster_name": r.raster_name,
                "tile_count": r.tile_count, "crs": r.crs.authid or r.crs.wkt, "bounds": _box(r.bounds),
                "bounds_wgs84": _lonlat_box(r),
                "current_checkpoint": r.current_checkpoint, "indexed_at": r.indexed_at,
                "changed_on_disk": r.changed_on_disk, "file_state": _file_state(r)} for r in response.rasters]
    if args.json:
        _print_json(rasters)
        return 0
    print(f"{len(rasters)} raster(s) in the index" + ("" if args.all else " for the server's checkpoint"))
    for r in rasters:
        other = "" if r["current_checkpoint"] else "  (another checkpoint: not searched)"
        print(f"{r['raster_id']:>6}  {r['raster_name']}  {r['tile_count']} tiles  {crs_text(r['crs'])}  "
              f"{r['raster_path'] or '(pixels sent by a client)'}{other}")
        if r["changed_on_disk"]:
            print(f"        note: {r['changed_on_disk']}")
    return 0


COMMANDS = {"info": cmd_info, "list": cmd_list, "remove": cmd_remove, "index": cmd_index, "search": cmd_search, "segment": cmd_segment, "caption": cmd_caption}


def _add_connection_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """The options every command shares. They go on the client parser (with their defaults) and on
    each command's (defaults suppressed), so they may come before or after the command: a value
    given after it wins, and one given before it is not reset by the command's defaults."""
    def default(value):
        return value if defaults else argparse.SUPPRESS

    parser.add_argument("--server", default=default(os.environ.get(SERVER_ENV, "127.0.0.1:50051")),
                        help=f"host:port of the server (default 127.0.0.1:50051; env {SERVER_ENV})")
    parser.add_argument("--token", default=default(os.environ.get(TOKEN_ENV)), help=f"bearer token (env {TOKEN_ENV})")
    parser.add_argument("--tls", action="store_true", default=default(False),
                        help="use TLS, trusting the system's root certificates (see --tls-ca for a CA of your own)")
    # a value is required: an optional one would take a raster path that follows as the CA file
    parser.add_argument("--tls-ca", default=default(None), metavar="PEM",
                        help="use TLS, trusting this CA certificate (a PEM file; for the system's roots: --tls)")
    parser.add_argument("--json", action="store_true", default=default(False),
                        help="print JSON (for scripts) instead of text")
    parser.add_argument("--timeout", type=float, default=default(None),
                        help="give up on a call after this many seconds (index: on each raster; default: wait as "
                             "long as the work takes)")


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    _add_connection_options(parser, defaults=True)
    common = argparse.ArgumentParser(add_help=False)
    _add_connection_options(common, defaults=False)
    extent = argparse.ArgumentParser(add_help=False)
    extent.add_argument("--extent", nargs=4, type=float, metavar=("XMIN", "YMIN", "XMAX", "YMAX"),
                        help="area to work on (default: the whole raster)")
    extent.add_argument("--extent-crs", default="", help="CRS of --extent (default: the raster's own CRS)")
    bands = argparse.ArgumentParser(add_help=False)
    bands.add_argument("--bands", nargs=3, type=int, metavar=("RED", "GREEN", "BLUE"),
                       help="1-based bands to show the model as red, green, blue, e.g. 3 2 1 for a sensor "
                            "stored blue-green-red-NIR (default: the bands marked red/green/blue, else the first "
                            "three, with a note naming them when four or more bands mark no colour)")
    bands.add_argument("--stretch", nargs=2, type=float, metavar=("LOW", "HIGH"),
                       help="percentiles of the linear stretch (default 2 98, applied to non-8-bit data only; "
                            "given, it applies to 8-bit data too)")

    sub = parser.add_subparsers(dest="client_command", required=True, metavar="COMMAND")
    sub.add_parser("info", parents=[common], help="describe the server, its model and index")
    p = sub.add_parser("index", parents=[common, bands], help="index rasters for search")
    p.add_argument("rasters", nargs="+", metavar="RASTER", help="raster files as paths on the server's machine (a relative path is made absolute here, "
                        "against this folder)")
    p.add_argument("--force", action="store_true", help="re-index even if unchanged")
    p.add_argument("--overlap", type=float, default=None, help="tile overlap fraction in [0, 0.9)")
    p.add_argument("--resolution", type=float, default=None,
                   help="ground size of one pixel of the tiles the model sees, in the raster's map units (metres "
                        "for UTM, degrees for EPSG:4326); default: the raster's own pixels")
    p.add_argument("--views", type=int, default=None, choices=VIEW_COUNTS, metavar="N",
                   help=f"views per tile, their embeddings averaged: {VIEW_HELP}; more views search a little "
                        "better and index N times slower (default: the server's, see `client info`)")
    p.add_argument("--min-valid", type=float, default=None, metavar="F",
                   help="fraction of a tile that must be valid (not nodata, not transparent) for it to be stored, "
                        f"in (0, 1] (default {DEFAULT_MIN_VALID:g}); lower keeps the tiles along a ragged "
                        "nodata edge, whose imagery is otherwise in no tile (or give --overlap 0.5)")
    p = sub.add_parser("list", parents=[common], help="the indexed rasters with their ids")
    p.add_argument("--all", action="store_true", help="also rasters indexed with another checkpoint")
    p = sub.add_parser("remove", parents=[common], help="drop rasters from the index (the files stay)")
    p.add_argument("rasters", nargs="+", metavar="RASTER",
                   help="raster ids (from list or index) or paths; a name that is both a number and a file here is the file")
    p = sub.add_parser("search", parents=[common], help="find indexed tiles matching a text")
    p.add_argument("query", nargs="?", default="", help="what to look for, e.g. \"tennis courts\" (or --like-tile)")
    p.add_argument("--like-tile", type=int, default=None, metavar="ID",
                   help="instead of a query: tiles that look like this one (a tile_id from an earlier search), "
                        "for when words fail")
    p.add_argument("--k", type=int, default=10, help="number of hits (default 10; 0 = the server's default, 10)")
    p.add_argument("--raster-id", action="append", default=[], help="only this raster id (repeatable)")
    p.add_argument("--raster", action="append", default=[], help="only this raster path (repeatable)")
    p.add_argument("--extent", nargs=4, type=float, metavar=("XMIN", "YMIN", "XMAX", "YMAX"),
                   help="only tiles intersecting this box")
    p.add_argument("--extent-crs", default="", help="CRS of --extent and --within (default EPSG:4326 lon/lat)")
    p.add_argument("--within", metavar="WKT", default=None,
                   help="only tiles meeting this polygon (WKT POLYGON in --extent-crs), e.g. an area of interest or a "
                        "rotated view; --extent, if given, must hold it (default: the polygon's box)")
    p.add_argument("--min-score", type=float, default=None, help="drop hits below this cosine similarity")
    p.add_argument("--thumbnails", metavar="DIR", default=None, help="save a PNG of each hit into DIR, as NNN_tile<ID>.png, e.g. 001_tile71.png (those of an earlier "
                        "search there are removed first; other files stay)")
    p.add_argument("--raw-query", action="store_true",
                   help="embed the query as typed (default: averaged over phrasings such as "
                        "\"an aerial photo of QUERY.\", which ranks better)")
    p.add_argument("--expand", type=int, default=None, metavar="N",
                   help="query expansion: rank, move the query toward the mean embedding of its N best tiles, "
                        "rank again; brings up more tiles like the best hits (scores are then similarities "
                        "to the expanded query; default: the server's, see `info`; 0 = off)")
    p.add_argument("--keyword-weight", type=float, default=None, metavar="W",
                   help="keyword matching: the query's words looked up in each tile's caption (written by the "
                        "model at indexing), added to the similarity with weight W (0 = embeddings alone; "
                        "default: the server's, see `info`)")
    p = sub.add_parser("segment", parents=[common, extent, bands], help="turn prompts into polygons")
    p.add_argument("--raster", required=True, help="raster file")
    p.add_argument("--prompt", action="append", required=True,
                   help=f"what to outline (repeatable, up to {Limits().max_prompts} prompts a call)")
    p.add_argument("--output", default=None, help="write polygons to this .gpkg, .geojson or .json (in the raster's CRS; a GeoJSON "
                        "of a raster whose CRS has no EPSG code is in longitude/latitude, EPSG:4326; an existing "
                        ".gpkg gets a new layer, an existing GeoJSON is refused)")
    p.add_argument("--threshold", type=float, default=None, help="relevance threshold in [0, 1] (default 0.5)")
    p.add_argument("--min-area", type=float, default=0.0, metavar="M2",
                   help="drop each polygon smaller than this many square metres (ground area, whatever "
                        "the raster's CRS, as in the plugin; one with no known ground area is kept; "
                        "default 0: keep all)")
    p.add_argument("--window", type=int, default=0, help="SAO window in patches (default: the server's)")
    p.add_argument("--edge-radius", type=int, default=None, metavar="PIXELS",
                   help="radius of the edge refinement that makes masks follow the image's edges, in pixels "
                        "of the working grid (default: the server's, see `info`; 0 = off)")
    p.add_argument("--resolution", type=float, default=None,
                   help="work at this ground size of a pixel, in the raster's map units (metres for UTM, degrees "
                        "for EPSG:4326); default: the raster's own pixels")
    p.add_argument("--relevance-map", default=None, metavar="TIF",
                   help="also save each prompt's relevance map as a GeoTIFF: TIF itself for one prompt, else "
                        "TIF's name with _0, _1, ... (prompt order); existing files are not replaced")
    p.add_argument("--raw-prompts", action="store_true",
                   help="embed each prompt as typed (default: averaged over phrasings, as search does)")
    p = sub.add_parser("caption", parents=[common, extent, bands], help="describe an area in words")
    p.add_argument("--raster", required=True, help="raster file")
    p.add_argument("--max-len", type=int, default=None,
                   help="most tokens to generate (default: the server's, 32 or the model's text context less one)")
    p.add_argument("--beam", type=int, default=3, help="beam width (default 3; 1 = greedy)")
    for command in sub.choices.values():
        # argparse takes only "-2" and "-2.5" for negative numbers: "--extent -2e7 ..." was an unknown option
        command._negative_number_matcher = NEGATIVE_NUMBER


NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
SERVER_ADDRESS = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[^\s:\[\]/]+):(\d{1,5})")


def check_server_address(server: str) -> str | None:
    """What is wrong with --server, or None: host:port with a port 1..65535 ([v6]:port; gRPC's own
    target forms such as unix:PATH or dns:///host:port are passed on as they are)."""
    if server.startswith(("unix:", "unix-abstract:", "dns:", "ipv4:", "ipv6:")):
        return None
    m = SERVER_ADDRESS.fullmatch(server.strip())
    if not m or not 1 <= int(m.group(2)) <= 65535:
        return f"--server {server!r}: give host:port with a port from 1 to 65535, e.g. 127.0.0.1:50051"
    return None


# gRPC's texts for a TLS handshake the peer ended ("Handshake read failed (Socket closed)", "(recvmsg:Connection
# reset by peer (104))"): the server, not its certificate, is the matter
CLOSED_IN_HANDSHAKE = re.compile(r"socket closed|connection reset|broken pipe|end of file|eof")
# and for a certificate the client does not trust
CERTIFICATE_REFUSED = re.compile(r"certificate|unknown ca|self.signed|unable to get local issuer")


def rpc_error_detail(e: grpc.RpcError, args: argparse.Namespace) -> str:
    """A failed call's message, with a hint at the likely cause where the message alone gives none."""
    code = e.code()
    detail = e.details() or ""
    low = detail.lower()
    if code == grpc.StatusCode.UNAVAILABLE and "wrong_version_number" in low:
        detail += f" (the server at {args.server} does not serve TLS: leave out --tls and --tls-ca)"
    elif "hostname verification" in low or "does not match ssl server name" in low:
        detail += (f" (the server's certificate does not name {args.server.rsplit(':', 1)[0]} in its "
                   f"subjectAltName, the only part of it gRPC checks (a subject CN is not read): connect by a name "
                   f"or address its subjectAltName holds, or make the certificate with one, e.g. {SAN_EXAMPLE})")
    elif code == grpc.StatusCode.UNAVAILABLE and "handshake" in low and CLOSED_IN_HANDSHAKE.search(low):
        detail += (f" (the server at {args.server} closed the connection during the TLS handshake: it is not "
                   "running or is restarting, or a tunnel to it is up but its far end is not; check that the "
                   "server runs, see its log)")
    elif code == grpc.StatusCode.UNAVAILABLE and CERTIFICATE_REFUSED.search(low) and args.tls_ca:
        detail += (f" (TLS failed: the server's certificate is not signed by --tls-ca {args.tls_ca}, nor is it "
                   "that certificate: give the server's own certificate or its CA's)")
    elif code == grpc.StatusCode.UNAVAILABLE and CERTIFICATE_REFUSED.search(low):
        detail += (" (TLS failed: a server whose certificate is self-signed or from a CA of your own needs "
                   "that certificate: --tls-ca PEM)")
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED and args.timeout:
        detail += (f" (the call took longer than --timeout {args.timeout:g} s: give a larger one, or leave it "
                   "out to wait as long as the work takes)")
    elif code == grpc.StatusCode.UNAVAILABLE and "failed parsing http/2" in low:
        detail += (f" (something other than a SkyPrompt server answers at {args.server}, a web server for "
                   "one: check the port)")
    elif code == grpc.StatusCode.UNAVAILABLE and "stream removed" in low:
        detail += (f" (the server at {args.server} stopped answering in the middle of the call: it may have "
                   "crashed or been killed, see its log; start it again)")
    elif code == grpc.StatusCode.UNAVAILABLE and "socket closed" in low and not (args.tls or args.tls_ca):
        detail += (f" (is the server running at {args.server}? if it serves TLS, add --tls or "
                   "--tls-ca PEM)")
    elif code == grpc.StatusCode.UNAVAILABLE and ("resolving" in low or "dns resolution" in low):
        detail += (f" (no such host: check the host name in --server {args.server}; is the server running "
                   "there?)")
    elif code == grpc.StatusCode.UNAVAILABLE and ("connect" in low or "unavailable" in low):
        detail += f" (is the server running at {args.server}? start it with: python -m backend serve)"
    elif code == grpc.StatusCode.CANCELLED:     # not ours (Ctrl-C is handled in run_client): the server's
        detail += " (the server cancelled the call, perhaps because it was stopped)"
    return detail


def _stdout_failed(e: OSError) -> bool:
    """Whether `e`, out of a command, is standard output's failed write (a full disk under a
    redirection): the commands' own files say their failures as ClientError, naming the file, and
    an OSError of a file has its name."""
    if e.filename is None and e.errno in WRITE_FAILURES:
        return True
    try:    # what it holds unwritten fails again
        sys.stdout.flush()
        return False
    except OSError:
        return True


def _stdout_name() -> str:
    """Where standard output goes, where the system says (Linux), for the message of a failed write."""
    try:
        return f"({os.path.realpath(os.readlink('/proc/self/fd/1'))})"
    except OSError:
        return ""


def _interrupted(signum, frame):
    """Ctrl-C: a KeyboardInterrupt once. A second press while the client stops is ignored: raised
    inside gRPC's clean-up, it printed a traceback and could leave the client hanging."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def run_client(args: argparse.Namespace) -> int:
    problem = check_server_address(args.server)
    if problem:
        print(f"skyprompt client: {problem}", file=sys.stderr)
        return 2
    given = any(a == "--token" or a.startswith("--token=") for a in sys.argv[1:])
    problem = token_problem(args.token, "--token" if given or args.token != os.environ.get(TOKEN_ENV)
                            else f"${TOKEN_ENV}")
    if problem:
        print(f"skyprompt client: {problem}", file=sys.stderr)
        return 2
    if args.tls_ca == "":
        print("skyprompt client: --tls-ca needs a PEM file; for the system's root certificates give --tls",
              file=sys.stderr)
        return 2
    if args.timeout is not None and not (math.isfinite(args.timeout) and args.timeout > 0):
        print(f"skyprompt client: --timeout {args.timeout:g}: give a positive number of seconds, or leave it out "
              "to wait as long as the work takes", file=sys.stderr)
        return 2
    try:
        channel = connect(args.server, args.tls_ca if args.tls_ca is not None else ("" if args.tls else None))
    except OSError as e:
        print(f"skyprompt client: cannot read --tls-ca: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"skyprompt client: {e}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, _interrupted)
    with channel:
        stub = pb_grpc.SkyPromptStub(channel)
        try:
            status = COMMANDS[args.client_command](stub, args)
            sys.stdout.flush()      # here, where a reader that stopped reading is handled (below)
            return status
        except grpc.RpcError as e:
            print(f"skyprompt client: {e.code().name}: {rpc_error_detail(e, args)}", file=sys.stderr)
            return 1
        except BrokenPipeError:
            reader_stopped_reading()
            return 0
        except UsageError as e:
            print(f"skyprompt client: {e}", file=sys.stderr)
            return 2
        except OSError as e:
            if _stdout_failed(e):
                print(f"skyprompt client: {output_failure('standard output', _stdout_name(), e, kept='the answer was not written')}",
                      file=sys.stderr)
                reader_stopped_reading()    # the interpreter's last flush would fail the same way
            else:
                print(f"skyprompt client: {e}", file=sys.stderr)
            return 1
        except (ClientError, RuntimeError) as e:
            print(f"skyprompt client: {e}", file=sys.stderr)
            return 1
        except ValueError as e:     # a number the request's field cannot hold, e.g. --k 4294967296
            print(f"skyprompt client: {e}; check the numbers given (see --help)", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            # the process ends here, without closing the channel: gRPC's close could take the
            # interrupt again and hang for good, waiting on the call it broke off. The connection
            # closes with the process, and the server drops the work in progress (it watches for that)
            print("skyprompt client: interrupted; the server cancels the call in progress", file=sys.stderr)
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            os._exit(130)


if __name__ == "__main__":
    from .__main__ import main

    sys.exit(main(["client", *sys.argv[1:]]))
