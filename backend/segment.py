"""Prompt to polygons: SAO relevance maps over an extent -> mask -> GDAL Polygonize -> clean polygons.

The extent is read once at the working resolution, cut into model-sized tiles with overlap, and
each tile's patch-grid relevance is upsampled to pixels and blended into one map with weights that
fall off towards tile edges, so a region that straddles a seam gets one smooth value and one
polygon instead of two halves.

Relevance in 0..1: the cosine similarities of a position to the prompts (and to a few generic
"background" texts) are turned into probabilities with the model's own temperature, a softmax over
{prompts, background}. A position is relevant to a prompt when that prompt wins against the
others and against "just ground", so the same threshold means the same thing for any prompt; raw
cosines of a contrastive model sit in a narrow band that differs from prompt to prompt.

The blended map is then refined along the image's own edges (backend.edges, a guided filter with
the extent's grey level as the guide), because the model sees the ground in 16-pixel patches and
its maps blur across every boundary; the mask follows field edges and roof lines instead. The
thresholded mask loses its specks and pinholes (without_specks) before it becomes polygons.
"""
from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import numpy as np
import shapely
import torch
import torch.nn.functional as F
from osgeo import gdal, ogr, osr
from shapely import wkb as shapely_wkb
from shapely.geometry import MultiPolygon, Polygon
from shapely.validation import make_valid

from .defaults import DEFAULT_SAO_WINDOW, DEFAULT_THRESHOLD, edge_radius_for
from .edges import edge_refined
from .engine import EngineError
from .raster import (NO_VALID_PIXELS, Raster, RasterError, _gdal_exceptions, _grid_to_map,
                     bounds_from_geotransform, transform_points_quietly, transformation)

# Generic texts every prompt competes with: what any overhead image "is" when nothing specific is.
BACKGROUND_PROMPTS = ("an aerial image", "a satellite image of the ground", "an overhead view of land")



@dataclass
class PolygonResult:
    geometry: Polygon | MultiPolygon   # in the raster's CRS; one region: a MultiPolygon when its pixels
                                       # touch only at corners (make_valid parts them)
    score: float                 # mean relevance inside
    max_score: float
    area: float                  # map units squared
    area_m2: float               # geodesic, 0 when unknown


@dataclass
class PromptResult:
    prompt: str
    index: int
    polygons: list[PolygonResult]
    max_relevance: float
    dropped_small: int
    relevance: np.ndarray | None = None      # float32 [H, W] when asked for


@dataclass
class SegmentOutput:
    results: list[PromptResult]
    extent: tuple[float, float, float, float]    # processed extent in the raster's CRS
    geotransform: tuple[float, ...]
    crs_wkt: str
    shape: tuple[int, int]                       # (height, width) of the working grid
    tiles: int = 0
    # (col, row, width, height) of the extent's own pixels on the working grid when the model saw
    # ground around it (a small extent), else None
    window: tuple[int, int, int, int] | None = None


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Tile starts along one axis of `length` pixels: step tile*(1-overlap), last tile flush with the end."""
    if length <= tile:
        return [0]
    step = max(1, int(round(tile * (1.0 - overlap))))
    starts = list(range(0, length - tile + 1, step))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def raise_if_cancelled(cancelled: Callable[[], bool]) -> None:
    if cancelled():
        raise EngineError("cancelled", "the request was cancelled")


def blend_weights(size: int) -> np.ndarray:
    """[size, size] weights: 1 in the middle, falling linearly to a small floor at the edges.

    Pixels near a tile's border see less context, so where tiles overlap the one in whose middle
    the pixel lies dominates; the floor keeps pixels covered by one tile only well defined.
    """
    ramp = np.minimum(np.arange(size) + 0.5, size - np.arange(size) - 0.5) / (size / 2.0)
    ramp = np.clip(ramp, 0.05, 1.0).astype(np.float32)
    return np.outer(ramp, ramp)


def relevance_probabilities(cosines: torch.Tensor, n_prompts: int, logit_scale: float) -> torch.Tensor:
    """[N, P + B, G, G] cosines (prompts first, then background) -> [N, P, G, G] probabilities."""
    return (cosines * logit_scale).softmax(dim=1)[:, :n_prompts]


def relevance_map(rgb: np.ndarray, valid: np.ndarray, text_embeddings: np.ndarray, n_prompts: int, engine,
                  window: int, sigma: float, overlap: float,
                  progress: Callable[[int, int], None] | None = None,
                  cancelled: Callable[[], bool] = lambda: False) -> tuple[np.ndarray, int]:
    """Blended relevance [P, H, W] (0..1) of an RGB array [3, H, W] to the first n_prompts texts."""
    _, height, width = rgb.shape
    size = engine.image_size
    ys, xs = tile_starts(height, size, overlap), tile_starts(width, size, overlap)
    total = len(ys) * len(xs)
    weights = blend_weights(size)
    acc = np.zeros((n_prompts, height, width), np.float32)
    wsum = np.zeros((height, width), np.float32)
    positions = [(y, x) for y in ys for x in xs]
    batch = 32
    done = 0
    for start in range(0, total, batch):
        raise_if_cancelled(cancelled)
        chunk = positions[start:start + batch]
        tiles = np.zeros((len(chunk), 3, size, size), np.uint8)
        for i, (y, x) in enumerate(chunk):
            piece = rgb[:, y:y + size, x:x + size]
            tiles[i, :, :piece.shape[1], :piece.shape[2]] = piece
        cos = engine.relevance(tiles, text_embeddings, window, sigma, cancelled=cancelled)
        probs = relevance_probabilities(torch.from_numpy(cos), n_prompts, engine.logit_scale)
        # bilinear upsampling of the patch grid to pixels (align_corners=False: patch centres)
        up = F.interpolate(probs, size=(size, size), mode="bilinear", align_corners=False).numpy()
        for i, (y, x) in enumerate(chunk):
            h, w = min(size, height - y), min(size, width - x)
            acc[:, y:y + h, x:x + w] += up[i, :, :h, :w] * weights[:h, :w]
            wsum[y:y + h, x:x + w] += weights[:h, :w]
        done += len(chunk)
        if progress:
            progress(done, total)
    relevance = acc / np.maximum(wsum, 1e-6)
    relevance[:, ~valid] = 0.0
    return relevance, total


# ---- polygons ---------------------------------------------------------------------------------

def _mem_raster(array: np.ndarray, geotransform, srs: osr.SpatialReference, gdal_type) -> gdal.Dataset:
    ds = gdal.GetDriverByName("MEM").Create("", array.shape[1], array.shape[0], 1, gdal_type)
    ds.SetGeoTransform(tuple(geotransform))
    ds.SetSpatialRef(srs)
    ds.GetRasterBand(1).WriteArray(array)
    return ds


# regions (in or out) under this fraction of one model patch are below what the model resolves
SPECK_PATCH_FRACTION = 1 / 4


def speck_pixels_for(patch_size: int) -> int:
    """The smallest region Segment keeps, in working-grid pixels (a tile's pixels are the model's)."""
    return int(round(patch_size * patch_size * SPECK_PATCH_FRACTION))


def without_specks(mask: np.ndarray, smallest: int) -> np.ndarray:
    """`mask` with its regions of fewer than `smallest` pixels, in or out (8-connected, as polygonize
    joins them), merged into the region around them: a speck or a pinhole far below the model's
    patch is noise of the upsampled, edge-refined map, not something it saw."""
    if smallest <= 1 or not mask.any() or mask.all():
        return mask
    with _gdal_exceptions():
        src = _mem_raster(mask.astype(np.uint8), (0.0, 1.0, 0.0, 0.0, 0.0, 1.0), None, gdal.GDT_Byte)
        band = src.GetRasterBand(1)
        gdal.SieveFilter(band, None, band, int(smallest), 8)
        return band.ReadAsArray().astype(bool)


def polygonize(mask: np.ndarray, geotransform, srs: osr.SpatialReference) -> tuple[list[Polygon], np.ndarray]:
    """Connected regions of a boolean mask as polygons in map coordinates, plus a label image
    (0 = outside, i + 1 = polygon i) used to score each polygon."""
    if not mask.any():
        return [], np.zeros(mask.shape, np.int32)
    with _gdal_exceptions():
        src = _mem_raster(mask.astype(np.uint8), geotransform, srs, gdal.GDT_Byte)
        band = src.GetRasterBand(1)
        vector = ogr.GetDriverByName("Memory").CreateDataSource(f"polygons-{uuid.uuid4().hex}")
        layer = vector.CreateLayer("polygons", srs=srs, geom_type=ogr.wkbPolygon)
        layer.CreateField(ogr.FieldDefn("value", ogr.OFTInteger))
        # the band is its own mask: only the True regions become polygons; 8-connected so a
        # diagonal chain of pixels stays one region
        gdal.Polygonize(band, band, layer, 0, ["8CONNECTED=8"])
        polygons = []
        for feature in layer:
            polygons.append(shapely_wkb.loads(bytes(feature.GetGeometryRef().ExportToWkb())))
        labels = _mem_raster(np.zeros(mask.shape, np.int32), geotransform, srs, gdal.GDT_Int32)
        layer.ResetReading()
        # burn FID + 1 so every polygon's own pixels can be found again
        layer.CreateField(ogr.FieldDefn("label", ogr.OFTInteger))
        for i, feature in enumerate(layer):
            feature.SetField("label", i + 1)
            layer.SetFeature(feature)
        gdal.RasterizeLayer(labels, [1], layer, options=["ATTRIBUTE=label"])
        label_image = labels.GetRasterBand(1).ReadAsArray()
    return polygons, label_image


SIMPLIFY_MAX_AREA_CHANGE = 0.25   # of a region's area: more, and its simplified outline is not the region


def clean_polygon(geometry, tolerance: float, min_part_area: float = 0.0) -> list[Polygon]:
    """make_valid, simplify (topology preserved), make_valid again; Polygon parts only. Simplifying
    a staircase edge can leave slivers (triangles of half a pixel) beside a region's real parts:
    parts under `min_part_area` go, unless every part is that small (a region of a pixel or two,
    simplified, is a detection, not a sliver). A region that simplifying would shrink or grow by
    over a quarter (a pixel's square, which becomes a triangle of half its area) keeps its pixel
    edges instead."""
    geometry = make_valid(geometry)
    if tolerance > 0:
        simplified = make_valid(geometry.simplify(tolerance, preserve_topology=True))
        if abs(simplified.area - geometry.area) <= SIMPLIFY_MAX_AREA_CHANGE * geometry.area:
            geometry = simplified
    parts = []
    stack = [geometry]
    while stack:
        g = stack.pop()
        if isinstance(g, Polygon):
            if not g.is_empty and g.area > 0:
                parts.append(g)
        elif hasattr(g, "geoms"):
            stack.extend(g.geoms)
    return [part for part in parts if part.area >= min_part_area] or parts


def equal_area_transformation(srs: osr.SpatialReference, x: float, y: float) -> osr.CoordinateTransformation | None:
    """From `srs` into a Lambert azimuthal equal-area projection of the WGS84 ellipsoid centred on
    (x, y) of `srs`: areas there are ground areas on the ellipsoid, near the poles and across 180
    degrees as anywhere else; None where `srs` has no place on the globe (a site grid)."""
    to_wgs84 = transformation(srs)
    if to_wgs84 is None:
        return None
    try:
        with _gdal_exceptions():
            lon, lat = to_wgs84.TransformPoint(float(x), float(y))[:2]
    except RuntimeError:
        return None
    if not (math.isfinite(lon) and math.isfinite(lat)):
        return None
    target = osr.SpatialReference()
    target.ImportFromProj4(f"+proj=laea +lat_0={lat:.9f} +lon_0={lon:.9f} +datum=WGS84 +units=m +no_defs")
    return transformation(srs, target)


def geodesic_area_m2(geometry: Polygon, to_equal_area: osr.CoordinateTransformation | None) -> float:
    """Ground area in square metres on the WGS84 ellipsoid: `geometry`'s rings moved by
    `to_equal_area` (equal_area_transformation, centred near it); 0 where unknown."""
    if to_equal_area is None:
        return 0.0

    def ring_area(ring) -> float:
        # edges straight in the raster's CRS curve in the projection (a parallel of a longitude/latitude
        # raster): densified, so the area is the region's, not that of chords between its corners
        xmin, ymin, xmax, ymax = ring.bounds
        coords = shapely.segmentize(ring, max(math.hypot(xmax - xmin, ymax - ymin) / 64.0, 1e-12)).coords
        moved = transform_points_quietly(to_equal_area, np.asarray(coords)[:, :2])
        if not np.isfinite(moved).all():
            raise ValueError("not transformable")
        return shapely.Polygon(moved).area      # shoelace: the ring's orientation does not matter

    try:
        area = ring_area(geometry.exterior) - sum(ring_area(r) for r in geometry.interiors)
    except ValueError:
        return 0.0
    return max(area, 0.0)


def polygons_for_prompt(relevance: np.ndarray, valid: np.ndarray, geotransform, srs: osr.SpatialReference,
                        threshold: float, min_area: float, tolerance: float,
                        to_equal_area: osr.CoordinateTransformation | None,
                        min_area_m2: float = 0.0, speck_pixels: int = 0) -> tuple[list[PolygonResult], int]:
    """Polygons where relevance >= threshold, scored, cleaned, small ones dropped (and counted):
    a region under `min_area` map units squared or under `min_area_m2` square metres of ground
    (geodesic_area_m2 by `to_equal_area`). A region whose ground area is unknown (None: no
    transform to longitude/latitude) is not judged by `min_area_m2`: it stays. Specks and pinholes
    of fewer than `speck_pixels` pixels are first merged into what surrounds them (without_specks)."""
    mask = without_specks((relevance >= threshold) & valid, speck_pixels) & valid
    raw, labels = polygonize(mask, geotransform, srs)
    if not raw:
        return [], 0
    flat_labels = labels.ravel()
    flat_rel = relevance.ravel()
    counts = np.bincount(flat_labels, minlength=len(raw) + 1)
    sums = np.bincount(flat_labels, weights=flat_rel, minlength=len(raw) + 1)
    maxima = np.zeros(len(raw) + 1, np.float64)
    np.maximum.at(maxima, flat_labels, flat_rel)
    results, dropped = [], 0
    pixel_area = abs(geotransform[1] * geotransform[5] - geotransform[2] * geotransform[4])
    for i, geometry in enumerate(raw):
        label = i + 1
        score = float(sums[label] / counts[label]) if counts[label] else float(relevance[mask].mean())
        top = float(maxima[label]) if counts[label] else score
        # a region of pixels that touch only at a corner comes back from make_valid in parts (a
        # diagonal road one pixel wide: a chain of squares): they stand or fall together, by the
        # region's area, and are one result, so every result is at least the minimum area
        parts = clean_polygon(geometry, tolerance, min_part_area=0.75 * pixel_area)
        if min_area > 0 and sum(part.area for part in parts) < min_area:
            dropped += 1
            continue
        ground = [geodesic_area_m2(part, to_equal_area) for part in parts]
        measured = all(area > 0 for area in ground)
        if min_area_m2 > 0 and measured and sum(ground) < min_area_m2:
            dropped += 1
            continue
        region = parts[0] if len(parts) == 1 else MultiPolygon(parts)
        results.append(PolygonResult(region, score, top, float(sum(part.area for part in parts)),
                                     float(sum(ground)) if measured else 0.0))
    results.sort(key=lambda r: (-r.score, -r.area))
    return results, dropped


def relevance_geotiff(relevance: np.ndarray, geotransform, srs: osr.SpatialReference) -> bytes:
    """A single-band Float32 GeoTIFF (DEFLATE) of a relevance map, as bytes."""
    name = f"/vsimem/skyprompt-relevance-{uuid.uuid4().hex}.tif"
    with _gdal_exceptions():
        src = _mem_raster(relevance.astype(np.float32), geotransform, srs, gdal.GDT_Float32)
        # the copy is closed (and so flushed) as soon as it is dropped
        gdal.GetDriverByName("GTiff").CreateCopy(name, src, options=["COMPRESS=DEFLATE", "PREDICTOR=3"])
        handle = gdal.VSIFOpenL(name, "rb")
        try:
            gdal.VSIFSeekL(handle, 0, 2)
            size = gdal.VSIFTellL(handle)
            gdal.VSIFSeekL(handle, 0, 0)
            data = gdal.VSIFReadL(1, size, handle)
        finally:
            gdal.VSIFCloseL(handle)
            gdal.Unlink(name)
    return bytes(data)


def crop_to_window(relevance: np.ndarray, geotransform, window) -> tuple[np.ndarray, tuple]:
    """`relevance` ([..., H, W] on the working grid) cut to `window` (col, row, width, height; None
    = whole) and the geotransform of the cut: a small extent is segmented with the ground around it,
    but its relevance map is the extent's own."""
    gt = tuple(geotransform)
    if window is None:
        return relevance, gt
    c0, r0, w, h = window
    return (relevance[..., r0:r0 + h, c0:c0 + w],
            (gt[0] + c0 * gt[1] + r0 * gt[2], gt[1], gt[2], gt[3] + c0 * gt[4] + r0 * gt[5], gt[4], gt[5]))


SAME_PROMPT_COSINE = 0.9999     # "houses", "Houses" and "houses." embed alike: one prompt to the model


def check_distinct_prompts(prompts: Sequence[str], embeddings: np.ndarray) -> None:
    """Refuse prompts the model reads as one (EngineError invalid_argument): each pixel's relevance
    is shared among the prompts, so two alike would each get half, under any usual threshold, and
    neither would give a polygon."""
    similar = embeddings @ embeddings.T
    for j in range(1, len(prompts)):
        for i in range(j):
            if similar[i, j] >= SAME_PROMPT_COSINE:
                raise EngineError("invalid_argument", f"prompts {i + 1} ({prompts[i]!r}) and {j + 1} ({prompts[j]!r}) "
                                                      "read the same to the model, and would split each pixel "
                                                      "between them so that neither reaches the threshold: give "
                                                      "each prompt once")


def prompt_embeddings(engine, prompts: Sequence[str], ensemble: bool = True,
                      cancelled: Callable[[], bool] = lambda: False) -> np.ndarray:
    """[len(prompts) + len(BACKGROUND_PROMPTS), E]: the prompts (ensembled unless `ensemble` is
    False), then the background texts as they are: what `relevance_map` takes."""
    return np.concatenate([engine.embed_prompts(list(prompts), ensemble, cancelled=cancelled),
                           engine.embed_texts(list(BACKGROUND_PROMPTS), cancelled=cancelled)])


def segment(raster: Raster, prompts: Sequence[str], engine, *, extent=None, threshold: float = DEFAULT_THRESHOLD,
            min_area: float = 0.0, min_area_m2: float = 0.0, simplify_tolerance: float | None = None,
            window: int = DEFAULT_SAO_WINDOW,
            sigma: float = 0.0, target_resolution: float | None = None, overlap: float = 0.25,
            max_pixels: int = 4096 * 4096, keep_relevance: bool = False, ensemble: bool = True,
            edge_radius: int | None = None, progress: Callable[[str, int, int], None] | None = None,
            cancelled: Callable[[], bool] = lambda: False) -> SegmentOutput:
    """Polygons for each prompt over `extent` of `raster` (see the module docstring). `ensemble`:
    embed each prompt under the zero-shot templates and average (`ModelEngine.embed_prompts`); the
    background texts are already phrased as captions and are embedded as they are. `edge_radius`:
    the guided filter's radius in working-grid pixels (None = `default_edge_radius`, 0 = off)."""
    if progress:
        progress("reading", 0, 0)
    text_embeddings = prompt_embeddings(engine, prompts, ensemble, cancelled)
    check_distinct_prompts(prompts, text_embeddings[:len(prompts)])
    # an extent smaller than one model tile: the model sees the ground around it rather than a tile
    # padded with black, and only the extent's own pixels (`inside`) become polygons
    wider = _context_read(raster, extent, target_resolution, engine.image_size, max_pixels)
    if wider is not None:
        rgb, valid, gt, inside, processed = wider
    else:
        rgb, valid, gt = raster.read_extent(extent, target_resolution=target_resolution, max_pixels=max_pixels)
        inside, processed = None, None
    height, width = valid.shape
    # a rotated raster, or an extent in another CRS: the window is the box around the extent, so
    # only the pixels whose centres lie in the extent itself may become polygons
    clip, exact = raster.extent_polygon(extent)
    if not exact:
        rows, cols = np.mgrid[0:height, 0:width] + 0.5
        in_clip = shapely.contains_xy(clip, *_grid_to_map(gt, cols, rows))
        in_view = raster.grid_in_extent(extent, gt, width, height)
        if in_view is not None:         # the polygon of an orthographic view's rim is a lattice's
            in_clip &= in_view
        if not in_clip.any():       # the box round it meets the raster, the extent itself does not
            raise RasterError("invalid_argument", f"the extent covers no pixel of {raster.path or raster.name!r}: it "
                                                  "lies beside the raster, within the box round it, or is smaller "
                                                  "than one pixel; give an extent over the raster")
        inside = in_clip if inside is None else inside & in_clip
        valid = valid & in_clip
    if not valid.any():
        # "0 polygons" would read as "nothing of the kind here" where there is nothing to look at
        raise RasterError("invalid_argument", NO_VALID_PIXELS)
    srs = raster.srs
    rel, tiles = relevance_map(rgb, valid, text_embeddings, len(prompts), engine, window, sigma, overlap,
                               progress=(lambda d, t: progress("relevance", d, t)) if progress else None,
                               cancelled=cancelled)
    raise_if_cancelled(cancelled)       # the filter takes seconds on large extents
    # on the model's device, so a GPU server filters on its GPU (bench/gpu_bench.py times both)
    rel = edge_refined(rel, rgb, valid, edge_radius_for(edge_radius, engine.image_size),
                       device=engine.device)
    if progress:
        progress("polygonizing", tiles, tiles)
    pixel = math.hypot(gt[1], gt[4])
    tolerance = pixel if simplify_tolerance is None else float(simplify_tolerance)
    # ground areas in an equal-area projection centred on the extent: exact on the ellipsoid there
    to_equal_area = equal_area_transformation(srs, *(float(v[0]) for v in _grid_to_map(gt, np.array([width / 2]),
                                                                                           np.array([height / 2]))))
    results = []
    if inside is not None:
        rel[:, ~inside] = 0.0
    for i, prompt in enumerate(prompts):
        raise_if_cancelled(cancelled)
        polygons, dropped = polygons_for_prompt(rel[i], valid, gt, srs, threshold, min_area, tolerance, to_equal_area,
                                                min_area_m2, speck_pixels_for(engine.config.patch_size))
        results.append(PromptResult(prompt, i, polygons, float(rel[i].max()) if rel[i].size else 0.0, dropped,
                                    rel[i] if keep_relevance else None))
    # the extent segmented: the request's, also when the model saw more around it
    if not exact:
        grid = shapely.Polygon(np.column_stack(_grid_to_map(gt, np.array([0, width, width, 0], float),
                                                            np.array([0, 0, height, height], float))))
        processed = tuple(clip.intersection(grid).bounds) if clip.intersects(grid) else tuple(grid.bounds)
    elif processed is None:
        processed = bounds_from_geotransform(gt, width, height)
    window = None
    if wider is not None:     # the pixels that are the extent's own, as `inside` marks them
        rows, cols = np.flatnonzero(wider.inside.any(axis=1)), np.flatnonzero(wider.inside.any(axis=0))
        if rows.size and cols.size:
            window = (int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1))
    return SegmentOutput(results, processed, tuple(gt), raster.crs_wkt, (height, width), tiles, window)


class ContextRead(NamedTuple):
    """A read widened around an extent smaller than one model tile (`_context_read`)."""
    rgb: np.ndarray
    valid: np.ndarray          # valid pixels of the extent's own (False on the ground around it)
    geotransform: tuple
    inside: np.ndarray         # the working-grid pixels whose centres lie in the extent's window
    bounds: tuple              # the extent's native window, in the raster's CRS


def _context_read(raster: Raster, extent, target_resolution: float | None, size: int,
                  max_pixels: int) -> ContextRead | None:
    """For an extent under one model tile a side on a north-up raster: a ContextRead of a read
    widened to a tile of real ground around it (kept within the raster); None when the extent is
    large enough, the raster is rotated, or the widened read would
    pass `max_pixels` (read_extent then reads the extent itself, under that limit)."""
    gt = raster.geotransform
    if gt[2] != 0 or gt[4] != 0:
        return None
    resolution = raster.check_target_resolution(target_resolution)
    col, row, w, h = raster.window_for_extent(extent)
    # native px per working px along each axis, as read_extent resamples (pixels need not be square)
    per_x, per_y = (resolution / raster.pixel_size[0], resolution / raster.pixel_size[1]) if resolution else (1.0, 1.0)
    need_w, need_h = int(math.ceil(size * per_x)), int(math.ceil(size * per_y))
    if w >= need_w and h >= need_h:
        return None
    wide_w, wide_h = min(raster.width, max(w, need_w)), min(raster.height, max(h, need_h))
    wide_col = min(max(0, col - (wide_w - w) // 2), raster.width - wide_w)
    wide_row = min(max(0, row - (wide_h - h) // 2), raster.height - wide_h)
    out_w, out_h = max(1, round(wide_w / per_x)), max(1, round(wide_h / per_y))
    if out_w * out_h > max_pixels:
        return None
    rgb, valid = raster.read_window(wide_col, wide_row, wide_w, wide_h, (out_w, out_h))
    wide_gt = raster.window_geotransform(wide_col, wide_row, wide_w, wide_h, out_w, out_h)
    # pixel centres of the working grid inside the requested native window
    cx = wide_col + (np.arange(out_w) + 0.5) * wide_w / out_w
    cy = wide_row + (np.arange(out_h) + 0.5) * wide_h / out_h
    inside = ((cy >= row) & (cy < row + h))[:, None] & ((cx >= col) & (cx < col + w))[None, :]
    bounds = bounds_from_geotransform(raster.window_geotransform(col, row, w, h, w, h), w, h)
    return ContextRead(rgb, valid & inside, wide_gt, inside, bounds)


__all__ = ["segment", "crop_to_window", "prompt_embeddings", "relevance_map", "polygons_for_prompt", "polygonize", "clean_polygon", "blend_weights",
           "tile_starts", "relevance_geotiff", "BACKGROUND_PROMPTS", "DEFAULT_SAO_WINDOW", "DEFAULT_THRESHOLD",
           "SegmentOutput", "PromptResult", "PolygonResult"]
