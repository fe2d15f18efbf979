"""GDAL raster access: open a raster safely, choose its bands, scale them to RGB bytes, read by windows, cut tiles.

One tiler serves the gRPC server (indexing, segmentation, captions) and the dataset builder, so
every raster the model sees goes through the same band choice, stretch, masking and resampling.

Nothing here reads a whole raster into memory: pixels are read window by window with GDAL doing the
resampling (``buf_xsize``/``buf_ysize``), and raster-wide statistics come from one decimated read
of at most ``STATS_SIDE`` pixels on the long side (GDAL uses overviews for it when the file has them).

Conventions (those of proto/skyprompt/v1/skyprompt.proto):
- pixel windows are ``(col, row, width, height)`` in the raster's native grid, from the top-left;
- bounds are ``(xmin, ymin, xmax, ymax)``; "wgs84" values are EPSG:4326 with x = longitude;
- every failure a request can cause is a ``RasterError`` whose ``kind`` names the gRPC status.

A ``Raster`` serialises its own GDAL calls with a lock (a GDAL dataset must not be read from two
threads at once); for parallel reads open one ``Raster`` per thread. GDAL's exception mode is
switched on only around this module's own calls and the caller's setting is restored afterwards.
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import math
import os
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from stat import S_ISREG
from typing import Iterator, Sequence
from xml.etree import ElementTree

import numpy as np
from osgeo import gdal, ogr, osr

from .defaults import DEFAULT_STRETCH

ERROR_KINDS = frozenset({"invalid_argument", "not_found", "permission_denied", "resource_exhausted", "aborted"})

STATS_SIDE = 1024                 # long side of the decimated read behind the stretch and tile masks
DEFAULT_MAX_PIXELS = 4096 * 4096  # cap on the output of read_extent
MAX_TILE_SIZE = 8192
FOOTPRINT_SEGMENTS = 8            # points per edge of EPSG:4326 footprints (projections bend edges)
BOUNDS_DENSIFY = 21               # points per edge when transforming bounding boxes

RESAMPLING = {
    "nearest": gdal.GRIORA_NearestNeighbour,
    "bilinear": gdal.GRIORA_Bilinear,
    "cubic": gdal.GRIORA_Cubic,
    "average": gdal.GRIORA_Average,
    "mode": gdal.GRIORA_Mode,
    "lanczos": gdal.GRIORA_Lanczos,
}

# The data types of PixelSource (proto DataType enum value -> GDAL name).
DATA_TYPES = {
    "Byte": (gdal.GDT_Byte, np.uint8),
    "UInt16": (gdal.GDT_UInt16, np.uint16),
    "Int16": (gdal.GDT_Int16, np.int16),
    "UInt32": (gdal.GDT_UInt32, np.uint32),
    "Int32": (gdal.GDT_Int32, np.int32),
    "Float32": (gdal.GDT_Float32, np.float32),
    "Float64": (gdal.GDT_Float64, np.float64),
}
_PROTO_DATA_TYPES = {1: "Byte", 2: "UInt16", 3: "Int16", 4: "UInt32", 5: "Int32", 6: "Float32", 7: "Float64"}
_NUMPY_DATA_TYPES = {np.dtype(np_type).name: name for name, (_, np_type) in DATA_TYPES.items()}


# an extent whose pixels are all nodata or transparent: a caption or polygons of it would describe black
NO_VALID_PIXELS = ("the extent holds no valid pixels of the raster (nodata, or transparent): give an area "
                   "with imagery")


class RasterError(Exception):
    """A raster request that cannot be served; ``kind`` is the gRPC status it maps to.

    The message names the path or field at fault and what to do about it.
    """

    def __init__(self, kind: str, message: str):
        if kind not in ERROR_KINDS:
            raise ValueError(f"unknown RasterError kind {kind!r}; expected one of {sorted(ERROR_KINDS)}")
        super().__init__(message)
        self.kind = kind
        self.message = message

    def __reduce__(self):
        # pickled whole (kind and message), so it crosses process pools as itself
        return type(self), (self.kind, self.message)


# ---------------------------------------------------------------------------------------------
# GDAL error handling
# ---------------------------------------------------------------------------------------------

# The bindings' exception flag is process-wide, not per thread. Concurrent readers therefore share
# one count: the first to enter turns exceptions on, the last to leave restores the setting found.
_exceptions_lock = threading.Lock()
_exceptions_depth = 0
_exceptions_turned_on: list = []


@contextmanager
def _gdal_exceptions():
    global _exceptions_depth
    with _exceptions_lock:
        if _exceptions_depth == 0:
            _exceptions_turned_on.clear()
            for module in (gdal, ogr, osr):
                if not module.GetUseExceptions():
                    module.UseExceptions()
                    _exceptions_turned_on.append(module)
        _exceptions_depth += 1
    try:
        yield
    finally:
        with _exceptions_lock:
            _exceptions_depth -= 1
            if _exceptions_depth == 0:
                # The bindings keep a stack of error handlers: undo in the reverse order.
                for module in reversed(_exceptions_turned_on):
                    try:
                        module.DontUseExceptions()
                    except RuntimeError:
                        pass  # someone else changed the setting meanwhile; theirs stands
                _exceptions_turned_on.clear()


def _gdal_reason(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:300] if text else type(error).__name__


@contextmanager
def _gdal(kind: str, what: str):
    """Run GDAL calls with exceptions on and turn any GDAL failure into RasterError(kind, what: reason)."""
    with _gdal_exceptions():
        try:
            yield
        except RasterError:
            raise
        except (RuntimeError, TypeError, ValueError) as error:
            raise RasterError(kind, f"{what} (GDAL: {_gdal_reason(error)})") from None


# ---------------------------------------------------------------------------------------------
# Coordinate reference systems
# ---------------------------------------------------------------------------------------------

_AUTHID = re.compile(r"^[A-Za-z][A-Za-z0-9_]*:[A-Za-z0-9_.]+$")   # EPSG:4326, ESRI:102100, OGC:CRS84
_URN = re.compile(r"^urn:ogc:def:crs:[A-Za-z0-9_.:]+$", re.IGNORECASE)
_WKT = re.compile(
    r"^\s*(PROJCS|GEOGCS|GEOCCS|COMPD_CS|LOCAL_CS|VERT_CS|PROJCRS|PROJECTEDCRS|GEOGCRS|GEOGRAPHICCRS|"
    r"GEODCRS|GEODETICCRS|BOUNDCRS|COMPOUNDCRS|VERTCRS|VERTICALCRS|ENGCRS|ENGINEERINGCRS|DERIVEDPROJCRS)\s*\[",
    re.IGNORECASE)
_MAX_CRS_CHARS = 100_000


def _short(text: str, limit: int = 80) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _traditional(srs: osr.SpatialReference) -> osr.SpatialReference:
    # x = easting/longitude everywhere, whatever axis order the EPSG definition declares.
    srs.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    return srs


def _wgs84() -> osr.SpatialReference:
    srs = osr.SpatialReference()
    with _gdal("invalid_argument", "cannot build EPSG:4326"):
        srs.ImportFromEPSG(4326)
    return _traditional(srs)


def parse_crs(text: str | osr.SpatialReference) -> osr.SpatialReference:
    """A CRS from an authority id ("EPSG:26914", "OGC:CRS84", a urn), WKT 1/2 or a PROJ string.

    File names and URLs are refused on purpose: GDAL would read or fetch them, and the text comes
    from requests. Unknown or malformed -> RasterError("invalid_argument", "unknown CRS ...").
    """
    if isinstance(text, osr.SpatialReference):
        return _traditional(text.Clone())
    if not isinstance(text, str):
        raise RasterError("invalid_argument", f"CRS must be text (an authority id such as 'EPSG:4326' or WKT), "
                                              f"not {type(text).__name__}")
    stripped = text.strip()
    hint = "give an authority id such as 'EPSG:4326' or the CRS as WKT"
    if not stripped:
        raise RasterError("invalid_argument", f"empty CRS: {hint}")
    if len(stripped) > _MAX_CRS_CHARS:
        raise RasterError("invalid_argument", f"CRS text is {len(stripped)} characters long (limit {_MAX_CRS_CHARS}): {hint}")
    srs = osr.SpatialReference()
    unknown = f"unknown CRS '{_short(stripped)}': {hint}"
    with _gdal_exceptions():
        try:
            if _WKT.match(stripped):
                status = srs.ImportFromWkt(stripped)
            elif _AUTHID.match(stripped) or _URN.match(stripped) or stripped.startswith("+proj="):
                status = srs.SetFromUserInput(stripped)
            else:
                raise RasterError("invalid_argument", unknown)
        except RuntimeError:
            raise RasterError("invalid_argument", unknown) from None
    if status != 0:
        raise RasterError("invalid_argument", unknown)
    return _traditional(srs)


def crs_authid(srs: osr.SpatialReference | None) -> str:
    """"EPSG:26914" style id of a CRS, or "" when it has none GDAL can name."""
    if srs is None:
        return ""
    with _gdal_exceptions():
        try:
            name, code = srs.GetAuthorityName(None), srs.GetAuthorityCode(None)
            if not (name and code):
                # WKT1 files often lack the top-level ID even for plain EPSG systems.
                guess = srs.Clone()
                if guess.AutoIdentifyEPSG() == 0:
                    name, code = guess.GetAuthorityName(None), guess.GetAuthorityCode(None)
        except RuntimeError:
            return ""
    return f"{name}:{code}" if name and code else ""


def _crs_label(srs: osr.SpatialReference) -> str:
    authid = crs_authid(srs)
    if authid:
        return authid
    name = srs.GetName() if srs is not None else ""
    return f"'{_short(name, 60)}'" if name else "a CRS without an authority id"


def _finite_bounds(bounds: Sequence[float]) -> tuple[float, float, float, float]:
    values = tuple(float(v) for v in bounds)
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise RasterError("invalid_argument", f"bounds must be 4 finite numbers (xmin, ymin, xmax, ymax), got {bounds!r}")
    return values  # type: ignore[return-value]


def transform_bounds(bounds: Sequence[float], src_crs: str | osr.SpatialReference,
                     dst_crs: str | osr.SpatialReference, densify: int = BOUNDS_DENSIFY) -> tuple[float, float, float, float]:
    """Bounding box of ``bounds`` (xmin, ymin, xmax, ymax in src_crs) reprojected to dst_crs.

    The edges are densified (``densify`` points each) so curved reprojected edges are enclosed.
    Geographic results crossing the antimeridian come back with xmin > xmax, as GDAL returns them.
    """
    xmin, ymin, xmax, ymax = _finite_bounds(bounds)
    src, dst = parse_crs(src_crs), parse_crs(dst_crs)
    if src.IsSame(dst):
        return xmin, ymin, xmax, ymax
    what = f"cannot reproject ({xmin}, {ymin}, {xmax}, {ymax}) from {_crs_label(src)} to {_crs_label(dst)}"
    with _gdal("invalid_argument", what):
        transform = osr.CoordinateTransformation(src, dst)
        result = transform.TransformBounds(xmin, ymin, xmax, ymax, int(densify))
    if not all(math.isfinite(v) for v in result):
        raise RasterError("invalid_argument", f"{what}: the box lies outside the area where that transformation is defined")
    return tuple(float(v) for v in result)  # type: ignore[return-value]


def wrapped_lonlat_box(box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    """A longitude/latitude box with its longitudes in [-180, 180]: one stored past 180 degrees (a
    raster in EPSG:4326 from 179.99 to 180.02, which GDAL hands back as it is) becomes a box across
    the antimeridian as GDAL gives those from other CRSs, xmin > xmax (179.99 to -179.98); one a
    whole turn or wider, -180 to 180."""
    xmin, ymin, xmax, ymax = box
    if xmin > xmax or (xmin >= -180.0 and xmax <= 180.0):
        return box
    if xmax - xmin >= 360.0:
        return -180.0, ymin, 180.0, ymax
    west, east = (xmin + 180.0) % 360.0 - 180.0, (xmax + 180.0) % 360.0 - 180.0
    return west, ymin, (180.0 if east == -180.0 else east), ymax


def transformation(source: osr.SpatialReference, target: osr.SpatialReference | None = None
                   ) -> osr.CoordinateTransformation | None:
    """The transformation from `source` to `target` (EPSG:4326, longitude first, when None); None
    where there is none, e.g. from an engineering CRS (a site grid has no place on the globe)."""
    try:
        with _gdal_exceptions():
            return osr.CoordinateTransformation(source, target if target is not None else _wgs84())
    except (RuntimeError, RasterError):
        return None


def densified_box(xmin: float, ymin: float, xmax: float, ymax: float, points_per_edge: int) -> tuple[np.ndarray, np.ndarray]:
    """A box's outline as x and y arrays, `points_per_edge` points an edge: reprojected point by
    point, it keeps the curved shape of the box in the other CRS."""
    t = np.linspace(0.0, 1.0, points_per_edge + 1)[:-1]
    w, h = xmax - xmin, ymax - ymin
    xs = np.concatenate([xmin + w * t, np.full_like(t, xmax), xmax - w * t, np.full_like(t, xmin)])
    ys = np.concatenate([np.full_like(t, ymin), ymin + h * t, np.full_like(t, ymax), ymax - h * t])
    return xs, ys


def shares_ground(area, shapes):
    """Whether each of `shapes` shares ground with `area` (vectorised, as shapely's predicates): a
    shape that only touches it, an edge or a corner on its edge, does not."""
    import shapely

    return shapely.intersects(area, shapes) & ~shapely.touches(area, shapes)


def unwrap_longitudes(lon: np.ndarray, period: float = 360.0) -> np.ndarray:
    """Longitudes along one outline made continuous (no 360-degree jumps), shifted so the least lies
    in [-180, 180): a tile across 180 degrees spans e.g. 179.7..180.3, not -179.7..180 round the
    globe. Its box may then end past 180; searches test boxes at -360, 0 and +360 degrees. With
    another `period`, the same for x in a CRS whose world repeats that far east (world_width)."""
    lon = np.unwrap(np.asarray(lon, float), period=period)
    return lon - period * np.floor((lon.min() + period / 2) / period)


def lonlat_ring(lon: np.ndarray, lat: np.ndarray, period: float = 360.0,
                poles: tuple[float, float] | None = None) -> np.ndarray:
    """An outline's points (not closed) as an (n, 2) ring a polygon can be made of: x continuous
    (unwrap_longitudes), and an outline that goes once round a pole, as that of a tile holding the
    pole does, closed over the pole, so its shape covers the pole and not a band of latitude beside
    it. `poles`: the (south, north) y it is closed at, +-90 for `period` 360 (longitude/latitude);
    in another CRS that repeats east and west (Web Mercator) the y past which the map ends for the
    caller, or None: not closed."""
    if poles is None and period == 360.0:
        poles = (-90.0, 90.0)
    lon, y = np.asarray(lon, float), np.asarray(lat, float)
    if period == 360.0:
        # a point on a pole has any longitude (PROJ gives 0): in longitude/latitude it is an edge along
        # the pole, from the longitude the outline comes in on to the one it leaves on
        at_pole = np.abs(y) >= 90.0 - 1e-9
        if at_pole.any() and not at_pole.all():
            lon, y = _pole_points_as_edges(lon, y, at_pole)
    x = unwrap_longitudes(lon, period)
    closing = (x[0] - x[-1] + period / 2) % period - period / 2      # the last point back to the first
    turn = x[-1] + closing - x[0]
    if abs(turn) > period / 2 and poles is not None:
        pole = poles[1] if y.mean() > 0 else poles[0]
        x = np.concatenate([x, [x[0] + turn, x[0] + turn, x[0]]])
        y = np.concatenate([y, [y[0], pole, pole]])
    return np.column_stack([x, y])


def _pole_points_as_edges(lon: np.ndarray, lat: np.ndarray, at_pole: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n, out_lon, out_lat = len(lon), [], []
    for i in range(n):
        if not at_pole[i]:
            out_lon.append(lon[i])
            out_lat.append(lat[i])
            continue
        before = next(lon[(i - j) % n] for j in range(1, n) if not at_pole[(i - j) % n])
        after = next(lon[(i + j) % n] for j in range(1, n) if not at_pole[(i + j) % n])
        out_lon += [before, after]
        out_lat += [lat[i], lat[i]]
    return np.asarray(out_lon), np.asarray(out_lat)


def transform_points_quietly(transform: osr.CoordinateTransformation, points) -> np.ndarray:
    """(n, 2) `points` through `transform`, non-finite where they have no place (off an orthographic
    globe: expected by the callers, so GDAL's complaint stays out of the log)."""
    gdal.PushErrorHandler("CPLQuietErrorHandler")
    try:
        return np.asarray(transform.TransformPoints(np.asarray(points, float).tolist()), float)[:, :2]
    except RuntimeError:
        return np.full((len(points), 2), np.nan)
    finally:
        gdal.PopErrorHandler()


def points_in_box(points: np.ndarray, box: Sequence[float], period: float | None) -> np.ndarray:
    """Which of (n, 2) `points` lie in `box` (xmin, ymin, xmax, ymax), also a world east or west where
    its CRS repeats every `period` (world_width); non-finite points lie in none."""
    xmin, ymin, xmax, ymax = box
    inside = np.zeros(len(points), bool)
    with np.errstate(invalid="ignore"):
        in_rows = (points[:, 1] >= ymin) & (points[:, 1] <= ymax)
        for turn in sorted({-(period or 0.0), 0.0, period or 0.0}):
            inside |= in_rows & (points[:, 0] + turn >= xmin) & (points[:, 0] + turn <= xmax)
    return inside


def world_width(srs: osr.SpatialReference) -> float | None:
    """How far east a projected CRS's map repeats (Web Mercator: 40,075 km), or None where it does
    not repeat (polar, conic, orthographic, UTM): x at its central meridian +-180 degrees on the
    equator, taken when x grows with longitude there as it does in a cylindrical map. Remembered
    per CRS: a search asks it of the extent's CRS and of each hit raster's."""
    return 360.0 if srs.IsGeographic() else _projected_world_width(srs.ExportToWkt())


@functools.lru_cache(maxsize=256)
def _projected_world_width(wkt: str) -> float | None:
    srs = parse_crs(wkt)
    lon0 = srs.GetProjParm(osr.SRS_PP_CENTRAL_MERIDIAN, 0.0) or srs.GetProjParm(osr.SRS_PP_LONGITUDE_OF_CENTER, 0.0)
    to_map = transformation(_wgs84(), srs)
    if to_map is None:
        return None
    x = transform_points_quietly(to_map, [[lon0 + d, 0.0] for d in (-179.9, -90.0, 90.0, 179.9)])[:, 0]
    if not np.isfinite(x).all() or not x[0] < x[1] < x[2] < x[3]:
        return None
    width = float(x[3] - x[0]) * 180.0 / 179.9
    return width if abs(width - 2.0 * float(x[2] - x[1])) <= 0.02 * width else None


def bounds_from_geotransform(geotransform: Sequence[float], width: int, height: int) -> tuple[float, float, float, float]:
    """Bounding box of a width x height grid placed by a GDAL geotransform."""
    corners = _grid_to_map(geotransform, np.array([0, width, width, 0], float), np.array([0, 0, height, height], float))
    return (float(corners[0].min()), float(corners[1].min()), float(corners[0].max()), float(corners[1].max()))


def _grid_to_map(gt: Sequence[float], px: np.ndarray, py: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return gt[0] + px * gt[1] + py * gt[2], gt[3] + px * gt[4] + py * gt[5]


# ---------------------------------------------------------------------------------------------
# Requests: band mapping and extents
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BandMapping:
    """Which bands feed red, green and blue (1-based; 0 = automatic) and the stretch percentiles.

    Automatic: the bands whose colour interpretation is red/green/blue, else the first three
    non-alpha bands; a 1- or 2-band raster repeats its first band. Byte data is used as is and
    other types are stretched between the 2nd and 98th percentiles; setting either percentile
    stretches Byte data too (the other one keeps its default).
    """

    red: int = 0
    green: int = 0
    blue: int = 0
    stretch_low: float | None = None
    stretch_high: float | None = None

    @classmethod
    def from_message(cls, message) -> "BandMapping":
        """From a skyprompt.v1.BandMapping message (None or unset -> automatic)."""
        if message is None:
            return cls()
        has = message.HasField
        return cls(red=int(message.red), green=int(message.green), blue=int(message.blue),
                   stretch_low=float(message.stretch_low_percent) if has("stretch_low_percent") else None,
                   stretch_high=float(message.stretch_high_percent) if has("stretch_high_percent") else None)

    @property
    def stretch_requested(self) -> bool:
        return self.stretch_low is not None or self.stretch_high is not None

    def percentiles(self) -> tuple[float, float]:
        """(low, high) percentiles, validated."""
        low = DEFAULT_STRETCH[0] if self.stretch_low is None else self.stretch_low
        high = DEFAULT_STRETCH[1] if self.stretch_high is None else self.stretch_high
        for name, value in (("stretch_low", low), ("stretch_high", high)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 100.0:
                raise RasterError("invalid_argument", f"band mapping {name}={value!r} must be a percentile in 0..100")
        if not low < high:
            raise RasterError("invalid_argument", f"band mapping stretch_low={low} must be below stretch_high={high}")
        return float(low), float(high)


def _as_band_mapping(bands) -> BandMapping:
    if bands is None:
        return BandMapping()
    if isinstance(bands, BandMapping):
        return bands
    if hasattr(bands, "HasField"):
        return BandMapping.from_message(bands)
    raise RasterError("invalid_argument", f"bands must be a BandMapping, not {type(bands).__name__}")


def _extent_parts(extent) -> tuple[float, float, float, float, str] | None:
    """(xmin, ymin, xmax, ymax, crs) from a tuple or an Extent-like object; None = the whole raster."""
    if extent is None:
        return None
    if all(hasattr(extent, name) for name in ("xmin", "ymin", "xmax", "ymax")):
        values = [extent.xmin, extent.ymin, extent.xmax, extent.ymax]
        crs = getattr(extent, "crs", "") or ""
    elif isinstance(extent, (tuple, list)) and len(extent) in (4, 5):
        values = list(extent[:4])
        crs = extent[4] if len(extent) == 5 and extent[4] is not None else ""
    else:
        raise RasterError("invalid_argument", f"extent must be (xmin, ymin, xmax, ymax[, crs]), got {extent!r}")
    try:
        xmin, ymin, xmax, ymax = (float(v) for v in values)
    except (TypeError, ValueError):
        raise RasterError("invalid_argument", f"extent coordinates must be numbers, got {values!r}") from None
    if not isinstance(crs, (str, osr.SpatialReference)):
        raise RasterError("invalid_argument", f"extent crs must be text (authority id or WKT), got {type(crs).__name__}")
    if (xmin, ymin, xmax, ymax) == (0.0, 0.0, 0.0, 0.0) and crs == "":
        return None  # the wire contract's "unset extent"
    if not all(math.isfinite(v) for v in (xmin, ymin, xmax, ymax)):
        raise RasterError("invalid_argument",
                          f"extent ({xmin}, {ymin}, {xmax}, {ymax}) has a coordinate that is not a finite number")
    for low_name, low, high_name, high in (("xmin", xmin, "xmax", xmax), ("ymin", ymin, "ymax", ymax)):
        if low > high:
            raise RasterError("invalid_argument", f"extent is inverted: {low_name}={low} is greater than {high_name}={high}; "
                                                  f"swap them (xmin < xmax and ymin < ymax are required)")
        if low == high:
            raise RasterError("invalid_argument", f"extent is degenerate: {low_name} = {high_name} = {low}; "
                                                  f"give a rectangle with xmin < xmax and ymin < ymax")
    return xmin, ymin, xmax, ymax, crs


def _check_int(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise RasterError("invalid_argument", f"{name} must be a whole number, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f"{low}..{high}" if high is not None else f">= {low}"
        raise RasterError("invalid_argument", f"{name}={value} is out of range ({bound})")
    return value


def _check_number(name: str, value, low: float, high: float, high_inclusive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) or not math.isfinite(value):
        raise RasterError("invalid_argument", f"{name} must be a finite number, got {value!r}")
    value = float(value)
    if value < low or value > high or (not high_inclusive and value == high):
        closing = "]" if high_inclusive else ")"
        raise RasterError("invalid_argument", f"{name}={value} is out of range [{low}, {high}{closing}")
    return value


def _check_resample(resample: str) -> int:
    if resample not in RESAMPLING:
        raise RasterError("invalid_argument", f"resample={resample!r} is not one of {sorted(RESAMPLING)}")
    return RESAMPLING[resample]


# a target resolution that would show the whole raster in fewer pixels a side, or enlarge each of its
# pixels more than this, is taken for a mistake of units (metres given for a raster in degrees, or
# the other way round) rather than honoured with one meaningless tile or an hour of tiles
MIN_WORKING_SIDE_PX = 8
MAX_UPSAMPLING = 100


def _check_resolution(target_resolution) -> float | None:
    if target_resolution is None or target_resolution == 0:
        return None  # 0 is the wire contract's "native resolution"
    if isinstance(target_resolution, bool) or not isinstance(target_resolution, (int, float, np.floating)) \
            or not math.isfinite(target_resolution) or target_resolution < 0:
        raise RasterError("invalid_argument", f"target_resolution={target_resolution!r} must be a positive number of "
                                              f"map units per pixel (or 0/None for native resolution)")
    return float(target_resolution)


# ---------------------------------------------------------------------------------------------
# Tiles
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tile:
    """One model-sized piece of a raster: its native pixel window and where it lies on the ground.

    ``index`` is the tile's position in the row-major grid of the request (skipped tiles keep
    their numbers, so indices are stable for a given raster and tiling). ``bounds_wgs84`` is None
    and ``footprint_wgs84_wkt`` empty when the raster's CRS cannot be transformed to EPSG:4326.
    """

    index: int
    col: int
    row: int
    width: int
    height: int
    bounds: tuple[float, float, float, float]
    bounds_wgs84: tuple[float, float, float, float] | None
    footprint_wkt: str
    footprint_wgs84_wkt: str

    @property
    def window(self) -> tuple[int, int, int, int]:
        return self.col, self.row, self.width, self.height


@dataclass(frozen=True)
class _TilePlan:
    cols: list[tuple[int, int]]   # (start, size) along x
    rows: list[tuple[int, int]]   # (start, size) along y
    window_width: int             # native pixels a full tile spans
    window_height: int
    tile_size: int
    # which tiles of the grid (row-major) meet the extent, where its window holds more than it (an
    # extent in another CRS, or a world raster met at both ends); None: all of them
    meets: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.cols) * len(self.rows) if self.meets is None else int(self.meets.sum())

    def windows(self) -> Iterator[tuple[int, tuple[int, int, int, int]]]:
        index = 0
        for row, height in self.rows:
            for col, width in self.cols:
                if self.meets is None or self.meets[index]:
                    yield index, (col, row, width, height)
                index += 1

    def out_size(self, width: int, height: int) -> tuple[int, int]:
        # A window cut short by a raster smaller than one tile keeps the ground resolution and
        # is padded later, rather than being stretched to the full tile.
        out_w = self.tile_size if width == self.window_width else max(1, round(width * self.tile_size / self.window_width))
        out_h = self.tile_size if height == self.window_height else max(1, round(height * self.tile_size / self.window_height))
        return out_w, out_h


def _axis_windows(start: int, stop: int, length: int, window: int, step: int) -> list[tuple[int, int]]:
    """Tile starts along one axis covering [start, stop) of a raster `length` pixels long."""
    if length <= window:
        return [(0, length)]
    if stop - start <= window:
        # Area narrower than a tile: one full tile centred on it, kept inside the raster.
        first = int(round((start + stop - window) / 2))
        return [(min(max(first, 0), length - window), window)]
    starts = list(range(start, stop - window + 1, step))
    if starts[-1] < stop - window:
        starts.append(stop - window)  # edge tile shifted inward so it stays full-size
    return [(s, window) for s in starts]


def _polygon_wkt(xs: Sequence[float], ys: Sequence[float]) -> str:
    points = ", ".join(f"{x!r} {y!r}" for x, y in zip(xs, ys))
    return f"POLYGON (({points}, {xs[0]!r} {ys[0]!r}))"


# ---------------------------------------------------------------------------------------------
# Raster
# ---------------------------------------------------------------------------------------------

def _decimated_size(width: int, height: int, side: int = STATS_SIDE) -> tuple[int, int]:
    scale = max(width, height) / side
    if scale <= 1:
        return width, height
    return max(1, round(width / scale)), max(1, round(height / scale))


# ---------------------------------------------------------------------------------------------
# Band choice and stretch: how a GDAL dataset's bands become RGB bytes. Raster reads by them, and
# so does training (training.data.gdal_rgb_image), which reads image files that may have no
# georeferencing: none of these needs any.
# ---------------------------------------------------------------------------------------------

def expand_palette(dataset: gdal.Dataset, shown: str) -> gdal.Dataset:
    """`dataset`, or for one band of colour-table entries (a palette image) a VRT of its colours as
    RGBA bytes: its values are palette entries, not grey levels. `shown` names it in errors."""
    first = dataset.GetRasterBand(1) if dataset.RasterCount == 1 else None
    if first is None or first.GetColorInterpretation() != gdal.GCI_PaletteIndex or not first.GetColorTable():
        return dataset
    with _gdal("invalid_argument", f"cannot expand the colour table of '{shown}'"):
        # as bytes: colour-table entries are 0-255 whatever the index type (a UInt16 index would
        # otherwise be stretched as if it were 16-bit data)
        return gdal.Translate("", dataset, format="VRT", rgbExpand="rgba", outputType=gdal.GDT_Byte)


def find_alpha_band(dataset: gdal.Dataset) -> int:
    """The first band marked alpha (1-based), or 0."""
    for index in range(1, dataset.RasterCount + 1):
        if dataset.GetRasterBand(index).GetColorInterpretation() == gdal.GCI_AlphaBand:
            return index
    return 0


def choose_rgb_bands(dataset: gdal.Dataset, mapping: BandMapping, alpha_band: int,
                     where: str) -> tuple[tuple[int, int, int], str]:
    """The (red, green, blue) bands read, and a note when a colour was guessed: a raster of four or
    more bands marks none as red, green or blue (a stack of blue, green, red and near infrared
    would be read in the wrong colour order), so the answer says which bands it read.

    Automatic (0 in `mapping`): the bands marked red, green and blue, else the first three bands
    but `alpha_band`; with fewer than three of those, the first one as grey. `where` names the
    raster in errors and the note ("raster '/data/a.tif'")."""
    band_count = dataset.RasterCount
    by_colour: dict[int, int] = {}
    for index in range(1, band_count + 1):
        by_colour.setdefault(dataset.GetRasterBand(index).GetColorInterpretation(), index)
    colour = [by_colour.get(c) for c in (gdal.GCI_RedBand, gdal.GCI_GreenBand, gdal.GCI_BlueBand)]
    candidates = [b for b in range(1, band_count + 1) if b != alpha_band] or [1]
    if all(colour):
        automatic = tuple(colour)
    else:
        automatic = tuple(candidates[:3]) if len(candidates) >= 3 else (candidates[0],) * 3
    # a guess worth a word: more than three colour bands to choose from and none marked
    guessed = len(candidates) > 3 and not any(colour)
    chosen = []
    for channel, value, auto in zip(("red", "green", "blue"), (mapping.red, mapping.green, mapping.blue), automatic):
        value = _check_int(f"band mapping {channel}", value, 0)
        if value == 0:
            chosen.append(auto)
            continue
        if value > band_count:
            raise RasterError("invalid_argument", f"band mapping {channel}={value}: {where} has "
                                                  f"{band_count} band(s); use 1..{band_count} (0 = automatic)")
        if value == alpha_band:
            raise RasterError("invalid_argument", f"band mapping {channel}={value}: band {value} of {where} "
                                                  f"is its alpha band; choose a colour band")
        chosen.append(value)
    note = ""
    if len(candidates) == 2 and not any(colour) and (mapping.red, mapping.green, mapping.blue) == (0, 0, 0):
        # two bands with no colour mark (a radar pair, two indices): one of them is shown, the other dropped
        shown, unused = candidates
        alpha = f" besides its alpha band {alpha_band}" if alpha_band else ""
        note = (f"{where} has 2 bands{alpha} and marks none as a colour: band {shown} was read as grey "
                f"and band {unused} is not used. To see band {unused}, give the bands (BandMapping; the "
                f"client's --bands, e.g. --bands {unused} {unused} {unused})")
    elif guessed and 0 in (mapping.red, mapping.green, mapping.blue):
        shown = ", ".join(str(b) for b in chosen)
        note = (f"{where} has {len(candidates)} bands and marks none as red, green or blue: bands "
                f"{shown} were read as red, green, blue. If those are not its colours, give the bands "
                f"(BandMapping; the client's --bands R G B, e.g. --bands 3 2 1)")
    return tuple(chosen), note  # type: ignore[return-value]


def plan_mask(dataset: gdal.Dataset, rgb_bands: Sequence[int], alpha_band: int) -> list[tuple[str, object]]:
    """Which reads decide validity (read_valid). A pixel is valid when every part says so."""
    parts: list[tuple[str, object]] = []
    unique_bands = sorted(set(rgb_bands))
    flags = dataset.GetRasterBand(rgb_bands[0]).GetMaskFlags()
    if flags & gdal.GMF_PER_DATASET and not flags & gdal.GMF_ALL_VALID:
        parts.append(("dataset", rgb_bands[0]))   # alpha band or internal mask, shared by all bands
    elif alpha_band:
        parts.append(("alpha", alpha_band))
    nodata_bands = [b for b in unique_bands if dataset.GetRasterBand(b).GetMaskFlags() == gdal.GMF_NODATA]
    if nodata_bands and len(nodata_bands) == len(unique_bands):
        # Like GDAL's warper, a pixel is no-data only when all its colour bands are: a dark
        # pixel that is 0 in one band but not the others is real.
        parts.append(("nodata", nodata_bands))
    return parts


def read_valid(dataset: gdal.Dataset, mask_parts: list[tuple[str, object]], col: int, row: int, width: int,
               height: int, out_w: int, out_h: int) -> np.ndarray | None:
    """Validity of a window by `mask_parts` (plan_mask; nearest sampling), or None when every pixel is valid."""
    valid = None
    nearest = gdal.GRIORA_NearestNeighbour
    for kind, detail in mask_parts:
        if kind == "dataset":
            part = dataset.GetRasterBand(detail).GetMaskBand().ReadAsArray(
                col, row, width, height, out_w, out_h, resample_alg=nearest) > 0
        elif kind == "alpha":
            part = dataset.GetRasterBand(detail).ReadAsArray(
                col, row, width, height, out_w, out_h, resample_alg=nearest) > 0
        else:
            part = np.zeros((out_h, out_w), bool)
            for band in detail:
                part |= dataset.GetRasterBand(band).GetMaskBand().ReadAsArray(
                    col, row, width, height, out_w, out_h, resample_alg=nearest) > 0
        valid = part if valid is None else valid & part
    return valid


def read_bands(dataset: gdal.Dataset, bands: list[int], col: int, row: int, width: int, height: int,
               out_w: int, out_h: int, resample_alg: int) -> np.ndarray:
    """`bands` of a window, resampled by GDAL to out_w x out_h: [len(bands), out_h, out_w]."""
    data = dataset.ReadAsArray(col, row, width, height, buf_xsize=out_w, buf_ysize=out_h,
                               band_list=bands, resample_alg=resample_alg)
    return np.asarray(data).reshape(len(bands), out_h, out_w)


def stretch_range(values: np.ndarray, percentiles: tuple[float, float]) -> tuple[float, float]:
    """(low, high) of the linear stretch of one band's valid `values`: their `percentiles`, the
    non-finite ones left out; (0, 1) when none is left, and one level wide for a flat band."""
    if values.dtype.kind == "f":
        values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(values, percentiles))
    return low, high if high > low else low + 1.0


def compute_stretch(dataset: gdal.Dataset, rgb_bands: Sequence[int], mask_parts: list[tuple[str, object]],
                    mapping: BandMapping) -> dict[int, tuple[float, float]]:
    """Per band (low, high) of the stretch (stretch_range) of each of `rgb_bands` that is stretched
    (every band but Byte ones, and those too where `mapping` sets a percentile), from one
    decimated read of the whole dataset (STATS_SIDE; a small image whole) by `mask_parts`."""
    bands = [b for b in sorted(set(rgb_bands))
             if mapping.stretch_requested or dataset.GetRasterBand(b).DataType != gdal.GDT_Byte]
    if not bands:
        return {}
    width, height = dataset.RasterXSize, dataset.RasterYSize
    out_w, out_h = _decimated_size(width, height)
    data = read_bands(dataset, bands, 0, 0, width, height, out_w, out_h, gdal.GRIORA_NearestNeighbour)
    valid = read_valid(dataset, mask_parts, 0, 0, width, height, out_w, out_h)
    percentiles = mapping.percentiles()
    return {band: stretch_range(plane[valid] if valid is not None else plane.ravel(), percentiles)
            for plane, band in zip(data, bands)}


def stretched(plane: np.ndarray, low: float, high: float) -> np.ndarray:
    """`plane` mapped linearly from low..high to 0..255 bytes (clipped; NaN 0)."""
    # float32 is exact for 8- and 16-bit values; wider ones (Int32, Float64) far from zero lose
    # levels in it (a step of 8 at 1e8), so they are offset in float64 first
    wide = plane.dtype.itemsize > 2 and plane.dtype != np.float32
    scaled = ((plane.astype(np.float64) - low).astype(np.float32) if wide else
              plane.astype(np.float32) - np.float32(low)) * np.float32(255.0 / (high - low))
    np.nan_to_num(scaled, copy=False, nan=0.0, posinf=255.0, neginf=0.0)
    np.clip(scaled, 0.0, 255.0, out=scaled)
    return (scaled + 0.5).astype(np.uint8)


def to_rgb(data: np.ndarray, valid: np.ndarray | None, rgb_bands: Sequence[int],
           ranges: dict[int, tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    """RGB bytes [3, H, W] and validity [H, W] of `data`, the read (read_bands) of the sorted
    distinct `rgb_bands`: each band stretched by its `ranges` (compute_stretch), one without a range
    (Byte) used as is; a pixel not `valid`, or not finite in some band, is 0 in every channel."""
    _, out_h, out_w = data.shape
    if valid is None:
        valid = np.ones((out_h, out_w), bool)
    if data.dtype.kind == "f":
        valid &= np.isfinite(data).all(axis=0)
    unique_bands = sorted(set(rgb_bands))
    rgb = np.empty((3, out_h, out_w), np.uint8)
    for channel, band in enumerate(rgb_bands):
        plane = data[unique_bands.index(band)]
        rgb[channel] = stretched(plane, *ranges[band]) if band in ranges else plane
    rgb[:, ~valid] = 0
    return rgb, valid


class Raster:
    """An open raster with a resolved band mapping. Build with open_raster() or raster_from_pixels()."""

    def __init__(self, dataset: gdal.Dataset, *, path: str, real_path: str, name: str, bands: BandMapping,
                 stat: os.stat_result | None = None, alpha_band: int = 0, digest: str = "",
                 files_of: gdal.Dataset | None = None):
        self._ds = dataset
        self._lock = threading.RLock()
        # extent in another CRS -> its area here: a Segment asks for the window and the clip of one
        # extent, each from the same area (_extent_area)
        self._extent_areas: dict = {}
        self._judged_by_points: set = set()    # those of them placed by the raster's points (_lattice_area)
        # the last tile plan made (_plan), by its arguments: an Index counts, reads and reports progress
        # over one plan, which tests every tile against an extent in another CRS
        self._last_plan: tuple | None = None
        self.path = path
        self.real_path = real_path
        self.name = name
        self.width = dataset.RasterXSize
        self.height = dataset.RasterYSize
        self.band_count = dataset.RasterCount
        self._digest = digest
        self._stat = stat  # taken before GDAL opened the file, so a change during the open is caught too
        # the other files it reads are stat-ed when its identity is first asked for (indexing, before
        # pixels are read), not at open: a VRT mosaic of thousands would cost Segment, Caption and
        # thumbnails as much
        self._files_of, self._sources = files_of, None
        where = self._where()

        if self.band_count < 1:
            raise RasterError("invalid_argument", f"{where} has no raster bands (is it a vector file?); give an image raster")
        geotransform = dataset.GetGeoTransform(can_return_null=True)
        if geotransform is None:
            extra = " It has ground control points: warp it first (gdalwarp)." if dataset.GetGCPCount() else ""
            raise RasterError("invalid_argument", f"{where} has no georeferencing (no geotransform).{extra} "
                                                  f"Georeference it, e.g. gdal_translate -a_ullr ... -a_srs EPSG:....")
        self.geotransform = tuple(float(v) for v in geotransform)
        determinant = self.geotransform[1] * self.geotransform[5] - self.geotransform[2] * self.geotransform[4]
        if not all(math.isfinite(v) for v in self.geotransform) or determinant == 0:
            raise RasterError("invalid_argument", f"{where} has an unusable geotransform {self.geotransform} "
                                                  f"(a pixel size of 0); fix its georeferencing")
        srs = dataset.GetSpatialRef()
        if srs is None:
            driver = dataset.GetDriver()
            if driver is not None and driver.GetMetadataItem(gdal.DCAP_CREATE) == "YES":
                how = "e.g. with gdal_edit.py -a_srs EPSG:<code> <file>"
            else:       # JPEG, PNG (a world file) and the like cannot be opened for update by gdal_edit
                how = (f"in a GeoTIFF copy, e.g. gdal_translate -a_srs EPSG:<code> <file> <copy>.tif "
                       f"({driver.ShortName if driver else 'its format'} files cannot be edited in place)")
            raise RasterError("invalid_argument", f"{where} has a geotransform but no CRS; assign one, {how}")
        self._srs = _traditional(srs.Clone())
        with _gdal("invalid_argument", f"cannot describe the CRS of {where}"):
            self.crs_wkt = self._srs.ExportToWkt(["FORMAT=WKT2_2019"])
        self.crs_authid = crs_authid(self._srs)
        self.data_type = gdal.GetDataTypeName(dataset.GetRasterBand(1).DataType)
        gt = self.geotransform
        self.pixel_size = (math.hypot(gt[1], gt[4]), math.hypot(gt[2], gt[5]))
        self.bounds = bounds_from_geotransform(gt, self.width, self.height)
        self._to_wgs84 = transformation(self._srs)
        self.bounds_wgs84 = self._bounds_wgs84(self.bounds)

        self.bands = bands
        bands.percentiles()     # validated here, not at the first read
        self._alpha_band = alpha_band or find_alpha_band(dataset)
        self.rgb_bands, self.band_note = choose_rgb_bands(dataset, bands, self._alpha_band, where)
        self._unique_bands = sorted(set(self.rgb_bands))
        self._mask_parts = plan_mask(dataset, self.rgb_bands, self._alpha_band)
        self._float = any(dataset.GetRasterBand(b).DataType in (gdal.GDT_Float32, gdal.GDT_Float64)
                          for b in self._unique_bands)
        self._stretch: dict[int, tuple[float, float]] | None = None
        self._coarse_valid: np.ndarray | None = None

    # -- description -------------------------------------------------------------------------

    def _where(self) -> str:
        return f"raster '{self.path}'" if self.path else f"pixel source '{self.name}'"

    def __repr__(self) -> str:
        return (f"Raster({self.path or self.name!r}, {self.width}x{self.height}x{self.band_count} {self.data_type}, "
                f"{self.crs_authid or 'custom CRS'})")

    @property
    def srs(self) -> osr.SpatialReference:
        """A copy of the raster's CRS (traditional GIS axis order)."""
        return _traditional(self._srs.Clone())

    @property
    def map_units(self) -> str:
        """What the CRS measures ground in: "degrees", "metre", "US survey foot", ..."""
        if self._srs is None:
            return "map units"
        return "degrees" if self._srs.IsGeographic() else (self._srs.GetLinearUnitsName() or "map units")

    def check_target_resolution(self, target_resolution) -> float | None:
        """A request's target resolution (map units per working pixel; 0 or None: native) as a float,
        or None for native; RasterError("invalid_argument") when it is no number, or so far from this
        raster's own pixels that its units must be wrong (MIN_WORKING_SIDE_PX, MAX_UPSAMPLING)."""
        resolution = _check_resolution(target_resolution)
        if resolution is None:
            return None
        native = min(self.pixel_size)
        ground = max(self.width * self.pixel_size[0], self.height * self.pixel_size[1])
        units, crs = self.map_units, self.crs_authid or "its CRS"
        advice = (f"give the ground size of one working pixel in the raster's own units ({units}, for {crs}); "
                  f"its own pixels are {native:.4g} {units}, 0 keeps them")
        if resolution * MIN_WORKING_SIDE_PX > ground:
            raise RasterError("invalid_argument", f"target resolution {resolution:g} {units} per pixel would show the "
                                                  f"whole raster ({ground:.4g} {units} across) in under "
                                                  f"{MIN_WORKING_SIDE_PX} pixels: {advice}")
        if resolution * MAX_UPSAMPLING < native:
            raise RasterError("invalid_argument", f"target resolution {resolution:g} {units} per pixel would enlarge "
                                                  f"each of the raster's pixels {native / resolution:,.0f} times: {advice}")
        return resolution

    @property
    def mask_kind(self) -> str:
        """How validity is decided: "none", or "dataset" (alpha/internal mask), "alpha", "nodata", joined by '+'."""
        return "+".join(kind for kind, _ in self._mask_parts) or "none"

    @property
    def nodata(self) -> list[float | None]:
        return [self._dataset().GetRasterBand(b).GetNoDataValue() for b in range(1, self.band_count + 1)]

    def identity(self) -> dict:
        """Key of this raster's content: real path, size in bytes and mtime in ns as at open, plus
        ``sources`` where it reads other files or has georeferencing in an .aux.xml (_sources_digest:
        a VRT's sources, a world file, the .aux.xml's georeferencing), so editing one of those
        changes the key (taken at the first call; RasterError where referenced_files() cannot
        follow its VRTs).

        Pixel sources have no file: path "", size and mtime_ns 0, plus a ``sha256`` of their pixels
        and georeferencing.
        """
        if self._stat is None:
            return {"path": "", "size": 0, "mtime_ns": 0, "sha256": self._digest}
        identity = {"path": self.real_path, "size": self._stat.st_size, "mtime_ns": self._stat.st_mtime_ns}
        with self._lock:
            if self._sources is None:
                files_of = self._files_of
                self._sources = _sources_digest(files_of, self.real_path, self.path) if files_of is not None else ""
        if self._sources:  # absent for a raster that is one file: its key stays what it always was
            identity["sources"] = self._sources
        return identity

    def _stat_now(self) -> os.stat_result:
        return os.stat(self.real_path)

    def check_unchanged(self) -> None:
        """Raise RasterError("aborted") if the file was modified, replaced or removed since open."""
        if self._stat is None:
            return
        try:
            now = self._stat_now()
        except OSError:
            raise RasterError("aborted", f"{self._where()} was removed or became unreadable while it was being read; "
                                         f"nothing was stored; retry once the file is in place") from None
        before = self._stat
        if (now.st_size, now.st_mtime_ns, now.st_ino, now.st_dev) != (before.st_size, before.st_mtime_ns,
                                                                      before.st_ino, before.st_dev):
            raise RasterError("aborted", f"{self._where()} changed on disk while it was being read; nothing was stored; "
                                         f"retry once the file is no longer being written")

    # -- lifetime ------------------------------------------------------------------------------

    def _dataset(self) -> gdal.Dataset:
        if self._ds is None:
            raise ValueError(f"{self._where()} is closed")
        return self._ds

    def close(self) -> None:
        with self._lock:
            self._ds = self._files_of = None

    def __enter__(self) -> "Raster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- setup ---------------------------------------------------------------------------------

    def _bounds_wgs84(self, bounds) -> tuple[float, float, float, float] | None:
        if self._to_wgs84 is None:
            return None
        try:
            with _gdal_exceptions():
                result = self._to_wgs84.TransformBounds(*bounds, BOUNDS_DENSIFY)
        except RuntimeError:
            return None
        if not all(math.isfinite(v) for v in result):
            return None
        return wrapped_lonlat_box(tuple(float(v) for v in result))

    # -- reading -------------------------------------------------------------------------------

    def _read_valid(self, col: int, row: int, width: int, height: int, out_w: int, out_h: int) -> np.ndarray | None:
        return read_valid(self._dataset(), self._mask_parts, col, row, width, height, out_w, out_h)

    def _read_bands(self, bands: list[int], col: int, row: int, width: int, height: int,
                    out_w: int, out_h: int, resample_alg: int) -> np.ndarray:
        return read_bands(self._dataset(), bands, col, row, width, height, out_w, out_h, resample_alg)

    def _read_failed(self, error: BaseException) -> RasterError:
        self.check_unchanged()  # a file rewritten under us is the likelier cause: say so (aborted)
        reason = _gdal_reason(error)
        if "No such file or directory" in reason:
            # a file it reads (a VRT's source, a mosaic's tile) is gone: nothing is damaged
            return RasterError("not_found", f"cannot read pixels of {self._where()}: a file it reads is missing "
                                            f"(GDAL: {reason}); put it back, or rebuild {self.name}")
        return RasterError("invalid_argument", f"cannot read pixels of {self._where()}: the file may be damaged "
                                               f"(GDAL: {reason})")

    def _guarded(self, work):
        with self._lock, _gdal_exceptions():
            try:
                return work()
            except RuntimeError as error:
                raise self._read_failed(error) from None

    def _stretch_ranges(self) -> dict[int, tuple[float, float]]:
        """Per band (lo, hi) of the linear stretch, computed once from a decimated read."""
        with self._lock:
            if self._stretch is None:
                self._stretch = self._guarded(self._compute_stretch)
            return self._stretch

    def _compute_stretch(self) -> dict[int, tuple[float, float]]:
        return compute_stretch(self._dataset(), self.rgb_bands, self._mask_parts, self.bands)

    def stretch_ranges(self) -> tuple[tuple[float, float] | None, ...]:
        """(lo, hi) mapped to 0..255 for each of the red, green, blue channels; None = Byte used as is."""
        ranges = self._stretch_ranges()
        return tuple(ranges.get(b) for b in self.rgb_bands)

    def keep_stretch_ranges(self, ranges) -> None:
        """Take `ranges`, the stretch_ranges() of an earlier opening of this file unchanged with the
        same band mapping, instead of working them out again from a read of the whole raster."""
        if len(ranges) != len(self.rgb_bands):
            raise ValueError(f"{len(ranges)} stretch ranges given for {len(self.rgb_bands)} channels")
        kept = {band: (float(r[0]), float(r[1])) for band, r in zip(self.rgb_bands, ranges) if r is not None}
        with self._lock:
            self._stretch = kept

    def _to_rgb(self, data: np.ndarray, valid: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        return to_rgb(data, valid, self.rgb_bands, self._stretch_ranges())

    def _check_window(self, col, row, width, height) -> tuple[int, int, int, int]:
        col = _check_int("window col", col, 0, self.width - 1)
        row = _check_int("window row", row, 0, self.height - 1)
        width = _check_int("window width", width, 1, self.width - col)
        height = _check_int("window height", height, 1, self.height - row)
        return col, row, width, height

    def read_window(self, col: int, row: int, width: int, height: int, out_size: tuple[int, int] | None = None,
                    resample: str = "average") -> tuple[np.ndarray, np.ndarray]:
        """Pixels of a native window, resampled by GDAL to out_size=(w, h) (default: native size).

        Returns (rgb uint8 [3, H, W], valid bool [H, W]); invalid pixels are 0 in every channel.
        """
        col, row, width, height = self._check_window(col, row, width, height)
        out_w, out_h = (width, height) if out_size is None else (
            _check_int("out_size width", out_size[0], 1), _check_int("out_size height", out_size[1], 1))
        alg = _check_resample(resample)

        def work():
            data = self._read_bands(self._unique_bands, col, row, width, height, out_w, out_h, alg)
            valid = self._read_valid(col, row, width, height, out_w, out_h)
            return data, valid

        data, valid = self._guarded(work)
        return self._to_rgb(data, valid)

    def window_geotransform(self, col: int, row: int, width: int, height: int,
                            out_w: int, out_h: int) -> tuple[float, ...]:
        """Geotransform of an out_w x out_h grid covering the native window."""
        gt = self.geotransform
        x0, y0 = _grid_to_map(gt, np.float64(col), np.float64(row))
        sx, sy = width / out_w, height / out_h
        return (float(x0), gt[1] * sx, gt[2] * sy, float(y0), gt[4] * sx, gt[5] * sy)

    # -- extents -------------------------------------------------------------------------------

    def extent_polygon(self, extent, points_per_edge: int = 64):
        """The requested extent as a polygon in the raster's CRS (its edges densified, so a box in
        another CRS keeps its curved shape), or None for the whole raster; and whether it is an exact
        pixel-aligned box of this raster (same CRS, north-up grid), where the window alone is exact."""
        import shapely

        parts = _extent_parts(extent)
        if parts is None:
            return None, True
        xmin, ymin, xmax, ymax, crs = parts
        source = None if crs in ("", None) else parse_crs(crs)
        same = source is None or source.IsSame(self._srs)
        if same:
            turns = self._world_turns(xmin, xmax)
            if len(turns) > 1:      # past the world's edge, meeting the raster a world over too: both parts
                return shapely.union_all([shapely.box(xmin + t, ymin, xmax + t, ymax) for t in turns]), False
            # met a world over only (181 to 182 over a raster stored from -180): that box, as exact as
            # any, and the window holds it
            xmin, xmax = xmin + turns[0], xmax + turns[0]
        if same and self.geotransform[2] == 0 and self.geotransform[4] == 0:
            return shapely.box(xmin, ymin, xmax, ymax), True
        if same:
            return shapely.Polygon(np.column_stack(densified_box(xmin, ymin, xmax, ymax, points_per_edge))), False
        area = self._extent_area((xmin, ymin, xmax, ymax), source, points_per_edge)
        if area is None:
            raise RasterError("invalid_argument", f"extent ({xmin}, {ymin}, {xmax}, {ymax}) in {_crs_label(source)} "
                                                  f"has no place in the raster's CRS {_crs_label(self._srs)}; give it "
                                                  "in that CRS instead")
        return area, False

    def grid_in_extent(self, extent, gt: Sequence[float], width: int, height: int, most: int = 250_000
                       ) -> np.ndarray | None:
        """Which cells of a `width` x `height` grid (geotransform `gt`, in the raster's CRS) have their
        centre in `extent` once moved into the extent's CRS (a world either way where that CRS
        repeats), as a [height, width] mask, where extent_polygon is an approximation: an extent
        placed by the raster's own points (an orthographic view's rim, which the polygon follows only
        to a 64th of the raster); None where the polygon is the extent's own outline, or the extent is
        in the raster's CRS. Cells are judged in blocks of one centre each where the grid has more
        than `most` cells (a block a side: the rim to within that)."""
        parts = _extent_parts(extent)
        if parts is None or parts[4] in ("", None):
            return None
        source = parse_crs(parts[4])
        to_source = None if source.IsSame(self._srs) else transformation(self._srs, source)
        if to_source is None:
            return None
        self._extent_area(parts[:4], source)        # placed once: by its outline, or by points
        if (tuple(parts[:4]), source.ExportToWkt()) not in self._judged_by_points:
            return None
        step = max(1, math.ceil(math.sqrt(width * height / most)))
        rows, cols = np.mgrid[0:height:step, 0:width:step] + step / 2.0
        moved = transform_points_quietly(to_source, np.column_stack(_grid_to_map(gt, cols.ravel(), rows.ravel())))
        blocks = points_in_box(moved, parts[:4], world_width(source)).reshape(rows.shape)
        return np.repeat(np.repeat(blocks, step, axis=0), step, axis=1)[:height, :width]

    def _cut_to_raster(self, box: Sequence[float], source: osr.SpatialReference) -> tuple[float, float, float, float]:
        """`box` (in `source`) cut to the raster's bounds as `source` sees them, with a margin: a
        zoomed-out view in another CRS reaches far past the raster, to where the raster's CRS may not
        be defined, and only its part over the raster matters. `box` itself where those bounds cannot
        be had in `source`, wrap round its world, or reach where `source` is not defined (GDAL's box
        of a world raster in an orthographic CRS is a line)."""
        xmin, ymin, xmax, ymax = box
        to_source = transformation(self._srs, source)
        if to_source is None or not np.isfinite(transform_points_quietly(
                to_source, np.column_stack(densified_box(*self.bounds, 16)))).all():
            return xmin, ymin, xmax, ymax
        try:
            over = transform_bounds(self.bounds, self._srs, source)
        except RasterError:
            return xmin, ymin, xmax, ymax
        if not over[0] < over[2]:       # across the antimeridian
            return xmin, ymin, xmax, ymax
        period = world_width(source)
        if period:      # a box past 180 degrees (179.95 to 180.05) over a raster stored before it, or after
            turn = max((0.0, -period, period), key=lambda t: min(xmax + t, over[2]) - max(xmin + t, over[0]))
            xmin, xmax = xmin + turn, xmax + turn
        # with a margin: the box's edges come back curved, and must not cut into the raster
        mx, my = 0.05 * (over[2] - over[0]), 0.05 * (over[3] - over[1])
        clipped = (max(xmin, over[0] - mx), max(ymin, over[1] - my), min(xmax, over[2] + mx), min(ymax, over[3] + my))
        if not (clipped[0] < clipped[2] and clipped[1] < clipped[3]):
            b = self.bounds
            xmin, ymin, xmax, ymax = box
            raise RasterError("invalid_argument", f"extent ({xmin}, {ymin}, {xmax}, {ymax}) in {_crs_label(source)} "
                                                  f"does not overlap {self._where()}, whose bounds are ({b[0]}, {b[1]}, "
                                                  f"{b[2]}, {b[3]}) in {_crs_label(self._srs)}")
        return clipped

    def _extent_area(self, box: Sequence[float], source: osr.SpatialReference, points_per_edge: int = 64):
        """The part of `box` (given in `source`) over the raster, as a shapely area in the raster's
        CRS (_placed_area), confirmed the other way round: some point of the raster in it must lie in
        `box` when moved back into `source`. A CRS that gives the far side of the globe finite
        coordinates (polar stereographic, transverse Mercator) places an orthographic view's hidden
        side over a raster too; such a raster is said not to overlap. None where the extent's CRS
        has no way to the raster's (a site grid)."""
        import shapely

        key = (tuple(box), source.ExportToWkt(), points_per_edge)
        if key in self._extent_areas:
            return self._extent_areas[key]
        if len(self._extent_areas) >= 16:        # a raster kept open serves many requests: a few extents
            self._extent_areas.clear()
            self._judged_by_points.clear()
        area = self._placed_area(box, source, points_per_edge)
        over = None if area is None else area.intersection(shapely.box(*self.bounds))
        to_source = transformation(self._srs, source)
        if over is None or over.is_empty or to_source is None:      # beside the raster: said by the caller
            self._extent_areas[key] = area
            return area
        x0, y0, x1, y1 = over.bounds
        gx, gy = np.meshgrid(np.linspace(x0, x1, 33), np.linspace(y0, y1, 33))
        points = np.column_stack([gx.ravel(), gy.ravel()])
        points = points[shapely.contains_xy(over, points[:, 0], points[:, 1])]
        inner = over.representative_point()
        moved = transform_points_quietly(to_source, np.vstack([points, [[inner.x, inner.y]]]))
        if points_in_box(moved, box, world_width(source)).any():
            self._extent_areas[key] = area
            return area
        raise self._no_point_in(box, source)

    def _no_point_in(self, given: Sequence[float], source: osr.SpatialReference) -> RasterError:
        b = self.bounds
        return RasterError("invalid_argument", f"extent {tuple(given)} in {_crs_label(source)} does not overlap "
                                               f"{self._where()} (no point of the raster lies in it), whose bounds "
                                               f"are ({b[0]}, {b[1]}, {b[2]}, {b[3]}) in {_crs_label(self._srs)}")

    def _copies_meeting(self, area, period: float):
        """`area` (in the raster's CRS, which repeats every `period` east) with its copies a world east
        and west, those that meet the raster; `area` itself where none does."""
        import shapely
        import shapely.affinity

        footprint = shapely.box(*self.bounds)
        copies = [shapely.affinity.translate(area, turn) for turn in (0.0, -period, period)]
        return shapely.union_all([c for c in copies if c.intersects(footprint)] or [area])

    def _placed_area(self, box: Sequence[float], source: osr.SpatialReference, points_per_edge: int = 64):
        """The part of `box` (given in `source`) over the raster, as a shapely area in the raster's
        CRS; None where the extent's CRS has no way to the raster's (a site grid).

        Its outline (`points_per_edge` points an edge) is moved point by point. Where the raster's CRS
        repeats east and west (longitude/latitude, Web Mercator), the outline is made continuous
        across the world's edge (GDAL gives a box across 180 degrees as 179.9 and -179.9), an outline
        that goes round a pole takes in the pole, and each copy of the area a world east or west that
        meets the raster is kept (a raster of the whole world meets both ends of a Pacific view).
        Where part of the outline has no place in the raster's CRS (an orthographic view's corners,
        off the globe), the raster's own points are judged in `source` instead (_lattice_area)."""
        import shapely

        cut = self._cut_to_raster(box, source)
        transform = transformation(source, self._srs)
        if transform is None:
            return None
        outline = transform_points_quietly(transform, np.column_stack(densified_box(*cut, points_per_edge)))
        if not np.isfinite(outline).all():
            self._judged_by_points.add((tuple(box), source.ExportToWkt()))
            return self._lattice_area(cut, source, box)
        period = world_width(self._srs)
        if not period:
            return shapely.make_valid(shapely.Polygon(outline))
        # once round a pole, the area is on the pole's side: up to it in longitude/latitude, and in
        # a projected map (Web Mercator) past the raster's edge, where the map has no more
        y = outline[:, 1]
        poles = None if self._srs.IsGeographic() else (min(self.bounds[1], y.min()), max(self.bounds[3], y.max()))
        return self._copies_meeting(shapely.make_valid(shapely.Polygon(lonlat_ring(outline[:, 0], y, period, poles))),
                                    period)

    def _lattice_area(self, box: Sequence[float], source: osr.SpatialReference, given: Sequence[float],
                      cells: int = 64):
        """The cells of a `cells` x `cells` lattice over the raster whose centres lie in `box` (in
        `source`, a world east or west too where that CRS repeats), with the cells beside them (the
        box's edge, or the globe's rim, may cross those), as an area in the raster's CRS: judged in
        the extent's CRS, where the raster has a place while the extent has none in the raster's (an
        orthographic view with the raster at the globe's rim). RasterError when no centre lies in
        it (`given`: the extent as asked, for the message)."""
        import shapely

        to_source = transformation(self._srs, source)
        if to_source is None:
            return None
        col_edges, row_edges = np.linspace(0.0, self.width, cells + 1), np.linspace(0.0, self.height, cells + 1)
        cols, rows = np.meshgrid((col_edges[:-1] + col_edges[1:]) / 2, (row_edges[:-1] + row_edges[1:]) / 2)
        moved = transform_points_quietly(to_source, np.column_stack(_grid_to_map(self.geotransform, cols.ravel(),
                                                                                 rows.ravel())))
        inside = points_in_box(moved, box, world_width(source)).reshape(cells, cells)
        if not inside.any():
            # a view smaller than a lattice cell (zoomed in at the rim): its own points on the globe
            return self._hull_of_points_in(box, source, given)
        grown = inside.copy()
        grown[1:] |= inside[:-1]
        grown[:-1] |= inside[1:]
        widened = grown.copy()
        widened[:, 1:] |= grown[:, :-1]
        widened[:, :-1] |= grown[:, 1:]
        boxes = []
        for i in np.nonzero(widened.any(axis=1))[0]:        # a box per run of cells along each row
            steps = np.diff(np.concatenate([[0], widened[i].astype(np.int8), [0]]))
            for j0, j1 in zip(np.nonzero(steps == 1)[0], np.nonzero(steps == -1)[0]):
                x, y = _grid_to_map(self.geotransform, col_edges[[j0, j1, j1, j0]], row_edges[[i, i, i + 1, i + 1]])
                boxes.append(shapely.Polygon(np.column_stack([x, y])))
        return shapely.union_all(boxes)

    def _hull_of_points_in(self, box: Sequence[float], source: osr.SpatialReference, given: Sequence[float]):
        """The hull of `box`'s points (its outline and a 17 x 17 grid inside it, in `source`) that have a
        place in the raster's CRS (where that CRS repeats, taken across its world's edge when that
        makes it narrower, and met one world either way too); RasterError where it misses the raster."""
        import shapely

        xs, ys = densified_box(*box, 16)
        gx, gy = np.meshgrid(np.linspace(box[0], box[2], 17), np.linspace(box[1], box[3], 17))
        points = np.column_stack([np.concatenate([xs, gx.ravel()]), np.concatenate([ys, gy.ravel()])])
        transform = transformation(source, self._srs)
        moved = transform_points_quietly(transform, points) if transform is not None else np.empty((0, 2))
        moved = moved[np.isfinite(moved).all(axis=1)]
        period = world_width(self._srs)
        footprint = shapely.box(*self.bounds)
        hull = None
        if len(moved):
            if period:
                wrapped = np.mod(moved[:, 0], period)       # a small view across 180 degrees: one piece
                if np.ptp(wrapped) < np.ptp(moved[:, 0]):
                    moved[:, 0] = wrapped
            hull = shapely.MultiPoint(moved).convex_hull
            if period:
                hull = self._copies_meeting(hull, period)
        if hull is None or not hull.intersects(footprint):
            raise self._no_point_in(given, source)
        # a hull of one point or a line has no area: a pixel round it
        return hull if hull.area > 0 else hull.buffer(max(abs(self.geotransform[1]), abs(self.geotransform[5])))

    def window_for_extent(self, extent) -> tuple[int, int, int, int]:
        """Native window (col, row, width, height) covering ``extent`` clipped to the raster.

        ``extent`` is (xmin, ymin, xmax, ymax[, crs]) or an Extent-like object; an empty crs means
        the raster's CRS; None (or the all-zero unset Extent) means the whole raster.
        """
        import shapely

        parts = _extent_parts(extent)
        if parts is None:
            return 0, 0, self.width, self.height
        xmin, ymin, xmax, ymax, crs = parts
        given = f"extent ({xmin}, {ymin}, {xmax}, {ymax})"
        pixels = None
        if crs != "" and crs is not None:
            source = parse_crs(crs)
            given += f" in {_crs_label(source)}"
            if not source.IsSame(self._srs):
                area = self._extent_area((xmin, ymin, xmax, ymax), source)
                if area is None:
                    raise RasterError("invalid_argument", f"{given} does not map to a usable rectangle in the raster's "
                                                          f"CRS {_crs_label(self._srs)}; give it in that CRS instead")
                over = area.intersection(shapely.box(*self.bounds))
                if not over.is_empty:
                    pixels = self._pixels_of_box(over.bounds)
                else:       # beside the raster: said below
                    pixels = (-1.0, -1.0, -1.0, -1.0)
        if pixels is None:
            boxes = [self._pixels_of_box((xmin + t, ymin, xmax + t, ymax)) for t in self._world_turns(xmin, xmax)]
            pixels = (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes),
                      max(b[3] for b in boxes))
        left, top, right, bottom = pixels
        left, right = max(left, 0.0), min(right, float(self.width))
        top, bottom = max(top, 0.0), min(bottom, float(self.height))
        if right <= left or bottom <= top:
            b = self.bounds
            hint = "" if crs not in ("", None) else (" (an extent without a CRS is read in the raster's CRS: if it "
                                                     "is in another, give that CRS, e.g. client --extent-crs)")
            raise RasterError("invalid_argument", f"{given} does not overlap {self._where()}, whose bounds are "
                                                  f"({b[0]}, {b[1]}, {b[2]}, {b[3]}) in {_crs_label(self._srs)}{hint}")
        # Tolerance so an extent on pixel edges (up to float noise) does not grow by a pixel.
        col0 = int(math.floor(left + 1e-6))
        row0 = int(math.floor(top + 1e-6))
        col1 = max(col0 + 1, int(math.ceil(right - 1e-6)))
        row1 = max(row0 + 1, int(math.ceil(bottom - 1e-6)))
        return col0, row0, min(col1, self.width) - col0, min(row1, self.height) - row0

    def _world_turns(self, xmin: float, xmax: float) -> list[float]:
        """For x from xmin to xmax in the raster's own CRS: the whole worlds (0, -period, +period) that
        bring it over the raster where that CRS repeats east and west, as a search extent is met
        (170 to 190 degrees over a world raster meets both its ends; 179.95 to 180.05 one stored as
        -180.1 to -179.9). [0.0] where it does not repeat, or where only the box as given meets it."""
        period = world_width(self._srs)
        if not period:
            return [0.0]
        west, east = self.bounds[0], self.bounds[2]
        meeting = [t for t in (0.0, -period, period) if xmin + t < east and xmax + t > west]
        return meeting or [0.0]

    def _pixels_of_box(self, box: Sequence[float]) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) in pixels round `box` (in the raster's CRS), not yet cut to the raster."""
        xmin, ymin, xmax, ymax = box
        px, py = _grid_to_map(gdal.InvGeoTransform(self.geotransform), np.array([xmin, xmax, xmax, xmin]),
                              np.array([ymin, ymin, ymax, ymax]))
        return float(px.min()), float(py.min()), float(px.max()), float(py.max())

    def read_extent(self, extent=None, out_size: tuple[int, int] | None = None, target_resolution: float | None = None,
                    resample: str = "average", max_pixels: int = DEFAULT_MAX_PIXELS
                    ) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
        """Pixels covering ``extent`` (any CRS), at out_size=(w, h) or target_resolution (map units per
        pixel; default native). Returns (rgb, valid, geotransform of the returned grid).

        Output above ``max_pixels`` -> RasterError("resource_exhausted").
        """
        if out_size is not None and target_resolution not in (None, 0):
            raise RasterError("invalid_argument", "give out_size or target_resolution, not both")
        col, row, width, height = self.window_for_extent(extent)
        resolution = self.check_target_resolution(target_resolution)
        if out_size is not None:
            out_w = _check_int("out_size width", out_size[0], 1)
            out_h = _check_int("out_size height", out_size[1], 1)
        elif resolution is not None:
            out_w = max(1, round(width * self.pixel_size[0] / resolution))
            out_h = max(1, round(height * self.pixel_size[1] / resolution))
        else:
            out_w, out_h = width, height
        if out_w * out_h > max_pixels:
            at = f" at {resolution} map units per pixel" if resolution else ""
            raise RasterError("resource_exhausted", f"the extent would be read as {out_w} x {out_h} = {out_w * out_h} pixels"
                                                    f"{at}; the limit is {max_pixels}: choose a smaller extent or a "
                                                    f"coarser target resolution (target_resolution; the client's --resolution)")
        rgb, valid = self.read_window(col, row, width, height, (out_w, out_h), resample)
        return rgb, valid, self.window_geotransform(col, row, width, height, out_w, out_h)

    # -- tiles ---------------------------------------------------------------------------------

    def _plan(self, tile_size, overlap, target_resolution, extent) -> _TilePlan:
        tile_size = _check_int("tile_size", tile_size, 1, MAX_TILE_SIZE)
        overlap = _check_number("overlap", overlap, 0.0, 0.9, high_inclusive=False)
        resolution = self.check_target_resolution(target_resolution)
        if resolution is None:
            window_w = window_h = tile_size
        else:
            window_w = max(1, round(tile_size * resolution / self.pixel_size[0]))
            window_h = max(1, round(tile_size * resolution / self.pixel_size[1]))
        key = (tile_size, overlap, resolution, _extent_parts(extent))
        last = self._last_plan
        if last is not None and last[0] == key:
            return last[1]
        col, row, width, height = self.window_for_extent(extent)
        step_w = max(1, round(window_w * (1.0 - overlap)))
        step_h = max(1, round(window_h * (1.0 - overlap)))
        cols = _axis_windows(col, col + width, self.width, window_w, step_w)
        rows = _axis_windows(row, row + height, self.height, window_h, step_h)
        plan = _TilePlan(cols=cols, rows=rows, window_width=window_w, window_height=window_h, tile_size=tile_size,
                         meets=self._tiles_meeting(extent, cols, rows))
        self._last_plan = (key, plan)
        return plan

    def _tiles_meeting(self, extent, cols: list[tuple[int, int]], rows: list[tuple[int, int]]) -> np.ndarray | None:
        """Which tiles of the grid (row-major) meet the extent's area in the raster's CRS, or None
        where its window is the extent itself. An extent in another CRS is curved in this one, and a
        Pacific view over a world raster meets it at both ends: the window holding it (one band)
        holds tiles the extent does not reach."""
        import shapely

        area, exact = self.extent_polygon(extent)
        if area is None or exact:
            return None
        starts = np.array([(c, r, w, h) for r, h in rows for c, w in cols], float)
        c, r, w, h = starts.T
        xs, ys = _grid_to_map(self.geotransform, np.stack([c, c + w, c + w, c, c], axis=1),
                              np.stack([r, r, r + h, r + h, r], axis=1))
        boxes = shapely.polygons(np.stack([xs, ys], axis=-1))
        return shares_ground(area, boxes)

    def count_tiles(self, tile_size: int = 224, overlap: float = 0.0, target_resolution: float | None = None,
                    extent=None) -> int:
        """Number of tiles in the grid before empty ones are skipped (for progress totals)."""
        return len(self._plan(tile_size, overlap, target_resolution, extent))

    def tiles_done_counter(self, tile_size: int = 224, overlap: float = 0.0, target_resolution: float | None = None,
                           extent=None):
        """A function of a grid index: how many of count_tiles' tiles come up to and including it (the
        tiles done, for progress, where an extent leaves some of the grid out)."""
        meets = self._plan(tile_size, overlap, target_resolution, extent).meets
        if meets is None:
            return lambda index: index + 1
        done = np.cumsum(meets)
        return lambda index: int(done[index])

    def _make_tiles(self, batch: list[tuple[int, tuple[int, int, int, int]]]) -> list[Tile]:
        """Tiles with their footprints; the EPSG:4326 reprojection is done for the whole batch at once."""
        gt = self.geotransform
        # Unit square walked counter-clockwise on the ground for north-up rasters; reversed when
        # the geotransform mirrors the grid.
        t = np.linspace(0.0, 1.0, FOOTPRINT_SEGMENTS, endpoint=False)
        zeros, ones = np.zeros_like(t), np.ones_like(t)
        ring_u = np.concatenate([zeros, t, ones, 1.0 - t])
        ring_v = np.concatenate([t, ones, 1.0 - t, zeros])
        corner_u, corner_v = np.array([0.0, 0.0, 1.0, 1.0]), np.array([0.0, 1.0, 1.0, 0.0])
        if gt[1] * gt[5] - gt[2] * gt[4] > 0:
            ring_u, ring_v = ring_u[::-1], ring_v[::-1]
            corner_u, corner_v = corner_u[::-1], corner_v[::-1]
        windows = np.array([w for _, w in batch], float).reshape(-1, 4)
        cols, rows, widths, heights = (windows[:, i:i + 1] for i in range(4))
        cx, cy = _grid_to_map(gt, cols + corner_u * widths, rows + corner_v * heights)
        wgs = None
        if self._to_wgs84 is not None:
            rx, ry = _grid_to_map(gt, cols + ring_u * widths, rows + ring_v * heights)
            points = np.stack([rx.ravel(), ry.ravel()], axis=1).tolist()
            try:
                with self._lock, _gdal_exceptions():   # a coordinate transformation is not thread-safe
                    wgs = np.asarray(self._to_wgs84.TransformPoints(points), float)[:, :2].reshape(len(batch), -1, 2)
            except RuntimeError:
                wgs = None
        tiles = []
        for i, (index, (col, row, width, height)) in enumerate(batch):
            xs, ys = cx[i].tolist(), cy[i].tolist()
            bounds_wgs84, footprint_wgs84 = None, ""
            if wgs is not None and np.isfinite(wgs[i]).all():
                ring = lonlat_ring(wgs[i, :, 0], wgs[i, :, 1])      # a tile holding a pole covers it
                lon, lat = ring[:, 0], ring[:, 1]
                bounds_wgs84 = (float(lon.min()), float(lat.min()), float(lon.max()), float(lat.max()))
                footprint_wgs84 = _polygon_wkt(lon.tolist(), lat.tolist())
            tiles.append(Tile(index=index, col=col, row=row, width=width, height=height,
                              bounds=(min(xs), min(ys), max(xs), max(ys)), bounds_wgs84=bounds_wgs84,
                              footprint_wkt=_polygon_wkt(xs, ys), footprint_wgs84_wkt=footprint_wgs84))
        return tiles

    def _iter_tile_batches(self, plan: _TilePlan, windows=None, batch_size: int = 256) -> Iterator[list[Tile]]:
        batch = []
        for item in (plan.windows() if windows is None else windows):
            batch.append(item)
            if len(batch) == batch_size:
                yield self._make_tiles(batch)
                batch = []
        if batch:
            yield self._make_tiles(batch)

    def _coarse_validity(self) -> np.ndarray | None:
        """Raster-wide validity at STATS_SIDE resolution (None when every pixel is valid), cached."""
        if not self._mask_parts and not self._float:
            return None
        with self._lock:
            if self._coarse_valid is None:
                out_w, out_h = _decimated_size(self.width, self.height)

                def work():
                    valid = self._read_valid(0, 0, self.width, self.height, out_w, out_h)
                    if valid is None:
                        valid = np.ones((out_h, out_w), bool)
                    if self._float:
                        data = self._read_bands(self._unique_bands, 0, 0, self.width, self.height, out_w, out_h,
                                                gdal.GRIORA_NearestNeighbour)
                        valid &= np.isfinite(data).all(axis=0)
                    return valid

                self._coarse_valid = self._guarded(work)
            return self._coarse_valid

    def _coarse_fraction(self, coarse: np.ndarray, window: tuple[int, int, int, int]) -> float:
        col, row, width, height = window
        out_h, out_w = coarse.shape
        sx, sy = self.width / out_w, self.height / out_h
        c0, r0 = min(int(col / sx), out_w - 1), min(int(row / sy), out_h - 1)
        c1, r1 = max(c0 + 1, math.ceil((col + width) / sx)), max(r0 + 1, math.ceil((row + height) / sy))
        return float(coarse[r0:r1, c0:c1].mean())

    def tiles(self, tile_size: int = 224, overlap: float = 0.0, target_resolution: float | None = None,
              extent=None, min_valid_fraction: float = 0.5) -> list[Tile]:
        """The tile grid over the raster (or ``extent``), row-major.

        Each tile spans tile_size * target_resolution / pixel size native pixels a side (tile_size
        at native resolution), neighbours step by (1 - overlap) of that, and edge tiles are shifted
        inward to stay full-size; a raster smaller than one tile gives one tile covering all of it.
        Tiles whose valid fraction, estimated from a raster-wide low-resolution mask read, is below
        min_valid_fraction are left out (0 keeps every tile).
        """
        plan = self._plan(tile_size, overlap, target_resolution, extent)
        minimum = _check_number("min_valid_fraction", min_valid_fraction, 0.0, 1.0)
        coarse = self._coarse_validity() if minimum > 0 else None
        windows = plan.windows()
        if coarse is not None:
            windows = (item for item in windows if self._coarse_fraction(coarse, item[1]) >= minimum)
        return [tile for batch in self._iter_tile_batches(plan, windows) for tile in batch]

    def iter_tiles_with_pixels(self, tile_size: int = 224, overlap: float = 0.0, target_resolution: float | None = None,
                               extent=None, min_valid_fraction: float = 0.5, resample: str = "average",
                               tile_range: tuple[int, int] | None = None
                               ) -> Iterator[tuple[Tile, np.ndarray, np.ndarray]]:
        """Yield (tile, rgb uint8 [3, S, S], valid bool [S, S]) with S = tile_size, reading lazily.

        The same grid as tiles(); a tile is skipped when the valid fraction of its own read is below
        min_valid_fraction. A tile cut short by a small raster is padded (invalid) at its right and
        bottom so the ground resolution stays the requested one. `tile_range` (start, stop) keeps to
        those tile indices of the grid. Raises RasterError("aborted") as soon as the file changes on
        disk. Arguments are checked when this is called, not on first use.
        """
        plan = self._plan(tile_size, overlap, target_resolution, extent)
        minimum = _check_number("min_valid_fraction", min_valid_fraction, 0.0, 1.0)
        alg = _check_resample(resample)
        windows = None
        if tile_range is not None:      # by grid index: the windows of an extent skip the tiles it does not meet
            start, stop = tile_range
            windows = itertools.takewhile(lambda item: item[0] < stop,
                                          itertools.dropwhile(lambda item: item[0] < start, plan.windows()))
        return self._tiles_with_pixels(plan, minimum, alg, windows)

    def _tiles_with_pixels(self, plan: _TilePlan, minimum: float, alg: int, windows=None):
        size = plan.tile_size
        for batch in self._iter_tile_batches(plan, windows, batch_size=64):
            for tile in batch:
                self.check_unchanged()
                out_w, out_h = plan.out_size(tile.width, tile.height)
                window = tile.window
                valid = self._guarded(lambda: self._read_valid(*window, out_w, out_h))
                if valid is not None and minimum > 0 and valid.mean() < minimum:
                    continue  # mostly empty: skip before paying for the colour bands
                data = self._guarded(lambda: self._read_bands(self._unique_bands, *window, out_w, out_h, alg))
                rgb, valid = self._to_rgb(data, valid)
                if minimum > 0 and valid.mean() < minimum:
                    continue
                if (out_w, out_h) != (size, size):
                    padded_rgb = np.zeros((3, size, size), np.uint8)
                    padded_valid = np.zeros((size, size), bool)
                    padded_rgb[:, :out_h, :out_w] = rgb
                    padded_valid[:out_h, :out_w] = valid
                    rgb, valid = padded_rgb, padded_valid
                yield tile, rgb, valid


# ---------------------------------------------------------------------------------------------
# Opening
# ---------------------------------------------------------------------------------------------

def _inside(path: str, root: str) -> bool:
    return path == root or os.path.commonpath([path, root]) == root


def _check_roots(what: str, real: str, roots: list[str], given: str | None = None) -> None:
    """`real` (a resolved path) must lie under one of `roots`. `given`: the path as asked for, before
    links were resolved: when that one lies under a root, the refusal says a link leads out (the
    target is not named, so a request learns nothing of the files outside the roots)."""
    if roots and not any(_inside(real, root) for root in roots):
        if given is not None and any(_inside(given, root) for root in roots):
            raise RasterError("permission_denied", f"{what} is a link (or lies under one) that leads outside the "
                                                   f"allowed roots ({', '.join(roots)}); copy the file itself under "
                                                   f"one of them or allow its folder when starting the server")
        raise RasterError("permission_denied", f"{what} is outside the allowed roots ({', '.join(roots)}); "
                                               f"move it under one of them or allow its folder when starting the server")


def _is_local(name: str) -> bool:
    """Whether a name GDAL reads is a local file, not a /vsi (virtual) or URL name."""
    return not (name.startswith("/vsi") or "://" in name)


def _is_vrt(path: str) -> bool:
    """Whether GDAL reads `path` as a VRT: decided by its start, as GDAL's VRT driver does, not by
    its name (a VRT saved as .xml, or with an XML declaration first, is one all the same)."""
    try:
        with open(path, "rb") as handle:
            return b"<VRTDataset" in handle.read(1024)
    except OSError:
        return False


# VRTs inside VRTs: GDAL follows any depth, but each nested one is opened again to list its files
_MAX_VRT_NESTING = 8


def referenced_files(dataset: gdal.Dataset, real: str, shown: str) -> Iterator[str]:
    """Every file but `real` (the dataset's own) that the dataset reads, each once: the real path of
    a local file, the name as GDAL lists it of a /vsi or URL one. A nested VRT's files follow it
    (a VRT lists only its own sources); a cycle of VRTs is followed once round.

    A file is yielded before it is opened, so a caller may refuse it first. Raises RasterError
    (invalid_argument) where VRTs nest more than _MAX_VRT_NESTING deep or a nested one cannot be opened.
    """
    seen = {real}

    def walk(names: list[str], depth: int) -> Iterator[str]:
        for name in names:
            local = _is_local(name)
            file = os.path.realpath(name) if local else name
            if file in seen:
                continue
            seen.add(file)
            yield file
            if not local or not _is_vrt(file):
                continue
            if depth >= _MAX_VRT_NESTING:
                raise RasterError("invalid_argument", f"raster '{shown}' nests VRT files more than "
                                                      f"{_MAX_VRT_NESTING} deep; build one VRT from the source files "
                                                      f"themselves (gdalbuildvrt) or write it out as a GeoTIFF")
            # only its file list is kept: an open dataset would stay open while the caller works on
            # each file (and, after an error, for as long as its traceback lives)
            with _gdal("invalid_argument", f"raster '{shown}' refers to '{file}', which GDAL cannot open"):
                nested = gdal.OpenEx(file, gdal.OF_RASTER | gdal.OF_READONLY).GetFileList() or []
            yield from walk(nested, depth + 1)

    return walk(dataset.GetFileList() or [], 0)


def _check_referenced_files(dataset: gdal.Dataset, real: str, shown: str, roots: list[str]) -> None:
    """Every file a dataset reads (VRT sources, nested VRTs included) must be under the roots too."""
    for file in referenced_files(dataset, real, shown):
        if not _is_local(file):
            raise RasterError("permission_denied", f"raster '{shown}' refers to '{_short(file)}', which is not a "
                                                   f"local file under the allowed roots")
        _check_roots(f"file '{file}', which raster '{shown}' refers to,", file, roots)


# archive members GDAL reads in place: VSIStatL gives their size and time (a network name is known
# by its name alone: stat-ing it would cost a request)
_ARCHIVE_PREFIXES = ("/vsizip/", "/vsitar/", "/vsigzip/", "/vsi7z/", "/vsirar/")


# files beside a raster that hold no pixels or georeferencing of their own: statistics QGIS and GDAL
# (re)write when they merely display a raster, and pyramids ("Build pyramids") of the same pixels;
# counting them would re-index unchanged rasters
_DERIVED_SUFFIXES = (".aux.xml", ".ovr", ".rrd", ".aux")     # .aux: Erdas-style pyramids (USE_RRD)


# what GDAL takes from an .aux.xml beside a raster that changes its tiles: where they lie, which
# pixels are nodata, which bands are red, green and blue
_PAM_GEOREFERENCING = ("SRS", "GeoTransform", "GCPList")
_PAM_BAND_FIELDS = ("NoDataValue", "ColorInterp", "Offset", "Scale")


def _pam_georeferencing(path: str) -> str:
    """The parts of an .aux.xml that change what a raster's tiles are (_PAM_GEOREFERENCING and
    each band's _PAM_BAND_FIELDS), as text; "" for statistics and histograms alone, which QGIS and
    GDAL write when they merely display a raster, or for a file that is not PAM XML (GDAL ignores
    it then). Read as a stream, so histograms of any size cost no memory."""
    held: list[str] = []
    depth, band = 0, None
    try:
        for event, element in ElementTree.iterparse(path, events=("start", "end")):
            if event == "start":
                depth += 1
                if depth == 2 and element.tag == "PAMRasterBand":
                    band = element.get("band")
                continue
            if depth == 2 and element.tag in _PAM_GEOREFERENCING:
                held.append(ElementTree.tostring(element, encoding="unicode").strip())
            elif depth == 3 and band is not None and element.tag in _PAM_BAND_FIELDS:
                held.append(f"band {band}: " + ElementTree.tostring(element, encoding="unicode").strip())
            if depth == 2:
                band = None
            if depth == 2 or band is not None:
                element.clear()     # read: its histograms and metadata need not stay in memory
            depth -= 1
    except (OSError, ElementTree.ParseError):
        return ""
    return "\n".join(held)


def _sources_digest(dataset: gdal.Dataset, real: str, shown: str) -> str:
    """sha256 of (path, size, mtime) of every file in referenced_files() but for _DERIVED_SUFFIXES
    (a VRT's sources, nested VRTs' too, a world file, a .prj or .msk beside a raster), and of the
    georeferencing an .aux.xml gives (its statistics are left out); "" when it reads nothing else
    that counts (a GeoTIFF alone, or with statistics beside it: its key stays what it always was)."""
    files = list(referenced_files(dataset, real, shown))
    found = [file for file in files if not file.lower().endswith(_DERIVED_SUFFIXES)]
    entries = []
    # (with PAM off, GDAL reads no .aux.xml: then neither does the identity)
    pam = gdal.GetConfigOption("GDAL_PAM_ENABLED", "YES").upper() not in ("NO", "FALSE", "OFF", "0")
    auxiliary = [file for file in files if pam and file.lower().endswith(".aux.xml") and _is_local(file)]
    for file in sorted(auxiliary):
        held = _pam_georeferencing(file)
        if held:
            entries.append(f"{file}\0georeferencing\0{held}")
    if not found and not entries:
        return ""
    for file in sorted(found):
        if file.startswith(_ARCHIVE_PREFIXES):
            st = gdal.VSIStatL(file)
            entries.append(f"{file}\0{st.size}\0{st.mtime}" if st is not None else f"{file}\0-\0-")
            continue
        try:
            st = os.stat(file)
            entries.append(f"{file}\0{st.st_size}\0{st.st_mtime_ns}")
        except (OSError, ValueError):
            entries.append(f"{file}\0-\0-")  # missing or not a local file: known by its name alone
    return hashlib.sha256("\n".join(entries).encode("utf-8", "surrogateescape")).hexdigest()


def sources_digest_of(real_path: str) -> str:
    """What Raster.identity() gives as "sources" for the raster file at `real_path` now ("" for a file
    that reads no other and has no georeferencing beside it), without the rest of open_raster's work.
    RasterError when GDAL cannot open it."""
    with _gdal("invalid_argument", f"GDAL cannot open '{real_path}'"):
        dataset = gdal.OpenEx(real_path, gdal.OF_RASTER | gdal.OF_READONLY)
    if dataset is None:
        raise RasterError("invalid_argument", f"GDAL cannot open '{real_path}'")
    return _sources_digest(dataset, real_path, real_path)


def open_raster(path: str | os.PathLike, bands: BandMapping | None = None,
                allowed_roots: Sequence[str | os.PathLike] | None = None) -> Raster:
    """Open a raster file read-only, with its band mapping resolved.

    Only local files are accepted (no /vsi or URL names). With allowed_roots, the real path
    (symlinks resolved) and every file the dataset refers to (e.g. the sources of a VRT) must lie
    under one of them. Errors: missing -> not_found; outside the roots or unreadable ->
    permission_denied; not a raster GDAL can open, no georeferencing, bad band index -> invalid_argument.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise RasterError("invalid_argument", f"raster path must be text, not {type(path).__name__}")
    shown = os.fspath(path)
    if isinstance(shown, bytes) or not shown.strip() or "\x00" in shown:
        raise RasterError("invalid_argument", f"raster path {shown!r} is empty or malformed; give the path of a raster file")
    if not _is_local(shown):
        raise RasterError("invalid_argument", f"raster path '{_short(shown)}' is a GDAL virtual or remote name; "
                                              f"only local files can be opened: copy it to a local file first")
    mapping = _as_band_mapping(bands)
    mapping.percentiles()
    absolute = os.path.abspath(shown)
    roots = [os.path.realpath(os.fspath(root)) for root in (allowed_roots or [])]
    # Roots first, so a request cannot learn which files exist outside them.
    real = os.path.realpath(absolute)
    _check_roots(f"raster '{shown}'", real, roots, given=os.path.normpath(absolute))
    try:
        if not os.path.exists(real):
            raise RasterError("not_found", f"raster '{shown}' does not exist on the server machine; check the path "
                                           f"(it must be a path the server can see, not one on the client)")
        if os.path.isdir(real):
            raise RasterError("invalid_argument", f"raster path '{shown}' is a folder; give the path of a raster file in it")
        stat = os.stat(real)
        if not S_ISREG(stat.st_mode):
            # a named pipe would block the request's thread in open() until something writes to it
            raise RasterError("invalid_argument", f"raster path '{shown}' is not a regular file (a pipe, device or "
                                                  f"socket); give the path of a raster file")
        with open(real, "rb"):
            pass  # os.access is not enough: it does not see every reason a read can fail
    except PermissionError:
        raise RasterError("permission_denied", f"the server may not read raster '{shown}'; give its user read "
                                               f"permission on the file and its folders") from None
    except OSError as error:
        raise RasterError("not_found", f"raster '{shown}' cannot be opened: {error.strerror or error}") from None

    not_raster = f"'{shown}' is not a raster GDAL can open; give a GeoTIFF or another GDAL raster format"
    with _gdal("invalid_argument", not_raster):
        dataset = gdal.OpenEx(real, gdal.OF_RASTER | gdal.OF_READONLY)
    if dataset is None:
        raise RasterError("invalid_argument", not_raster)
    if roots:
        _check_referenced_files(dataset, real, shown, roots)
    files_of = dataset      # its file list, as opened: a palette's expansion is a VRT in memory
    dataset = expand_palette(dataset, shown)
    name = os.path.basename(absolute)
    return Raster(dataset, path=absolute, real_path=real, name=name, bands=mapping, stat=stat, files_of=files_of)


def _data_type_name(dtype) -> str:
    if isinstance(dtype, bool):
        pass
    elif isinstance(dtype, (int, np.integer)) and int(dtype) in _PROTO_DATA_TYPES:
        return _PROTO_DATA_TYPES[int(dtype)]
    elif isinstance(dtype, str) and dtype in DATA_TYPES:
        return dtype
    else:
        try:
            return _NUMPY_DATA_TYPES[np.dtype(dtype).name]
        except (TypeError, KeyError):
            pass
    raise RasterError("invalid_argument", f"pixel data_type {dtype!r} is not supported; use one of {', '.join(DATA_TYPES)}")


MAX_PIXEL_SOURCE_BANDS = 256


def raster_from_pixels(data: bytes | np.ndarray, width: int, height: int, band_count: int, dtype,
                       geotransform: Sequence[float], crs: str, nodata: float | None = None, alpha_band: int = 0,
                       interleave: str = "band", bands: BandMapping | None = None, label: str = "") -> Raster:
    """A Raster over pixels sent by a client (an in-memory GDAL dataset).

    ``data`` is little-endian, row-major from the top-left, band-sequential (interleave="band") or
    pixel-interleaved ("pixel"); its length must be width * height * band_count * size of dtype.
    ``dtype`` is a GDAL name ("UInt16"), a numpy dtype or the wire DataType number. ``alpha_band``
    is 1-based (0 = none); alpha 0 means no data, and that band is never a colour band.
    """
    width = _check_int("pixel source width", width, 1)
    height = _check_int("pixel source height", height, 1)
    # GDAL makes an object per band: a tiny message naming a million bands costs seconds and gigabytes
    band_count = _check_int("pixel source band_count", band_count, 1, MAX_PIXEL_SOURCE_BANDS)
    type_name = _data_type_name(dtype)
    gdal_type, np_type = DATA_TYPES[type_name]
    itemsize = np.dtype(np_type).itemsize
    expected = width * height * band_count * itemsize
    if interleave in (0, 1):
        interleave = "band"
    elif interleave == 2:
        interleave = "pixel"
    if interleave not in ("band", "pixel"):
        raise RasterError("invalid_argument", f"pixel source interleave {interleave!r} must be 'band' or 'pixel'")
    alpha_band = _check_int("pixel source alpha_band", alpha_band, 0, band_count)
    if alpha_band and band_count == 1:
        raise RasterError("invalid_argument", "pixel source alpha_band=1 leaves no colour band; send at least one more band")
    if nodata is not None and (isinstance(nodata, bool) or not isinstance(nodata, (int, float, np.number))):
        raise RasterError("invalid_argument", f"pixel source nodata must be a number, got {nodata!r}")

    size_hint = (f"width {width} x height {height} x {band_count} band(s) x {itemsize} byte(s) ({type_name}) = "
                 f"{expected} bytes; check width, height, band_count and data_type")
    if isinstance(data, np.ndarray):
        if _NUMPY_DATA_TYPES.get(data.dtype.name) != type_name:
            raise RasterError("invalid_argument", f"pixel array has dtype {data.dtype} but data_type says {type_name}")
        if data.size != width * height * band_count:
            raise RasterError("invalid_argument", f"pixel array has {data.size} values but {size_hint}")
        flat = np.ascontiguousarray(data).reshape(-1).astype(np.dtype(np_type), copy=False)
    elif isinstance(data, (bytes, bytearray, memoryview)):
        length = memoryview(data).nbytes
        if length != expected:
            raise RasterError("invalid_argument", f"pixel data is {length} bytes but {size_hint}")
        flat = np.frombuffer(data, dtype=np.dtype(np_type).newbyteorder("<")).astype(np.dtype(np_type), copy=False)
    else:
        raise RasterError("invalid_argument", f"pixel data must be bytes or a numpy array, not {type(data).__name__}")

    try:
        gt = tuple(float(v) for v in geotransform)
    except (TypeError, ValueError):
        raise RasterError("invalid_argument", f"pixel source geotransform must be 6 numbers, got {geotransform!r}") from None
    if len(gt) != 6 or not all(math.isfinite(v) for v in gt) or gt[1] * gt[5] - gt[2] * gt[4] == 0:
        raise RasterError("invalid_argument", f"pixel source geotransform {list(gt)} must be 6 finite numbers in GDAL order "
                                              f"[x of top-left, pixel width, row rotation, y of top-left, column rotation, "
                                              f"pixel height] with a non-zero pixel size")
    if not isinstance(crs, (str, osr.SpatialReference)) or (isinstance(crs, str) and not crs.strip()):
        raise RasterError("invalid_argument", "pixel source crs is required: give an authority id such as 'EPSG:3857' or WKT")
    srs = parse_crs(crs)

    planes = flat.reshape(band_count, height, width) if interleave == "band" else \
        flat.reshape(height, width, band_count).transpose(2, 0, 1)
    name = _short(label, 256) if label else "pixels"
    with _gdal("invalid_argument", f"cannot hold pixel source '{name}' in memory"):
        dataset = gdal.GetDriverByName("MEM").Create("", width, height, band_count, gdal_type)
        dataset.SetGeoTransform(gt)
        dataset.SetSpatialRef(srs)
        for index in range(band_count):
            band = dataset.GetRasterBand(index + 1)
            band.WriteArray(planes[index])
            if index + 1 == alpha_band:
                band.SetColorInterpretation(gdal.GCI_AlphaBand)
            elif nodata is not None:
                band.SetNoDataValue(float(nodata))
    # The key covers the pixels in one canonical layout plus where they lie, so the same image
    # sent band- or pixel-interleaved gets the same identity, and a moved one does not.
    digest = hashlib.sha256()
    digest.update(repr((width, height, band_count, type_name, gt, srs.ExportToWkt(), nodata, alpha_band)).encode())
    digest.update(memoryview(np.ascontiguousarray(planes)))
    return Raster(dataset, path="", real_path="", name=name, bands=_as_band_mapping(bands),
                  alpha_band=alpha_band, digest=digest.hexdigest())
