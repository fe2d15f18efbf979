"""Backend answers as QGIS vector layers: search hits as tile footprints, segments as polygons.

Plain data in (the protobuf messages), layers out; called on the main thread (in finished()) or in
a Processing algorithm, which writes the same features into its sink.
"""
from __future__ import annotations

import os

from qgis.core import (QgsCategorizedSymbolRenderer, QgsClassificationEqualInterval, QgsCoordinateReferenceSystem,
                       QgsCoordinateTransform, QgsFeature, QgsField, QgsFields, QgsFillSymbol, QgsGeometry,
                       QgsGradientColorRamp, QgsGraduatedSymbolRenderer, QgsPointXY, QgsRendererCategory,
                       QgsVectorFileWriter, QgsVectorLayer, QgsProject, QgsWkbTypes)
from qgis.PyQt.QtCore import QVariant
from qgis.PyQt.QtGui import QColor

WGS84 = "EPSG:4326"
_PALETTE = ["#e41a1c", "#377eb8", "#4daf4a", "#984ea3", "#ff7f00", "#a65628", "#f781bf", "#999999"]


def _fields(spec: list[tuple]) -> QgsFields:
    """Fields from (name, type) or (name, type, length) tuples."""
    out = QgsFields()
    for name, kind, *length in spec:
        out.append(QgsField(name, kind, len=length[0] if length else 0))
    return out


# a shapefile keeps a 64-bit integer as one only up to 18 digits: QGIS writes one with no length as
# 20 digits, which GDAL reads back as a decimal (418.0)
_INTEGER64_DIGITS = 18


def visible_polygon(settings) -> QgsGeometry:
    """What a map (QgsMapSettings) shows, as a polygon in its CRS: a turned rectangle where the map
    is rotated (QgsMapSettings.visiblePolygon gives its corners, not closed)."""
    corners = [QgsPointXY(p) for p in settings.visiblePolygon()]
    return QgsGeometry.fromPolygonXY([corners + corners[:1]])


def search_fields() -> QgsFields:
    return _fields([("rank", QVariant.Int), ("score", QVariant.Double), ("layer", QVariant.String),
                    ("raster_id", QVariant.String), ("tile_id", QVariant.LongLong, _INTEGER64_DIGITS),
                    ("path", QVariant.String), ("caption", QVariant.String)])


def segment_fields() -> QgsFields:
    return _fields([("prompt", QVariant.String), ("score", QVariant.Double), ("max_score", QVariant.Double),
                    ("area_m2", QVariant.Double)])


def hits_crs(hits) -> QgsCoordinateReferenceSystem:
    """The hits' own CRS when they share one (footprints exact), else WGS 84."""
    wkts = {h.crs.wkt or h.crs.authid for h in hits}
    if len(wkts) == 1:
        h = hits[0]
        crs = QgsCoordinateReferenceSystem(h.crs.authid) if h.crs.authid else QgsCoordinateReferenceSystem()
        if not crs.isValid():
            crs = QgsCoordinateReferenceSystem.fromWkt(h.crs.wkt)
        if crs.isValid():
            return crs
    return QgsCoordinateReferenceSystem(WGS84)


def search_features(hits, crs: QgsCoordinateReferenceSystem, layer_names: dict | None = None) -> list[QgsFeature]:
    """One feature per hit, rank order; footprints native when `crs` is theirs, else WGS 84."""
    fields = search_fields()
    wgs84 = crs.authid() == WGS84
    out = []
    for rank, h in enumerate(hits, 1):
        f = QgsFeature(fields)
        # a raster in EPSG:4326 keeps its own longitudes (180.0..180.5 where its layer is drawn), not
        # the -180..180 of footprint_wgs84_wkt
        native = not wgs84 or h.crs.authid == WGS84
        f.setGeometry(QgsGeometry.fromWkt(h.footprint_wkt if native else h.footprint_wgs84_wkt))
        name = (layer_names or {}).get(h.raster_path) or h.raster_name
        f.setAttributes([rank, float(h.score), name, h.raster_id, int(h.tile_id), h.raster_path, h.caption])
        out.append(f)
    return out


def dropped_note(results) -> str:
    """', N smaller than the minimum area dropped' when the backend dropped any, else ''."""
    dropped = sum(r.dropped_small for r in results)
    return f", {dropped} smaller than the minimum area dropped" if dropped else ""


def no_polygons_message(prompts: list[str], results, threshold: float) -> str:
    """What to say of a Segment whose SegmentResults hold no polygon, and what to change: Minimum area
    where every region was smaller (dropped_small), else the Threshold, which no pixel reached (each
    prompt's max_relevance says how near it came)."""
    said = f"0 polygon(s) for {', '.join(prompts)}"
    if any(r.dropped_small for r in results):
        return f"{said}{dropped_note(results)}: lower Minimum area to keep them"
    highest = ", ".join(f"{r.max_relevance:.2f}" + (f" ({r.prompt})" if len(results) > 1 else "") for r in results)
    return (f"{said}: no pixel reached the Threshold of {threshold:.2f} (the highest relevance was {highest}): "
            "lower the Threshold to find some")


def segment_features(results) -> list[QgsFeature]:
    """A feature per polygon of every SegmentResult (the backend already dropped those under the
    request's minimum area)."""
    fields = segment_fields()
    out = []
    for result in results:
        for p in result.polygons:
            f = QgsFeature(fields)
            geom = QgsGeometry()
            geom.fromWkb(p.wkb)
            f.setGeometry(geom)
            f.setAttributes([result.prompt, float(p.score), float(p.max_score), float(p.area_m2)])
            out.append(f)
    return out


def in_crs(geometry: QgsGeometry, source: QgsCoordinateReferenceSystem,
           target: QgsCoordinateReferenceSystem) -> QgsGeometry:
    """A polygon of `source` in `target`, its sides given points along them first: a straight side
    in one CRS is a curve in another."""
    out = geometry.densifyByCount(16)
    if source != target:
        out.transform(QgsCoordinateTransform(source, target, QgsProject.instance()))
    return out


def keep_within(features: list[QgsFeature], area: QgsGeometry, min_area_m2: float = 0.0) -> list[QgsFeature]:
    """Segment features (segment_features) cut to `area`, a polygon in their CRS: what a rotated map
    shows of the box round it that was segmented. Those wholly outside go; the others lose their parts
    outside, and their area_m2 in proportion. One cut smaller than `min_area_m2` goes too, as the
    backend drops a polygon cut small at the edge of the area it segments (an area_m2 of 0 is unknown,
    and kept)."""
    kept = []
    for feature in features:
        geometry = feature.geometry()
        if area.contains(geometry):
            kept.append(feature)
            continue
        cut = geometry.intersection(area)
        cut.convertGeometryCollectionToSubclass(QgsWkbTypes.PolygonGeometry)   # not the points and lines it touches
        if cut.isEmpty() or cut.area() <= 0:
            continue
        area_m2 = feature["area_m2"] * cut.area() / geometry.area()
        if 0 < area_m2 < min_area_m2:
            continue
        out = QgsFeature(feature)
        out.setGeometry(cut)
        out["area_m2"] = area_m2
        kept.append(out)
    return kept


def unused_layer_name(name: str) -> str:
    """`name`, or "name (2)", ...: the first no layer of the project has, so a search run twice gives
    two layers told apart (the later one numbered), as the GeoPackage outputs are."""
    taken = {layer.name() for layer in QgsProject.instance().mapLayers().values()}
    out, n = name, 1
    while out in taken:
        n += 1
        out = f"{name} ({n})"
    return out


# the custom property that marks a memory layer of results (kept in a saved project, its features not)
RESULT_PROPERTY = "skyprompt/result"


def memory_layer(name: str, crs: QgsCoordinateReferenceSystem, fields: QgsFields,
                 features: list[QgsFeature]) -> QgsVectorLayer:
    """A memory layer of `features`, named `name` or, when a layer has that name already, numbered."""
    layer = QgsVectorLayer(f"MultiPolygon?crs={crs.authid() or 'EPSG:4326'}", unused_layer_name(name), "memory")
    layer.setCustomProperty(RESULT_PROPERTY, True)
    if not crs.authid():
        layer.setCrs(crs)
    provider = layer.dataProvider()
    provider.addAttributes(list(fields))
    layer.updateFields()
    for f in features:
        g = f.geometry()
        if g.isMultipart() is False:
            g.convertToMultiType()
            f.setGeometry(g)
    provider.addFeatures(features)
    layer.updateExtents()
    return layer


def emptied_result_layers(project) -> list[str]:
    """The names of `project`'s memory layers of results (memory_layer) that hold no feature: what a
    project saved with them gives back."""
    return [layer.name() for layer in project.mapLayers().values()
            if isinstance(layer, QgsVectorLayer) and layer.providerType() == "memory"
            and layer.customProperty(RESULT_PROPERTY) and layer.featureCount() == 0]


def style_by_score(layer: QgsVectorLayer) -> None:
    """Graduated fill on `score`: pale for weak matches, strong red for the best."""
    symbol = QgsFillSymbol.createSimple({"color": "255,0,0,90", "outline_color": "200,0,0", "outline_width": "0.6"})
    renderer = QgsGraduatedSymbolRenderer("score")
    renderer.setSourceSymbol(symbol)
    # light fills: hits overlap (tiles overlap), and the imagery under them is what the user checks
    renderer.setSourceColorRamp(QgsGradientColorRamp(QColor(255, 245, 200, 50), QColor(200, 0, 0, 100)))
    renderer.setClassificationMethod(QgsClassificationEqualInterval())
    renderer.updateClasses(layer, 5)
    layer.setRenderer(renderer)


def style_by_prompt(layer: QgsVectorLayer, prompts: list[str]) -> None:
    categories = []
    for i, prompt in enumerate(prompts):
        colour = QColor(_PALETTE[i % len(_PALETTE)])
        symbol = QgsFillSymbol.createSimple({"color": f"{colour.red()},{colour.green()},{colour.blue()},110",
                                             "outline_color": colour.name(), "outline_width": "0.5"})
        categories.append(QgsRendererCategory(prompt, symbol, prompt))
    layer.setRenderer(QgsCategorizedSymbolRenderer("prompt", categories))


def check_output_folder(path: str) -> None:
    """OSError unless the folder `path` would be written in exists: checked before any work, so a
    mistyped folder is said at once, not after the backend has segmented the area."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise OSError(f"cannot write {path}: its folder {folder} does not exist; make it first or choose "
                      "another file")


def nothing_to_keep(path: str) -> bool:
    """Whether there is no file at `path`, or an empty one (a 0-byte file that tempfile.mkstemp or
    `touch` made): nothing in it is lost when a new GeoPackage is written there."""
    return not os.path.exists(path) or (os.path.isfile(path) and os.path.getsize(path) == 0)


def gpkg_layer_names(path: str) -> list[str]:
    """The tables of the GeoPackage at `path`, vector layers and raster tiles alike ([] when there is
    no file, or an empty one); OSError when the file holds something else (it is never overwritten)."""
    if nothing_to_keep(path):
        return []
    from osgeo import gdal

    ds = gdal.OpenEx(path, gdal.OF_VECTOR | gdal.OF_RASTER, allowed_drivers=["GPKG"])
    if ds is None:
        raise OSError(f"{path} exists and is not a GeoPackage: choose another output file")
    # gpkg_contents names raster tables too, which no vector layer may take (through GDAL, not a
    # sqlite3 URI: those cannot name a file on a network share)
    table = ds.ExecuteSQL("SELECT table_name FROM gpkg_contents")
    if table is None:
        raise OSError(f"{path}: its layers cannot be read: choose another output file")
    try:
        return [feature.GetField(0) for feature in table]
    finally:
        ds.ReleaseResultSet(table)


def free_gpkg_layer_name(path: str, wanted: str) -> str:
    """`wanted`, or "wanted (2)", ...: the first name no table of the GeoPackage at `path` has, so an
    output never replaces the user's layer (GeoPackage names are case-insensitive: "Trees" would
    overwrite "trees")."""
    taken = {n.casefold() for n in gpkg_layer_names(path)}
    name, n = wanted, 1
    while name.casefold() in taken:
        n += 1
        name = f"{wanted} ({n})"
    return name


def gpkg_layer_options(path: str, name: str) -> QgsVectorFileWriter.SaveVectorOptions:
    """Writer options for a new layer `name` in the GeoPackage at `path`, the file's other layers kept
    (a new file where there is none, or an empty one)."""
    options = QgsVectorFileWriter.SaveVectorOptions()
    options.driverName = "GPKG"
    options.layerName = name
    options.actionOnExistingFile = (QgsVectorFileWriter.CreateOrOverwriteFile if nothing_to_keep(path)
                                    else QgsVectorFileWriter.CreateOrOverwriteLayer)
    return options


def write_gpkg(layer: QgsVectorLayer, path: str, name: str | None = None) -> QgsVectorLayer:
    """Save `layer` into the GeoPackage at `path` as a layer of its own, named `name` (default: the
    layer's), and open it: the file's other layers stay, and a name already in the file gets a number
    (" (2)", ...) instead of being replaced; the layer opened is numbered against the project's."""
    # "|" would end the path in the layer's source, "path|layername=NAME", and the layer opened invalid
    wanted = (name or layer.name()).replace("|", "/")
    name = free_gpkg_layer_name(path, wanted)
    error, message, *_ = QgsVectorFileWriter.writeAsVectorFormatV3(
        layer, path, QgsProject.instance().transformContext(), gpkg_layer_options(path, name))
    if error != QgsVectorFileWriter.NoError:
        raise OSError(f"could not write {path}: {message}")
    # on the map: the table's name, or where a layer has it, the name wanted numbered against the
    # project's layers (the table's "trees (2)" numbered again was "trees (2) (2)")
    on_map = name if unused_layer_name(name) == name else unused_layer_name(wanted)
    out = QgsVectorLayer(f"{path}|layername={name}", on_map, "ogr")
    out.setRenderer(layer.renderer().clone())
    return out


def is_polygon_layer(layer: QgsVectorLayer) -> bool:
    return layer.geometryType() == QgsWkbTypes.PolygonGeometry
