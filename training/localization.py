"""The localization benchmark: how well a checkpoint's dense maps find classes in mosaics with exact
ground truth (training.mosaic), and which dense method to ship.

Two measurements:
- relevance maps directly: every dataset class competes for every pixel (its prompt-ensemble text
  embedding against each position's dense embedding, softmax at the model's temperature, tiles
  blended as the backend's Segment does); the pixel goes to the best class. Scored against the
  mask: IoU per class, mIoU, pixel accuracy, boundary F-score (within `tolerance` pixels).
- end to end through the backend's Segment (backend.segment.segment on the written GeoTIFF: the
  class names as prompts, the default threshold, GDAL polygons): polygons of each class against the
  ground-truth class polygons, IoU from areas in map units.

Dense methods (`METHODS`): the global attention pool (one embedding per tile, upsampled), the
value path alone (MaskCLIP-style: each position's own value through the pool's output projection;
SAO with a 1x1 window) and SAO with 3/5/7 windows, with and without Gaussian weighting, on the
image upsampled twice, and with the backend's edge refinement (backend.edges: a guided filter with
the image as the guide, radius `default_edge_radius` unless asked otherwise).
"""
from __future__ import annotations

import math
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import shapely
import torch
import torch.nn.functional as F
from osgeo import ogr
from tqdm import tqdm

from backend.defaults import DEFAULT_SAO_WINDOW, DEFAULT_THRESHOLD, edge_radius_for
from backend.edges import edge_refined
from backend.segment import relevance_map

from . import metrics as M
from .mosaic import Mosaic, write_mosaic

GLOBAL_WINDOW = 10_000      # any window >= the patch grid is the global pool, exactly
SEGMENT_OVERLAP = 0.125     # the backend's default tile overlap for Segment



class DenseMethod(NamedTuple):
    window: int            # SAO window in patches (GLOBAL_WINDOW = the global pool)
    sigma: float = 0.0     # Gaussian sigma in patches; 0 = uniform window
    zoom: int = 1          # map the image upsampled this many times (as Segment at half the pixel size would)
    edges: bool = False    # refine the maps along the image's edges, as the backend's Segment does by default


METHODS: dict[str, DenseMethod] = {
    "global": DenseMethod(GLOBAL_WINDOW),
    "maskclip": DenseMethod(1),
    "sao3": DenseMethod(3), "sao5": DenseMethod(5), "sao7": DenseMethod(7),
    "sao3-gauss": DenseMethod(3, 1.5), "sao5-gauss": DenseMethod(5, 2.5), "sao7-gauss": DenseMethod(7, 3.5),
    "sao7-zoom2": DenseMethod(7, zoom=2),
    "sao3-edges": DenseMethod(3, edges=True), "sao5-edges": DenseMethod(5, edges=True),
    "sao7-edges": DenseMethod(7, edges=True),
}
# what the backend's Segment does when a request sets nothing
DEFAULT_METHOD = f"sao{DEFAULT_SAO_WINDOW}-edges"


class DirectModel:
    """The part of the backend's ModelEngine interface that relevance maps need, on a model in memory
    (refinement measures its model between rounds without writing a checkpoint)."""

    def __init__(self, model, tokenizer, device):
        self.model, self.tokenizer, self.device = model, tokenizer, torch.device(device)
        self.image_size = model.config.image_size
        self.logit_scale = float(model.logit_scale.detach().clamp(max=model.config.max_logit_scale).exp())

    @torch.no_grad()
    def relevance(self, images: np.ndarray, text_embeddings: np.ndarray, window: int, sigma: float,
                  cancelled=None) -> np.ndarray:
        was_training = self.model.training
        self.model.eval()
        x = self.model.preprocess(torch.from_numpy(np.ascontiguousarray(images)).to(self.device))
        text = torch.from_numpy(np.ascontiguousarray(text_embeddings, np.float32)).to(self.device)
        out = self.model.sao_relevance_map(x, text, window, gaussian=sigma > 0, sigma=sigma or None)
        self.model.train(was_training)
        return out.float().cpu().numpy()


def upsample_image(image: np.ndarray, zoom: int) -> np.ndarray:
    """A uint8 [3, H, W] image resampled (bilinear) to [3, zoom*H, zoom*W]."""
    x = torch.from_numpy(np.ascontiguousarray(image[None])).float()
    x = F.interpolate(x, scale_factor=zoom, mode="bilinear", align_corners=False)
    return x.clamp(0, 255).round().to(torch.uint8)[0].numpy()


def class_probabilities(engine, image: np.ndarray, class_embeddings: np.ndarray, window: int,
                        sigma: float, zoom: int = 1) -> np.ndarray:
    """[C, H, W] probabilities of each class at each pixel of a uint8 [3, H, W] image; with zoom > 1
    the image is mapped upsampled and the probabilities averaged back onto its pixels."""
    big = upsample_image(image, zoom) if zoom > 1 else image
    valid = np.ones(big.shape[1:], bool)
    probs, _ = relevance_map(big, valid, class_embeddings, len(class_embeddings), engine, window, sigma,
                             SEGMENT_OVERLAP)
    if zoom > 1:
        probs = F.avg_pool2d(torch.from_numpy(probs)[None], zoom)[0].numpy()
    return probs


def _polygons_of(path: Path, n_classes: int) -> list:
    """Ground-truth geometry (shapely) per class index from the written class polygons."""
    out = [[] for _ in range(n_classes)]
    ds = ogr.Open(str(path))
    for feature in ds.GetLayer(0):
        out[feature.GetField("class_index")].append(shapely.from_wkb(bytes(feature.GetGeometryRef().ExportToWkb())))
    return [shapely.union_all(g) if g else None for g in out]


def _summary(confusion: np.ndarray, boundary: np.ndarray, classes: Sequence[str]) -> dict:
    """Scores of the classes in the truth or the prediction (the standard mIoU): a class predicted
    where the truth never has it scores IoU 0 and boundary F 0, and pulls the means down."""
    iou = M.iou_per_class(confusion)
    present = confusion.sum(1) > 0
    scored = present | (confusion.sum(0) > 0)
    # a class only predicted has no true boundary (F undefined): every boundary it drew is false
    per_bf = {c: M.boundary_f_score(boundary[c]) if present[c] else 0.0 for c in range(len(classes)) if scored[c]}
    bf = [v for v in per_bf.values() if not math.isnan(v)]

    def by_class(values) -> dict:
        return {classes[c]: (None if math.isnan(v) else float(v)) for c, v in values}

    return {
        "miou": M.mean_iou(confusion),
        "pixel_accuracy": M.pixel_accuracy(confusion),
        "boundary_f": float(np.mean(bf)) if bf else float("nan"),
        "per_class_iou": by_class((c, iou[c]) for c in range(len(classes)) if scored[c]),
        # the share of each class's pixels labelled with it (recall; none for a class only predicted)
        "per_class_pixel_accuracy": by_class((c, confusion[c, c] / confusion[c].sum() if present[c] else math.nan)
                                             for c in range(len(classes)) if scored[c]),
        "per_class_boundary_f": by_class(per_bf.items()),
    }


def evaluate_mosaics(engine, mosaics: Sequence[Mosaic], class_embeddings: np.ndarray,
                     methods: Sequence[str] = (DEFAULT_METHOD,), tolerance: int = 3,
                     progress: bool = True, edge_radius: int | None = None) -> dict[str, dict]:
    """Per method: mIoU, pixel accuracy, boundary F and per-class IoU over all mosaics. `edge_radius`
    (pixels) for the edge-refined methods; None = the backend's default for the engine's tile."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    classes = mosaics[0].classes
    n = len(classes)
    out = {}
    bar = tqdm(total=len(methods) * len(mosaics), desc="relevance maps", unit="map", disable=not progress)
    radius = edge_radius_for(edge_radius, engine.image_size)
    for name in methods:
        window, sigma, zoom, edges = METHODS[name]
        confusion = np.zeros((n, n), np.int64)
        boundary = np.zeros((n, 4), np.int64)
        for m in mosaics:
            probs = class_probabilities(engine, m.image, class_embeddings, window, sigma, zoom)
            if edges:
                probs = edge_refined(probs, m.image, np.ones(m.mask.shape, bool), radius, device=engine.device)
            pred = probs.argmax(0)
            confusion += M.segmentation_confusion(pred, m.mask, n)
            boundary += M.class_boundary_counts(pred, m.mask, n, tolerance)
            bar.update(1)
        out[name] = _summary(confusion, boundary, classes)
        out[name]["window"], out[name]["sigma"] = window if window != GLOBAL_WINDOW else "global", sigma
        out[name]["zoom"] = zoom
        out[name]["edge_radius"] = radius if edges else 0
    bar.close()
    return out


def evaluate_end_to_end(engine, mosaics: Sequence[Mosaic], prompts: Sequence[str],
                        threshold: float = DEFAULT_THRESHOLD, window: int = DEFAULT_SAO_WINDOW,
                        folder: str | Path | None = None, progress: bool = True, ensemble: bool = True,
                        edge_radius: int | None = None) -> dict:
    """Backend Segment on each written mosaic, every class name as a prompt; polygon IoU per class
    (intersection and union areas summed over mosaics, in map units). `edge_radius` as Segment's
    (None = its default, 0 = no edge refinement)."""
    from backend.raster import open_raster
    from backend.segment import segment

    classes = mosaics[0].classes
    inter = np.zeros(len(classes))
    union = np.zeros(len(classes))
    with tempfile.TemporaryDirectory(prefix="skyprompt-mosaics-") as tmp:
        folder = Path(folder) if folder else Path(tmp)
        for i, m in enumerate(tqdm(mosaics, desc="segment (end to end)", unit="mosaic", disable=not progress)):
            paths = write_mosaic(m, folder, f"mosaic_{i:03d}")
            truth = _polygons_of(paths["polygons"], len(classes))
            result = segment(open_raster(paths["image"]), list(prompts), engine, threshold=threshold,
                             window=window, overlap=SEGMENT_OVERLAP, ensemble=ensemble, edge_radius=edge_radius)
            for c, r in enumerate(result.results):
                found = shapely.union_all([p.geometry for p in r.polygons]) if r.polygons else None
                t = truth[c]
                if t is None and found is None:
                    continue
                if t is None:
                    union[c] += found.area
                elif found is None:
                    union[c] += t.area
                else:
                    inter[c] += shapely.intersection(found, t).area
                    union[c] += shapely.union(found, t).area
    # every class found or present (union > 0): one found where no mosaic has it scores 0
    per_class = {classes[c]: float(inter[c] / union[c]) for c in range(len(classes)) if union[c] > 0}
    return {"miou": float(np.mean(list(per_class.values()))) if per_class else float("nan"),
            "per_class_iou": per_class, "threshold": threshold, "window": window,
            "edge_radius": edge_radius_for(edge_radius, engine.image_size)}


def images_by_class(records) -> dict[str, list[str]]:
    """Folder-of-classes records (training.data.Record) grouped by class key, in first-seen order."""
    out: dict[str, list[str]] = {}
    for r in records:
        out.setdefault(r.class_name, []).append(str(r.image))
    return out


def first_names(names: Mapping[str, Sequence[str]]) -> list[str]:
    return [v if isinstance(v, str) else v[0] for v in names.values()]


def _note(text: str) -> None:
    sys.stdout.flush()      # after what it follows, where both streams share a terminal or file
    print(f"note: {text}", file=sys.stderr, flush=True)


def _label_truth(labels_path: str | Path, layer_name: str | None, where: str | None, shape, geotransform,
                 srs) -> tuple[np.ndarray, object, str]:
    """(bool [H, W] mask of the labelled features on the grid, their union as shapely in the grid's CRS,
    the labels' CRS as said in messages). The vector may be in any CRS: it is reprojected to the
    raster's; a layer that says none is read as `training.labels.assumed_label_crs` says, with a note."""
    from osgeo import gdal, osr

    from backend.raster import bounds_from_geotransform, crs_authid, transform_points_quietly, transformation

    from .labels import assumed_label_crs, defined_crs, label_layer, layer_names, set_filter

    source = ogr.Open(str(labels_path))
    if source is None:
        raise ValueError(f"{labels_path} is not a vector file OGR can open")
    layer = label_layer(source, labels_path, layer_name)
    what = f"{labels_path} (layer {layer.GetName()!r})"
    if where:
        set_filter(layer, where, what)
    geoms = []
    for feature in layer:
        g = feature.GetGeometryRef()
        if g is None or g.IsEmpty():
            continue
        if g.HasCurveGeometry():        # circular arcs and curve polygons: as straight segments
            g = g.GetLinearGeometry()
        geoms.append(shapely.make_valid(shapely.from_wkb(bytes(g.ExportToIsoWkb()))))
    if not geoms:
        layers = layer_names(source)
        fix = (f"the file has {len(layers)} layers ({', '.join(layers)}): --label-layer picks one" if len(layers) > 1
               else "check --where" if where else "the file's only layer is empty")
        raise ValueError(f"{what} has no label features to score against" + (f" where {where}" if where else "")
                         + f"; {fix}")
    height, width = shape
    layer_srs = defined_crs(layer.GetSpatialRef())
    if layer_srs is None:
        layer_srs, note = assumed_label_crs(shapely.total_bounds(geoms), srs,
                                            bounds_from_geotransform(geotransform, width, height), what)
        _note(note)
    layer_srs = layer_srs.Clone()
    layer_srs.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    crs = crs_authid(layer_srs) or repr(layer_srs.GetName() or "an unnamed CRS")
    if not layer_srs.IsSame(srs):
        transform = transformation(layer_srs, srs)
        if transform is None:
            raise ValueError(f"cannot reproject {what} from {crs} to {crs_authid(srs) or 'the CRS'} of the raster: "
                             "there is no transformation between them; give labels in the raster's CRS or one that "
                             "can be transformed to it")
        # a point with no place in the raster's CRS (numbers of another CRS read as degrees) becomes
        # infinite and its feature is left out; GDAL's own line per point would only repeat that
        moved = (shapely.transform(g, lambda xy: transform_points_quietly(transform, xy)) for g in geoms)
        geoms = [g for g in moved if np.isfinite(shapely.bounds(g)).all()]
    # burnt from the reprojected geometries: the mask and the union are the same features
    grid = gdal.GetDriverByName("MEM").Create("", width, height, 1, gdal.GDT_Byte)
    grid.SetGeoTransform(geotransform)
    grid.SetSpatialRef(srs)
    memory = ogr.GetDriverByName("Memory").CreateDataSource("")
    burnt = memory.CreateLayer("labels", srs, ogr.wkbUnknown)
    for g in geoms:
        f = ogr.Feature(burnt.GetLayerDefn())
        f.SetGeometry(ogr.CreateGeometryFromWkb(shapely.to_wkb(g)))
        burnt.CreateFeature(f)
    gdal.RasterizeLayer(grid, [1], burnt, burn_values=[1])
    mask = grid.GetRasterBand(1).ReadAsArray().astype(bool)
    return mask, shapely.union_all(geoms), crs


def evaluate_labelled_raster(engine, raster_path: str | Path, labels_path: str | Path, prompt: str,
                             threshold: float = DEFAULT_THRESHOLD, window: int = DEFAULT_SAO_WINDOW,
                             sigma: float = 0.0, layer: str | None = None, where: str | None = None,
                             tolerance: int = 3, target_resolution: float | None = None, ensemble: bool = True,
                             edge_radius: int | None = None, bands: Sequence[int] | None = None) -> dict:
    """One prompt against labelled features (e.g. building footprints) on a real raster: pixel IoU,
    accuracy and boundary F of the thresholded relevance map, and polygon IoU of the backend's
    Segment against the label polygons (clipped to the raster), in map units. `edge_radius` as
    Segment's (None = its default, 0 = no edge refinement), for both. `bands`: the raster's (red, green,
    blue) bands, 1-based (None: the backend's choice, with a note when it had to guess)."""
    from backend.raster import BandMapping, crs_authid, open_raster
    from backend.segment import segment

    raster = open_raster(raster_path, BandMapping(*bands) if bands else None)
    if raster.band_note:
        _note(raster.band_note)
    _, valid, gt = raster.read_extent(None, target_resolution=target_resolution)
    if not 0 <= tolerance <= max(valid.shape):
        # past the raster's side every boundary pixel matches: boundary F would say nothing
        raise ValueError(f"--tolerance {tolerance} must be 0 or more and at most the raster's side "
                         f"({max(valid.shape)} px on its grid), in pixels")
    truth, truth_geom, labels_crs = _label_truth(labels_path, layer, where, valid.shape, gt, raster.srs)
    if not (truth & valid).any():
        # scoring would report IoU 0 for a mistake in the inputs, not for the model
        raise ValueError(f"none of the label features of {labels_path} fall on the valid pixels of {raster_path}: "
                         f"check that the two cover the same area (the labels, read in {labels_crs}, are reprojected "
                         f"to the raster's CRS, {crs_authid(raster.srs) or 'its own'})")
    radius = edge_radius_for(edge_radius, engine.image_size)
    # one Segment call gives both: its relevance map (kept) for the pixel scores, its polygons
    result = segment(raster, [prompt], engine, threshold=threshold, window=window, sigma=sigma,
                     target_resolution=target_resolution, overlap=SEGMENT_OVERLAP, ensemble=ensemble,
                     keep_relevance=True, edge_radius=radius)
    pred = result.results[0].relevance >= threshold
    labels = np.where(valid, truth.astype(np.int64), -1)
    confusion = M.segmentation_confusion(pred.astype(np.int64), labels, 2)
    iou = M.iou_per_class(confusion)
    found = [p.geometry for p in result.results[0].polygons]
    found = shapely.union_all(found) if found else None
    xmin, ymin, xmax, ymax = result.extent
    clip = shapely.box(xmin, ymin, xmax, ymax)
    t = shapely.intersection(truth_geom, clip)       # _label_truth refuses labels with no features
    if found is None or t.is_empty:
        polygon_iou = 0.0 if (found is not None or not t.is_empty) else float("nan")
    else:
        polygon_iou = float(shapely.intersection(found, t).area / shapely.union(found, t).area)
    return {"prompt": prompt, "iou": None if math.isnan(iou[1]) else float(iou[1]),
            "pixel_accuracy": M.pixel_accuracy(confusion),
            "boundary_f": M.boundary_f_score(M.boundary_counts(pred & valid, truth & valid, tolerance)),
            "truth_fraction": float(truth[valid].mean()),        # valid has pixels: truth & valid has some
            "predicted_fraction": float(pred[valid].mean()),
            "end_to_end": {"polygon_iou": polygon_iou, "polygons": len(result.results[0].polygons)},
            "settings": {"raster": str(raster_path), "labels": str(labels_path), "layer": layer, "where": where,
                         "bands": list(raster.rgb_bands),
                         "threshold": threshold, "window": window, "tolerance_px": tolerance,
                         "prompt_ensemble": ensemble, "edge_radius": radius,
                         "grid": list(valid.shape)}}
