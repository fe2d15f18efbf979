"""Mosaics with exact ground truth for the localization benchmark.

Each mosaic is a square raster cut into irregular regions (Voronoi cells, or random rectangles of
varied size painted over each other); every region is filled with one scene image of one class,
repeated to cover it, so the class of every pixel is known exactly. Scenes are resized to
`scene_px` first: at the model's own image size, one model tile shows about one scene, the scale
the model learned at. Everything is drawn from numpy's generator seeded with (seed, mosaic index):
the same seed gives the same mosaics on any machine.

`write_mosaic` saves a georeferenced GeoTIFF, a per-pixel class mask GeoTIFF (Int16, -1 = none) and
the class polygons (GeoPackage, polygonized from the mask, so they match it exactly).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from osgeo import gdal, ogr, osr
from PIL import Image, UnidentifiedImageError

from .data import load_image

MOSAIC_CRS = "EPSG:32633"
LAYOUTS = ("voronoi", "rectangles")


class MosaicError(ValueError):
    pass


@dataclass
class Mosaic:
    image: np.ndarray                    # uint8 [3, H, W]
    mask: np.ndarray                     # int16 [H, W]: index into `classes`
    classes: list[str]                   # the dataset's class keys (all of them, not only those present)
    regions: list[dict] = field(default_factory=list)   # per region: class, image
    geotransform: tuple = ()
    crs: str = MOSAIC_CRS

    @property
    def present(self) -> list[int]:
        return sorted(int(c) for c in np.unique(self.mask) if c >= 0)


def voronoi_regions(size: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """[size, size] region ids 0..n-1: the nearest of n random seed points (every id appears)."""
    while True:
        points = rng.uniform(0, size, (n, 2))
        yy, xx = np.mgrid[0:size, 0:size]
        d = (yy[None] - points[:, 0, None, None]) ** 2 + (xx[None] - points[:, 1, None, None]) ** 2
        labels = d.argmin(0)
        if len(np.unique(labels)) == n:
            return labels


RECTANGLE_TRIES = 2000   # rectangle layouts drawn before giving up on one where every region shows


def rectangle_regions(size: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Region 0 is the background; regions 1..n-1 are rectangles of varied size painted in turn
    (later ones over earlier ones). Redrawn until every region keeps some pixels; too many regions
    for that (the chance falls fast past about 16) is an error, not an endless loop."""
    for _ in range(RECTANGLE_TRIES):
        labels = np.zeros((size, size), np.int64)
        for r in range(1, n):
            h, w = (rng.uniform(0.2, 0.6, 2) * size).astype(int)
            y, x = rng.integers(0, size - h), rng.integers(0, size - w)
            labels[y:y + h, x:x + w] = r
        counts = np.bincount(labels.ravel(), minlength=n)
        if (counts >= (size * size) // (8 * n)).all():
            return labels
    raise MosaicError(f"{RECTANGLE_TRIES} rectangle layouts of {n} regions left some region too small: use fewer "
                      "--regions or --layout voronoi")


def _scene(path: str, scene_px: int) -> np.ndarray:
    """A scene image centre-cropped square and resized to scene_px: uint8 [3, s, s]. An image that
    cannot be read is a MosaicError naming it (the commands report it in one line)."""
    try:
        with load_image(path) as im:
            side = min(im.size)
            left, top = (im.width - side) // 2, (im.height - side) // 2
            im = im.crop((left, top, left + side, top + side)).resize((scene_px, scene_px), Image.BICUBIC)
            return np.asarray(im).transpose(2, 0, 1)
    except UnidentifiedImageError:
        raise MosaicError(f"scene image {path} is not an image file that can be read") from None
    except (OSError, Image.DecompressionBombError) as e:    # missing, unreadable, truncated, too large
        raise MosaicError(f"cannot read scene image {path}: {getattr(e, 'strerror', None) or e}") from None


def build_mosaic(images_by_class: Mapping[str, Sequence[str]], seed: int, index: int, size: int = 512,
                 regions: int = 5, scene_px: int = 128, layout: str = "voronoi",
                 pixel_size: float = 0.5) -> Mosaic:
    """One mosaic: `regions` regions of distinct classes (fewer if the set has fewer classes)."""
    if layout not in LAYOUTS:
        raise MosaicError(f"layout {layout!r} must be one of {', '.join(LAYOUTS)}")
    classes = [c for c, paths in images_by_class.items() if paths]
    if len(classes) < 2:
        raise MosaicError("a mosaic needs images of at least two classes")
    if size < 2 * scene_px // 4 or regions < 2:
        raise MosaicError(f"size {size} and regions {regions} leave no room for regions")
    rng = np.random.default_rng([seed, index])
    n = min(regions, len(classes))
    labels = (voronoi_regions if layout == "voronoi" else rectangle_regions)(size, n, rng)
    chosen = rng.choice(len(classes), n, replace=False)
    image = np.zeros((3, size, size), np.uint8)
    mask = np.full((size, size), -1, np.int16)
    reps = -(-size // scene_px)
    info = []
    for r, c in enumerate(chosen):
        paths = images_by_class[classes[c]]
        path = str(paths[rng.integers(len(paths))])
        tiled = np.tile(_scene(path, scene_px), (1, reps, reps))[:, :size, :size]
        inside = labels == r
        image[:, inside] = tiled[:, inside]
        mask[inside] = c
        info.append({"class": classes[c], "image": path})
    # mosaics of one seed sit side by side on the ground, so their footprints never overlap
    origin_x, origin_y = 500000.0 + index * (size + 16) * pixel_size, 5000000.0
    return Mosaic(image, mask, classes, info, (origin_x, pixel_size, 0.0, origin_y, 0.0, -pixel_size))


def build_mosaics(images_by_class: Mapping[str, Sequence[str]], seed: int, count: int, **kw) -> list[Mosaic]:
    return [build_mosaic(images_by_class, seed, i, **kw) for i in range(count)]


def _srs(crs: str) -> osr.SpatialReference:
    srs = osr.SpatialReference()
    srs.SetFromUserInput(crs)
    srs.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    return srs


def write_mosaic(m: Mosaic, folder: str | Path, name: str) -> dict[str, Path]:
    """<name>.tif (RGB), <name>_mask.tif (class index, -1 = none), <name>_classes.gpkg (polygons with
    `class_index` and `class`). Returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    srs = _srs(m.crs)
    _, height, width = m.image.shape
    paths = {"image": folder / f"{name}.tif", "mask": folder / f"{name}_mask.tif",
             "polygons": folder / f"{name}_classes.gpkg"}
    driver = gdal.GetDriverByName("GTiff")
    ds = driver.Create(str(paths["image"]), width, height, 3, gdal.GDT_Byte, ["COMPRESS=DEFLATE"])
    ds.SetGeoTransform(m.geotransform)
    ds.SetSpatialRef(srs)
    for b in range(3):
        ds.GetRasterBand(b + 1).WriteArray(m.image[b])
        ds.GetRasterBand(b + 1).SetColorInterpretation(gdal.GCI_RedBand + b)
    ds = None
    mask = driver.Create(str(paths["mask"]), width, height, 1, gdal.GDT_Int16, ["COMPRESS=DEFLATE"])
    mask.SetGeoTransform(m.geotransform)
    mask.SetSpatialRef(srs)
    band = mask.GetRasterBand(1)
    band.WriteArray(m.mask)
    band.SetNoDataValue(-1)
    band.FlushCache()
    paths["polygons"].unlink(missing_ok=True)
    out = ogr.GetDriverByName("GPKG").CreateDataSource(str(paths["polygons"]))
    layer = out.CreateLayer("classes", srs, ogr.wkbPolygon)
    layer.CreateField(ogr.FieldDefn("class_index", ogr.OFTInteger))
    layer.CreateField(ogr.FieldDefn("class", ogr.OFTString))
    gdal.Polygonize(band, band.GetMaskBand(), layer, 0, ["8CONNECTED=8"])
    layer.ResetReading()
    layer.StartTransaction()
    for feature in layer:
        feature.SetField("class", m.classes[feature.GetField("class_index")])
        layer.SetFeature(feature)
    layer.CommitTransaction()
    out = None
    mask = None
    return paths
