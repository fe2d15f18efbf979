"""From a QGIS raster layer to the wire's RasterSource and Extent.

A layer the backend can open itself (a GDAL file on a local disk) is sent by path. Any other layer
(XYZ/WMS tiles, /vsimem or remote rasters, rasters of other providers) is read here through a clone
of its data provider and sent as pixels + geotransform + CRS, capped at a maximum side (a colour-table
image as its colours, as the backend reads such a file). So is a file whose CRS the user set in QGIS
(none of its own, or an overridden one): the backend would use the file's own CRS, or refuse a file with
none, while its pixels go with the layer's CRS. The clone is
made on the main thread (`PixelReader(layer)`); `read()` then runs safely inside a QgsTask.
"""
from __future__ import annotations

import functools
import math
import os

import numpy as np
from qgis.core import (Qgis, QgsCoordinateReferenceSystem, QgsCoordinateTransform, QgsCsException,
                       QgsMultiBandColorRenderer, QgsProject, QgsRaster, QgsRasterDataProvider, QgsRasterLayer, QgsRectangle,
                       QgsSingleBandGrayRenderer, QgsSingleBandPseudoColorRenderer)

# Qgis.DataType -> (numpy dtype, wire DataType name)
_NUMERIC = {
    Qgis.DataType.Byte: (np.uint8, "DATA_TYPE_UINT8"),
    Qgis.DataType.UInt16: (np.uint16, "DATA_TYPE_UINT16"),
    Qgis.DataType.Int16: (np.int16, "DATA_TYPE_INT16"),
    Qgis.DataType.UInt32: (np.uint32, "DATA_TYPE_UINT32"),
    Qgis.DataType.Int32: (np.int32, "DATA_TYPE_INT32"),
    Qgis.DataType.Float32: (np.float32, "DATA_TYPE_FLOAT32"),
    Qgis.DataType.Float64: (np.float64, "DATA_TYPE_FLOAT64"),
}
_ARGB = (Qgis.DataType.ARGB32, Qgis.DataType.ARGB32_Premultiplied)
# the longest PixelSource.label a backend takes when its ServerInfo.limits.max_label_chars is 0 (one
# older than that field), counted in characters (code points, as Python's len and slicing count them)
DEFAULT_LABEL_CHARS = 256


class SourceError(ValueError):
    """The layer cannot be sent to the backend; the message says why."""


def crs_text(crs: QgsCoordinateReferenceSystem) -> str:
    """An authority id when there is one (short, exact), else WKT."""
    return crs.authid() if crs.authid() and not crs.authid().startswith("USER:") else \
        crs.toWkt(QgsCoordinateReferenceSystem.WKT_PREFERRED)


def crs_name(crs: QgsCoordinateReferenceSystem) -> str:
    """A CRS as a message names it: its authority id, else its description, else its PROJ string (a
    CRS made from one has neither, or a description of "unknown", as GDAL names it in a file)."""
    if crs.authid() and not crs.authid().startswith("USER:"):
        return crs.authid()
    if crs.description() and crs.description() != "unknown":
        return crs.description()
    return crs.toProj() or "a CRS with no name"


def local_path(layer: QgsRasterLayer) -> str | None:
    """The file behind a GDAL layer, when it is on a local disk the backend can read (or was, before it
    was moved or deleted); else None. A
    georeferenced file whose CRS the user set in QGIS (it has none of its own, or the layer's CRS was
    overridden) is None too: the backend would refuse the file or use its own CRS, while its pixels sent
    with the layer's CRS land where QGIS shows them."""
    if layer.providerType() != "gdal":
        return None
    path = layer.source().split("|")[0]
    if not os.path.isfile(path):
        # a file moved or deleted since the layer was added is still that file's layer: its index entry
        # and hits are under this path, and indexing it is refused by name ("does not exist"), not
        # made from the pixels QGIS still holds. A GDAL name that is no path ("PG:...", "/vsizip/...",
        # "NETCDF:...") is no file layer.
        gone = os.path.isabs(path) and not path.startswith("/vsi") and not os.path.exists(path)
        return os.path.abspath(path) if gone else None
    if layer.crs().isValid():
        georeferenced, file_wkt = _file_crs(path, _file_version(path))
        if georeferenced and (not file_wkt or not _same_crs(QgsCoordinateReferenceSystem.fromWkt(file_wkt),
                                                           layer.crs())):
            return None
    return os.path.abspath(path)


def shown_bands(layer: QgsRasterLayer) -> tuple[int, ...] | None:
    """On the main thread: the bands the layer's renderer shows of a multiband layer, as the model
    should see them: (red, green, blue) of a multiband colour renderer, (band,) of a single-band one
    (grey or pseudocolour). None for a single-band layer (the backend repeats its band, or reads its
    colour table) or a renderer that shows no bands as such: the backend then chooses.

    A stack of blue, green, red and near infrared marks no band as a colour, and the backend would
    read bands 1, 2, 3 as red, green, blue; once it is shown as true colour in QGIS (3, 2, 1), that is
    what the model sees too."""
    provider = layer.dataProvider()
    if provider is None or provider.bandCount() < 2:
        return None
    renderer = layer.renderer()
    if isinstance(renderer, QgsMultiBandColorRenderer):
        bands = (renderer.redBand(), renderer.greenBand(), renderer.blueBand())
    elif isinstance(renderer, QgsSingleBandGrayRenderer):
        bands = (renderer.grayBand(),)
    elif isinstance(renderer, QgsSingleBandPseudoColorRenderer):
        bands = (renderer.band(),)
    else:
        return None
    # a colour the renderer leaves out (-1) leaves the choice to the backend
    return bands if all(1 <= b <= provider.bandCount() for b in bands) else None


class LayerPath(str):
    """A layer's local file (a str: it goes wherever a path goes) and the bands its renderer shows
    (shown_bands), which the requests name in their BandMapping."""

    bands: tuple[int, ...] | None

    def __new__(cls, path: str, bands: tuple[int, ...] | None = None):
        self = super().__new__(cls, path)
        self.bands = bands
        return self


def band_mapping(pb, prepared):
    """The BandMapping for a request about `prepared` (a LayerPath with shown bands), else None."""
    bands = getattr(prepared, "bands", None) if isinstance(prepared, str) else None
    if not bands:
        return None
    red, green, blue = bands if len(bands) == 3 else bands * 3
    return pb.BandMapping(red=red, green=green, blue=blue)


def names_by_real_path(layer_paths) -> dict[str, str]:
    """{real path: layer name} of (layer, local_path(layer)) pairs that have a path. The backend
    names a raster in its answers by its real path (links followed), whichever path the layer was
    opened through, so hits are matched back to layers by that."""
    return {os.path.realpath(path): layer.name() for layer, path in layer_paths if path}


def _file_version(path: str) -> tuple:
    """(mtime, size) of the file and of the sidecars its CRS may come from (.aux.xml, .prj): a change
    to any of them is a new version of the file's georeferencing."""
    version = []
    for name in (path, path + ".aux.xml", os.path.splitext(path)[0] + ".prj"):
        try:
            stat = os.stat(name)
            version.append((stat.st_mtime_ns, stat.st_size))
        except OSError:
            version.append(None)
    return tuple(version)


@functools.lru_cache(maxsize=256)
def _file_crs(path: str, version: tuple) -> tuple[bool, str]:
    """(georeferenced, wkt) of the raster file at `path`, from its header only: whether it has a
    geotransform, and its CRS as WKT ("" when it has none). A file GDAL cannot open is (False, ""), left
    to the backend to refuse with its own advice, as is one with no geotransform at all. Kept per
    file version (`_file_version`): every Search, Segment and Describe asks, and the file rarely changes."""
    from osgeo import gdal

    try:
        dataset = gdal.OpenEx(path, gdal.OF_RASTER | gdal.OF_READONLY)
    except RuntimeError:        # with gdal.UseExceptions() on
        return False, ""
    if dataset is None:
        return False, ""
    srs = dataset.GetSpatialRef()
    # WKT2, as QGIS's GDAL provider reads it: WKT1 renames a local CRS's axes, so it would not match
    wkt = srs.ExportToWkt(["FORMAT=WKT2_2018"]) if srs is not None else ""
    return dataset.GetGeoTransform(can_return_null=True) is not None, wkt


def _same_crs(file_crs: QgsCoordinateReferenceSystem, layer_crs: QgsCoordinateReferenceSystem) -> bool:
    """Whether the file's CRS is the layer's. Only a clear difference counts: a false one would send
    every file layer as pixels, capped in size, instead of by path. A file CRS QGIS cannot read is no
    clear difference."""
    if not file_crs.isValid() or file_crs == layer_crs:
        return True
    if file_crs.authid() and file_crs.authid() == layer_crs.authid():
        return True
    return file_crs.toWkt(QgsCoordinateReferenceSystem.WKT_PREFERRED) == \
        layer_crs.toWkt(QgsCoordinateReferenceSystem.WKT_PREFERRED)


def wire_extent(pb, rect: QgsRectangle, crs: QgsCoordinateReferenceSystem):
    return pb.Extent(xmin=rect.xMinimum(), ymin=rect.yMinimum(), xmax=rect.xMaximum(), ymax=rect.yMaximum(),
                     crs=crs_text(crs))


def within_crs_area(rect: QgsRectangle, crs: QgsCoordinateReferenceSystem) -> QgsRectangle:
    """`rect` as an area the backend takes. A longitude/latitude map zoomed out past the world shows
    latitudes past 90 degrees, which are no coordinates: clipped to the world; one panned across 180
    degrees keeps its longitudes past 180 (tiles on both sides are in view). A projected map is sent
    as it is, however far it reaches past the CRS's area of use (a layer in the next UTM zone is still
    in view) or past where the CRS is defined at all (an orthographic view's corners off the globe):
    the backend judges each tile in the view's own CRS."""
    if not crs.isGeographic():
        return QgsRectangle(rect)
    south, north = max(rect.yMinimum(), -90.0), min(rect.yMaximum(), 90.0)
    if south >= north:
        return QgsRectangle()
    if rect.width() >= 360.0:
        return QgsRectangle(-180.0, south, 180.0, north)
    # a view across 180 degrees (175..185) keeps its longitudes, one turn at most past 180
    west = rect.xMinimum() - 360.0 * math.floor((rect.xMinimum() + 180.0) / 360.0)
    return QgsRectangle(west, south, west + rect.width(), north)


def to_layer_crs(rect: QgsRectangle, crs: QgsCoordinateReferenceSystem, layer: QgsRasterLayer) -> QgsRectangle:
    """`rect` (in `crs`) as a rectangle in the layer's CRS; SourceError where it has none there (a map
    panned off its globe, in an orthographic view)."""
    if crs == layer.crs():
        return QgsRectangle(rect)
    transform = QgsCoordinateTransform(crs, layer.crs(), QgsProject.instance())
    try:
        return transform.transformBoundingBox(rect)
    except QgsCsException:
        raise SourceError(f"the area cannot be placed in the CRS of layer {layer.name()!r} ({crs_name(layer.crs())}): "
                          "the map may show no part of the globe there; pan or zoom to the layer") from None


def _palette(provider) -> np.ndarray | None:
    """A colour-table band's entries as an RGBA lookup table ([n, 4] uint8, row = index; entries the
    table lacks are transparent), or None when band 1 holds no palette indices."""
    if provider.colorInterpretation(1) != QgsRaster.PaletteIndex:
        return None
    entries = [(int(item.value), item.color) for item in provider.colorTable(1) if item.value >= 0]
    if not entries:
        return None
    lookup = np.zeros((max(i for i, _ in entries) + 1, 4), np.uint8)
    for i, colour in entries:
        lookup[i] = (colour.red(), colour.green(), colour.blue(), colour.alpha())
    return lookup


class PixelReader:
    """Reads a layer's pixels inside an extent off the main thread, for layers sent as pixels."""

    def __init__(self, layer: QgsRasterLayer):
        self.name = layer.name()
        self.crs = layer.crs()
        self.full_extent = layer.extent()
        provider = layer.dataProvider()
        if provider is None or not layer.isValid():
            raise SourceError(f"layer {layer.name()!r} is not valid: it cannot be read")
        if not self.crs.isValid():      # its pixels would land nowhere on the ground
            raise no_crs_error(layer)
        self.provider = provider.clone()
        self.band_count = provider.bandCount()
        self.bands = shown_bands(layer)      # shown_bands, as LayerPath.bands (None: the first four)
        alpha = layer.renderer().alphaBand() if self.bands and layer.renderer() is not None else -1
        # the renderer's transparency band goes along as the alpha band (alpha 0: no data)
        self.alpha_band = alpha if 1 <= alpha <= self.band_count and alpha not in self.bands else 0
        self.data_type = provider.dataType(1)
        # a colour-table image is sent as its colours, as the backend reads such a file (open_raster)
        self.palette = _palette(provider) if self.band_count == 1 and self.data_type in _NUMERIC else None
        if self.palette is not None:        # indices are entries, never averaged into other ones
            nearest = QgsRasterDataProvider.ResamplingMethod.Nearest
            self.provider.setZoomedInResamplingMethod(nearest)
            self.provider.setZoomedOutResamplingMethod(nearest)
        # native ground resolution when the provider has one (tile services report none)
        self.native_resolution = (layer.rasterUnitsPerPixelX()
                                  if provider.capabilities() & provider.Size and layer.width() > 0 else None)

    def clip(self, extent: QgsRectangle) -> QgsRectangle:
        """`extent` (layer CRS) cut to the layer; an error when nothing of it is on the layer."""
        if not self.full_extent.isEmpty():
            extent = extent.intersect(self.full_extent)
        if extent.isEmpty():
            raise SourceError(f"the requested area does not overlap layer {self.name!r}")
        return extent

    def plan(self, extent: QgsRectangle, max_side: int, resolution: float | None = None) -> tuple[int, int, str]:
        """(width, height, note): the pixel size to read `extent` (already clipped) at, capped at max_side."""
        res = resolution or self.native_resolution or max(extent.width(), extent.height()) / max_side
        width, height = max(1, round(extent.width() / res)), max(1, round(extent.height() / res))
        note = ""
        if max(width, height) > max_side:
            scale = max_side / max(width, height)
            width, height = max(1, round(width * scale)), max(1, round(height * scale))
            note = (f"layer {self.name!r} is sent as pixels, capped at {max_side} px a side: read at "
                    f"{extent.width() / width:.3g} map units per pixel instead of {res:.3g}")
        return width, height, note

    def read(self, pb, extent: QgsRectangle, max_side: int, resolution: float | None = None,
             label_chars: int = DEFAULT_LABEL_CHARS):
        """(RasterSource with pixels, note). `extent` is in the layer's CRS; the layer's name is cut to
        `label_chars` characters for its label (ServerInfo.limits.max_label_chars)."""
        extent = self.clip(extent)
        width, height, note = self.plan(extent, max_side, resolution)
        nodata = None
        alpha = 0
        if self.data_type in _ARGB:
            block = self.provider.block(1, extent, width, height)
            argb = np.frombuffer(bytes(block.data()), dtype=np.uint8).reshape(height, width, 4)
            bgra = argb.astype(np.float32)
            if self.data_type == Qgis.DataType.ARGB32_Premultiplied:
                a = np.maximum(bgra[..., 3:4], 1.0)
                bgra[..., :3] = np.clip(bgra[..., :3] * 255.0 / a, 0, 255)
            rgba = bgra[..., [2, 1, 0, 3]].astype(np.uint8)
            data, bands, dtype, alpha = np.ascontiguousarray(rgba.transpose(2, 0, 1)), 4, "DATA_TYPE_UINT8", 4
        elif self.palette is not None:
            block = self.provider.block(1, extent, width, height)
            index = np.frombuffer(bytes(block.data()), dtype=_NUMERIC[self.data_type][0]).reshape(height, width)
            index = index.astype(np.int64)
            known = (index >= 0) & (index < len(self.palette))
            rgba = self.palette[np.where(known, index, 0)]
            rgba[~known] = 0
            if self.provider.sourceHasNoDataValue(1):
                rgba[index == self.provider.sourceNoDataValue(1)] = 0
            # an alpha band only when some pixel is no data (alpha 0) or see-through
            bands = 3 if (rgba[..., 3] == 255).all() else 4
            data, dtype, alpha = rgba[..., :bands].transpose(2, 0, 1), "DATA_TYPE_UINT8", 0 if bands == 3 else 4
        elif self.data_type in _NUMERIC:
            np_type, dtype = _NUMERIC[self.data_type]
            if self.bands:
                read = self.bands + ((self.alpha_band,) if self.alpha_band else ())
            else:
                read = tuple(range(1, min(self.band_count, 4) + 1))
            bands = len(read)
            alpha = bands if self.alpha_band else 0
            planes = []
            for b in read:
                block = self.provider.block(b, extent, width, height)
                planes.append(np.frombuffer(bytes(block.data()), dtype=np_type).reshape(height, width))
            if self.provider.sourceHasNoDataValue(read[0]):
                nodata = float(self.provider.sourceNoDataValue(read[0]))
            data = np.stack(planes)
        else:
            raise SourceError(f"layer {self.name!r} has pixel type {self.data_type}, which SkyPrompt cannot send")
        geotransform = [extent.xMinimum(), extent.width() / width, 0.0, extent.yMaximum(), 0.0,
                        -extent.height() / height]
        pixels = pb.PixelSource(width=width, height=height, band_count=bands, data_type=dtype,
                                data=np.ascontiguousarray(data).astype(data.dtype.newbyteorder("<")).tobytes(),
                                interleave=pb.INTERLEAVE_BAND, geotransform=geotransform, crs=crs_text(self.crs),
                                alpha_band=alpha, label=self.name[:label_chars])
        if nodata is not None:
            pixels.nodata = nodata
        return pb.RasterSource(pixels=pixels), note


def has_no_resolution(prepared) -> bool:
    """A pixel source with no ground resolution of its own (a tile service): it can only be read over
    a chosen view at a chosen resolution, not whole."""
    return isinstance(prepared, PixelReader) and prepared.native_resolution is None


def native_pixels(layer: QgsRasterLayer, area: QgsRectangle | None = None) -> tuple[float, float]:
    """On the main thread, for a layer sent by path: (pixels, resolution), the pixel count of `area`
    (layer CRS, cut to the layer; None = the whole layer) at the layer's own resolution, and that
    resolution in map units per pixel (the geometric mean of x and y, as the backend resamples)."""
    extent = layer.extent() if area is None else area.intersect(layer.extent())
    rx, ry = layer.rasterUnitsPerPixelX(), layer.rasterUnitsPerPixelY()
    return (extent.width() / rx) * (extent.height() / ry), math.sqrt(rx * ry)


def no_crs_error(layer: QgsRasterLayer) -> SourceError:
    """What to tell about a layer with no CRS, whether it goes as a file or as pixels."""
    return SourceError(f"layer {layer.name()!r} has no CRS, so its pixels have no place on the ground: set one "
                       "in its Layer Properties (Source) if the file is georeferenced, or georeference it first "
                       "(Raster > Georeferencer), then run again")


def prepare_source(layer: QgsRasterLayer):
    """On the main thread: the layer's path, or a PixelReader for layers the backend cannot open.
    SourceError for a layer with no CRS: sent as a file, the backend would refuse it in other words."""
    if layer.isValid() and not layer.crs().isValid():
        raise no_crs_error(layer)
    path = local_path(layer)
    return LayerPath(path, shown_bands(layer)) if path else PixelReader(layer)


def build_source(pb, prepared, extent: QgsRectangle | None, max_side: int, resolution: float | None = None,
                 label_chars: int = DEFAULT_LABEL_CHARS):
    """In a task: (RasterSource, note). `extent` (layer CRS) is needed only for pixel sources."""
    if isinstance(prepared, str):
        return pb.RasterSource(path=prepared), ""
    return prepared.read(pb, extent if extent is not None else prepared.full_extent, max_side, resolution,
                         label_chars)
