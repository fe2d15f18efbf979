"""The SkyPrompt dock: a connection bar and three tabs (Search, Segment, Describe).

Every backend call runs in a BackendTask; the dock only prepares inputs on the main thread (layer
paths, pixel readers, extents) and turns answers into layers in the task's finished(). `taskDone`
fires after each answer is shown, with the kind ("health", "index", "search", "segment", "caption",
"install") and the error (None on success).
"""
from __future__ import annotations

import dataclasses
import os
from collections import Counter

from qgis.core import (Qgis, QgsApplication, QgsCoordinateReferenceSystem, QgsCoordinateTransform, QgsCsException,
                       QgsGeometry, QgsMapLayerProxyModel, QgsMessageLog, QgsProject, QgsRasterLayer, QgsRectangle,
                       QgsTask)
from qgis.gui import QgsFileWidget, QgsMapLayerComboBox, QgsMapToolExtent
from qgis.PyQt.QtCore import QSize, Qt, pyqtSignal
from qgis.PyQt.QtGui import QIcon, QPixmap
from qgis.PyQt.QtWidgets import (QComboBox, QDialog, QDialogButtonBox, QDockWidget, QDoubleSpinBox, QFormLayout,
                                 QHBoxLayout, QLabel, QLineEdit, QListView, QListWidget, QListWidgetItem,
                                 QPlainTextEdit, QProgressBar, QPushButton, QSpinBox, QStyledItemDelegate,
                                 QTabWidget, QCheckBox, QToolButton, QVBoxLayout, QWidget)

from . import deps, operations, results
from .connection import GRPC_SCHEME, PORT_AT_END
from .index_dialog import IndexedRastersDialog
from .local_backend import LocalBackend
from .settings import LOG_TAG, PluginSettings, address_problem
from .sources import (PixelReader, SourceError, has_no_resolution, local_path, names_by_real_path, native_pixels,
                      prepare_source, to_layer_crs)
from .tasks import BackendTask, start

MIN_DESCRIBE_PIXELS = 8    # of the layer's own, a side: Describe refuses a view of fewer
# tasks whose answer goes onto the map or names the backend's rasters and tiles: dropped when it comes
# after the backend address changed or the project was closed
RESULT_KINDS = ("index", "search", "segment", "caption")


def shortened(text: str, limit: int = 120) -> str:
    """`text` cut to `limit` characters with an ellipsis: a 2,000-character query or prompt echoed
    whole made a message nobody can read."""
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"

def search_refusal(error, names: dict, address: str, like_tile_id: int | None):
    """A search's BackendError in the panel's words where the backend does not know what it was asked
    about (NOT_FOUND): a ticked layer, which it names by its real path (`names`: real path -> layer
    name), or the result "More like this tile" started from; else `error` itself."""
    from .connection import BackendError

    if error.code != "NOT_FOUND":
        return error
    missing = [names[p] for p in names if p in error.message]
    if missing:
        if "was indexed with checkpoint" in error.message:     # the Indexed window's words for it
            return BackendError(error.code, f"layer {missing[0]!r} on the backend at {address} is indexed with "
                                            "another model: press Index, then search")
        return BackendError(error.code, f"layer {missing[0]!r} is not indexed on the backend at {address}: "
                                        "tick it and press Index, then search")
    if like_tile_id is not None and f"tile {like_tile_id} is not" in error.message:
        # indexing a raster again gives its tiles new ids (IndexResult: a raster replaced)
        return BackendError(error.code, "this result is from before the raster was indexed again: search again")
    return error


def score_words(hit) -> str:
    """What a SearchHit's score is made of: a cosine similarity (at most 1), plus what matching the
    query's words in the tile's caption added (SearchHit.keyword_score), which can take it past 1."""
    if hit.keyword_score <= 0:
        return "score: how like the query the tile is (cosine similarity, at most 1)"
    return (f"score {hit.score:.3f} = {hit.score - hit.keyword_score:.3f} for how like the query the tile is (cosine "
            f"similarity, at most 1) + {hit.keyword_score:.3f} for the query's words in its caption ('Match tile "
            "captions'), which can take it past 1")


LIGHTS = {"SERVING": ("#2ca02c", "serving"), "NOT_SERVING": ("#ff7f0e", "not serving"),
          "REFUSED": ("#ff7f0e", "answers, but refuses this plugin"),
          "UNREACHABLE": ("#d62728", "no backend"), "UNKNOWN": ("#999999", "unknown"),
          "MISSING": ("#999999", "packages missing")}


class RowsFitTheList(QStyledItemDelegate):
    """Rows no wider than the list they are in: a long row ends in an ellipsis, where the list would
    otherwise scroll sideways and cut it off."""

    def sizeHint(self, option, index):  # noqa: N802 - Qt API
        hint = super().sizeHint(option, index)
        return QSize(min(hint.width(), self.parent().viewport().width()), hint.height())


class SettingsDialog(QDialog):
    """Token, TLS and the local backend's command; saved to QgsSettings on OK."""

    def __init__(self, settings: PluginSettings, parent=None):
        super().__init__(parent)
        self.setWindowTitle("SkyPrompt settings")
        self.settings = settings
        form = QFormLayout(self)
        self.token = QLineEdit(settings.token)
        self.token.setEchoMode(QLineEdit.Password)
        self.token.setToolTip("The token the backend was started with (its $SKYPROMPT_TOKEN or --token), sent with "
                              "every call; empty for a backend started without one. 'Start local backend' starts "
                              "its backend with this token")
        self.use_tls = QCheckBox("Use TLS")
        self.use_tls.setChecked(settings.use_tls)
        self.tls_ca = QgsFileWidget()
        self.tls_ca.setFilePath(settings.tls_ca)
        self.tls_ca.setFilter("PEM certificates (*.pem *.crt)")
        self.tls_ca.setEnabled(settings.use_tls)          # the CA file is read only over TLS
        self.use_tls.toggled.connect(self.tls_ca.setEnabled)
        self.python = QLineEdit(settings.python)
        self.python.setToolTip("Python (or command) that runs `-m backend serve`, e.g. /path/to/.venv/bin/python")
        self.backend_dir = QgsFileWidget()
        self.backend_dir.setStorageMode(QgsFileWidget.GetDirectory)
        self.backend_dir.setFilePath(settings.backend_dir)
        self.checkpoint = QgsFileWidget()
        self.checkpoint.setStorageMode(QgsFileWidget.GetDirectory)
        self.checkpoint.setFilePath(settings.checkpoint)
        self.device = QComboBox()
        self.device.setEditable(True)
        self.device.addItems(["auto", "cpu", "cuda", "cuda:0", "cuda:1"])
        self.device.setCurrentText(settings.device)
        self.device.setToolTip("Where 'Start local backend' runs the model: auto (a GPU when there is one), cpu, "
                               "cuda, or cuda:N for the Nth GPU. A backend started elsewhere keeps its own")
        self.max_side = QSpinBox()
        self.max_side.setRange(*PluginSettings.RANGES["max_pixel_side"])
        self.max_side.setValue(settings.max_pixel_side)
        self.max_side.setToolTip("Layers the backend cannot open as files (tile services, WMS, layers not on a local "
                                 "disk, files whose CRS was set in QGIS) are read here and sent as pixels: at most "
                                 "this many a side, and no more than the backend takes; a larger area is read "
                                 "coarser")
        self.start_timeout = QSpinBox()
        self.start_timeout.setRange(*(int(v) for v in PluginSettings.RANGES["start_timeout_s"]))
        self.start_timeout.setSuffix(" s")
        self.start_timeout.setValue(int(settings.start_timeout_s))
        self.start_timeout.setToolTip("How long 'Start local backend' waits for the backend to load its model and "
                                      "answer before giving up")
        form.addRow("Token", self.token)
        form.addRow("", self.use_tls)
        form.addRow("CA certificate", self.tls_ca)
        form.addRow("Backend Python", self.python)
        form.addRow("Backend folder", self.backend_dir)
        form.addRow("Checkpoint (empty = bundled)", self.checkpoint)
        form.addRow("Device", self.device)
        form.addRow("Max side of layers sent as pixels", self.max_side)
        form.addRow("Start timeout", self.start_timeout)
        buttons = QDialogButtonBox(QDialogButtonBox.Ok | QDialogButtonBox.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        form.addRow(buttons)
        self.setMinimumWidth(520)      # room for a whole path in the file fields

    def accept(self) -> None:
        s = self.settings
        s.token, s.use_tls, s.tls_ca = self.token.text(), self.use_tls.isChecked(), self.tls_ca.filePath()
        s.python, s.backend_dir = self.python.text().strip() or "python3", self.backend_dir.filePath()
        s.checkpoint, s.device = self.checkpoint.filePath(), self.device.currentText().strip() or "auto"
        s.max_pixel_side, s.start_timeout_s = self.max_side.value(), float(self.start_timeout.value())
        s.save()
        super().accept()


class SkyPromptDock(QDockWidget):
    taskDone = pyqtSignal(str, object)

    def __init__(self, iface, deps_folder: str, parent=None):
        super().__init__("SkyPrompt", parent)
        self.setObjectName("SkyPromptDock")
        self.iface = iface
        self.canvas = iface.mapCanvas()
        self.deps_folder = deps_folder
        self.settings = PluginSettings.load()
        self.tasks: set[QgsTask] = set()
        self.running: dict[str, int] = {}      # task kind -> how many run: its button waits for them
        self.deps_problem: str | None = None   # set by check_dependencies, once the widgets exist
        # layer id -> the raster ids it was indexed under: a tile service indexed in several views
        # is several rasters (the backend names pixels by their hash), all of them searchable
        self.indexed: dict[str, set[str]] = {}
        self._closed = False                   # shutdown() ran: callbacks must not touch the widgets
        self.hits = []
        # the checkpoint the backend ran at its last health check, and the one of the results listed
        # (when known): a backend restarted with another at the same address knows none of their tiles
        self.checkpoint_hash = ""
        self.hits_checkpoint = ""
        self.hits_names: dict = {}      # raster path -> layer name, as the results list names them
        self._watched_names: set[str] = set()   # layers whose renaming refreshes the list of layers to search
        self.last_layer = None                 # the last result layer added
        self.drawn_rect: tuple[QgsRectangle, QgsCoordinateReferenceSystem] | None = None
        self.index_dialog: IndexedRastersDialog | None = None
        # health checks can answer out of order: each is numbered, and one older than the answer the
        # light shows is stale
        self._health_asked = 0
        self._health_shown = 0
        self.backend = LocalBackend(self)
        self.backend.serving.connect(self._backend_serving)
        self.backend.already_serving.connect(self._backend_already_serving)
        self.backend.failed.connect(lambda m: self._message(m, Qgis.Critical))
        self.backend.stopped.connect(self._backend_stopped)
        self.extent_tool = QgsMapToolExtent(self.canvas)
        self.extent_tool.extentChanged.connect(self._rectangle_drawn)
        self._previous_tool = None
        self._build()
        QgsProject.instance().layersAdded.connect(self.refresh_layers)
        QgsProject.instance().layersRemoved.connect(self.refresh_layers)
        # a project closed (or a new one) while a task runs: its answer belongs to no project now
        self._project_generation = 0
        QgsProject.instance().cleared.connect(self._project_cleared)
        QgsProject.instance().readProject.connect(self._project_read)
        # the Layers panel's order, which the list follows (new layers reach the tree after layersAdded)
        QgsProject.instance().layerTreeRoot().layerOrderChanged.connect(self.refresh_layers)
        self.refresh_layers()
        self.check_dependencies()

    # -- building the widgets --
    def _build(self) -> None:
        body = QWidget()
        layout = QVBoxLayout(body)
        bar = QHBoxLayout()
        self.address = QLineEdit(self.settings.address)
        self.address.setToolTip("host:port of the SkyPrompt backend")
        self.address.editingFinished.connect(self._address_edited)
        self.light = QLabel()
        self.check_button = QPushButton("Check")
        self.check_button.setToolTip("Ask the backend at this address whether it serves: the light, and its model, "
                                     "device and index counts below")
        self.check_button.clicked.connect(self.refresh_health)
        self.start_button = QPushButton("Start local backend")
        self.start_button.setToolTip("Start a backend on this computer at this address's port (127.0.0.1), with the "
                                     "Backend Python, Backend folder, Checkpoint, Device and Token of the settings "
                                     "(one already serving there is used as it is); press again to stop it")
        self.start_button.clicked.connect(self.toggle_backend)
        # a gear, as QGIS's own options: with its words the row set the panel's width past a narrow dock
        self.settings_button = QToolButton()
        self.settings_button.setText("Settings…")
        self.settings_button.setIcon(QgsApplication.getThemeIcon("/mActionOptions.svg"))
        self.settings_button.setToolButtonStyle(Qt.ToolButtonIconOnly)
        self.settings_button.setToolTip("Settings… (backend address, token, TLS, local backend, checkpoint)")
        self.settings_button.clicked.connect(self.open_settings)
        for w in (self.light, self.address, self.check_button):
            bar.addWidget(w)
        layout.addLayout(bar)
        bar2 = QHBoxLayout()
        bar2.addWidget(self.start_button)
        bar2.addWidget(self.settings_button)
        layout.addLayout(bar2)
        self.info = QLabel("")
        self.info.setWordWrap(True)
        layout.addWidget(self.info)
        self.deps_box = QWidget()
        deps_layout = QHBoxLayout(self.deps_box)
        self.deps_label = QLabel()
        self.deps_label.setWordWrap(True)
        self.install_button = QPushButton("Install grpcio + protobuf")
        self.install_button.clicked.connect(self.install_dependencies)
        deps_layout.addWidget(self.deps_label, 1)
        deps_layout.addWidget(self.install_button)
        layout.addWidget(self.deps_box)
        self.tabs = QTabWidget()
        self.tabs.addTab(self._search_tab(), "Search")
        self.tabs.addTab(self._segment_tab(), "Segment")
        self.tabs.addTab(self._describe_tab(), "Describe")
        layout.addWidget(self.tabs, 1)
        self.progress = QProgressBar()
        self.progress.setRange(0, 100)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(self.cancel_all)
        row = QHBoxLayout()
        row.addWidget(self.progress, 1)
        row.addWidget(self.cancel_button)
        layout.addLayout(row)
        self._set_busy(False)
        self.setWidget(body)
        self._show_light("UNKNOWN")

    def _search_tab(self) -> QWidget:
        tab = QWidget()
        v = QVBoxLayout(tab)
        self.layers_label = QLabel()
        self.layers_label.setWordWrap(True)
        # small buttons: the panel must fit a narrow dock
        self.tick_all = QToolButton()
        self.tick_all.setText("All")
        self.tick_all.setToolTip("Tick every raster layer")
        self.tick_all.clicked.connect(lambda: self.tick_layers(True))
        self.tick_none = QToolButton()
        self.tick_none.setText("None")
        self.tick_none.setToolTip("Untick every raster layer")
        self.tick_none.clicked.connect(lambda: self.tick_layers(False))
        row = QHBoxLayout()
        row.addWidget(self.layers_label, 1)
        row.addWidget(self.tick_all)
        row.addWidget(self.tick_none)
        v.addLayout(row)
        self.layer_list = QListWidget()
        self.layer_list.setMaximumHeight(110)
        self.layer_list.itemChanged.connect(lambda _: self._update_actions())   # a tick or an untick
        v.addWidget(self.layer_list)
        self.index_button = QPushButton("Index")
        self.index_button.clicked.connect(self.index_layers)
        self.rotation_views = QCheckBox("Rotation views")
        self.rotation_views.setToolTip(f"Store each tile's embedding averaged over its {operations.ROTATION_VIEWS} "
                                       "rotations, so a search does not depend on which way the ground faces: "
                                       "a little better search, indexing about 4 times slower. Off: the "
                                       "backend's default")
        self._remember(self.rotation_views, "rotation_views")
        row = QHBoxLayout()
        row.addWidget(self.index_button, 1)
        self.indexed_button = QPushButton("Indexed…")
        self.indexed_button.setToolTip("What the backend has indexed: remove rasters from its index, or add them to "
                                       "the map")
        self.indexed_button.clicked.connect(self.open_index_dialog)
        row.addWidget(self.indexed_button)
        v.addLayout(row)
        v.addWidget(self.rotation_views)
        self.query = QLineEdit()
        self.query.setPlaceholderText("e.g. parking lots next to a highway")
        self.query.returnPressed.connect(self.search)
        self.query.textChanged.connect(self.query.setToolTip)     # a query longer than the box, whole
        # a row of its own: beside k and Search it was a few words wide in a narrow dock
        v.addWidget(self.query)
        row = QHBoxLayout()
        self.k = QSpinBox()
        self.k.setRange(*PluginSettings.RANGES["k"])
        self._remember(self.k, "k")
        self.k.setPrefix("k ")
        self.k.setToolTip("How many of the best-matching tiles a search lists and draws (a backend refuses more "
                          "than its limit)")
        self.search_button = QPushButton("Search")
        self.search_button.clicked.connect(self.search)
        row.addWidget(self.k)
        row.addWidget(self.search_button, 1)
        v.addLayout(row)
        self.expand_query = QCheckBox("More like the best hits")
        self.expand_query.setToolTip(f"Search twice: the second time for the query moved toward its "
                                     f"{operations.EXPAND_TILES} best tiles, which brings up more tiles like them "
                                     "(better when the first hits are right, worse when they are not). Off: the "
                                     "backend's default")
        self._remember(self.expand_query, "expand_query")
        v.addWidget(self.expand_query)
        self.match_captions = QCheckBox("Match tile captions")
        self._remember(self.match_captions, "match_captions")
        self.match_captions.setToolTip("Also look the query's words up in the caption the model wrote for each tile "
                                       "when it was indexed (better for everyday wording; a class name such as "
                                       "'storage tanks' may do better without). On: the backend's default")
        v.addWidget(self.match_captions)
        self.search_in_view = QCheckBox("Only in the map view")
        self._remember(self.search_in_view, "search_in_view")
        self.search_in_view.setToolTip("Find tiles in the area the map shows now, not everywhere in the ticked layers")
        v.addWidget(self.search_in_view)
        self.result_list = QListWidget()
        self.result_list.setIconSize(QSize(64, 64))
        self.result_list.setItemDelegate(RowsFitTheList(self.result_list))
        self.result_list.setTextElideMode(Qt.ElideRight)
        self.result_list.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        self.result_list.setResizeMode(QListView.Adjust)     # rows follow the list's width
        self.result_list.itemClicked.connect(self.zoom_to_result)
        v.addWidget(self.result_list, 1)
        self.like_button = QPushButton("More like this tile")
        self.like_button.setToolTip("Search for tiles that look like the selected result (its embedding is the query): "
                                    "for when words fail")
        self.like_button.clicked.connect(self.search_like_selected)
        self.like_button.setEnabled(False)
        self.result_list.currentItemChanged.connect(lambda item, _: self.like_button.setEnabled(item is not None))
        v.addWidget(self.like_button)
        return tab

    def _segment_tab(self) -> QWidget:
        tab = QWidget()
        form = QFormLayout(tab)
        # a narrow dock puts a label above its field instead of pushing the panel wider than the screen
        form.setRowWrapPolicy(QFormLayout.WrapLongRows)
        self.prompts = QLineEdit()
        self.prompts.setPlaceholderText("buildings, trees")
        self.prompts.setToolTip("What to outline: one or more prompts separated by commas, semicolons or line "
                                "breaks, each with polygons of its own colour. Prompts the model reads as one "
                                "('houses', 'Houses.') are refused: give each once")
        self.segment_layer = QgsMapLayerComboBox()
        self.segment_layer.setFilters(QgsMapLayerProxyModel.RasterLayer)
        self.segment_layer.layerChanged.connect(lambda _: self._update_actions())
        self.area = QComboBox()
        self.area.addItems(["Canvas extent", "Drawn rectangle"])
        self.area.setToolTip("Canvas extent: what the map shows when Segment is pressed (a rotated map: the box "
                             "round it, the polygons cut to what it shows). Drawn rectangle: the last one drawn "
                             "with 'Draw rectangle'")
        self.draw_button = QPushButton("Draw rectangle")
        self.draw_button.clicked.connect(self.draw_rectangle)
        self.threshold = QDoubleSpinBox()
        self.threshold.setRange(*PluginSettings.RANGES["threshold"])
        self.threshold.setSingleStep(0.05)
        self.threshold.setToolTip("How relevant to a prompt a pixel must be (0 to 1) to lie in its polygons: lower "
                                  "outlines more, and looser; higher only the surest. A pixel's relevance is shared "
                                  "among the prompts")
        self._remember(self.threshold, "threshold")
        self.min_area = QDoubleSpinBox()
        self.min_area.setRange(*PluginSettings.RANGES["min_area_m2"])
        self.min_area.setSuffix(" m²")
        self.min_area.setToolTip("Polygons smaller than this on the ground are dropped (parts of a region that touch "
                                 "at a corner count as one); 0 keeps them all")
        self._remember(self.min_area, "min_area_m2")
        self.follow_edges = QCheckBox("Follow image edges")
        self._remember(self.follow_edges, "follow_edges")
        self.follow_edges.setToolTip("Refine each mask along edges in the image (field borders, shores, roofs) "
                                     "instead of the model's 16-pixel patches; the backend chooses the radius")
        self.output = QgsFileWidget()
        self.output.setStorageMode(QgsFileWidget.SaveFile)
        self.output.setFilter("GeoPackage (*.gpkg)")
        self.output.lineEdit().setPlaceholderText("[memory layer]")
        self.segment_button = QPushButton("Segment")
        self.segment_button.clicked.connect(self.segment)
        form.addRow("Prompts", self.prompts)
        form.addRow("Layer", self.segment_layer)
        form.addRow("Area", self.area)
        form.addRow("", self.draw_button)     # under the choice, not beside it: both stay readable at ~300 px
        form.addRow("Threshold", self.threshold)
        form.addRow("Minimum area", self.min_area)
        form.addRow(self.follow_edges)      # the whole row: beside an empty label it was cut short
        form.addRow("Output", self.output)
        form.addRow(self.segment_button)
        return tab

    def _describe_tab(self) -> QWidget:
        tab = QWidget()
        v = QVBoxLayout(tab)
        self.describe_layer = QgsMapLayerComboBox()
        self.describe_layer.setFilters(QgsMapLayerProxyModel.RasterLayer)
        self.describe_layer.layerChanged.connect(lambda _: self._update_actions())
        self.describe_button = QPushButton("Describe current view")
        self.describe_button.clicked.connect(self.describe)
        self.caption = QPlainTextEdit()
        self.caption.setReadOnly(True)
        label = QLabel("Layer to describe (its part in the map view)")
        label.setWordWrap(True)
        v.addWidget(label)
        v.addWidget(self.describe_layer)
        v.addWidget(self.describe_button)
        v.addWidget(self.caption, 1)
        return tab

    # -- feedback --
    def _message(self, text: str, level=Qgis.Info, duration: int = 8) -> None:
        self.iface.messageBar().pushMessage("SkyPrompt", text, level, duration)
        QgsMessageLog.logMessage(text, LOG_TAG, level)

    def _project_cleared(self) -> None:
        self._project_generation += 1
        self.hits, self.hits_names = [], {}
        self.result_list.clear()
        # a reopened project brings its layers back with the same ids, as new layers to watch
        self._watched_names.clear()
        # a rectangle drawn on the last project's map is no area of the next one
        self.drawn_rect = None
        self.area.setCurrentIndex(0)

    def _project_read(self, *args) -> None:
        """A project read with result layers of this panel that were in memory: QGIS saves no features
        of a memory layer, so they are back empty, which is said, with how to keep results next time."""
        emptied = results.emptied_result_layers(QgsProject.instance())
        if emptied:
            self._message(f"{len(emptied)} SkyPrompt result layer(s) of this project were temporary (in memory) "
                          f"and came back empty: {', '.join(emptied)}. Search or segment again; to keep results, "
                          "give Segment an Output GeoPackage, or use Make Permanent on a layer before saving",
                          Qgis.Warning, 15)

    def _remember(self, widget, name: str) -> None:
        """Show the setting `name` in `widget` and save every change of it: the next QGIS session starts
        with the panel as it was left, whether or not it was used."""
        if isinstance(widget, QCheckBox):
            widget.setChecked(getattr(self.settings, name))
            changed = widget.toggled
        else:
            widget.setValue(getattr(self.settings, name))
            changed = widget.valueChanged

        def save(value) -> None:
            setattr(self.settings, name, value)
            self.settings.save()

        changed.connect(save)

    def _show_light(self, state: str) -> None:
        colour, words = LIGHTS.get(state, LIGHTS["UNKNOWN"])
        self.light.setText(f"<span style='color:{colour}; font-size:16px'>●</span> {words}")
        self.light.setToolTip(words)
        self.health_state = state

    def _set_busy(self, busy: bool) -> None:
        self.progress.setVisible(busy)
        self.cancel_button.setVisible(busy)
        if busy:
            # a moving bar until the task reports a percentage: search and describe never do, and a
            # bar standing at 0% looks stuck
            self.progress.setRange(0, 0)
        else:
            self.progress.setRange(0, 100)
            self.progress.setValue(0)

    def _task(self, kind: str, description: str, work, shown, failed=None, settings=None) -> BackendTask | None:
        """Start a BackendTask whose answer goes to shown(result) and ends with taskDone(kind, error);
        failed(error) also hears an error that is no cancel. `settings`: a copy to call the backend
        with, where the call must go to the backend of that moment (default: the panel's own)."""
        if self.deps_problem:
            self._message(f"cannot call the backend: {self.deps_problem}", Qgis.Warning)
            self.taskDone.emit(kind, self.deps_problem)
            return None

        what = shortened(description.removeprefix("SkyPrompt: "))   # the message bar's title already says SkyPrompt
        # an answer is the backend's of that moment, for the project of that moment
        address, generation = (settings or self.settings).address, self._project_generation

        def done(result, error):
            if self._closed:        # the plugin was unloaded meanwhile: its widgets are gone
                return
            self.running[kind] -= 1
            self._update_actions()
            self._set_busy(any(t.status() in (QgsTask.Queued, QgsTask.Running) for t in self.tasks if t is not task))
            moved = settings is None and self.settings.address != address
            if error is None and kind in RESULT_KINDS and (moved or self._project_generation != generation):
                # its ids name another backend's rasters and tiles, or its layer would land in another project
                why = "the backend address changed" if moved else "the project was closed"
                dropped = f"the answer came after {why}, so it was dropped"
                if kind == "index":     # the backend's index has the rasters all the same
                    dropped = (f"the backend at {address} indexed {len(result[0])} of them, but the answer came "
                               f"after {why}, so only the panel's report of it was dropped")
                self._message(f"{what}: {dropped}", Qgis.Info, 6)
                self.taskDone.emit(kind, None)
                return
            # the light must not stay on "serving" for a backend gone, or one that cancelled the call
            # because it was stopping (a cancel the user did not ask for)
            backend_cancelled = error is not None and error.code == "CANCELLED" and not task.isCanceled()
            if error is not None and (error.code == "UNAVAILABLE" or backend_cancelled) and kind != "health":
                self.refresh_health()
            if error is None:
                try:
                    shown(result)
                except Exception as e:  # a bad answer must not leave the dock half-updated silently
                    error = e
                    self._message(f"{what}: {e}", Qgis.Critical)
            elif not (error.code == "CANCELLED" and task.isCanceled()):   # a backend that stopped is an error
                self._message(f"{what} failed: {shortened(operations.in_panel_words(error.message), 600)}",
                              Qgis.Critical)
                if failed is not None:
                    failed(error)
            if error is None:   # the notes say how the work was done: a coarser read, a cap, bands guessed
                for note in task.notes:
                    self._message(note, Qgis.Warning)
            self.taskDone.emit(kind, error)

        # a copy of this moment's settings: the task may start after the address or token changed, and
        # must call the backend its answer will be judged against (done() drops it when that moved)
        task = BackendTask(description, dataclasses.replace(settings or self.settings), work, done)
        task.progressChanged.connect(self._show_progress)
        task.said.connect(lambda text: None if self._closed else self._message(text, Qgis.Info, 6))
        self._set_busy(True)
        # a second press while the first runs would start a second task and add a second layer
        self.running[kind] = self.running.get(kind, 0) + 1
        self._update_actions()
        return start(task, self.tasks)

    def _show_progress(self, percent: float) -> None:
        if not self._closed:     # a task's last progress can arrive after the plugin was unloaded
            if percent > 0:
                self.progress.setRange(0, 100)
            self.progress.setValue(int(percent))

    def cancel_all(self) -> None:
        for task in list(self.tasks):
            task.cancel()

    # -- connection --
    def _address_edited(self) -> None:
        address = self.address.text().strip()
        if not address:     # the address in use stays, and the field shows it, never one it does not call
            self.address.setText(self.settings.address)
            self._message("the backend address cannot be empty: give it as HOST:PORT, e.g. 127.0.0.1:50051",
                          Qgis.Warning, 6)
            return
        if address != self.settings.address:
            self.settings.address = address
            self.settings.save()
            self._forget_backend_state()
            problem = address_problem(address)
            if problem:     # kept as typed, to be corrected there: every call to it would fail
                self._message(problem, Qgis.Warning, 10)
            self.refresh_health()

    def _forget_backend_state(self) -> None:
        """Raster and tile ids are numbers each backend's index gives out on its own: those of the
        backend before (this session's indexed layers, the results shown) would name other rasters
        and tiles on the next, so they go when the address changes."""
        self.indexed.clear()
        self.hits = []
        self.result_list.clear()
        if self.index_dialog is not None:
            self.index_dialog.clear("The backend address changed: press Refresh for this backend's index")

    # -- the backend's index --
    def open_index_dialog(self) -> BackendTask | None:
        """Show the Indexed rasters window and ask the backend for its list."""
        if self.index_dialog is None:
            self.index_dialog = IndexedRastersDialog(self, self.list_indexed, self.remove_indexed, self._message)
        self.index_dialog.show()
        self.index_dialog.raise_()
        return self.list_indexed()

    def list_indexed(self) -> BackendTask | None:
        dialog = self.index_dialog
        settings = dataclasses.replace(self.settings)       # this backend's list, whatever the address becomes
        address = settings.address

        def current() -> bool:
            # an answer from the backend before an address change is not this backend's: its ids
            # would name other rasters here
            return dialog is not None and address == self.settings.address

        def shown(rasters):
            if current():
                dialog.show_rasters(rasters, address)

        def failed(error):
            if current():
                dialog.clear(f"Could not list the index of the backend at {address}: {error.message}")

        return self._task("list", "SkyPrompt: listing the backend's index",
                          lambda conn, task: operations.indexed_rasters(conn), shown, failed, settings)

    def remove_indexed(self, entries: list, address: str) -> BackendTask | None:
        """Remove IndexedRaster `entries`, listed from the backend at `address`, from its index."""
        if address != self.settings.address:
            self._message(f"that list is of the backend at {address}, not of the one at {self.settings.address}: "
                          "nothing removed; look at the list again", Qgis.Warning)
            self.taskDone.emit("remove", "another backend")
            self.list_indexed()
            return None
        settings = dataclasses.replace(self.settings)
        names = {e.raster_id: e.raster_name for e in entries}

        def work(conn, task):
            return operations.remove_rasters(conn, list(names), task.isCanceled)

        def shown(answer):
            removed, failed = answer
            gone = {r.raster_id for r in removed}
            for ids in self.indexed.values():      # this session's layers indexed under those ids: no more
                ids -= gone
            if removed:
                tiles = sum(r.tiles_removed for r in removed)
                self._message(f"removed {len(removed)} raster(s), {tiles} tiles, from the index", Qgis.Success, 4)
            for raster_id, why in failed:
                self._message(f"{names[raster_id]} not removed: {why}", Qgis.Warning)
            self.list_indexed()
            self.refresh_health()       # the index counts in the connection bar

        return self._task("remove", f"SkyPrompt: removing {len(names)} raster(s) from the index", work, shown,
                          settings=settings)

    def check_dependencies(self) -> None:
        deps.activate(self.deps_folder)
        self.deps_problem = deps.missing()
        self.deps_box.setVisible(bool(self.deps_problem))
        too_old = deps.python_problem()
        # no install helps a Python too old for the packages: the button is not offered then
        self.install_button.setVisible(not too_old)
        if self.deps_problem:
            what = "cannot work in this QGIS" if too_old else "needs grpcio and protobuf"
            self.deps_label.setText(f"SkyPrompt {what}: {self.deps_problem}.")
            self._show_light("MISSING")
        for w in (self.check_button, self.start_button, self.search_button, self.indexed_button):
            w.setEnabled(not self.deps_problem)
        self._update_actions()

    def _update_actions(self) -> None:
        """Index, Segment and Describe are on only when they have a raster layer to work on."""
        if not hasattr(self, "describe_button"):    # signals while the tabs are still being built
            return
        ready = not self.deps_problem
        running = {kind for kind, count in self.running.items() if count > 0}
        self.index_button.setEnabled(ready and bool(self.checked_layers()) and "index" not in running)
        self.segment_button.setEnabled(ready and self.segment_layer.currentLayer() is not None
                                       and "segment" not in running)
        self.describe_button.setEnabled(ready and self.describe_layer.currentLayer() is not None
                                        and "caption" not in running)
        # a second search while one runs would show whichever answer came last under the query box
        self.search_button.setEnabled(ready and "search" not in running)
        no_layer = "Add a raster layer to the project first" if not self.layer_list.count() else ""
        wait = "Running: wait for it to finish, or Cancel"
        self.index_button.setToolTip(no_layer or ("index" in running and wait)
                                     or "Tile the checked layers and store their embeddings in the backend")
        self.segment_button.setToolTip(no_layer or ("segment" in running and wait)
                                       or "Outline the prompts in the area of the layer: a polygon layer, a colour "
                                          "per prompt, in memory or in the Output GeoPackage")
        self.describe_button.setToolTip(no_layer or ("caption" in running and wait)
                                        or "A caption, by the model, of the layer's part in the map view")

    def install_dependencies(self) -> None:
        if not self.install_button.isEnabled():   # one install at a time: two pips in one folder corrupt it
            return
        folder = self.deps_folder
        lines: list[str] = []

        def work(task):
            deps.install(folder, log=lambda line: lines.append(line))
            return True

        def finished(exception, result=None):
            if self._closed:
                return
            for line in lines:
                QgsMessageLog.logMessage(line, LOG_TAG, Qgis.Info)
            self.install_button.setEnabled(True)
            self._set_busy(False)
            self.check_dependencies()
            if exception is not None:
                self._message(str(exception), Qgis.Critical, 0)
            elif self.deps_problem:
                self._message("grpcio and protobuf are installed; restart QGIS to use them "
                              f"({self.deps_problem})", Qgis.Warning, 0)
            else:
                self._message("grpcio and protobuf are installed", Qgis.Success)
                self.refresh_health()
            self.taskDone.emit("install", exception or (self.deps_problem or None))

        task = QgsTask.fromFunction("SkyPrompt: installing grpcio and protobuf", work, on_finished=finished)
        self.install_button.setEnabled(False)
        self._set_busy(True)
        start(task, self.tasks)

    def refresh_health(self) -> BackendTask | None:
        self._health_asked += 1
        number = self._health_asked

        def work(conn, task):
            from .connection import BackendError   # here: grpc may be missing when the panel is built

            state = conn.health(timeout=2.0)
            if state != "SERVING":
                return state, None, ""
            try:    # fresh: the counts shown change with every index; the limits kept for Segment and Describe too
                return state, conn.info(timeout=5.0, fresh=True), ""
            except BackendError as e:     # health needs no token: a wrong one shows only here
                return "REFUSED", None, e.message

        def shown(result):
            if number < self._health_shown:      # a later check's answer is on the light already
                return
            self._health_shown = number
            state, info, refusal = result
            self._show_light(state)
            if refusal:
                refusal = operations.in_panel_words(refusal)
                # the panel's own advice, where the refusal does not say what to fix in the settings
                advice = "" if "SkyPrompt settings" in refusal else "; fix it in SkyPrompt settings (Token, TLS)"
                self.info.setText(f"the backend at {self.settings.address} refuses this plugin: {refusal}{advice}")
            elif info is not None:
                self._checkpoint_seen(info.checkpoint_hash)
                stats = info.index_stats
                self.info.setText(f"{info.model_name} ({info.model_preset}, {info.image_size} px) on {info.device} · "
                                  f"{stats.raster_count} rasters, {stats.tile_count} tiles indexed")
            elif address_problem(self.settings.address):    # no backend answers at a URL: it is no address
                self.info.setText(address_problem(self.settings.address))
            elif not PORT_AT_END.search(self.settings.address.strip()) and not GRPC_SCHEME.match(self.settings.address):
                # "127.0.0.1:abc", "backend.lan": starting a backend would not help (Start refuses it too)
                self.info.setText(f"no backend answers at {self.settings.address}: the address has no port; give it "
                                  "as HOST:PORT, e.g. 127.0.0.1:50051, in SkyPrompt settings")
            else:
                self.info.setText(f"no backend answers at {self.settings.address}: start one with "
                                  "'Start local backend' or check the address")

        return self._task("health", "SkyPrompt: checking the backend", work, shown)

    def _checkpoint_seen(self, checkpoint: str) -> None:
        """A health check saw the backend run `checkpoint`: results listed from another one (it was
        restarted with another model at this address) name tiles and scores it does not have, so
        they are cleared rather than left to fail."""
        if self.hits and self.hits_checkpoint and checkpoint != self.hits_checkpoint:
            self.hits = []
            self.result_list.clear()
            self._message(f"the backend at {self.settings.address} now runs another model than the one the results "
                          "listed came from: they were cleared; search again", Qgis.Info, 8)
        self.checkpoint_hash = checkpoint

    def toggle_backend(self) -> None:
        if self.backend.running:
            self.backend.stop()
            return
        if self.deps_problem:
            self._message(f"cannot start the backend: {self.deps_problem}", Qgis.Warning)
            return
        # the button stays live: a start with wrong settings, or a slow one, can be cancelled before
        # its timeout
        self.start_button.setText("Cancel start")
        if not self.backend.start(self.settings):
            self.start_button.setText("Start local backend")

    def _backend_serving(self, address: str) -> None:
        self.start_button.setEnabled(True)
        self.start_button.setText("Stop local backend" if self.backend.running else "Start local backend")
        self._message(f"backend serving at {address}", Qgis.Success, 4)
        self.refresh_health()

    def _backend_already_serving(self, address: str) -> None:
        """'Start local backend' found a backend serving at the address, started elsewhere (a terminal,
        another QGIS): it is used as it is, with its own checkpoint and device, not the settings'."""
        self.start_button.setEnabled(True)
        self.start_button.setText("Start local backend")
        host, _, port = address.rpartition(":")
        other = f"{host}:{int(port) + 1}" if port.isdigit() and int(port) < 65535 else "127.0.0.1:50052"
        self._message(f"a backend already runs at {address}, so none was started: SkyPrompt uses that one, with "
                      "the checkpoint and device it was started with, not your Checkpoint and Device settings. "
                      "To use yours, stop that backend and press 'Start local backend' again, or give another "
                      f"port in the address field (e.g. {other})", Qgis.Warning, 15)
        self.refresh_health()

    def _backend_stopped(self) -> None:
        self.start_button.setEnabled(True)
        self.start_button.setText("Start local backend")
        self._show_light("UNKNOWN")
        if not self._closed and not self.deps_problem:
            self.refresh_health()   # the light says whether a backend still answers (another one may)

    def open_settings(self) -> None:
        before = dataclasses.replace(self.settings)
        if SettingsDialog(self.settings, self).exec_():
            if self.settings.address != before.address:
                self.address.setText(self.settings.address)
                self._forget_backend_state()
            changed = [label for label, name in (("Checkpoint", "checkpoint"), ("Device", "device"),
                                                 ("Backend Python", "python"), ("Backend folder", "backend_dir"))
                       if getattr(self.settings, name) != getattr(before, name)]
            if changed and self.backend.running:
                # the running backend was started with the earlier ones
                self._message(f"{', '.join(changed)} changed: stop and start the local backend to use "
                              f"{'it' if len(changed) == 1 else 'them'}", Qgis.Info, 8)
            self.refresh_health()

    # -- search --
    def refresh_layers(self, *args) -> None:
        if self._closed:        # a layer renamed after the panel closed
            return
        checked = {self.layer_list.item(i).data(Qt.UserRole): self.layer_list.item(i).checkState()
                   for i in range(self.layer_list.count())}
        self.layer_list.clear()
        project = QgsProject.instance()
        # in the Layers panel's order (then any layer not in it), each listed under its current name
        ordered = project.layerTreeRoot().layerOrder()
        shown = {layer.id() for layer in ordered}
        for layer in ordered + [l for l in project.mapLayers().values() if l.id() not in shown]:
            if isinstance(layer, QgsRasterLayer):
                if layer.id() not in self._watched_names:
                    self._watched_names.add(layer.id())
                    layer.nameChanged.connect(self.refresh_layers)
                item = QListWidgetItem(layer.name())
                item.setData(Qt.UserRole, layer.id())
                item.setFlags(item.flags() | Qt.ItemIsUserCheckable)
                item.setCheckState(checked.get(layer.id(), Qt.Checked))
                self.layer_list.addItem(item)
        self.layers_label.setText("Raster layers to search" if self.layer_list.count() else
                                  "No raster layers in the project: add one to index and search it")
        for button in (self.tick_all, self.tick_none):
            button.setEnabled(self.layer_list.count() > 0)
        self._update_actions()

    def tick_layers(self, ticked: bool) -> None:
        """Tick or untick every layer in the list (the All and None buttons)."""
        state = Qt.Checked if ticked else Qt.Unchecked
        for i in range(self.layer_list.count()):
            self.layer_list.item(i).setCheckState(state)

    def checked_layers(self) -> list[QgsRasterLayer]:
        project = QgsProject.instance()
        out = []
        for i in range(self.layer_list.count()):
            item = self.layer_list.item(i)
            layer = project.mapLayer(item.data(Qt.UserRole))
            if item.checkState() == Qt.Checked and layer is not None:
                out.append(layer)
        return out

    def index_layers(self) -> BackendTask | None:
        layers = self.checked_layers()
        if not layers:
            self._message("check at least one raster layer to index", Qgis.Warning)
            self.taskDone.emit("index", "no layers")
            return None
        try:
            prepared, seen = [], []
            canvas_rect, canvas_crs = QgsRectangle(self.canvas.extent()), self.canvas.mapSettings().destinationCrs()
            by_file: dict[str, tuple] = {}        # real path -> (layer name, bands shown) of a ticked file layer
            for layer in layers:
                source, view, resolution = prepare_source(layer), None, None
                if isinstance(source, str):
                    # the backend keeps one index per file: two layers of it in other bands would each
                    # replace the other's on every Index (minutes of embedding for nothing)
                    other = by_file.setdefault(os.path.realpath(source), (layer.name(), source.bands))
                    if other[1] != source.bands:
                        raise SourceError(f"layers {other[0]!r} and {layer.name()!r} show different bands of one "
                                          "file, and the backend keeps one index per file: untick one of them, or "
                                          "show the same bands in both")
                if has_no_resolution(source):
                    # a tile service has no extent or resolution to index whole: the current view at
                    # the canvas resolution, as Segment reads it
                    view = to_layer_crs(canvas_rect, canvas_crs, layer)
                    if not view.intersects(layer.extent()):
                        raise SourceError(f"layer {layer.name()!r} is a tile service: pan to the area to index")
                    resolution = self._canvas_resolution(view)
                    seen.append(layer.name())
                prepared.append((layer.id(), layer.name(), source, view, resolution))
        except SourceError as e:    # the user's to fix, as for Segment and Describe
            self._message(str(e), Qgis.Warning)
            self.taskDone.emit("index", e)
            return None
        max_side = self.settings.max_pixel_side
        views = operations.ROTATION_VIEWS if self.rotation_views.isChecked() else None
        if seen:
            self._message(f"{', '.join(seen)}: tile service(s), indexing the current view at the map's resolution",
                          Qgis.Info, 6)

        def work(conn, task):
            from .connection import BackendError

            out, failed = {}, []
            for i, (layer_id, name, source, view, resolution) in enumerate(prepared):
                if task.isCanceled():
                    break
                step = lambda p, i=i: task.setProgress((i + p / 100.0) * 100.0 / len(prepared))  # noqa: E731
                try:
                    out[layer_id] = operations.index_layer(conn, source, max_side, step, task.isCanceled,
                                                           notes=task.notes, views=views, view=view,
                                                           resolution=resolution, said=task.said.emit)
                except BackendError as e:
                    # one layer the backend refuses (or that was removed while it indexed it) leaves
                    # the others to index; a backend gone, a refused token or a cancel stops them all
                    if operations.stops_all(e):
                        raise
                    refused = f"{name!r} not indexed: {e.message}"
                    if len(prepared) == 1:
                        raise BackendError(e.code, refused) from None
                    failed.append(refused)
            if failed and not out:
                raise BackendError("", "; ".join(failed))
            return out, failed

        def shown(answer):
            indexed, failed = answer
            for lid, r in indexed.items():
                self.indexed.setdefault(lid, set()).add(r.raster_id)
            tiles = sum(r.tile_count for r in indexed.values())
            counts = Counter(operations.outcome_word(r) for r in indexed.values())
            what = ", ".join(f"{n} {word}" for word, n in counts.items())
            self._message(f"indexed {len(indexed)} layer(s), {tiles} tiles ({what})", Qgis.Success, 4)
            for line in failed:
                self._message(line, Qgis.Warning)
            self.refresh_health()   # the index counts in the connection bar

        return self._task("index", f"SkyPrompt: indexing {len(layers)} layer(s)", work, shown)

    def search(self) -> BackendTask | None:
        query = self.query.text().strip()
        if not query:
            self._message("type what to look for, e.g. 'parking lots'", Qgis.Warning)
            self.taskDone.emit("search", "empty query")
            return None
        return self._search(query, None)

    def search_like_selected(self) -> BackendTask | None:
        """Tiles like the selected result (SearchRequest.like_tile_id)."""
        item = self.result_list.currentItem()
        if item is None:
            self._message("select a result first: the search looks for tiles like it", Qgis.Warning)
            self.taskDone.emit("search", "no result selected")
            return None
        hit = self.hits[item.data(Qt.UserRole)]
        # an index's tile number says nothing of where the tile lies: named with its raster, as listed
        shown = self.hits_names.get(hit.raster_path, hit.raster_name)
        return self._search(f"like tile {hit.tile_id} of {shown}", hit.tile_id)

    def _search(self, title: str, like_tile_id: int | None) -> BackendTask | None:
        if self.running.get("search"):      # Enter in the query box while the button is off
            self._message("a search is running: wait for its answer, or Cancel it", Qgis.Info, 4)
            self.taskDone.emit("search", "a search is running")
            return None
        query = title if like_tile_id is None else ""
        layers = self.checked_layers()
        path_of = {layer.id(): local_path(layer) for layer in layers}
        names = names_by_real_path((layer, path_of[layer.id()]) for layer in layers)
        # the ticked layers: a file by its path (whoever indexed it, this session or an earlier one;
        # the server says NOT_FOUND if nobody did), a layer read as pixels by the id this session
        # indexed it under: it has no path, so one not indexed in this session cannot be searched alone
        raster_paths = [path_of[l.id()] for l in layers if path_of[l.id()]]
        as_pixels = [l for l in layers if not path_of[l.id()]]
        raster_ids = sorted({rid for l in as_pixels for rid in self.indexed.get(l.id(), ())})
        unreachable = [l.name() for l in as_pixels if l.id() not in self.indexed]
        if not layers and self.layer_list.count():
            # nothing ticked would search the whole index, rasters of no layer here too: asked for
            self._message("tick the layers to search in the list above (Index adds them to the index)",
                          Qgis.Warning)
            self.taskDone.emit("search", "no layer ticked")
            return None
        if layers and not raster_ids and not raster_paths:
            self._message(f"{', '.join(unreachable)}: index the ticked layers first (press Index), then search",
                          Qgis.Warning)
            self.taskDone.emit("search", "not indexed")
            return None
        k = self.k.value()
        expand = operations.EXPAND_TILES if self.expand_query.isChecked() else None
        keyword_weight = None if self.match_captions.isChecked() else 0.0
        area = None
        if self.search_in_view.isChecked():
            # read here, on the main thread: the map may move while the backend works
            crs = QgsCoordinateReferenceSystem(self.canvas.mapSettings().destinationCrs())
            # a rotated map shows a turned rectangle: its box holds tiles beside the view too
            shown = results.visible_polygon(self.canvas.mapSettings()) if self.canvas.rotation() else None
            view = operations.search_area(self.canvas.extent(), crs, shown=shown)
            if view.problem:
                remedy = {"no_crs": "set the project's CRS (Project > Properties > CRS)",
                          "local": "set a CRS placed on the globe"}.get(view.problem, "pan to the layers")
                self._message(f"the map view {view.words}: {remedy}, or untick 'Only in the map view'", Qgis.Warning)
                self.taskDone.emit("search", f"map view: {view.problem}")
                return None
            area = view.wire(crs)

        address = self.settings.address

        def work(conn, task):
            from .connection import BackendError

            try:
                return operations.search(conn, query, k, raster_ids, thumbnails=True, expand=expand,
                                         like_tile_id=like_tile_id, raster_paths=raster_paths,
                                         keyword_weight=keyword_weight, area=area, cancelled=task.isCanceled)
            except BackendError as e:
                raise search_refusal(e, names, address, like_tile_id) from None

        def shown(response):
            for note in operations.unsearchable_notes(response, names):
                self._message(note, Qgis.Warning, 12)
            if area is not None and not response.hits:
                self.show_hits(title, [], names, empty_note=operations.empty_area_note("the map view"))
                return
            self.show_hits(title, list(response.hits), names)
            if response.unfamiliar_words:
                self._message(operations.unfamiliar_note(response.unfamiliar_words), Qgis.Warning, 12)
            for note in operations.stale_notes(response.hits, names):
                self._message(note, Qgis.Warning, 12)

        if unreachable:
            self._message(f"not searched: {', '.join(unreachable)} (read as pixels and not indexed in this "
                          "session: press Index first)", Qgis.Warning, 8)
        return self._task("search", f"SkyPrompt: searching {title!r}", work, shown)

    def show_hits(self, query: str, hits: list, names: dict, empty_note: str = "") -> None:
        self.hits, self.hits_names = hits, names
        self.hits_checkpoint = self.checkpoint_hash
        self.result_list.clear()
        for rank, h in enumerate(hits, 1):
            text = f"{rank}.  score {h.score:.3f}  ·  tile {h.tile_id}\n{names.get(h.raster_path, h.raster_name)}"
            change = operations.file_change(h)
            if change:
                text += f"  ({change} since indexed)"
            item = QListWidgetItem(text)
            # the whole row, which a narrow list elides, and what the model saw in the tile
            said = f"\n“{h.caption}”" if h.caption else ""
            item.setToolTip(f"{text}\n{h.raster_path}{said}\n{score_words(h)}")
            item.setData(Qt.UserRole, rank - 1)
            if h.thumbnail_png:
                pixmap = QPixmap()
                pixmap.loadFromData(h.thumbnail_png, "PNG")
                item.setIcon(QIcon(pixmap))
            self.result_list.addItem(item)
        if not hits:
            self._message(empty_note or f"no tiles match {query!r}: index some layers first", Qgis.Warning)
            return
        crs = results.hits_crs(hits)
        layer = results.memory_layer(f"SkyPrompt: {query}", crs, results.search_fields(),
                                     results.search_features(hits, crs, names))
        results.style_by_score(layer)
        QgsProject.instance().addMapLayer(layer)
        self.last_layer = layer

    def zoom_to_result(self, item: QListWidgetItem) -> None:
        h = self.hits[item.data(Qt.UserRole)]
        crs = results.hits_crs([h])
        rect = QgsRectangle(h.bounds.xmin, h.bounds.ymin, h.bounds.xmax, h.bounds.ymax)
        if crs.authid() == results.WGS84 and h.crs.authid != results.WGS84:
            rect = QgsRectangle(h.bounds_wgs84.xmin, h.bounds_wgs84.ymin, h.bounds_wgs84.xmax, h.bounds_wgs84.ymax)
        target = self.canvas.mapSettings().destinationCrs()
        if crs != target:
            try:
                rect = QgsCoordinateTransform(crs, target, QgsProject.instance()).transformBoundingBox(rect)
            except QgsCsException:
                self._message(f"tile {h.tile_id} cannot be shown in this map: it has no place in the map's CRS "
                              f"({target.authid() or target.description()}), e.g. on the far side of an "
                              "orthographic globe", Qgis.Warning)
                return
        rect.scale(1.5)
        self.canvas.setExtent(rect)
        self.canvas.refresh()

    # -- segment --
    def draw_rectangle(self) -> None:
        self._previous_tool = self.canvas.mapTool()
        self.canvas.setMapTool(self.extent_tool)

    def _rectangle_drawn(self, rect: QgsRectangle) -> None:
        if rect.isEmpty():
            return
        self.drawn_rect = (QgsRectangle(rect), self.canvas.mapSettings().destinationCrs())
        self.area.setCurrentIndex(1)
        if self._previous_tool is not None and self._previous_tool is not self.extent_tool:
            self.canvas.setMapTool(self._previous_tool)
        else:
            self.canvas.unsetMapTool(self.extent_tool)

    def _area(self) -> tuple[QgsRectangle, QgsCoordinateReferenceSystem]:
        if self.area.currentIndex() == 1:
            if self.drawn_rect is None:
                raise SourceError("no rectangle drawn yet: click 'Draw rectangle' and drag on the map")
            return self.drawn_rect
        return QgsRectangle(self.canvas.extent()), self.canvas.mapSettings().destinationCrs()

    def _rotated_view(self) -> QgsGeometry | None:
        """What a rotated map shows, a turned rectangle in the map's CRS, when the area is the map's
        (canvas.extent() is then the box round it: up to twice the ground the map shows); None for a
        map not rotated, or a drawn rectangle."""
        if self.area.currentIndex() == 1 or not self.canvas.rotation():
            return None
        return results.visible_polygon(self.canvas.mapSettings())

    def _canvas_resolution(self, rect_in_layer: QgsRectangle) -> float:
        """Map units (of the layer) per screen pixel: what a tile service is read at."""
        size = self.canvas.mapSettings().outputSize()
        return max(rect_in_layer.width() / max(size.width(), 1), rect_in_layer.height() / max(size.height(), 1))

    def segment(self) -> BackendTask | None:
        prompts = operations.split_prompts(self.prompts.text())
        layer = self.segment_layer.currentLayer()
        try:
            if not prompts:
                raise SourceError("type one or more prompts, comma-separated, e.g. 'buildings, trees'")
            if layer is None:
                raise SourceError("choose a raster layer to segment")
            rect, crs = self._area()
            rotated_view = self._rotated_view()
            in_layer = to_layer_crs(rect, crs, layer)
            if not in_layer.intersects(layer.extent()):
                raise SourceError(f"the area does not overlap layer {layer.name()!r}: pan to it or draw another")
            output = self.output.filePath().strip()
            if output:
                output = output if output.lower().endswith(".gpkg") else output + ".gpkg"
                try:   # before the work: a missing folder, or a file that is no GeoPackage (never replaced)
                    results.check_output_folder(output)
                    results.gpkg_layer_names(output)
                except OSError as e:
                    raise SourceError(str(e)) from None
            prepared = prepare_source(layer)
        except SourceError as e:
            self._message(str(e), Qgis.Warning)
            self.taskDone.emit("segment", e)
            return None
        threshold, min_area = self.threshold.value(), self.min_area.value()
        max_side, resolution = self.settings.max_pixel_side, self._canvas_resolution(in_layer)
        layer_crs = layer.crs()
        edge_radius = None if self.follow_edges.isChecked() else 0      # None: the backend's default radius
        # a file's pixels in the area (read here: layers belong to the main thread), coarsened in the
        # task if over the backend's limit
        native = native_pixels(layer, in_layer) if isinstance(prepared, str) else None

        def work(conn, task):
            return operations.segment(conn, prepared, prompts, rect, crs, in_layer, threshold, max_side,
                                      task.setProgress, task.isCanceled, resolution=resolution, notes=task.notes,
                                      edge_radius=edge_radius, native=native, min_area_m2=min_area)

        def shown(answers):
            found = results.segment_features(answers)
            out_crs = layer_crs
            if answers and answers[0].crs.wkt:
                out_crs = QgsCoordinateReferenceSystem.fromWkt(answers[0].crs.wkt)
            features, cut_note = found, ""
            if rotated_view is not None:    # the box round the view was segmented: kept to the view
                features = results.keep_within(found, results.in_crs(rotated_view, crs, out_crs), min_area)
                cut_note = " (the map is rotated: its box was segmented, and the polygons cut to what it shows)"
            said = ', '.join(prompts)
            if features:
                self._add_segments(features, out_crs, prompts, output)
                self._message(f"{len(features)} polygon(s) for {said}{results.dropped_note(answers)}{cut_note}",
                              Qgis.Success, 4)
            elif found:     # no empty layer
                self._message(f"0 polygon(s) for {said}: the {len(found)} found lie beside what the rotated map "
                              "shows, in the box round it", Qgis.Warning, 10)
            else:
                self._message(results.no_polygons_message(prompts, answers, threshold), Qgis.Warning, 10)
            unfamiliar = operations.distinct_unfamiliar(answers)
            if unfamiliar:
                self._message(operations.unfamiliar_note(unfamiliar), Qgis.Warning, 12)

        return self._task("segment", f"SkyPrompt: segmenting {', '.join(prompts)}", work, shown)

    def _add_segments(self, features: list, crs: QgsCoordinateReferenceSystem, prompts: list[str],
                      output: str) -> None:
        """Segment's polygons as a layer on the map: in memory, or a new table of the GeoPackage `output`."""
        name = f"SkyPrompt: {', '.join(prompts)}"
        out = results.memory_layer(name, crs, results.segment_fields(), features)
        results.style_by_prompt(out, prompts)
        if output:      # numbered against the file's tables only, not also the project's layers
            out = results.write_gpkg(out, output, name)
        QgsProject.instance().addMapLayer(out)
        self.last_layer = out

    # -- describe --
    def describe(self) -> BackendTask | None:
        layer = self.describe_layer.currentLayer()
        if layer is None:
            self._message("choose a raster layer to describe", Qgis.Warning)
            self.taskDone.emit("caption", "no layer")
            return None
        rect, crs = QgsRectangle(self.canvas.extent()), self.canvas.mapSettings().destinationCrs()
        try:
            in_layer = to_layer_crs(rect, crs, layer)
            if not in_layer.intersects(layer.extent()):
                raise SourceError(f"the view does not overlap layer {layer.name()!r}: pan to it to describe it")
            prepared = prepare_source(layer)
            if not has_no_resolution(prepared):
                # a view of a few of the layer's pixels, enlarged to the model's input, is a blur that
                # still gets a confident caption
                seen = in_layer.intersect(layer.extent())
                across = (seen.width() / layer.rasterUnitsPerPixelX(), seen.height() / layer.rasterUnitsPerPixelY())
                if min(across) < MIN_DESCRIBE_PIXELS:
                    raise SourceError(f"the view shows only {across[0]:.1f} x {across[1]:.1f} pixels of layer "
                                      f"{layer.name()!r}: zoom out to describe it (at least {MIN_DESCRIBE_PIXELS} "
                                      f"x {MIN_DESCRIBE_PIXELS})")
            native = file_reader = None
            if isinstance(prepared, str):
                # a file's pixels in the view and a reader of it, made here (layers belong to the main
                # thread): the task reads the view coarser through it if over the backend's limit
                native, file_reader = native_pixels(layer, in_layer), PixelReader(layer)
        except SourceError as e:
            self._message(str(e), Qgis.Warning)
            self.taskDone.emit("caption", e)
            return None
        max_side, resolution = self.settings.max_pixel_side, self._canvas_resolution(in_layer)
        rotated = bool(self.canvas.rotation())

        def work(conn, task):
            return operations.caption(conn, prepared, rect, crs, in_layer, max_side, resolution, notes=task.notes,
                                      native=native, file_reader=file_reader, cancelled=task.isCanceled)

        def shown(answer):
            self.caption.setPlainText(answer.caption)
            if rotated:     # a caption is of one rectangle (CaptionRequest.extent): no polygon can be sent
                self._message("the map is rotated: the caption is of the box round the view, which holds ground "
                              "beside what the map shows", Qgis.Info, 6)

        return self._task("caption", f"SkyPrompt: describing {layer.name()}", work, shown)

    # -- teardown --
    def shutdown(self) -> None:
        """Everything this dock started: tasks, the map tool, project signals, a local backend."""
        self._closed = True
        for task in list(self.tasks):
            task.cancel()
        for task in list(self.tasks):
            task.waitForFinished(5000)
        self.tasks.clear()
        try:
            QgsProject.instance().cleared.disconnect(self._project_cleared)
            QgsProject.instance().readProject.disconnect(self._project_read)
            QgsProject.instance().layersAdded.disconnect(self.refresh_layers)
            QgsProject.instance().layersRemoved.disconnect(self.refresh_layers)
            QgsProject.instance().layerTreeRoot().layerOrderChanged.disconnect(self.refresh_layers)
        except TypeError:
            pass
        if self.canvas.mapTool() is self.extent_tool:
            self.canvas.unsetMapTool(self.extent_tool)
        if self.index_dialog is not None:
            self.index_dialog.close()
        self.backend.stop()
