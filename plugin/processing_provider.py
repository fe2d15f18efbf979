"""The "SkyPrompt" Processing provider: Index raster, Search tiles by text, Prompt to polygons.

Processing runs algorithms in a background thread (or the main thread in batch mode when asked),
so each one calls the backend directly, reports progress through `feedback`, and stops when
feedback.isCanceled(). Connection settings come from the plugin's settings; SERVER overrides the
address for one run (handy in models and scripts).
"""
from __future__ import annotations

import os
import re
from contextlib import contextmanager, nullcontext

from qgis.core import (QgsFeatureSink, QgsProcessing, QgsProcessingAlgorithm, QgsProcessingContext,
                       QgsProcessingException, QgsProcessingUtils, QgsVectorFileWriter,
                       QgsProcessingOutputLayerDefinition, QgsProcessingParameterBoolean,
                       QgsProcessingParameterEnum, QgsProcessingParameterExtent, QgsProcessingParameterFeatureSink,
                       QgsProcessingParameterMultipleLayers, QgsProcessingParameterNumber,
                       QgsProcessingParameterRasterLayer, QgsProcessingParameterString, QgsProcessingProvider,
                       QgsProcessingOutputNumber, QgsProcessingOutputString, QgsProcessingParameterDefinition,
                       QgsProperty, QgsProviderRegistry, QgsRasterLayer, QgsRectangle, QgsWkbTypes, QgsCoordinateReferenceSystem, QgsField,
                       QgsFields)
from qgis.PyQt.QtCore import QVariant
from qgis.PyQt.QtGui import QIcon

from . import operations, results
from .settings import PluginSettings
from .sources import (SourceError, crs_name, has_no_resolution, local_path, names_by_real_path, native_pixels,
                      prepare_source, to_layer_crs)

ICON = os.path.join(os.path.dirname(__file__), "icon.svg")
# "memory:", "ogr:...", "postgres://...": outputs that are no plain file (a drive letter, "C:", is one letter)
_PROVIDER_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")
# the longest text a shapefile (dBase) field holds, in bytes
SHAPEFILE_TEXT_BYTES = 254
# an Extent typed as "xmin,xmax,ymin,ymax [CRS]": the CRS text in its brackets
_TYPED_EXTENT_CRS = re.compile(r"^\s*(?:[-+0-9.eE]+\s*,\s*){3}[-+0-9.eE]+\s*\[(.*)\]\s*$")


def _setting_number(name: str, description: str, setting: str, open_above: bool = False):
    """A number parameter for the PluginSettings field `setting`: its default, and the range the panel's
    field allows (PluginSettings.RANGES), Integer or Double as the field is, so that the two cannot
    drift apart. `open_above`: no maximum (QGIS's own), for a value a script may give past what the
    panel's spin box holds."""
    default = getattr(PluginSettings, setting)
    low, high = PluginSettings.RANGES[setting]
    kind = QgsProcessingParameterNumber.Integer if isinstance(default, int) else QgsProcessingParameterNumber.Double
    bounds = {"minValue": low} if open_above else {"minValue": low, "maxValue": high}
    return QgsProcessingParameterNumber(name, description, kind, defaultValue=default, **bounds)


def _crs_advice(text: str) -> str:
    """What to write for an Extent's [CRS] that QGIS cannot read: the EPSG code it seems to mean
    ("4326", "EPSG 4326", an OGC URN), else the form QGIS reads."""
    codes = re.findall(r"\d{4,}", text)
    if len(codes) == 1 and QgsCoordinateReferenceSystem(f"EPSG:{codes[0]}").isValid():
        return f"write it as [EPSG:{codes[0]}]"
    return "name one QGIS knows, as [EPSG:code] (e.g. [EPSG:4326] for longitude/latitude)"


def _is_shapefile(path: str) -> bool:
    return path.lower().endswith(".shp")


def _is_file(path: str) -> bool:
    """Whether an OUTPUT path names a file: not "" (none), TEMPORARY_OUTPUT or a provider URI."""
    return bool(path) and path != QgsProcessing.TEMPORARY_OUTPUT and not _PROVIDER_URI.match(path)


def _add_features(sink, features, fields, text_bytes: int | None = None) -> tuple[int, set[str], str | None]:
    """Add `features` to `sink`, each a MultiPolygon as the sink's type says (a memory layer keeps what
    it is given), up to the first the sink cannot write, text values cut to `text_bytes` of UTF-8 where
    given (a shapefile's fields, declared that wide, refuse longer ones): how many it took, the fields
    with a value cut, and why the sink failed (None when it did not)."""
    written, cut = 0, set()
    for f in features:
        g = f.geometry()
        g.convertToMultiType()
        f.setGeometry(g)
        for i, v in enumerate(f.attributes()):
            if text_bytes is not None and isinstance(v, str) and len(v.encode("utf-8")) > text_bytes:
                cut.add(fields.at(i).name())
                f.setAttribute(i, v.encode("utf-8")[:text_bytes].decode("utf-8", "ignore"))   # whole characters
        if not sink.addFeature(f, QgsFeatureSink.FastInsert):
            return written, cut, _sink_problem(sink)
        written += 1
    if not sink.flushBuffer() or _sink_failed(sink):
        return written, cut, _sink_problem(sink)
    return written, cut, None


def _file_and_layer_name(address: str) -> tuple[str, str | None]:
    """A layer's address as OUTPUT ("x.gpkg|layername=roads", a layer dragged from the Browser) as its
    file and the layer's name; any other OUTPUT as it is, with no name (None)."""
    if not _is_file(address) or "|" not in address:
        return address, None
    parts = QgsProviderRegistry.instance().decodeUri("ogr", address)     # QGIS's own reading of it
    name = parts.get("layerName")
    return parts.get("path") or address, name if isinstance(name, str) and name else None


def _writing_to(given, path: str):
    """OUTPUT `given` (a QgsProcessingOutputLayerDefinition or a value) with the file `path` as its sink."""
    if not isinstance(given, QgsProcessingOutputLayerDefinition):
        return path
    given = QgsProcessingOutputLayerDefinition(given)
    given.sink = QgsProperty.fromValue(path)
    return given


def _shapefile_fields(fields: QgsFields) -> QgsFields:
    """`fields` with each text field of no declared width as wide as a shapefile keeps: QGIS declares
    such a field 255 bytes wide, which GDAL cuts to 254 with a console warning on every run."""
    out = QgsFields()
    for field in fields:
        field = QgsField(field)
        if field.type() == QVariant.String and field.length() <= 0:
            field.setLength(SHAPEFILE_TEXT_BYTES)
        out.append(field)
    return out


def _sink_problem(sink) -> str:
    """Why `sink` could not write, in its own words: a file writer's error message, else its last error."""
    message = sink.errorMessage() if isinstance(sink, QgsVectorFileWriter) else ""
    return message or sink.lastError() or "the features could not be written"


def _sink_failed(sink) -> bool:
    """Whether `sink` has failed since it was made (only a file writer of our own says so)."""
    return isinstance(sink, QgsVectorFileWriter) and sink.hasError()


@contextmanager
def _gdal_errors():
    """The messages of the GDAL errors raised in the block, in a list, for the user's message: QGIS
    only logs them (a GeoPackage writer's failed commit among them)."""
    from osgeo import gdal

    errors: list[str] = []
    gdal.PushErrorHandler(lambda level, _number, message: errors.append(message) if level >= gdal.CE_Failure
                          else None)
    try:
        yield errors
    finally:
        gdal.PopErrorHandler()


def _delete_written_file(path: str) -> None:
    """Remove the file Processing's sink wrote at `path`, with its companions (a shapefile's .dbf,
    .shx, ...): that sink replaces a file whole, so nothing of the user's was left in it."""
    from osgeo import gdal

    with _gdal_errors():
        driver = gdal.IdentifyDriverEx(path, gdal.OF_VECTOR)
        if driver is not None:
            driver.Delete(path)


class _NewGpkgLayer:
    """The layer `name` that _gpkg_layer_sink adds to the GeoPackage `path`: checked once its writer
    has closed, and taken out again when it was not written whole, so that no half-written layer is
    left for the user to take for a result. The file's other layers are never touched."""

    def __init__(self, path: str, name: str):
        self.path, self.name = path, name
        self.new_file = results.nothing_to_keep(path)
        self.file_was_there = os.path.exists(path)      # an empty one (tempfile.mkstemp's) is left empty

    def holds(self, count: int) -> bool:
        """Whether the layer holds the `count` features written. A GeoPackage writer commits its
        features as it closes, and a commit that fails ("database or disk is full") is no error of the
        writer's: the layer is read back to see."""
        from osgeo import gdal

        with _gdal_errors():        # a file the failed commit left unreadable: said by the caller
            ds = gdal.OpenEx(self.path, gdal.OF_VECTOR, allowed_drivers=["GPKG"])
            layer = ds.GetLayerByName(self.name) if ds is not None else None
            return layer is not None and layer.GetFeatureCount() == count

    def discard(self) -> None:
        """Take the layer out: a new file is removed (an empty one emptied again), a layer added to
        an existing file is deleted from it where the file lets us (a full disk may not)."""
        if self.new_file:
            for leftover in (self.path, self.path + "-journal", self.path + "-wal", self.path + "-shm"):
                if os.path.exists(leftover):
                    os.remove(leftover)
            if self.file_was_there:
                open(self.path, "wb").close()
            return
        from osgeo import gdal

        with _gdal_errors():
            ds = gdal.OpenEx(self.path, gdal.OF_VECTOR | gdal.OF_UPDATE, allowed_drivers=["GPKG"])
            names = [ds.GetLayer(i).GetName() for i in range(ds.GetLayerCount())] if ds is not None else []
            if self.name in names:
                ds.DeleteLayer(names.index(self.name))
            ds = None


def _backend_error():
    from .connection import BackendError

    return BackendError


class _SkyPromptAlgorithm(QgsProcessingAlgorithm):
    def group(self) -> str:
        return ""

    def groupId(self) -> str:
        return ""

    def icon(self) -> QIcon:
        return QIcon(ICON)

    def createInstance(self):
        return type(self)()

    def _add_server(self) -> None:
        p = QgsProcessingParameterString("SERVER", "Backend address (host:port; empty = plugin settings)",
                                         optional=True)
        p.setFlags(p.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
        self.addParameter(p)

    def _settings(self, parameters, context) -> PluginSettings:
        from .deps import missing, python_problem

        problem = missing()
        if python_problem():    # no install helps: the panel has nothing to offer either
            raise QgsProcessingException(f"SkyPrompt cannot work in this QGIS: {problem}.")
        if problem:
            raise QgsProcessingException(f"SkyPrompt cannot reach its backend: {problem}. Open the SkyPrompt "
                                         "panel to install the missing packages.")
        settings = PluginSettings.load()
        server = self.parameterAsString(parameters, "SERVER", context).strip()
        if server:      # blanks (a batch cell) are empty: the plugin settings' address, as the label says
            settings.address = server
        return settings

    def _extent_crs(self, parameters, context, unnamed: QgsCoordinateReferenceSystem) -> QgsCoordinateReferenceSystem:
        """The CRS of the Extent parameter, `unnamed` where it names none. A CRS typed in its brackets
        that QGIS cannot read ("[4326]", "[EPSG 4326]") is refused: QGIS would take the project's CRS
        instead, and the extent would be placed on other ground."""
        typed = parameters.get("EXTENT")
        named = _TYPED_EXTENT_CRS.match(typed) if isinstance(typed, str) else None
        if named and named[1].strip() and not QgsCoordinateReferenceSystem(named[1]).isValid():
            raise QgsProcessingException(f"Extent's CRS {named[1]!r} is not recognised: "
                                         f"{_crs_advice(named[1])}")
        crs = self.parameterAsExtentCrs(parameters, "EXTENT", context)
        return crs if crs.isValid() else unnamed

    @staticmethod
    def _prepare(layer):
        """prepare_source, its refusal (an invalid layer) a QgsProcessingException: one line, no traceback."""
        try:
            return prepare_source(layer)
        except SourceError as e:
            raise QgsProcessingException(str(e)) from None

    @staticmethod
    def _output_address(parameters, context) -> str:
        """OUTPUT as given: a file path (or a layer's, "x.gpkg|layername=roads"), a provider URI
        ("ogr:...", "memory:"), TEMPORARY_OUTPUT or ""."""
        given = parameters.get("OUTPUT")
        sink_value = given.sink if isinstance(given, QgsProcessingOutputLayerDefinition) else given
        # not parameterAsOutputLayer: it would also have the whole file loaded into the project at the end
        return sink_value.valueAsString(context.expressionContext())[0] if isinstance(sink_value, QgsProperty) \
            else str(sink_value or "")

    def _output_path(self, parameters, context) -> str:
        """What OUTPUT names: a file path, a provider URI ("ogr:...", "memory:"), TEMPORARY_OUTPUT or "";
        a layer's address, its file (see _file_and_layer_name). A file path whose suffix names no
        vector format gets the extension Processing will add (.gpkg), so that an existing "survey.gpkg"
        typed as "survey", or "site.v2.gpkg" as "site.v2", is found as one."""
        path, _ = _file_and_layer_name(self._output_address(parameters, context))
        definition = self.parameterDefinition("OUTPUT")
        suffix = os.path.splitext(path)[1][1:].lower()
        if _is_file(path) and suffix not in definition.supportedOutputVectorLayerExtensions():
            path += "." + definition.defaultFileExtension()
        return path

    def _check_output(self, parameters, context) -> None:
        """Before the backend works: a file OUTPUT in a folder that does not exist, or an existing file
        named .gpkg that is no GeoPackage, is refused now, not after the work is done."""
        path = self._output_path(parameters, context)
        if not _is_file(path):
            return
        try:
            results.check_output_folder(path)
            if path.lower().endswith(".gpkg"):
                results.gpkg_layer_names(path)
        except OSError as e:
            raise QgsProcessingException(str(e)) from None

    def _sink(self, parameters, context, fields, crs):
        """parameterAsSink for OUTPUT, but a GeoPackage file is written by _gpkg_layer_sink: the sink,
        the output's layer source, and the _NewGpkgLayer written (None for Processing's sink)."""
        path = self._output_path(parameters, context)
        address = self._output_address(parameters, context)
        if path.lower().endswith(".gpkg") and _is_file(path):
            wanted = _file_and_layer_name(address)[1] or os.path.splitext(os.path.basename(path))[0]
            return self._gpkg_layer_sink(parameters.get("OUTPUT"), path, wanted, context, fields, crs)
        # OUTPUT alone: the others may hold a layer removed from the project while the backend worked,
        # which handing the whole map to QGIS would touch
        output = {"OUTPUT": parameters.get("OUTPUT")}
        if path != address:     # a layer's address: its file (Processing would take it all for a file's name)
            output["OUTPUT"] = _writing_to(output["OUTPUT"], path)
        if _is_shapefile(path):
            fields = _shapefile_fields(fields)
        sink, dest = self.parameterAsSink(output, "OUTPUT", context, fields, QgsWkbTypes.MultiPolygon, crs)
        if sink is None:
            raise QgsProcessingException(self.invalidSinkError(output, "OUTPUT"))
        return sink, dest, None

    def _gpkg_layer_sink(self, given, path: str, wanted: str, context, fields, crs):
        """A writer of a new layer in the GeoPackage `path`, named `wanted` (the file's name, or the
        layer's in a layer's address; " (2)", ... when the file has a layer of that name, as the panel
        does: it is never replaced), and its layer source "path|layername=NAME", loaded at the end where
        OUTPUT asks for it, as parameterAsSink would.

        Processing's own sink would replace an existing file whole, and its other layers with it; and
        the layer it writes in a new file is loaded as the bare file name, which QGIS 3.22 keeps open
        and reuses for the file without seeing what was added since: the layer a rerun adds was then
        "not correctly generated" ("Cannot find layer r (2)"). A layer loaded by its name is reopened
        once the file changed. Not Processing's sink for an "ogr:dbname=..." address either: QGIS takes
        the format from all after the file name's first dot, and finds none for "site.v2.gpkg"."""
        try:        # refuses a file that is not a GeoPackage
            name = results.free_gpkg_layer_name(path, wanted)
        except OSError as e:
            raise QgsProcessingException(str(e)) from None
        new_layer = _NewGpkgLayer(path, name)
        writer = QgsVectorFileWriter.create(path, fields, QgsWkbTypes.MultiPolygon, crs, context.transformContext(),
                                            results.gpkg_layer_options(path, name))
        if writer.hasError():
            raise QgsProcessingException(f"could not add a layer to {path}: {writer.errorMessage()}")
        dest = f"{path}|layername={name}"
        if isinstance(given, QgsProcessingOutputLayerDefinition) and given.destinationProject is not None:
            # a new file's layer under the output's name, as Processing shows its own; one added to a
            # file under its numbered name, told apart from the file's earlier results
            shown = given.destinationName or (self.parameterDefinition("OUTPUT").description() if new_layer.new_file
                                              else name)
            context.addLayerToLoadOnCompletion(dest, QgsProcessingContext.LayerDetails(
                shown, given.destinationProject, "OUTPUT", QgsProcessingUtils.LayerHint.Vector))
        return writer, dest, new_layer

    def _write(self, parameters, context, feedback, features, fields, crs):
        """The features into OUTPUT (see _sink and _add_features). A shapefile keeps 254 bytes of a text
        value: cut values are said in the log, not left to a GDAL line on the console. A write that
        fails (a full disk) stops the run, and what it wrote is taken out again."""
        path = self._output_path(parameters, context)
        sink, dest, new_layer = self._sink(parameters, context, fields, crs)
        written, cut, problem = _add_features(sink, features, fields,
                                              SHAPEFILE_TEXT_BYTES if _is_shapefile(path) else None)
        # a file writer of our own (_gpkg_layer_sink) closes its layer here, before it is loaded; what
        # GDAL says as it does is the reason a failed commit gives (Processing's sinks log their own)
        with _gdal_errors() if new_layer else nullcontext([]) as closing:
            del sink
        if problem is None and new_layer and not new_layer.holds(written):
            problem = closing[0] if closing else f"its layer {new_layer.name!r} was not saved whole"
        if problem is not None:
            if new_layer:
                new_layer.discard()
            elif _is_file(path):
                _delete_written_file(path)
            raise QgsProcessingException(f"could not write {path}: {problem}")
        if cut:
            feedback.pushWarning(f"a shapefile keeps {SHAPEFILE_TEXT_BYTES} bytes of text: {', '.join(sorted(cut))} "
                                 "values longer than that were cut short; write a GeoPackage (.gpkg) to keep them whole")
        return dest

    def _call(self, settings, fn, feedback):
        """Run fn(conn); None when the user cancelled. Backend failures (a cancel the user did not ask
        for too: a backend that stopped), unreadable layer areas and an unreadable TLS CA file become
        QgsProcessingException with one line for the user."""
        BackendError = _backend_error()
        try:
            with settings.connection() as conn:     # an unreadable TLS CA file: BackendError too
                return fn(conn)
        except BackendError as e:
            if e.code == "CANCELLED" and feedback.isCanceled():
                return None
            address = settings.address.strip()
            # the connection's own messages name the address where it matters ("no backend answers at X")
            where = f" at {address}" if address and address not in e.message else ""
            raise QgsProcessingException(f"SkyPrompt backend{where}: {e.message} ({e.code})") from None
        except SourceError as e:   # the layer's pixels could not be read as asked: the user's to fix
            raise QgsProcessingException(str(e)) from None


# IndexRasterRequest.views: None = the backend's default (ServerInfo.default_index_views)
VIEW_CHOICES = ((None, "the backend's default"), (1, "1: each tile as it is"), (2, "2: + its mirror image"),
                (4, "4: its four rotations (about 4x slower)"), (8, "8: its rotations and their mirror images (about 8x slower)"))


class IndexRasterAlgorithm(_SkyPromptAlgorithm):
    def name(self):
        return "indexraster"

    def displayName(self):
        return "Index raster"

    def shortHelpString(self):
        return ("Cuts the raster into tiles and stores their embeddings in the backend's index, so "
                "'Search tiles by text' can find them. A raster indexed already and unchanged since is "
                "skipped unless 'Re-index even if unchanged' is ticked. "
                "Views per tile (advanced): the embeddings of each tile's rotations (and mirror images) are "
                "averaged, so a search does not depend on which way the ground faces; a little better "
                "search, one model pass per view. Outputs: RASTER_ID (the raster's id in the index), "
                "TILE_COUNT (its tiles in the index, also when unchanged) and OUTCOME (indexed, unchanged "
                "or replaced).")

    def initAlgorithm(self, config=None):
        self.addParameter(QgsProcessingParameterRasterLayer("INPUT", "Raster layer"))
        self.addParameter(QgsProcessingParameterBoolean("FORCE", "Re-index even if unchanged", defaultValue=False))
        views = QgsProcessingParameterEnum("VIEWS", "Views per tile", options=[label for _, label in VIEW_CHOICES],
                                           defaultValue=0)
        views.setFlags(views.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
        self.addParameter(views)
        self._add_server()
        self.addOutput(QgsProcessingOutputString("RASTER_ID", "Raster id"))
        self.addOutput(QgsProcessingOutputNumber("TILE_COUNT", "Tiles in the index for this raster "
                                                               "(also when unchanged)"))
        self.addOutput(QgsProcessingOutputString("OUTCOME", "What happened: indexed, unchanged or replaced"))

    def processAlgorithm(self, parameters, context, feedback):
        layer = self.parameterAsRasterLayer(parameters, "INPUT", context)
        if layer is None:
            raise QgsProcessingException("Index raster needs a raster layer")
        settings = self._settings(parameters, context)
        prepared = self._prepare(layer)
        if has_no_resolution(prepared):
            raise QgsProcessingException(f"layer {layer.name()!r} is a tile service, with no extent or resolution "
                                         "to index whole: index the view you want from the SkyPrompt panel (its "
                                         "Index reads the current view at the map's resolution)")
        notes: list[str] = []
        result = self._call(settings, lambda conn: operations.index_layer(
            conn, prepared, settings.max_pixel_side, feedback.setProgress, feedback.isCanceled,
            force=self.parameterAsBool(parameters, "FORCE", context), notes=notes,
            views=VIEW_CHOICES[self.parameterAsEnum(parameters, "VIEWS", context)][0],
            said=feedback.pushInfo), feedback)
        for note in notes:
            feedback.pushInfo(note)
        if result is None:          # cancelled: the backend keeps nothing of a raster it did not finish
            feedback.pushInfo("cancelled: nothing indexed")
            return {}
        outcome = operations.outcome_word(result)
        feedback.pushInfo(f"{result.raster_name}: {outcome}, {result.tile_count} tiles ({result.seconds:.1f} s)")
        return {"RASTER_ID": result.raster_id, "TILE_COUNT": result.tile_count, "OUTCOME": outcome}


class SearchTilesAlgorithm(_SkyPromptAlgorithm):
    def name(self):
        return "searchtiles"

    def displayName(self):
        return "Search tiles by text"

    def shortHelpString(self):
        return ("Finds the indexed tiles that best match a text query and writes their footprints with "
                "scores. Restrict the search to some layers with Only in these layers (they must be indexed "
                "files; a layer read as pixels, such as a tile service, cannot restrict it and is named in a "
                "warning). The advanced Query expansion searches twice, the second time for the query moved "
                "toward its N best tiles: more tiles like the best hits, and scores that are similarities to "
                "that moved query. Query words the model rarely or never saw in training are named in a "
                "warning. The advanced Tiles like this tile id searches for tiles that look like one tile (a "
                "tile_id of an earlier result) instead of a query; leave Query empty then. With Only in this extent, only "
                "tiles that lie in it or overlap it are found (an extent typed without [EPSG:code] is in the "
                "project's CRS; in longitude/latitude, a west edge typed east of the east edge, "
                "\"170,-170,-30,-10 [EPSG:4326]\", is an extent across 180 degrees). Attributes: rank, score, "
                "layer (the project's layer of the tile's file, else the raster's name in the index), "
                "raster_id, tile_id, path (the raster's file) and caption (what the model wrote for the tile "
                "when it was indexed).")

    def initAlgorithm(self, config=None):
        self.addParameter(QgsProcessingParameterString("QUERY", "Query", optional=True))
        self.addParameter(_setting_number("K", "Number of tiles", "k"))
        self.addParameter(QgsProcessingParameterMultipleLayers("LAYERS", "Only in these layers",
                                                               QgsProcessing.TypeRaster, optional=True))
        self.addParameter(QgsProcessingParameterExtent("EXTENT", "Only in this extent", optional=True))
        expand = QgsProcessingParameterNumber("EXPAND", "Query expansion from the N best tiles (-1 = the backend's "
                                              "default, 0 = off)", QgsProcessingParameterNumber.Integer,
                                              defaultValue=-1, minValue=-1)
        expand.setFlags(expand.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
        self.addParameter(expand)
        captions = QgsProcessingParameterBoolean("MATCH_CAPTIONS", "Match the query's words in tile captions "
                                                 "(off: embeddings alone)", defaultValue=True)
        captions.setFlags(captions.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
        self.addParameter(captions)
        like = QgsProcessingParameterNumber("LIKE_TILE", "Tiles like this tile id instead of a query (-1 = none)",
                                            QgsProcessingParameterNumber.Integer, defaultValue=-1, minValue=-1)
        like.setFlags(like.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
        self.addParameter(like)
        self._add_server()
        self.addParameter(QgsProcessingParameterFeatureSink("OUTPUT", "Matching tiles",
                                                            QgsProcessing.TypeVectorPolygon))

    def processAlgorithm(self, parameters, context, feedback):
        query = self.parameterAsString(parameters, "QUERY", context).strip()
        like = self.parameterAsInt(parameters, "LIKE_TILE", context)
        if like >= 0 and query:
            raise QgsProcessingException("give a query or Like tile, not both")
        if like < 0 and not query:
            raise QgsProcessingException("the query is empty: type what to look for, e.g. 'parking lots'")
        k = self.parameterAsInt(parameters, "K", context)
        settings = self._settings(parameters, context)
        layers = self.parameterAsLayerList(parameters, "LAYERS", context)
        not_rasters = [l.name() for l in layers if not isinstance(l, QgsRasterLayer)]
        if not_rasters:
            raise QgsProcessingException(f"{', '.join(not_rasters)}: not a raster layer; 'Only in these layers' "
                                         "takes indexed raster layers")
        path_of = [(l, local_path(l)) for l in layers]
        # hits are named after the project's layers of their files, those given in Layers first
        project = context.project()
        shown = [l for l in (project.mapLayers().values() if project else ()) if isinstance(l, QgsRasterLayer)
                 and l not in layers]
        names = {**names_by_real_path((l, local_path(l)) for l in shown), **names_by_real_path(path_of)}
        paths = [path for _, path in path_of if path]
        # a layer read as pixels (tile services, memory rasters) has no path to restrict the search to
        unreachable = [l.name() for l, path in path_of if not path]
        if unreachable and not paths:
            raise QgsProcessingException(f"cannot search only in {', '.join(unreachable)}: layers read as pixels "
                                         "(tile services, non-file rasters) are not searchable by layer; leave "
                                         "'Only in these layers' empty to search the whole index")
        if unreachable:
            feedback.pushWarning(f"not searched: {', '.join(unreachable)} (read as pixels, not searchable by layer)")

        expand = self.parameterAsInt(parameters, "EXPAND", context)
        match_captions = self.parameterAsBool(parameters, "MATCH_CAPTIONS", context)
        area = self._search_area(parameters, context)
        self._check_output(parameters, context)

        def run(conn):
            # -1 and on: the backend's defaults (query expansion, keyword matching)
            return operations.search(conn, query, k, raster_paths=paths, expand=expand if expand >= 0 else None,
                                     like_tile_id=like if like >= 0 else None,
                                     keyword_weight=None if match_captions else 0.0, area=area,
                                     cancelled=feedback.isCanceled)

        if feedback.isCanceled():
            feedback.pushInfo("cancelled: nothing written")
            return {}
        response = self._call(settings, run, feedback)
        if response is None or feedback.isCanceled():      # cancelled: the output is left as it was
            feedback.pushInfo("cancelled: nothing written")
            return {}
        if area is not None and not response.hits:
            feedback.pushWarning(operations.empty_area_note(
                "Extent", "give an Extent where they are, or index them first" if paths else
                "give an Extent where rasters are indexed", of_layers=bool(paths)))
        hits = list(response.hits)
        crs = results.hits_crs(hits) if hits else \
            context.project().crs() if context.project() else QgsCoordinateReferenceSystem()
        if not crs.isValid():       # no hits, and no project CRS (a script): an empty layer needs one too
            crs = QgsCoordinateReferenceSystem(results.WGS84)
        dest = self._write(parameters, context, feedback, results.search_features(hits, crs, names),
                           results.search_fields(), crs)
        feedback.pushInfo(f"{len(hits)} tiles for {query!r}" if like < 0 else f"{len(hits)} tiles like tile {like}")
        if response and response.unfamiliar_words:
            feedback.pushWarning(operations.unfamiliar_note(response.unfamiliar_words))
        for note in operations.stale_notes(hits, names) + operations.unsearchable_notes(response, names):
            feedback.pushWarning(note)
        return {"OUTPUT": dest}

    def _search_area(self, parameters, context):
        """(rectangle, CRS) of the Extent parameter (a longitude/latitude one clipped to the world); None when unset."""
        if not parameters.get("EXTENT"):
            return None
        crs = self._extent_crs(parameters, context,
                               context.project().crs() if context.project() else QgsCoordinateReferenceSystem())
        rect = self.parameterAsExtent(parameters, "EXTENT", context, crs)
        typed = parameters["EXTENT"]
        west_east = re.match(r"\s*([-+0-9.eE]+)\s*,\s*([-+0-9.eE]+)\s*,", typed) if isinstance(typed, str) else None
        if west_east and crs.isGeographic() and float(west_east[1]) > float(west_east[2]):
            # typed west > east ("170,-170,..."): across 180 degrees, as the client's --extent takes it;
            # QGIS would swap them into the 340 degrees between
            rect = QgsRectangle(float(west_east[1]), rect.yMinimum(), float(west_east[2]) + 360.0, rect.yMaximum())
        area = operations.search_area(rect, crs, typed=True)
        if area.problem == "no_crs":
            raise QgsProcessingException("Extent has no CRS, and there is no project CRS to take: give it as "
                                         "'xmin,xmax,ymin,ymax [EPSG:code]'")
        if area.problem:
            raise QgsProcessingException(f"Extent {area.words}" + (": give it in a CRS placed on the globe, as "
                                                                   "'xmin,xmax,ymin,ymax [EPSG:code]'"
                                                                   if area.problem == "local" else ""))
        return area.wire(crs)


NO_PROMPT = "no prompt given: type what to outline, e.g. 'buildings, trees'"


class PromptToPolygonsAlgorithm(_SkyPromptAlgorithm):
    def name(self):
        return "prompttopolygons"

    def displayName(self):
        return "Prompt to polygons"

    def shortHelpString(self):
        return ("Turns text prompts (separated by commas, semicolons or line breaks: 'buildings, trees') into polygons where "
                "the raster shows them, over an extent (default: the whole layer; an extent typed without "
                "[EPSG:...] is in the project's CRS). Attributes: prompt, score (mean relevance), max_score, "
                "area_m2 (ground area in m²). "
                "Masks follow the image's own edges (edge refinement); the advanced Edge refinement radius "
                "sets how far, in pixels, or turns it off (0). A tile service (XYZ, WMS) needs an extent. "
                "The advanced Resolution is the ground size of a working pixel in the layer's map units; "
                "empty: the layer's own, or coarser when the extent holds more pixels than the backend "
                "takes at once (the log says so).")

    def initAlgorithm(self, config=None):
        self.addParameter(QgsProcessingParameterRasterLayer("INPUT", "Raster layer"))
        self.addParameter(QgsProcessingParameterString("PROMPTS", "Prompts (separated by commas, semicolons or line breaks)"))
        self.addParameter(QgsProcessingParameterExtent("EXTENT", "Extent", optional=True))
        self.addParameter(_setting_number("THRESHOLD", "Threshold", "threshold"))
        self.addParameter(_setting_number("MIN_AREA", "Minimum area (m²)", "min_area_m2", open_above=True))
        edges = QgsProcessingParameterNumber("EDGE_RADIUS", "Edge refinement radius in pixels (-1 = the backend's "
                                             "default, 0 = off)", QgsProcessingParameterNumber.Integer,
                                             defaultValue=-1, minValue=-1)
        edges.setFlags(edges.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
        self.addParameter(edges)
        resolution = QgsProcessingParameterNumber("RESOLUTION", "Resolution in map units of the layer per pixel "
                                                  "(empty = automatic)", QgsProcessingParameterNumber.Double,
                                                  optional=True, minValue=0.0)
        resolution.setFlags(resolution.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
        self.addParameter(resolution)
        self._add_server()
        self.addParameter(QgsProcessingParameterFeatureSink("OUTPUT", "Polygons", QgsProcessing.TypeVectorPolygon))

    @staticmethod
    def _in_layer_crs(rect: QgsRectangle, crs: QgsCoordinateReferenceSystem, layer) -> QgsRectangle:
        """The Extent `rect` (in `crs`) in the layer's CRS (to_layer_crs); where it cannot be placed
        there, a refusal in Processing's words (to_layer_crs's speak of a map to pan)."""
        try:
            return to_layer_crs(rect, crs, layer)
        except SourceError:
            area = operations.search_area(rect, crs)      # off its own CRS's globe: its words say so
            where = area.words if area.problem else (f"lies off the part of the globe the CRS of layer "
                                                     f"{layer.name()!r} ({crs_name(layer.crs())}) holds")
            raise QgsProcessingException(f"Extent {where}: give an Extent over the layer") from None

    def checkParameterValues(self, parameters, context):
        # QGIS's own check of an empty PROMPTS says only "Incorrect parameter value for PROMPTS"
        if not operations.split_prompts(self.parameterAsString(parameters, "PROMPTS", context)):
            return False, NO_PROMPT
        return super().checkParameterValues(parameters, context)

    def processAlgorithm(self, parameters, context, feedback):
        layer = self.parameterAsRasterLayer(parameters, "INPUT", context)
        if layer is None:
            raise QgsProcessingException("Prompt to polygons needs a raster layer")
        prompts = operations.split_prompts(self.parameterAsString(parameters, "PROMPTS", context))
        if not prompts:
            raise QgsProcessingException(NO_PROMPT)
        settings = self._settings(parameters, context)
        rect = crs = in_layer = None
        if parameters.get("EXTENT"):
            crs = self._extent_crs(parameters, context, layer.crs())
            rect = self.parameterAsExtent(parameters, "EXTENT", context, crs)
            if operations.latitudes_first(rect, crs):
                raise QgsProcessingException(f"Extent lies past the poles: {operations.LATITUDES_FIRST}")
            in_layer = self._in_layer_crs(rect, crs, layer)
        prepared = self._prepare(layer)
        if rect is None and has_no_resolution(prepared):
            raise QgsProcessingException(f"layer {layer.name()!r} is a tile service, with no extent or resolution "
                                         "to segment whole: set Extent to the area to segment")
        self._check_output(parameters, context)
        # read now: the layer may be removed from the project while the backend works
        layer_crs = QgsCoordinateReferenceSystem(layer.crs())
        # Resolution (map units per pixel; empty or 0 = automatic): a pixel source is read at it, a
        # file segmented at it; automatic, a file's area over the backend's limit is coarsened
        resolution = self.parameterAsDouble(parameters, "RESOLUTION", context) or None
        # a RESOLUTION given is the working resolution: the layer's own pixel count is not needed then
        native = native_pixels(layer, in_layer) if isinstance(prepared, str) and not resolution else None
        notes: list[str] = []
        edge_radius = self.parameterAsInt(parameters, "EDGE_RADIUS", context)
        threshold = self.parameterAsDouble(parameters, "THRESHOLD", context)
        answers = self._call(settings, lambda conn: operations.segment(
            conn, prepared, prompts, rect, crs, in_layer, threshold,
            settings.max_pixel_side, feedback.setProgress, feedback.isCanceled, notes=notes,
            edge_radius=None if edge_radius < 0 else edge_radius, resolution=resolution, native=native,
            path_resolution=resolution, min_area_m2=self.parameterAsDouble(parameters, "MIN_AREA", context)),
            feedback)
        for note in notes:
            feedback.pushInfo(note)
        if answers is None:         # cancelled: the output is left as it was, not replaced by an empty layer
            feedback.pushInfo("cancelled: nothing written")
            return {}
        features = results.segment_features(answers)
        dest = self._write(parameters, context, feedback, features, results.segment_fields(), layer_crs)
        if features:
            feedback.pushInfo(f"{len(features)} polygons for {', '.join(prompts)}{results.dropped_note(answers)}")
        else:   # the panel's words, with what to change: an empty layer alone says nothing of why
            feedback.pushWarning(results.no_polygons_message(prompts, answers, threshold))
        unfamiliar = operations.distinct_unfamiliar(answers)
        if unfamiliar:
            feedback.pushWarning(operations.unfamiliar_note(unfamiliar))
        return {"OUTPUT": dest}


class SkyPromptProvider(QgsProcessingProvider):
    def id(self) -> str:
        return "skyprompt"

    def name(self) -> str:
        return "SkyPrompt"

    def icon(self) -> QIcon:
        return QIcon(ICON)

    def loadAlgorithms(self) -> None:
        for algorithm in (IndexRasterAlgorithm(), SearchTilesAlgorithm(), PromptToPolygonsAlgorithm()):
            self.addAlgorithm(algorithm)
