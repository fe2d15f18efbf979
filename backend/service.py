"""The skyprompt.v1.SkyPrompt gRPC service: requests checked, work done, errors mapped to status codes.

Every handler validates its request first (INVALID_ARGUMENT with the field named), then does its
work through the shared `ModelEngine` (batched model queue) and `TileIndex`. Exceptions of the
backend's own kinds (RasterError, TileIndexError, EngineError) become the gRPC status their
`kind` names; anything else is a bug and becomes INTERNAL with what failed. The server keeps
serving after every error.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import queue
import sqlite3
import threading
import time
import unicodedata
from functools import wraps
from typing import NamedTuple

import grpc
import numpy as np
import shapely
import shapely.affinity
from PIL import Image

from .engine import EngineError, ModelEngine, out_of_memory
from .index import (DB_NAME, EXPAND_WEIGHT, SearchHits, TileIndex, TileIndexError, crosses_antimeridian,
                    expanded_queries, normalise_raster_path, raster_identity)
from .raster import (NO_VALID_PIXELS, BandMapping, Raster, RasterError, bounds_from_geotransform, densified_box,
                     lonlat_ring, open_raster, parse_crs, raster_from_pixels, shares_ground, sources_digest_of,
                     transform_bounds, transform_points_quietly, transformation, unwrap_longitudes, world_width)
from .rpc import skyprompt_pb2 as pb
from .rpc import skyprompt_pb2_grpc as pb_grpc
from .defaults import (API_VERSION, BUSY, DEFAULT_INDEX_VIEWS, DEFAULT_KEYWORD_WEIGHT, DEFAULT_MIN_VALID,
                       DEFAULT_SAO_WINDOW, DEFAULT_SEARCH_EXPAND, DEFAULT_THRESHOLD, KEYWORD_POOL, LONLAT_CRS,
                       SEGMENTS_AT_ONCE, Limits, check_edge_radius, check_expand, check_keyword_weight,
                       check_min_valid, check_target_resolution, check_tile_overlap, check_views, edge_radius_for)
from .keywords import keyword_bonus
from .segment import crop_to_window, raise_if_cancelled, relevance_geotiff, segment

log = logging.getLogger("skyprompt.server")

DEFAULT_TILE_OVERLAP = 0.0       # search tiles side by side: each ground point in one tile
DEFAULT_SEGMENT_OVERLAP = 0.125  # segmentation tiles overlap so seams can be blended away
INDEX_BATCH = 32                 # tiles read ahead and embedded together
PROGRESS_INTERVAL_S = 0.25       # at most four progress messages a second

_STATUS = {
    "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "permission_denied": grpc.StatusCode.PERMISSION_DENIED,
    "resource_exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "aborted": grpc.StatusCode.ABORTED,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "cancelled": grpc.StatusCode.CANCELLED,
    "internal": grpc.StatusCode.INTERNAL,
}


def server_version() -> str:
    try:
        from importlib.metadata import version
        return version("skyprompt")
    except Exception:  # noqa: BLE001 - running from a source tree without installing
        return "0.1.0"


class RequestError(Exception):
    """A request that fails validation; `kind` names the gRPC status."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


def _bad(message: str) -> RequestError:
    return RequestError("invalid_argument", message)


def _status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    kind = getattr(error, "kind", None)
    if isinstance(error, (RequestError, RasterError, TileIndexError, EngineError)) and kind in _STATUS:
        return _STATUS[kind], str(error)
    if out_of_memory(error):
        # outside the model too (edge refinement, polygons on a huge extent): the request's size, not a bug
        log.error("a request ran out of memory: %s", error)
        return grpc.StatusCode.RESOURCE_EXHAUSTED, ("the server ran out of memory for this request: ask for a smaller "
                                                    "extent or fewer prompts, or try again when it is less busy")
    if isinstance(error, sqlite3.DatabaseError) and (
            getattr(error, "sqlite_errorname", "") in ("SQLITE_CORRUPT", "SQLITE_NOTADB") or "malformed" in str(error)):
        # damage inside the file, which opening it did not reach: the operator's to act on, not a bug
        log.error("the tile index database is damaged: %s", error)
        return grpc.StatusCode.DATA_LOSS, (
            f"the tile index database is damaged ({error}): stop the server, move {DB_NAME} in its --data-dir aside "
            "(keep it), start it again and re-index; the embedding files are kept, and come back if the file is put "
            "back")
    log.exception("internal error", exc_info=error)
    return grpc.StatusCode.INTERNAL, f"internal server error: {type(error).__name__}: {error}"


def _abort(context: grpc.ServicerContext, error: BaseException):
    # also where the client is gone (cancelled): the abort tells nobody, but ends the call quietly, where
    # a unary handler's None would be serialized by gRPC and logged as a traceback
    context.abort(*_status_for(error))


def unary(method):
    @wraps(method)
    def handler(self, request, context):
        try:
            return method(self, request, context)
        except Exception as error:  # noqa: BLE001 - mapped to a status, never a dead server
            if isinstance(error, grpc.RpcError):
                raise
            _abort(context, error)
    return handler


def streaming(method):
    @wraps(method)
    def handler(self, request, context):
        try:
            yield from method(self, request, context)
        except Exception as error:  # noqa: BLE001
            if isinstance(error, grpc.RpcError):
                raise
            _abort(context, error)
    return handler


# ---- request checking ---------------------------------------------------------------------------

def check_text(field: str, text: str, limits: Limits) -> str:
    if not isinstance(text, str) or not text.strip():
        raise _bad(f"{field} is empty; give a few words describing what to find, e.g. \"parking lots\"")
    if len(text) > limits.max_prompt_chars:
        raise _bad(f"{field} is {len(text)} characters long; the limit is {limits.max_prompt_chars}: shorten it")
    if "\x00" in text:
        raise _bad(f"{field} contains a NUL character; send plain text")
    return text.strip()


# rasters of another checkpoint a search names one by one; more are counted in one more entry
OTHER_CHECKPOINT_LISTED = 20


def _check_has_words(field: str, text: str) -> None:
    """INVALID_ARGUMENT for a query or prompt with no letter of any script ("...", "123", an emoji):
    it still embeds, and its hits looked like any search's, matching nothing it said."""
    if not any(unicodedata.category(c).startswith("L") for c in text):
        raise _bad(f"{field} {text!r} has no word to look for (no letters); describe what to find in words, "
                   "e.g. \"parking lots\"")


# how a pixel source is stored in the index, as a path no file can have
PIXELS_PREFIX = "pixels:"
# Caption takes this many times Limits.max_extent_pixels (Segment's): it reads one model input, decimated
CAPTION_EXTENT_FACTOR = 16


def _shown_path(path: str) -> str:
    """A raster's path as clients see it: empty for pixels a client sent (stored as "pixels:<hash>")."""
    return "" if path.startswith(PIXELS_PREFIX) else path


def _is_lonlat(xmin: float, ymin: float, xmax: float, ymax: float) -> bool:
    """Whether a box's coordinates can be longitudes (x, up to one turn past 180 degrees, for a box
    across it) and latitudes (y)."""
    return -90 <= ymin <= 90 and -90 <= ymax <= 90 and all(-540 <= x <= 540 for x in (xmin, xmax))


def extent_parts(message, lonlat_default: bool = False) -> tuple | None:
    """An Extent message as (xmin, ymin, xmax, ymax, crs), or None when unset / all zero.
    `lonlat_default` (Search): an empty crs means EPSG:4326, whose extents must be longitudes and
    latitudes, and may cross 180 degrees as xmin > xmax."""
    if message is None:
        return None
    values = (message.xmin, message.ymin, message.xmax, message.ymax)
    if not message.crs and all(v == 0 for v in values):
        return None
    if not all(math.isfinite(v) for v in values):
        raise _bad(f"extent {values} has a coordinate that is not a finite number")
    # given in longitude/latitude: checked as such, so latitude first is said, not left to fail later as
    # a box GDAL "cannot reproject"; only Search's extents, over every raster, may cross 180 degrees
    lonlat = (message.crs or ("EPSG:4326" if lonlat_default else "")).upper() in LONLAT_CRS
    if lonlat and not _is_lonlat(*values):
        if _is_lonlat(values[1], values[0], values[3], values[2]):
            # latitude first, as coordinates are often spoken: say so rather than suggest another CRS
            raise _bad(f"extent ({values[0]}, {values[1]}, {values[2]}, {values[3]}) gives latitude first: longitude "
                       f"comes first (xmin, ymin, xmax, ymax = LON0, LAT0, LON1, LAT1; client: "
                       f"--extent LON0 LAT0 LON1 LAT1)")
        raise _bad(f"extent ({values[0]}, {values[1]}, {values[2]}, {values[3]}) is not longitude/latitude in "
                   f"EPSG:4326: if it is in another CRS, give that CRS (Extent.crs; client: --extent-crs)")
    wraps_allowed = lonlat and lonlat_default
    wraps = wraps_allowed and crosses_antimeridian(values[0], values[2])
    if not ((values[0] < values[2] or wraps) and values[1] < values[3]):
        raise _bad(f"extent ({values[0]}, {values[1]}, {values[2]}, {values[3]}) is degenerate or inverted: "
                   f"xmin must be < xmax and ymin < ymax" + (" (or xmin east of 0 and xmax west of it, for an "
                                                             "extent across 180 degrees)" if wraps_allowed else ""))
    if message.crs:
        parse_crs(message.crs)  # an unknown CRS fails here, with its own message
    return (*values, message.crs)


def _outline_and_inside(xmin: float, ymin: float, xmax: float, ymax: float) -> np.ndarray:
    """(n, 2) points of a box: its densified outline (densified_box order, the first
    4 * POINTS_PER_EDGE) and a 9 x 9 grid inside it."""
    xs, ys = densified_box(xmin, ymin, xmax, ymax, _ExtentShape.POINTS_PER_EDGE)
    gx, gy = np.meshgrid(np.linspace(xmin, xmax, 9), np.linspace(ymin, ymax, 9))
    return np.column_stack([np.concatenate([xs, gx.ravel()]), np.concatenate([ys, gy.ravel()])])


class _ExtentShape:
    """A search extent as a shape, to keep only the tiles whose footprint meets it. The index filters
    by longitude/latitude boxes: the box round an extent in a projected CRS, and the boxes round
    tiles, reach past their corners (far past them in a polar or otherwise rotated CRS), so tiles
    outside the extent would be found too.

    A local extent is moved into each hit's raster CRS, once per CRS, and met there. One that is not
    local, spanning more than MAX_SPAN_DEGREES of longitude or latitude or reaching past
    MAX_LATITUDE (the whole world, a box round a pole), one that reaches past where its CRS is
    defined (a zoomed-out orthographic view, whose corners lie off the globe), or one whose outline
    tears when moved, is judged in its own CRS instead, each hit's footprint moved there: a tile is
    small, and a point off the visible globe has no place. Where the extent's map repeats east and
    west (longitude/latitude, Web Mercator), a footprint is met one world either way too. With a
    `polygon` (SearchRequest.extent_polygon_wkt, e.g. a rotated map view), that polygon is met instead
    of the box, which still gives the index its longitude/latitude box."""

    POINTS_PER_EDGE = 16
    POINTS_PER_TILE = 16         # a tile's outline, moved into the extent's CRS: small, hardly curved
    MAX_SPAN_DEGREES = 30.0
    MAX_LATITUDE = 84.0
    EXPAND_LIMIT = 1 << 16       # the most candidates taken from the index to fill k

    def __init__(self, parts: tuple, lonlat_box: tuple | None, on_globe: bool = True, polygon=None):
        """`lonlat_box`: the extent's (west, south, east, north), None when it cannot be had.
        `on_globe`: False when no point of the extent has a place on the globe. `polygon`: a shapely
        polygon within the extent (search_polygon), or None for the box itself."""
        self.xmin, self.ymin, self.xmax, self.ymax, crs = parts
        self.srs = parse_crs(crs or "EPSG:4326")
        if self.srs.IsGeographic() and self.xmin > self.xmax:      # across 180 degrees: continuous longitudes
            self.xmax += 360.0
        self.period = world_width(self.srs)
        self.polygon = polygon
        area = polygon if polygon is not None else shapely.box(self.xmin, self.ymin, self.xmax, self.ymax)
        self._boxes = self._turns(area, self.period)
        self.on_globe = on_globe
        self.local = False
        if lonlat_box is not None:
            west, south, east, north = lonlat_box
            span = east - west if west <= east else east + 360.0 - west
            self.local = (span <= self.MAX_SPAN_DEGREES and north - south <= self.MAX_SPAN_DEGREES
                          and max(abs(south), abs(north)) <= self.MAX_LATITUDE)
        self._judges: dict = {}     # raster CRS WKT -> hit -> bool
        self._met: dict = {}        # tile id -> bool: a search taking more candidates meets them again

    def meets(self, hit) -> bool:
        if hit.tile_id not in self._met:
            if hit.crs_wkt not in self._judges:
                self._judges[hit.crs_wkt] = self._judge(hit.crs_wkt)
            self._met[hit.tile_id] = self._judges[hit.crs_wkt](hit)
        return self._met[hit.tile_id]

    def _judge(self, crs_wkt: str):
        try:
            raster_srs = parse_crs(crs_wkt) if crs_wkt else None
        except RasterError:
            raster_srs = None
        if raster_srs is None:
            return lambda hit: False        # no place on the globe, so in no extent (nor in the index's box)
        if self._whole_world():
            return lambda hit: True
        shapes = self._boxes if raster_srs.IsSame(self.srs) else self._moved_extent(raster_srs) if self.local else []
        if shapes:
            return lambda hit: bool(shares_ground(shapely.from_wkt(hit.footprint_wkt), shapes).any())
        transform = transformation(raster_srs, self.srs)
        if transform is None:       # no way from its CRS to the extent's (a site grid): not in it
            return lambda hit: False
        inside = self._points_in(raster_srs)
        # a tile larger than the part of the extent on the globe (a view at an orthographic globe's
        # rim, inside one tile) has no outline point in it: the extent's own points are in the tile
        return lambda hit: self._moved_footprint_meets(transform, hit) or (
            inside is not None and bool(shapely.contains_properly(shapely.from_wkt(hit.footprint_wkt), inside).any()))

    def _points_in(self, target):
        """Points of the extent (its outline and a grid inside) moved into `target`, one world either
        way too where that map repeats, as an array of points; None where none has a place there. A
        tile counts as meeting them when one lies inside it, not on its edge (touching is not meeting)."""
        to_target = transformation(self.srs, target)
        if to_target is None:
            return None
        moved = transform_points_quietly(to_target, self._outline_and_inside())
        moved = moved[np.isfinite(moved).all(axis=1)]
        if not len(moved):
            return None
        period = world_width(target)
        if period:
            moved = np.concatenate([moved + [turn, 0.0] for turn in (-period, 0.0, period)])
        return shapely.points(moved)

    def _whole_world(self) -> bool:
        return (self.polygon is None and self.srs.IsGeographic() and self.xmax - self.xmin >= 360.0
                and self.ymin <= -90.0 and self.ymax >= 90.0)

    def _outline(self) -> np.ndarray:
        """The extent's outline, densified to be moved into another CRS, as (n, 2) points (not closed)."""
        if self.polygon is None:
            return np.column_stack(densified_box(self.xmin, self.ymin, self.xmax, self.ymax, self.POINTS_PER_EDGE))
        ring = self.polygon.exterior
        return np.asarray(shapely.segmentize(ring, ring.length / (4 * self.POINTS_PER_EDGE)).coords)[:-1, :2]

    def _outline_and_inside(self) -> np.ndarray:
        """Points of the extent: its outline and a grid inside."""
        points = _outline_and_inside(self.xmin, self.ymin, self.xmax, self.ymax)
        if self.polygon is None:
            return points
        inside = points[4 * self.POINTS_PER_EDGE:]
        inside = inside[shapely.contains_xy(self.polygon, inside[:, 0], inside[:, 1])]
        return np.concatenate([self._outline(), inside])

    @staticmethod
    def _turns(shape, period: float | None) -> list:
        """A shape with its copies one world east and west, where the map repeats (tiles and
        extents may reach past 180 degrees); else itself."""
        if period:
            return [shapely.affinity.translate(shape, turn) for turn in (-period, 0.0, period)]
        return [shape]

    def _moved_extent(self, target) -> list:
        """The extent in `target`; [] where its outline does not reproject into a simple polygon."""
        to_target = transformation(self.srs, target)
        if to_target is None:
            return []
        moved = transform_points_quietly(to_target, self._outline())
        if not np.isfinite(moved).all():
            return []
        period = world_width(target)     # a raster in a repeating map may run past its seam (165..195 E)
        if period:
            moved[:, 0] = unwrap_longitudes(moved[:, 0], period)
        shape = shapely.Polygon(moved)
        if not shape.is_valid:      # folded or torn on the way: not the extent any more
            return []
        return self._turns(shape, period)

    def _moved_footprint_meets(self, transform, hit) -> bool:
        footprint = shapely.from_wkt(hit.footprint_wkt)
        outline = shapely.segmentize(footprint.exterior, max(footprint.length, 1e-12) / self.POINTS_PER_TILE)
        moved = transform_points_quietly(transform, np.asarray(outline.coords)[:-1, :2])
        finite = np.isfinite(moved).all(axis=1)
        if not finite.any():
            return False        # wholly where the extent's CRS has no place: off its visible globe
        moved = moved[finite]
        if self.period:     # continuous across the map's east-west seam; round a pole, closed over it
            moved = lonlat_ring(moved[:, 0], moved[:, 1], self.period)
        shape = shapely.Polygon(moved) if finite.all() and len(moved) >= 3 else None
        if shape is None or not shape.is_valid:     # cut by the CRS's edge: its points
            shape = shapely.MultiPoint(moved)
        return bool(shares_ground(shape, self._boxes).any())


def search_polygon(wkt: str, parts: tuple | None):
    """SearchRequest.extent_polygon_wkt as a shapely polygon within the extent `parts`; None when empty."""
    if not wkt.strip():
        return None
    if parts is None:
        raise _bad("extent_polygon_wkt needs an extent that holds it (its box, in the same CRS): set `extent`")
    try:
        polygon = shapely.from_wkt(wkt)
    except shapely.errors.GEOSException as e:
        raise _bad(f"extent_polygon_wkt is not WKT: {e}") from None
    if polygon.geom_type != "Polygon" or polygon.is_empty:
        raise _bad(f"extent_polygon_wkt must be one POLYGON, not {polygon.geom_type.upper()}"
                   + (" EMPTY" if polygon.is_empty else ""))
    if len(polygon.interiors):
        raise _bad("extent_polygon_wkt must be a polygon without holes")
    if not np.isfinite(np.asarray(polygon.exterior.coords)).all():
        raise _bad("extent_polygon_wkt has a coordinate that is not a finite number")
    if not polygon.is_valid:
        raise _bad(f"extent_polygon_wkt is not a valid polygon ({shapely.is_valid_reason(polygon)}): "
                   "its outline must not cross itself")
    xmin, ymin, xmax, ymax, crs = parts
    if parse_crs(crs or "EPSG:4326").IsGeographic() and xmin > xmax:
        xmax += 360.0       # an extent across 180 degrees: the polygon's longitudes run on past 180
    slack = 1e-9 * max(1.0, *(abs(v) for v in (xmin, ymin, xmax, ymax)))
    west, south, east, north = polygon.bounds
    if west < xmin - slack or south < ymin - slack or east > xmax + slack or north > ymax + slack:
        raise _bad(f"extent_polygon_wkt ({west:.10g}, {south:.10g}, {east:.10g}, {north:.10g}) reaches past the "
                   f"extent ({xmin:.10g}, {ymin:.10g}, {xmax:.10g}, {ymax:.10g}): the extent must hold it, in the "
                   "same CRS (for an extent across 180 degrees, longitudes past 180)")
    return polygon


def _search_extent(parts: tuple, polygon=None) -> tuple[tuple | None, _ExtentShape]:
    """The longitude/latitude box a search extent gives the index (None: none can be had, every
    tile is a candidate) and the shape each candidate is then met with (None: the box decides).
    `polygon`: the shape within the extent that hits must meet (search_polygon)."""
    crs = parts[4] or "EPSG:4326"
    if crs.upper() in LONLAT_CRS:
        return _box_and_shape(parts, parts[:4], aligned=True, polygon=polygon)
    srs = parse_crs(crs)
    # its outline and inside, placed on the globe: an orthographic view's corners may lie off it, and
    # the box GDAL gives round the rest would leave out the globe's edge
    to_lonlat = transformation(srs)
    if to_lonlat is None:
        raise _bad(f"the search extent's CRS {crs!r} has no longitude/latitude (a local grid): give the extent in "
                   "a CRS placed on the globe")
    placed = transform_points_quietly(to_lonlat, _outline_and_inside(*parts[:4]))
    finite = np.isfinite(placed).all(axis=1)
    if not finite.all():
        box = _box_of_part_on_globe(parts, srs, to_lonlat)
        return box, _ExtentShape(parts, box, on_globe=box is not None, polygon=polygon)
    try:
        west, south, east, north = transform_bounds(parts[:4], srs, "EPSG:4326")
    except RasterError:
        return None, _ExtentShape(parts, None, polygon=polygon)
    outline = placed[:4 * _ExtentShape.POINTS_PER_EDGE]
    aligned = _along_meridians_and_parallels(outline)
    period = world_width(srs)
    if period and aligned:
        # a cylindrical map (Web Mercator): longitude grows with x, so the box runs from the west edge's
        # longitude as far east as the view is wide. GDAL's box wraps the ends of a view wider than one
        # world (x +-8e7 gave -164..164), and of one nearly a world wide it cannot tell the side shown
        span = (parts[2] - parts[0]) / period * 360.0
        west = float(outline[-1, 0]) - 360.0 * math.floor((float(outline[-1, 0]) + 180.0) / 360.0)
        west, east = (-180.0, 180.0) if span >= 360.0 else (west, west + span)
    elif (period and parts[2] - parts[0] >= period) or (west > east and not crosses_antimeridian(west, east)):
        # a repeating map shown more than once across, or a box round the globe east to west, nearly all
        # of it, as (-29.7, .., -30.3) says of a wide view in a CRS centred on 150 degrees east: every
        # longitude, and the shape judges each tile
        west, east = -180.0, 180.0
    return _box_and_shape(parts, (west, south, east, north), aligned=aligned, polygon=polygon)


GLOBE_PART_SAMPLES = 65      # a grid this many points a side finds the part of an extent on the globe


def _box_of_part_on_globe(parts: tuple, srs, to_lonlat) -> tuple | None:
    """A longitude/latitude box round the part of an extent that lies on the globe, where the rest lies
    off it (an orthographic view past the globe's rim, a Mollweide view past its corners); None where no
    sample of it is on the globe. Without a box every tile in the index is a candidate, each met with
    the extent one by one: seconds for a view at the rim of a world-wide index.

    A grid of samples is placed on the globe, and where a grid line leaves it, the rim is found by
    bisection. The box holds them all, widened by the largest step between neighbouring samples, as
    the rim may bulge out between two of them; the extent's shape still judges each candidate."""
    xmin, ymin, xmax, ymax = parts[:4]
    n = GLOBE_PART_SAMPLES
    gx, gy = np.meshgrid(np.linspace(xmin, xmax, n), np.linspace(ymin, ymax, n))
    grid = np.stack([gx, gy], axis=-1)
    placed = transform_points_quietly(to_lonlat, grid.reshape(-1, 2)).reshape(n, n, 2)
    finite = np.isfinite(placed).all(axis=-1)
    if not finite.any():
        return None
    on, off, neighbours = [], [], []      # grid points on the globe beside one off it; neighbours on it
    for axis in (0, 1):
        a = (slice(None, -1), slice(None)) if axis == 0 else (slice(None), slice(None, -1))
        b = (slice(1, None), slice(None)) if axis == 0 else (slice(None), slice(1, None))
        both = finite[a] & finite[b]
        neighbours.append(np.stack([placed[a][both], placed[b][both]], axis=1))
        for first, second in ((a, b), (b, a)):
            leaving = finite[first] & ~finite[second]
            on.append(grid[first][leaving])
            off.append(grid[second][leaving])
    on, off = np.concatenate(on), np.concatenate(off)
    for _ in range(30):
        middle = (on + off) / 2.0
        there = np.isfinite(transform_points_quietly(to_lonlat, middle)).all(axis=1) if len(middle) else \
            np.zeros(0, bool)
        on[there], off[~there] = middle[there], middle[~there]
    rim = transform_points_quietly(to_lonlat, on) if len(on) else np.zeros((0, 2))
    rim = rim[np.isfinite(rim).all(axis=1)]
    points = np.concatenate([placed[finite], rim])
    pairs = np.concatenate(neighbours)
    step_lon = step_lat = 0.0
    if len(pairs):
        step_lon = float(np.abs((pairs[:, 1, 0] - pairs[:, 0, 0] + 180.0) % 360.0 - 180.0).max())
        step_lat = float(np.abs(pairs[:, 1, 1] - pairs[:, 0, 1]).max())
    south = max(-90.0, float(points[:, 1].min()) - step_lat)
    north = min(90.0, float(points[:, 1].max()) + step_lat)
    from_lonlat = transformation(parse_crs("EPSG:4326"), srs)
    poles = transform_points_quietly(from_lonlat, [[0.0, -90.0], [0.0, 90.0]]) if from_lonlat else np.full((2, 2), np.nan)
    within = np.isfinite(poles).all(axis=1) & (poles[:, 0] >= xmin) & (poles[:, 0] <= xmax) & \
        (poles[:, 1] >= ymin) & (poles[:, 1] <= ymax)
    south, north = (-90.0 if within[0] else south), (90.0 if within[1] else north)
    # the least run of longitudes holding every sample: round the globe from the end of its widest gap
    lon = np.sort((points[:, 0] + 180.0) % 360.0 - 180.0)
    gaps = np.diff(np.append(lon, lon[0] + 360.0))
    widest = int(np.argmax(gaps))
    span = 360.0 - float(gaps[widest]) + 2.0 * step_lon
    if within.any() or span >= 360.0:
        return -180.0, south, 180.0, north
    west = float(lon[(widest + 1) % len(lon)]) - step_lon
    return west, south, west + span, north


def _along_meridians_and_parallels(outline: np.ndarray) -> bool:
    """Whether a box's outline (densified_box order, in longitude/latitude) runs along two meridians
    and two parallels, as a box in a cylindrical map (Web Mercator) does: its longitude/latitude box
    is then the box itself."""
    n = len(outline) // 4
    lon, lat = outline[:, 0], outline[:, 1]

    def same(values: np.ndarray, turn: float | None = None) -> bool:
        spread = values - values[0]
        if turn:
            spread = (spread + turn / 2) % turn - turn / 2
        return bool(np.abs(spread).max() <= 1e-7)

    return (same(lat[:n + 1]) and same(lat[2 * n:3 * n + 1])
            and same(lon[n:2 * n + 1], 360.0) and same(np.append(lon[3 * n:], lon[0]), 360.0))


POLAR_LATITUDE = 89.0     # past it, a tile's longitude/latitude box is far larger than the tile


def _box_and_shape(parts: tuple, box: tuple, aligned: bool, polygon=None) -> tuple[tuple, _ExtentShape | None]:
    shape = _ExtentShape(parts, box, polygon=polygon)
    if aligned and polygon is None and not shape.local and max(abs(box[1]), abs(box[3])) <= POLAR_LATITUDE:
        # a wide extent along meridians and parallels is its own longitude/latitude box: the index's
        # box decides, and only tiles at its very edge, whose boxes reach past their corners, could
        # be let in that a footprint would not; a local one is met exactly, at the cost of one shape,
        # and so is one reaching within a degree of a pole, where tiles' boxes span wide longitudes
        return box, None
    return box, shape


def _overlap(value: float | None, default: float, field: str) -> float:
    if value is None:
        return default
    try:
        return check_tile_overlap(value, field)
    except ValueError as e:
        raise _bad(str(e)) from None


def _resolution(value: float, field: str = "target_resolution") -> float | None:
    try:
        return check_target_resolution(value, field) or None
    except ValueError as e:
        raise _bad(str(e)) from None


class _RecentDigests:
    """sources_digest_of(path), remembered for `ttl_s` seconds per (path, size, mtime) of the file
    and of its .aux.xml: a VRT of thousands of files takes tens of milliseconds to digest, once per
    search that hits it otherwise. A change to the file or its .aux.xml shows at once, a change to
    a file behind a VRT within `ttl_s`."""

    def __init__(self, ttl_s: float = 30.0):
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._known: dict[tuple, tuple[float, str]] = {}

    def digest(self, path: str, size: int, mtime_ns: int, beside: tuple | None) -> str:
        """`beside`: (size, mtime_ns) of its .aux.xml, None when it has none."""
        key, now = (path, size, mtime_ns, beside), time.monotonic()
        with self._lock:
            seen = self._known.get(key)
        if seen is not None and now - seen[0] < self.ttl_s:
            return seen[1]
        digest = sources_digest_of(path)
        with self._lock:
            if len(self._known) > 4096:      # old keys of rasters since changed: start afresh
                self._known.clear()
            self._known[key] = (now, digest)
        return digest


_RECENT_DIGESTS = _RecentDigests()


class _FileCheck(NamedTuple):
    """What became of an indexed raster's file: a FileState, and why in words ("" when unchanged)."""
    state: int
    reason: str = ""


def _changed_since_indexing(row: dict) -> _FileCheck:
    """Whether an indexed raster's file is still what was indexed: it may be gone, its size or
    modification time may differ from the index's record, or so may those of a file it reads (a
    VRT's sources, a world file) or the georeferencing in its .aux.xml (_RecentDigests: a change
    behind a VRT shows within 30 s)."""
    path = row["path"]
    if path.startswith(PIXELS_PREFIX):
        return _FileCheck(pb.FILE_STATE_PIXELS)
    try:
        now = raster_identity(path)
    except (TileIndexError, OSError):
        return _FileCheck(pb.FILE_STATE_MISSING, f"raster {path!r} was moved or deleted since it was indexed: "
                                                 "index it where it is now, and remove the old entry (client remove)")
    if (now["size"], now["mtime_ns"]) != (row["size"], row["mtime_ns"]):
        return _FileCheck(pb.FILE_STATE_CHANGED, f"raster {path!r} changed on disk since it was indexed: index it "
                                                 "again (client index) to search what it holds now")
    # the files it reads besides (a VRT's sources, a world file) and georeferencing set in an .aux.xml:
    # opened with GDAL only where there are any, so a raster that is one file costs one stat more
    try:
        aux = os.stat(path + ".aux.xml")
        beside = (aux.st_size, aux.st_mtime_ns)
    except OSError:
        beside = None
    if row.get("sources") or beside is not None:
        try:
            sources = _RECENT_DIGESTS.digest(path, now["size"], now["mtime_ns"], beside)
        except RasterError:
            # not to be judged here; indexing it again says what is wrong
            return _FileCheck(pb.FILE_STATE_UNCHANGED)
        if sources != row.get("sources", ""):
            return _FileCheck(pb.FILE_STATE_CHANGED, f"raster {path!r}: a file it reads, or the georeferencing in "
                                                     "its .aux.xml, changed since it was indexed: index it again "
                                                     "(client index) to search what it holds now")
    return _FileCheck(pb.FILE_STATE_UNCHANGED)


def _crs_message(raster: Raster) -> pb.Crs:
    return pb.Crs(authid=raster.crs_authid, wkt=raster.crs_wkt)


def _box(values) -> pb.BoundingBox | None:
    if values is None:
        return None
    return pb.BoundingBox(xmin=values[0], ymin=values[1], xmax=values[2], ymax=values[3])


def _png(rgb: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb.transpose(1, 2, 0))).save(out, format="PNG")
    return out.getvalue()


class _Progress:
    """Throttles progress messages to a few per second (the first and forced ones always go)."""

    def __init__(self):
        self._last = 0.0

    def due(self, force: bool = False) -> bool:
        now = time.monotonic()
        if force or now - self._last >= PROGRESS_INTERVAL_S:
            self._last = now
            return True
        return False


class _IndexJob:
    """One raster being indexed; `removed` is set when RemoveRaster asks for that raster meanwhile."""

    def __init__(self, key: str):
        self.key = key
        self.lock = threading.Lock()
        self.users = 0                  # requests counted in: opening the raster, waiting for `lock` or holding it
        self.removed = threading.Event()
        self.committed = False          # the holder's tiles are in the index: a removal now removes them


class _TilePlan(NamedTuple):
    """How a raster is cut into tiles for the index."""
    size: int
    overlap: float
    resolution: float | None
    extent: tuple | None
    min_valid: float
    views: int


class _RasterJobs:
    """Work on one raster's index entry, one request at a time.

    Two requests indexing the same raster used to embed it twice, minutes of model work each on a
    CPU, and the later one replaced the other's entry. Now the second waits for the first and then
    finds the raster up to date. A RemoveRaster that comes while a raster is being indexed stops
    that indexing: otherwise its commit would put back the entry the user just removed.
    `commit_lock` makes "was it removed?" and the index's commit one step, so a removal cannot fall
    between the two.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._jobs: dict[str, _IndexJob] = {}
        self.commit_lock = threading.Lock()

    def join(self, key: str) -> _IndexJob:
        """Count a request in on `key`'s job, as soon as the request knows its raster (before opening
        it, which for a large VRT takes a while): a removal from then on stops it. Every join is
        matched by one `leave`."""
        with self._lock:
            job = self._jobs.get(key)
            if job is None or job.removed.is_set():
                job = self._jobs[key] = _IndexJob(key)
            job.users += 1
            return job

    def leave(self, job: _IndexJob) -> None:
        with self._lock:
            job.users -= 1
            if job.users == 0 and self._jobs.get(job.key) is job:
                del self._jobs[job.key]

    def acquire(self, job: _IndexJob, name: str, cancelled):
        """Generator: yields progress while another request indexes the raster, then holds the job's
        lock until `release`. Raises, holding nothing, when the request is cancelled or the raster
        was removed since the request joined (it asked before the removal)."""
        told = False
        while not job.lock.acquire(timeout=0.2):
            if cancelled():
                raise EngineError("cancelled", "indexing was cancelled; nothing was stored")
            if not told:
                told = True
                yield pb.IndexProgress(stage=pb.INDEX_STAGE_QUEUED,
                                       message=f"waiting: another request is indexing {name}")
        if job.removed.is_set():
            job.lock.release()
            raise _removed_while_indexing(name, waiting=True)

    @staticmethod
    def release(job: _IndexJob) -> None:
        job.lock.release()

    def mark_removed(self, key: str) -> bool:
        """Stop the indexing of `key` that is under way, if any (call with `commit_lock` held)."""
        with self._lock:
            job = self._jobs.get(key)
            if job is None:
                return False
            job.removed.set()
            # requests still waiting for it were made before the removal and stop too; later ones
            # start a job of their own
            del self._jobs[key]
            # stopped: an indexing not yet stored, or requests opening the raster or waiting for it
            # (users counts the holder too)
            return not job.committed or job.users > 1


def _path_key(source) -> str | None:
    """The key the index will store a raster sent by path under (its real path), known before the
    raster is opened; None for a pixel source or a path that is no path."""
    if source is None or source.WhichOneof("kind") != "path" or not source.path.strip():
        return None
    try:
        return normalise_raster_path(source.path)
    except (TileIndexError, OSError, ValueError):
        return None


def _removed_while_indexing(name: str, waiting: bool = False) -> RequestError:
    when = "while this request opened it or waited to index it" if waiting else "while it was being indexed"
    return RequestError("aborted", f"{name} was removed from the index (client remove) {when}; nothing was "
                                   "stored. Index it again if you still want to search it")


# ---- the service -----------------------------------------------------------------------------

class SkyPromptService(pb_grpc.SkyPromptServicer):
    def __init__(self, engine: ModelEngine, index: TileIndex, allowed_roots: list[str] | None = None,
                 limits: Limits | None = None, sao_window: int = DEFAULT_SAO_WINDOW, tls: bool = False,
                 auth: bool = False, io_threads: int = 4, edge_radius: int | None = None,
                 index_views: int = DEFAULT_INDEX_VIEWS, search_expand: int = DEFAULT_SEARCH_EXPAND,
                 keyword_weight: float = DEFAULT_KEYWORD_WEIGHT, tile_captions: bool = True,
                 segments_at_once: int = SEGMENTS_AT_ONCE, workers: int | None = None):
        self.engine = engine
        self.segments_at_once = segments_at_once
        self._segment_slots = threading.BoundedSemaphore(segments_at_once)
        # Segment and IndexRaster calls hold a call thread while they run and while they wait (for a
        # Segment slot, for their raster): with no bound they could take all `workers` threads, and a
        # health check or a search would get no answer. Some threads are kept for the short calls.
        self.workers = workers
        self.long_calls = None if workers is None else max(1, workers - max(2, workers // 4))    # 1 at least
        self._long_call_slots = None if workers is None else threading.BoundedSemaphore(self.long_calls)
        self.index = index
        self.allowed_roots = [os.path.realpath(r) for r in (allowed_roots or [])]
        self.limits = limits or Limits()
        self.sao_window = sao_window
        # the guided filter's default radius scales with the model's tile (backend.defaults); a
        # radius given here was range-checked by Server, before the model loaded
        self.edge_radius = edge_radius_for(edge_radius, engine.image_size)
        self.index_views = index_views     # checked by Server, like the radius
        self.search_expand = search_expand  # checked by Server too
        self.keyword_weight = keyword_weight  # checked by Server too
        self.tile_captions = tile_captions
        self.tls = tls
        self.auth = auth
        self.io_threads = max(1, io_threads)
        self.stopping = threading.Event()
        self.raster_jobs = _RasterJobs()

    # -- shared pieces --
    def _cancelled(self, context) -> "callable":
        return lambda: self.stopping.is_set() or not context.is_active()

    def _check_serving(self) -> None:
        if self.stopping.is_set():
            raise RequestError("unavailable", "the server is shutting down; retry later")

    @contextlib.contextmanager
    def _long_call(self, what: str):
        """One of the Segment and IndexRaster calls the server takes at once (see __init__), or
        RESOURCE_EXHAUSTED at once, saying so, where that many are under way or queued."""
        if self._long_call_slots is None:
            yield
            return
        if not self._long_call_slots.acquire(blocking=False):
            raise RequestError("resource_exhausted", f"{BUSY}: {self.long_calls} Segment and IndexRaster "
                                                     f"calls are under way or queued, the most it takes at once so that "
                                                     f"searches and health checks still get an answer (serve --workers "
                                                     f"{self.workers}); {what} again when one has ended")
        try:
            yield
        finally:
            self._long_call_slots.release()

    def _open(self, source, bands_message) -> Raster:
        bands = BandMapping.from_message(bands_message) if bands_message is not None else None
        kind = source.WhichOneof("kind") if source is not None else None
        if kind is None:
            raise _bad("source is not set: give a raster path or pixels")
        if kind == "path":
            return open_raster(source.path, bands=bands, allowed_roots=self.allowed_roots)
        pixels = source.pixels
        side = self.limits.max_pixel_source_side
        if pixels.width > side or pixels.height > side:
            raise RequestError("resource_exhausted", f"pixel source is {pixels.width} x {pixels.height} pixels; the "
                                                     f"limit is {side} a side: send a smaller view or a coarser render")
        if pixels.data_type == pb.DATA_TYPE_UNSPECIFIED:
            raise _bad("pixel source data_type is not set; give e.g. DATA_TYPE_UINT8")
        if len(pixels.label) > self.limits.max_label_chars:
            raise _bad(f"pixel source label is {len(pixels.label)} characters; the limit is "
                       f"{self.limits.max_label_chars}")
        return raster_from_pixels(pixels.data, pixels.width, pixels.height, pixels.band_count, int(pixels.data_type),
                                  list(pixels.geotransform), pixels.crs,
                                  nodata=pixels.nodata if pixels.HasField("nodata") else None,
                                  alpha_band=pixels.alpha_band, interleave=int(pixels.interleave), bands=bands,
                                  label=pixels.label)

    @staticmethod
    def _identity(raster: Raster) -> dict:
        identity = raster.identity()
        if not identity["path"]:
            identity = {"path": f"{PIXELS_PREFIX}{identity['sha256']}", "size": 0, "mtime_ns": 0}
        return identity

    # -- GetInfo --
    @unary
    def GetInfo(self, request, context):
        cfg = self.engine.config
        stats = self.index.stats(self.engine.checkpoint_hash)
        capabilities = ["index", "search", "segment", "caption", "embed_text", "pixel_source", "relevance_map",
                        "thumbnails", "ann", "prompt_ensemble", "edge_refinement", "index_views",
                        "query_expansion", "like_tile", "list_rasters", "min_area_m2", "keyword_matching",
                        "extent_polygon", "extent_placement"]
        if self.engine.words:
            capabilities.append("unfamiliar_words")
        if self.tls:
            capabilities.append("tls")
        if self.auth:
            capabilities.append("auth")
        return pb.ServerInfo(
            server_version=server_version(), api_version=API_VERSION, model_name="MaMMUT",
            model_preset=cfg.preset or "custom", checkpoint_hash=self.engine.checkpoint_hash,
            device=str(self.engine.device), image_size=cfg.image_size, patch_size=cfg.patch_size,
            embed_dim=cfg.embed_dim, text_context_length=cfg.context_length, capabilities=capabilities,
            index_stats=pb.IndexStats(raster_count=stats["rasters"], tile_count=stats["tiles"],
                                      disk_bytes=stats["bytes"], ann_active=bool(stats.get("ann_active"))),
            default_sao_window=pb.SaoWindow(size=self.sao_window), default_tile_overlap=DEFAULT_TILE_OVERLAP,
            limits=pb.Limits(**{k: getattr(self.limits, k) for k in self.limits.__dataclass_fields__}),
            default_edge_radius=self.edge_radius, default_index_views=self.index_views,
            default_search_expand=self.search_expand, default_keyword_weight=self.keyword_weight)

    # -- IndexRaster --
    @streaming
    def IndexRaster(self, request, context):
        self._check_serving()
        with self._long_call("index it"):
            yield from self._index_raster(request, context)

    def _index_raster(self, request, context):
        started = time.monotonic()
        cancelled = self._cancelled(context)
        overlap = _overlap(request.tile_overlap if request.HasField("tile_overlap") else None,
                           DEFAULT_TILE_OVERLAP, "tile_overlap")
        resolution = _resolution(request.target_resolution)
        try:
            min_valid = check_min_valid(request.min_valid_fraction or DEFAULT_MIN_VALID)
        except ValueError as e:
            raise _bad(f"{e}; 0 means the default") from None
        extent = extent_parts(request.extent) if request.HasField("extent") else None
        views = request.views if request.HasField("views") else self.index_views
        try:
            check_views(views)
        except ValueError as e:
            raise _bad(f"{e}; leave it unset for the server's default ({self.index_views})") from None
        jobs = self.raster_jobs
        # counted in on its raster before opening it (a large VRT takes a while to open): a removal
        # from now on stops this request, as it does one that waits or works
        early = _path_key(request.source)
        job = jobs.join(early) if early else None
        try:
            yield pb.IndexProgress(stage=pb.INDEX_STAGE_OPENING, message="opening the raster")
            raster = self._open(request.source, request.bands if request.HasField("bands") else None)
            with raster:
                size = self.engine.image_size
                settings = {"tile_size": size, "overlap": overlap, "target_resolution": resolution,
                            "min_valid_fraction": min_valid, "bands": list(raster.rgb_bands),
                            "stretch": list(raster.bands.percentiles()) if raster.bands.stretch_requested else None,
                            "extent": list(extent) if extent else None}
                if views != 1:      # absent for one view, so rasters indexed before views existed stay unchanged
                    settings["views"] = views
                if self.tile_captions:
                    # each tile's caption, for keyword matching: a raster indexed without them is indexed again
                    settings["tile_captions"] = True
                identity = self._identity(raster)
                if job is None or job.key != identity["path"]:      # a pixel source, known by its pixels
                    if job is not None:
                        jobs.leave(job)
                        job = None
                    job = jobs.join(identity["path"])
                # one request at a time per raster: a second waits, then finds it indexed already
                yield from jobs.acquire(job, raster.name, cancelled)
                try:
                    plan = _TilePlan(self.engine.image_size, overlap, resolution, extent, min_valid, views)
                    yield from self._index_held(request, raster, identity, job, settings, plan, started, cancelled)
                finally:
                    jobs.release(job)
        finally:
            if job is not None:
                jobs.leave(job)

    def _index_held(self, request, raster: Raster, identity: dict, job: _IndexJob, settings: dict, plan: "_TilePlan",
                    started: float, cancelled_by_client):
        """IndexRaster's work once this request holds the raster's job."""
        def cancelled():
            return cancelled_by_client() or job.removed.is_set()

        size, overlap, resolution, extent, min_valid, views = plan
        state = self.index.needs_indexing(identity, self.engine.checkpoint_hash, settings)
        total = raster.count_tiles(size, overlap, resolution, extent)
        # (a RemoveRaster between the two lookups leaves no entry: then it is indexed again)
        entry = self.index.raster_by_path(identity["path"]) if state == "unchanged" and not request.force else None
        if entry is not None:
            yield self._index_done(raster, entry, pb.INDEX_OUTCOME_UNCHANGED, started, total,
                                   f"{raster.name} is already indexed with this model; nothing to do")
            return
        yield pb.IndexProgress(stage=pb.INDEX_STAGE_EMBEDDING, tiles_total=total,
                               message=f"embedding {total} tiles of {raster.name}")
        meta = {"name": raster.name, "crs_authid": raster.crs_authid, "crs_wkt": raster.crs_wkt,
                "width": raster.width, "height": raster.height, "band_count": raster.band_count,
                "bounds": raster.bounds, "bounds_wgs84": raster.bounds_wgs84}
        # the stretch of a raster that is not 8-bit, which reading the first tile would work out anyway:
        # kept, so its thumbnails need not read the whole raster again to find it
        ranges = raster.stretch_ranges()
        if any(ranges):
            meta["stretch_ranges"] = [list(r) if r else None for r in ranges]
        kept = 0
        throttle = _Progress()
        # progress is reported once a batch: with `views` views a tile costs `views` images of
        # model work, so a batch holds fewer tiles and each report stands for the same work.
        # The engine cuts a job into passes of MAX_BATCH_IMAGES // views tiles anyway, so the
        # passes, and the embeddings, are the same as with whole batches.
        batch = max(1, INDEX_BATCH // views)
        writer = self.index.writer(identity, self.engine.checkpoint_hash, settings, meta, self.engine.embed_dim)
        try:
            for tiles, pixels, seen in self._read_ahead(raster, size, overlap, resolution, extent, min_valid,
                                                        total, cancelled, batch):
                if tiles:
                    stack = np.stack(pixels)
                    dicts = [_tile_dict(t) for t in tiles]
                    if self.tile_captions:
                        embeddings, captions = self.engine.embed_and_describe(stack, views, cancelled=cancelled)
                        dicts = [{**d, "caption": c} for d, c in zip(dicts, captions)]
                    else:
                        embeddings = self.engine.embed_images(stack, cancelled=cancelled, views=views)
                    writer.add(dicts, embeddings)
                    kept += len(tiles)
                if cancelled():
                    raise EngineError("cancelled", "indexing was cancelled; nothing was stored")
                if throttle.due():
                    yield pb.IndexProgress(stage=pb.INDEX_STAGE_EMBEDDING, tiles_done=seen, tiles_total=total,
                                           tiles_skipped=seen - kept,
                                           message=f"embedding tiles {seen}/{total}")
            raster.check_unchanged()
            writer.meta["tiles_skipped"] = total - kept
            yield pb.IndexProgress(stage=pb.INDEX_STAGE_WRITING, tiles_done=total, tiles_total=total,
                                   tiles_skipped=total - kept, message=f"writing {kept} tiles to the index")
            with self.raster_jobs.commit_lock:
                if job.removed.is_set():
                    raise _removed_while_indexing(raster.name)
                writer.commit()
                job.committed = True
                entry = self.index.raster(writer.raster_id)
        except BaseException as error:
            writer.abort()
            why = ("it was removed from the index meanwhile" if job.removed.is_set()
                   else getattr(error, "message", None) or str(error) or type(error).__name__)
            # the reason often says "nothing was stored" itself (a cancel): said once
            said = why if "nothing was stored" in why else f"nothing stored: {why}"
            log.info("indexing %s stopped after %d tiles, %s", raster.name, kept, said)
            if job.removed.is_set() and not isinstance(error, RequestError):
                raise _removed_while_indexing(raster.name) from None
            raise
        outcome = pb.INDEX_OUTCOME_INDEXED if state == "new" and not writer.replaced else pb.INDEX_OUTCOME_REPLACED
        log.info("indexed %s: %d tiles (%d skipped) in %.1f s", raster.name, kept, total - kept,
                 time.monotonic() - started)
        yield self._index_done(raster, entry, outcome, started, total, f"indexed {kept} tiles of {raster.name}")

    def _read_ahead(self, raster: Raster, size, overlap, resolution, extent, min_valid, plan_total, cancelled,
                    batch: int):
        """Yield (tiles, pixels, tiles seen so far) in batches of `batch` tiles, read by a background
        thread, so GDAL reads of the next batch overlap with embedding this one."""
        tile_iter = raster.iter_tiles_with_pixels(size, overlap, resolution, extent, min_valid)
        tiles_done = raster.tiles_done_counter(size, overlap, resolution, extent)
        batches: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()

        def reader():
            try:
                tiles, pixels = [], []
                last_index = -1
                for tile, rgb, _valid in tile_iter:
                    if stop.is_set():
                        return
                    tiles.append(tile)
                    pixels.append(rgb)
                    last_index = tile.index
                    if len(tiles) == batch:
                        batches.put(("batch", tiles, pixels, tiles_done(last_index)))
                        tiles, pixels = [], []
                batches.put(("batch", tiles, pixels, plan_total))
                batches.put(("end", None, None, None))
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                batches.put(("error", e, None, None))

        thread = threading.Thread(target=reader, name="skyprompt-index-read", daemon=True)
        thread.start()
        try:
            while True:
                try:
                    kind, a, b, c = batches.get(timeout=0.2)
                except queue.Empty:
                    if cancelled():
                        raise EngineError("cancelled", "indexing was cancelled; nothing was stored") from None
                    continue
                if kind == "end":
                    return
                if kind == "error":
                    raise a
                yield a, b, c
        finally:
            stop.set()
            while thread.is_alive():  # unblock a reader waiting on a full queue
                try:
                    batches.get_nowait()
                except queue.Empty:
                    thread.join(0.05)

    def _index_done(self, raster: Raster, entry: dict, outcome, started, total, message) -> pb.IndexProgress:
        result = pb.IndexResult(
            # the path the index keys it by (links followed), as Search and ListRasters answer
            raster_id=str(entry["id"]), raster_path=_shown_path(entry["path"]), raster_name=entry["name"],
            outcome=outcome,
            tile_count=entry["tile_count"], tiles_skipped=entry["tiles_skipped"], width=raster.width,
            height=raster.height, band_count=raster.band_count, crs=_crs_message(raster), bounds=_box(raster.bounds),
            bounds_wgs84=_box(raster.bounds_wgs84), seconds=time.monotonic() - started, band_note=raster.band_note)
        return pb.IndexProgress(stage=pb.INDEX_STAGE_DONE, tiles_done=total, tiles_total=total,
                                tiles_skipped=entry["tiles_skipped"], message=message, done=True, result=result)

    # -- Search --
    @unary
    def Search(self, request, context):
        self._check_serving()
        started = time.monotonic()
        like = request.like_tile_id if request.HasField("like_tile_id") else None
        if like is None:
            query = self._check_prompt("query", request.query)
        elif request.query.strip():
            raise _bad("give a query or like_tile_id, not both: like_tile_id searches by that tile's embedding")
        k = request.k or 10
        if k > self.limits.max_k:
            raise _bad(f"k={k} is above the limit of {self.limits.max_k} hits")
        thumb = request.thumbnail_size or min(128, self.limits.max_thumbnail_side)
        if thumb > self.limits.max_thumbnail_side:
            raise _bad(f"thumbnail_size {thumb} is above the limit of {self.limits.max_thumbnail_side} pixels")
        min_score = request.min_score if request.HasField("min_score") else None
        if min_score is not None and not (-1.0 <= min_score <= 1.0):
            raise _bad(f"min_score {min_score} must be a cosine similarity in [-1, 1]")
        bbox = shape = parts = None
        if request.HasField("extent"):
            parts = extent_parts(request.extent, lonlat_default=True)
        polygon = search_polygon(request.extent_polygon_wkt, parts)
        if parts is not None:
            bbox, shape = _search_extent(parts, polygon)
        raster_ids = list(request.raster_ids)  # the index checks them: an id it cannot hold is not_found
        expand = request.expand if request.HasField("expand") else self.search_expand
        try:
            check_expand(expand, limit=self.limits.max_expand)
        except ValueError as e:
            raise _bad(f"{e}; leave it unset for the server's default ({self.search_expand})") from None
        weight = request.keyword_weight if request.HasField("keyword_weight") else self.keyword_weight
        try:
            check_keyword_weight(weight)
        except ValueError as e:
            raise _bad(f"{e}; leave it unset for the server's default ({self.keyword_weight:g})") from None
        if like is not None:
            weight = 0.0        # no words to match
        cancelled = self._cancelled(context)
        if like is None:
            vector = self.engine.embed_prompts([query], ensemble=not request.raw_query, cancelled=cancelled)[0]
        else:
            vector = self.index.tile_embedding(like, self.engine.checkpoint_hash)
        # unspecified = the server's choice: the index is exact below its ANN threshold anyway
        exact = request.mode == pb.SEARCH_MODE_EXACT
        # keyword matching re-orders the best KEYWORD_POOL by cosine: it needs their captions
        pool = max(k, KEYWORD_POOL) if weight > 0 else k

        def in_the_area(vec: np.ndarray, n: int, floor: float | None = min_score) -> SearchHits:
            """The best `n` hits for `vec` that meet the extent (or polygon), if any, none under `floor`;
            expanded by the index where there is no area (within one, the query is expanded below)."""
            wanted = n
            while shape is None or shape.on_globe:      # an orthographic view wholly off its globe holds nothing
                found = self.index.search(vec, wanted, self.engine.checkpoint_hash,
                                          raster_ids=raster_ids or None,
                                          raster_paths=list(request.raster_paths) or None, bbox_wgs84=bbox,
                                          exact=exact, min_score=floor, expand=expand if shape is None else 0)
                if shape is None:
                    return found
                kept = [h for h in found if shape.meets(h)]
                # the index's box let in tiles outside the extent: take more candidates until `n` are in it
                if len(kept) >= n or len(found) < wanted or wanted >= _ExtentShape.EXPAND_LIMIT:
                    return type(found)(kept[:n], tiles_searched=found.tiles_searched, approximate=found.approximate)
                wanted = min(_ExtentShape.EXPAND_LIMIT, wanted * 4)
            return SearchHits()

        if shape is None or not expand:
            hits = in_the_area(vector, pool)
        else:
            # expanded from the best tiles in the area itself: the index's expansion knows only the box
            # round it, whose best tiles may all lie outside a polygon or a rotated view
            # (min_score is for the expanded query's scores, as the index's own expansion applies it)
            best = in_the_area(vector, expand, floor=None)
            try:
                found = [self.index.tile_embedding(h.tile_id, self.engine.checkpoint_hash) for h in best]
            except TileIndexError:      # re-indexed or removed since: expanded from none, the query as it is
                found = []
            if found:
                vector = expanded_queries(np.asarray(vector, np.float32)[None], np.stack(found).T,
                                          [np.arange(len(found))], len(found), EXPAND_WEIGHT)[0]
            hits = in_the_area(vector, pool)
        bonus = np.zeros(len(hits))
        if weight > 0 and len(hits):
            bonus = keyword_bonus([h.score for h in hits], query, [h.extra.get("caption") for h in hits], weight)
            order = sorted(range(len(hits)), key=lambda i: -(hits[i].score + bonus[i]))[:k]
            hits, bonus = type(hits)([hits[i] for i in order], tiles_searched=hits.tiles_searched,
                                     approximate=hits.approximate), bonus[order]
        out = pb.SearchResponse(tiles_searched=hits.tiles_searched, approximate=hits.approximate,
                                unfamiliar_words=self._unfamiliar(query) if like is None else [])
        if not raster_ids and not request.raster_paths:     # a filtered search names such a raster as an error
            current = self.engine.checkpoint_hash
            for r in self.index.unsearchable_rasters(current):
                out.unsearchable_rasters.add(raster_id=str(r["id"]), raster_path=_shown_path(r["path"]),
                                             raster_name=r["name"], reason=r["reason"])
            # after a checkpoint change every raster is of the other one: "0 hits among 0 tiles" said
            # nothing of why
            others, total = self.index.other_checkpoint_rasters(current, limit=OTHER_CHECKPOINT_LISTED)
            for r in others:
                out.unsearchable_rasters.add(
                    raster_id=str(r["id"]), raster_path=_shown_path(r["path"]), raster_name=r["name"],
                    reason=f"indexed with checkpoint {r['checkpoint_hash'][:12]}, not this server's "
                           f"({current[:12]}): index it again to search it")
            if total > len(others):     # counted in one entry: thousands would fill the answer
                out.unsearchable_rasters.add(
                    raster_name=f"{total - len(others)} more rasters", raster_count=total - len(others),
                    reason="indexed with another checkpoint than this server's: index them again to search them "
                           "(ListRasters with all_checkpoints names each)")
        rows = {}       # raster id -> its index entry, looked up once per search
        for hit in hits:
            if hit.raster_id not in rows:
                try:
                    rows[hit.raster_id] = self.index.raster(hit.raster_id)
                except TileIndexError:      # removed since the search: its hits are answered as they are
                    rows[hit.raster_id] = None
        # a raster removed since the search is not judged: its hits are answered as they are
        changed = {rid: _changed_since_indexing(row) if row else _FileCheck(pb.FILE_STATE_UNSPECIFIED)
                   for rid, row in rows.items()}
        for hit, extra in zip(hits, bonus):
            out.hits.add(score=hit.score + float(extra), keyword_score=float(extra),
                         changed_on_disk=changed[hit.raster_id].reason, file_state=changed[hit.raster_id].state,
                         caption=str(hit.extra.get("caption") or ""), raster_id=str(hit.raster_id),
                               raster_path=_shown_path(hit.raster_path),
                               raster_name=hit.raster_name, tile_id=hit.tile_id,
                               window=pb.PixelWindow(x_off=hit.col, y_off=hit.row, width=hit.width, height=hit.height),
                               crs=pb.Crs(authid=hit.crs_authid, wkt=hit.crs_wkt), bounds=_box(hit.bounds),
                               footprint_wkt=hit.footprint_wkt, bounds_wgs84=_box(hit.bounds_wgs84),
                               footprint_wgs84_wkt=hit.footprint_wgs84_wkt)
        left_out = (f"left out: more thumbnails would pass the message limit of {self.limits.max_message_bytes} "
                    "bytes (ask for fewer hits or a smaller thumbnail_size)")
        note = len(left_out.encode()) + 8       # a hit's note, with its field's tag and length
        size, limit = out.ByteSize(), self.limits.max_message_bytes - 1024
        if request.include_thumbnails:
            size += note * len(out.hits)        # room for a note on every hit, should no thumbnail fit
        if size > limit:
            # said now, as what to ask for, not as gRPC's "Sent message larger than max" after the work
            hits_part = size - (out.ByteSize() - sum(h.ByteSize() + 3 for h in out.hits))
            fit = max(0, int((limit - (size - hits_part)) / (hits_part / len(out.hits)))) if len(out.hits) else 0
            raise RequestError("resource_exhausted", f"{len(out.hits)} hits take {size} bytes, more than this server's "
                                                     f"message limit of {self.limits.max_message_bytes} bytes "
                                                     f"(--max-message-mb): ask for at most {fit} hits")
        if request.include_thumbnails:
            cancelled = self._cancelled(context)
            # best first, as many as the message limit holds: k=1000 at 512 px would pass it, and the
            # whole answer would then fail to send
            room = self.limits.max_message_bytes - out.ByteSize() - 1024
            opened: dict = {}       # raster id -> that raster, open for all its hits' thumbnails, or why not
            try:
                for i, (hit, msg) in enumerate(zip(hits, out.hits)):
                    raise_if_cancelled(cancelled)   # a client gone, or the server stopping: no more reads for it
                    png, error = self._thumbnail(hit, thumb, rows[hit.raster_id], changed[hit.raster_id].reason,
                                                 opened)
                    cost = len(png) + 16 + len(error.encode())
                    # room kept for the notes of the hits after this one, should they be left out
                    if cost + (len(out.hits) - i - 1) * note > room:
                        log.info("search: thumbnails for the first %d of %d hits; more would pass the message "
                                 "limit of %d bytes", i, len(out.hits), self.limits.max_message_bytes)
                        for rest in out.hits[i:]:
                            rest.thumbnail_error = left_out
                        break
                    msg.thumbnail_png = png
                    msg.thumbnail_error = error
                    room -= cost
            finally:
                for raster in opened.values():
                    if isinstance(raster, Raster):
                        raster.close()
        out.seconds = time.monotonic() - started
        return out

    def _check_prompt(self, field: str, text: str) -> str:
        """A query or prompt as check_text has it, or INVALID_ARGUMENT for one with no letter, or
        longer than the text tower reads: its end would be cut off without a word, and two long
        queries that differ only there searched alike."""
        text = check_text(field, text, self.limits)
        _check_has_words(field, text)
        tokens, room = self.engine.text_tokens(text)
        if tokens > room:
            raise _bad(f"{field} is {tokens} tokens; the model reads at most {room}, so its end would be ignored: "
                       "shorten it to the words that matter (a phrase, not a paragraph)")
        return text

    def _unfamiliar(self, text: str) -> list:
        """The words of a query or prompt the checkpoint barely trained on, with close spellings it
        knows (none without its word list)."""
        words = self.engine.words
        if not words:
            return []
        return [pb.UnfamiliarWord(word=w, close_spellings=words.close_spellings(w)) for w in words.unfamiliar(text)]

    def _thumbnail(self, hit, side: int, row: dict | None, changed: str, opened: dict) -> tuple[bytes, str]:
        """(PNG of the hit's tile, "") or (b"", why there is none; "" for a pixel source's tile).
        `row` is the hit's raster's index entry (None: removed meanwhile), `changed` why its file is no
        longer what was indexed ("" when it is). `opened` keeps each raster open for the search's other
        hits on it. A raster that is not 8-bit takes the stretch its tiles were indexed with: working it
        out again reads the whole raster, decimated (0.7 s for a 5,000 x 5,000 16-bit GeoTIFF)."""
        if hit.raster_path.startswith(PIXELS_PREFIX):
            return b"", ""
        if changed:     # its pixels at the tile's window would be another image's, or nothing
            return b"", changed
        if row is None:
            return b"", "its raster was removed from the index during the search"
        if hit.raster_id not in opened:
            try:
                settings = row.get("settings") or {}
                red, green, blue = settings.get("bands") or (0, 0, 0)
                stretch = settings.get("stretch")
                mapping = BandMapping(red=red, green=green, blue=blue, stretch_low=stretch[0] if stretch else None,
                                      stretch_high=stretch[1] if stretch else None)
                raster = opened[hit.raster_id] = open_raster(hit.raster_path, bands=mapping,
                                                             allowed_roots=self.allowed_roots)
                stored = (row.get("extra") or {}).get("stretch_ranges")
                if stored:      # the file is as indexed (changed is ""): the stretch its tiles were read with
                    try:
                        raster.keep_stretch_ranges(stored)
                    except (TypeError, ValueError, IndexError) as e:    # worked out again instead
                        log.warning("raster %s: stored stretch ranges %r not taken: %s", hit.raster_id, stored, e)
            except (RasterError, TileIndexError, TypeError, ValueError) as e:
                log.info("no thumbnails from raster %s: %s", hit.raster_id, e)
                opened[hit.raster_id] = str(e)
        raster = opened[hit.raster_id]
        if isinstance(raster, str):
            return b"", raster
        try:
            scale = side / max(hit.width, hit.height)
            out = (max(1, round(hit.width * scale)), max(1, round(hit.height * scale)))
            rgb, _ = raster.read_window(hit.col, hit.row, hit.width, hit.height, out)
            return _png(rgb), ""
        except (RasterError, TypeError, ValueError) as e:
            log.info("no thumbnail for tile %s: %s", hit.tile_id, e)
            return b"", str(e)

    # -- Segment --
    @streaming
    def Segment(self, request, context):
        self._check_serving()
        with self._long_call("segment"):
            yield from self._segment(request, context)

    def _segment(self, request, context):
        limits = self.limits
        prompts = list(request.prompts)
        if not prompts:
            raise _bad("prompts is empty; give at least one, e.g. [\"buildings\"]")
        if len(prompts) > limits.max_prompts:
            raise _bad(f"{len(prompts)} prompts given; the limit is {limits.max_prompts} per request")
        prompts = [self._check_prompt(f"prompts[{i}]", p) for i, p in enumerate(prompts)]
        threshold = request.threshold if request.HasField("threshold") else DEFAULT_THRESHOLD
        if not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
            raise _bad(f"threshold {threshold} must be in [0, 1]")
        if not math.isfinite(request.min_area) or request.min_area < 0:
            raise _bad(f"min_area {request.min_area} must be 0 or a positive area in map units squared")
        if not math.isfinite(request.min_area_m2) or request.min_area_m2 < 0:
            raise _bad(f"min_area_m2 {request.min_area_m2} must be 0 or a positive area in square metres")
        tolerance = request.simplify_tolerance if request.HasField("simplify_tolerance") else None
        if tolerance is not None and (not math.isfinite(tolerance) or tolerance < 0):
            raise _bad(f"simplify_tolerance {tolerance} must be 0 (none) or a positive distance in map units")
        window = request.sao_window.size or self.sao_window
        sigma = request.sao_window.sigma
        if not math.isfinite(sigma) or sigma < 0:
            raise _bad(f"sao_window.sigma {sigma} must be >= 0 (0 = uniform window)")
        grid = self.engine.grid
        window = min(window, grid)
        if window < grid and window % 2 == 0:
            raise _bad(f"sao_window.size {window} must be odd (1, 3, 5, ...) so the window centres on a patch")
        edge_radius = request.edge_radius if request.HasField("edge_radius") else self.edge_radius
        try:
            check_edge_radius(edge_radius, limit=limits.max_edge_radius)
        except ValueError as e:
            raise _bad(f"{e}; leave it unset for the server's default ({self.edge_radius})") from None
        overlap = _overlap(request.tile_overlap if request.HasField("tile_overlap") else None,
                           DEFAULT_SEGMENT_OVERLAP, "tile_overlap")
        resolution = _resolution(request.target_resolution)
        extent = extent_parts(request.extent) if request.HasField("extent") else None
        cancelled = self._cancelled(context)
        # the work after the model holds several full-size planes a prompt (gigabytes at the largest
        # extents): a few Segments at a time, the others queued, so many at once cannot exhaust memory
        if not self._segment_slots.acquire(blocking=False):
            yield pb.SegmentEvent(progress=pb.SegmentProgress(
                stage=pb.SEGMENT_STAGE_QUEUED, message=f"waiting: {self.segments_at_once} segmentations are running, "
                                                       "the most this server runs at once (serve --segments-at-once)"))
            while not self._segment_slots.acquire(timeout=0.25):
                raise_if_cancelled(cancelled)
        held = True         # given back once the answers are made, before a slow client reads them

        def give_back_slot():
            nonlocal held
            if held:
                held = False
                self._segment_slots.release()
        try:
            yield pb.SegmentEvent(progress=pb.SegmentProgress(stage=pb.SEGMENT_STAGE_READING,
                                                              message="reading the extent"))
            raster = self._open(request.source, request.bands if request.HasField("bands") else None)
            events: queue.Queue = queue.Queue()
            throttle = _Progress()

            def progress(stage, done, total):
                if stage == "relevance" and throttle.due(done == total):
                    events.put(pb.SegmentProgress(stage=pb.SEGMENT_STAGE_RELEVANCE, tiles_done=done, tiles_total=total,
                                                  message=f"relevance maps: tile {done}/{total}"))
                elif stage == "polygonizing":
                    events.put(pb.SegmentProgress(stage=pb.SEGMENT_STAGE_POLYGONIZING, tiles_done=done, tiles_total=total,
                                                  message="thresholding and polygonizing"))

            outcome: dict = {}
            closing = threading.Event()     # the answer is no longer wanted: the work stops at its next check

            def work():
                try:
                    outcome["output"] = segment(
                        raster, prompts, self.engine, extent=extent, threshold=threshold, min_area=request.min_area,
                        min_area_m2=request.min_area_m2,
                        simplify_tolerance=tolerance, window=window, sigma=sigma, target_resolution=resolution,
                        overlap=overlap, max_pixels=limits.max_extent_pixels, keep_relevance=request.return_relevance_map,
                        ensemble=not request.raw_prompts, edge_radius=edge_radius, progress=progress,
                        cancelled=lambda: closing.is_set() or cancelled())
                except BaseException as e:  # noqa: BLE001 - re-raised in the handler thread
                    outcome["error"] = e
                finally:
                    events.put(None)

            with raster:
                thread = threading.Thread(target=work, name="skyprompt-segment", daemon=True)
                thread.start()
                try:
                    while True:
                        event = events.get()
                        if event is None:
                            break
                        yield pb.SegmentEvent(progress=event)
                finally:
                    # also when the stream is closed at a yield (its client gone): the work ends before
                    # the raster it reads is closed, and before its memory slot is given to another
                    closing.set()
                    thread.join()
            if "error" in outcome:
                raise outcome["error"]
            answers = self._segment_answers(outcome.pop("output"), raster, request)
            # the working planes went with the function's locals, and with them the memory the slot
            # stands for: a client that reads its answers slowly (or not at all, frozen) no longer
            # keeps the next Segment waiting
            give_back_slot()
            for msg in answers:
                yield pb.SegmentEvent(result=msg)
        finally:
            give_back_slot()

    def _segment_answers(self, output, raster: Raster, request) -> list:
        """The SegmentResult of each prompt of a Segment's output."""
        srs = raster.srs
        crs = pb.Crs(authid=raster.crs_authid, wkt=raster.crs_wkt)
        answers = []
        for result in output.results:
            msg = pb.SegmentResult(prompt=result.prompt, prompt_index=result.index, crs=crs,
                                   extent=_box(output.extent), max_relevance=result.max_relevance,
                                   dropped_small=result.dropped_small,
                                   unfamiliar_words=self._unfamiliar(result.prompt), band_note=raster.band_note)
            for polygon in result.polygons:
                g = polygon.geometry
                msg.polygons.add(wkb=g.wkb, wkt=g.wkt if request.include_wkt else "", score=polygon.score,
                                 max_score=polygon.max_score, area=polygon.area, area_m2=polygon.area_m2,
                                 bounds=_box(g.bounds))
            if request.return_relevance_map and result.relevance is not None:
                # the extent's own map, not the ground read around a small extent
                relevance, gt = crop_to_window(result.relevance, output.geotransform, output.window)
                msg.relevance_map_tiff = relevance_geotiff(relevance, gt, srs)
            size = msg.ByteSize()
            if size > self.limits.max_message_bytes - 1024:
                # said as what to change, not as gRPC's "Sent message larger than max" after the work
                parts = (["its relevance map (leave return_relevance_map off)"] if msg.relevance_map_tiff else []) + (
                    ["the WKT copies (leave include_wkt off)"] if request.include_wkt else [])
                raise RequestError("resource_exhausted", f"the answer for prompt {result.prompt!r} is {size} bytes, more "
                                                         f"than this server's message limit of "
                                                         f"{self.limits.max_message_bytes} bytes (--max-message-mb): "
                                                         f"ask without {' or '.join(parts) or 'so many polygons'}, or "
                                                         "for a smaller extent or a coarser target_resolution")
            answers.append(msg)
        return answers

    # -- Caption --
    @unary
    def Caption(self, request, context):
        self._check_serving()
        started = time.monotonic()
        # the start token takes one place of the model's text context: the rest is what a caption can fill
        longest = self.engine.config.context_length - 1
        max_len = request.max_len or min(32, longest)
        if max_len > longest:
            raise _bad(f"max_len {max_len} is more than this model can generate: at most {longest} tokens "
                       f"(its text context of {longest + 1} less the start token)")
        beam = max(1, request.beam_size)
        if beam > self.limits.max_beam_size:
            raise _bad(f"beam_size {beam} is above the limit of {self.limits.max_beam_size}")
        extent = extent_parts(request.extent) if request.HasField("extent") else None
        with self._open(request.source, request.bands if request.HasField("bands") else None) as raster:
            image, box = model_input(raster, extent, self.engine.image_size, self.limits.max_extent_pixels)
            text, logp = self.engine.caption(image, max_len, beam, cancelled=self._cancelled(context))
            return pb.CaptionResponse(caption=text, mean_log_prob=min(0.0, logp), extent=_box(box),
                                      crs=_crs_message(raster), seconds=time.monotonic() - started,
                                      band_note=raster.band_note)

    # -- EmbedText --
    @unary
    def EmbedText(self, request, context):
        self._check_serving()
        texts = list(request.texts)
        if not texts:
            raise _bad("texts is empty; give at least one text to embed")
        if len(texts) > self.limits.max_texts:
            raise _bad(f"{len(texts)} texts given; the limit is {self.limits.max_texts} per request")
        texts = [check_text(f"texts[{i}]", t, self.limits) for i, t in enumerate(texts)]
        vectors = self.engine.embed_texts(texts, cancelled=self._cancelled(context))
        return pb.EmbedTextResponse(dim=vectors.shape[1], checkpoint_hash=self.engine.checkpoint_hash,
                                    embeddings=[pb.Embedding(values=v.tolist()) for v in vectors])


    # -- RemoveRaster --
    @unary
    def RemoveRaster(self, request, context):
        self._check_serving()
        rid, path = request.raster_id.strip(), request.raster_path.strip()
        if bool(rid) == bool(path):
            raise _bad("give exactly one of raster_id and raster_path")
        with self.raster_jobs.commit_lock:
            if rid:
                entry = self.index.raster(rid)
                key = entry["path"]
            else:
                key = normalise_raster_path(os.path.abspath(path))
                entry = self.index.raster_by_path(key)
            stopped = self.raster_jobs.mark_removed(key)
            if entry is None:
                if not stopped:
                    raise RequestError("not_found", f"raster '{path}' is not in the index; nothing to remove")
                log.info("stopped indexing %s: it was removed before its first index was stored", _shown_path(key))
                return pb.RemoveRasterResponse(raster_name=os.path.basename(key), tiles_removed=0,
                                               indexing_stopped=True)
            self.index.remove_raster(int(entry["id"]))
        log.info("removed %s (%d tiles) from the index%s", entry["name"], entry["tile_count"],
                 "; its indexing under way was stopped" if stopped else "")
        return pb.RemoveRasterResponse(raster_id=str(entry["id"]), raster_name=entry["name"],
                                       tiles_removed=entry["tile_count"], indexing_stopped=stopped)

    # -- ListRasters --
    @unary
    def ListRasters(self, request, context):
        self._check_serving()
        current = self.engine.checkpoint_hash
        entries = self.index.list_rasters(None if request.all_checkpoints else current)
        out = pb.ListRastersResponse()
        for e in entries:
            check = _changed_since_indexing(e)
            out.rasters.add(
                raster_id=str(e["id"]), raster_path=_shown_path(e["path"]), raster_name=e["name"],
                tile_count=e["tile_count"], crs=pb.Crs(authid=e["crs_authid"], wkt=e["crs_wkt"]),
                bounds=_box(e["bounds"]), bounds_wgs84=_box(e["bounds_wgs84"]),
                current_checkpoint=e["checkpoint_hash"] == current, indexed_at=e["indexed_at"],
                changed_on_disk=check.reason, file_state=check.state)
        return out


def _tile_dict(tile) -> dict:
    return {"col": tile.col, "row": tile.row, "width": tile.width, "height": tile.height, "bounds": tile.bounds,
            "bounds_wgs84": tile.bounds_wgs84, "footprint_wkt": tile.footprint_wkt,
            "footprint_wgs84_wkt": tile.footprint_wgs84_wkt}


def model_input(raster: Raster, extent, size: int, max_pixels: int) -> tuple[np.ndarray, tuple]:
    """One model input [3, size, size] covering `extent`, aspect kept, padded right/bottom; and the
    extent actually covered, in the raster's CRS."""
    col, row, width, height = raster.window_for_extent(extent)
    if width * height > max_pixels * CAPTION_EXTENT_FACTOR:
        # reading is decimated by GDAL, but an absurd extent still costs
        raise RequestError("resource_exhausted", f"the extent covers {width} x {height} pixels; zoom in to at most "
                                                 f"{max_pixels * CAPTION_EXTENT_FACTOR} pixels for a caption")
    scale = size / max(width, height)
    out = (max(1, round(width * scale)), max(1, round(height * scale)))
    rgb, valid = raster.read_window(col, row, width, height, out)
    if valid is not None and not valid.any():
        # black pixels would still get a confident caption ("a place with farmland")
        raise _bad(NO_VALID_PIXELS)
    image = np.zeros((3, size, size), np.uint8)
    image[:, :rgb.shape[1], :rgb.shape[2]] = rgb
    gt = raster.window_geotransform(col, row, width, height, width, height)
    return image, bounds_from_geotransform(gt, width, height)   # all four corners: rotated rasters too
