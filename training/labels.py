"""Reading labelled vector features (any OGR source) for a raster: the rules every reader of labels
follows, so the same file means the same thing to `evaluate segmentation --raster` and to
`build_dataset landmarks`.

- `label_layer`: a layer by name, or an error listing the layers the file has;
- `set_filter`: an attribute filter (--where), or an error naming the layer's own fields; GDAL's own
  lines stay off the terminal;
- `defined_crs`: a layer's CRS, or None where it says none (a GeoPackage's "Undefined" one too);
- `assumed_label_crs`: what a layer with no CRS is taken to be, with a note that says so.
"""
from __future__ import annotations

from collections.abc import Sequence

from osgeo import gdal, ogr, osr

FIX_CRS = "give the file a CRS (a .prj beside a shapefile, or ogr2ogr -a_srs EPSG:CODE fixed.gpkg FILE)"


def layer_names(source: ogr.DataSource) -> list[str]:
    return [source.GetLayer(i).GetName() for i in range(source.GetLayerCount())]


def label_layer(source: ogr.DataSource, path, name: str | None, error: type[Exception] = ValueError) -> ogr.Layer:
    """The layer `name` of `source` (opened from `path`), its first when `name` is None; `error` naming
    the layers it has when it has no such layer (or none at all)."""
    layer = source.GetLayerByName(name) if name else source.GetLayer(0)
    if layer is None:
        names = layer_names(source)
        raise error(f"{path} has no layer {name!r} (it has: {', '.join(names)})" if name and names
                    else f"{path} has no layers")
    return layer


def set_filter(layer: ogr.Layer, where: str, what: str, error: type[Exception] = ValueError) -> None:
    """`where` as the attribute filter of `layer`, or `error` naming `what` (the file and layer): some
    drivers (GeoPackage) take any filter and fail only on the first read, printing a GDAL error and
    reading nothing, so the first feature is read here, with GDAL's own lines kept quiet."""
    gdal.PushErrorHandler("CPLQuietErrorHandler")
    try:
        gdal.ErrorReset()
        try:
            bad = layer.SetAttributeFilter(where) != 0
            if not bad:
                layer.GetNextFeature()
                bad = gdal.GetLastErrorType() >= gdal.CE_Failure
        except RuntimeError:      # with GDAL exceptions on
            bad = True
        detail = gdal.GetLastErrorMsg()
    finally:
        gdal.PopErrorHandler()
    if bad:
        # GDAL's reason, but not a GeoPackage's whole SQL statement (the fields below say what it would)
        detail = "" if "SELECT " in detail else " ".join(detail.split())
        defn = layer.GetLayerDefn()
        fields = ", ".join(defn.GetFieldDefn(i).GetName() for i in range(defn.GetFieldCount())) or "none"
        raise error(f"--where {where!r} is not a valid filter for {what}"
                    + (f" ({detail})" if detail else "")
                    + f": use the layer's own field names ({fields}), in SQL (e.g. \"highway = 'primary'\")")
    layer.ResetReading()


def defined_crs(srs: osr.SpatialReference | None) -> osr.SpatialReference | None:
    """A layer's CRS, or None where it says none: GDAL gives a GeoPackage layer of no CRS (srs_id 0 or
    -1) an "Undefined geographic/cartesian SRS", which would be taken as longitude/latitude unsaid."""
    if srs is None or (srs.GetName() or "").startswith("Undefined "):
        return None
    return srs


def _overlap(a: Sequence[float], b: Sequence[float]) -> bool:
    return a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3]


def assumed_label_crs(layer_extent: Sequence[float], raster_srs: osr.SpatialReference,
                      raster_bounds: Sequence[float], what: str = "the labels",
                      error: type[Exception] = ValueError) -> tuple[osr.SpatialReference, str]:
    """The CRS a layer that says none (a shapefile without its .prj) is read in, and a one-line note
    naming the choice. `layer_extent` and `raster_bounds` are (xmin, ymin, xmax, ymax), the layer's
    in its own numbers, the raster's in `raster_srs`; `what` names the layer in the note.

    - the raster's CRS, where the layer's extent overlaps the raster's in it;
    - else longitude/latitude (EPSG:4326), where its coordinates lie within +-180 / +-90;
    - else `error`, saying to give the file a CRS."""
    from backend.raster import crs_authid

    xmin, ymin, xmax, ymax = (float(v) for v in layer_extent)
    raster_crs = crs_authid(raster_srs) or repr(raster_srs.GetName() or "an unnamed CRS")
    extent = f"x {xmin:.6g} to {xmax:.6g}, y {ymin:.6g} to {ymax:.6g}"
    if _overlap((xmin, ymin, xmax, ymax), raster_bounds):
        srs = raster_srs.Clone()
        srs.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
        return srs, (f"{what} says no CRS (a shapefile without its .prj?): its coordinates ({extent}) overlap the "
                     f"raster's extent in the raster's CRS, so they are taken in it ({raster_crs})")
    if -180.0 <= xmin <= xmax <= 180.0 and -90.0 <= ymin <= ymax <= 90.0:
        srs = osr.SpatialReference()
        srs.ImportFromEPSG(4326)
        srs.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
        return srs, (f"{what} says no CRS (a shapefile without its .prj?): its coordinates ({extent}) lie outside "
                     f"the raster's extent in its CRS ({raster_crs}) and within +-180/+-90, so they are taken as "
                     "longitude/latitude (EPSG:4326)")
    raise error(f"{what} says no CRS, and its coordinates ({extent}) are neither within the raster's extent in its "
                f"CRS ({raster_crs}) nor longitude/latitude: {FIX_CRS}")
