"""The QGIS plugin in real QGIS 3.22 (headless, pytest-qgis) against a real backend subprocess with a
tiny checkpoint: the packaged zip, loading and unloading, the dock's Search/Segment/Describe work in
QgsTasks, the Processing algorithms, a backend that is down, and the local backend launcher.

QGIS's desktop application is not installed here, so `iface` is tests/desktop_iface.py (real Qt and
QGIS widgets); everything else is the real thing."""
from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from osgeo import gdal, ogr
from qgis.core import (Qgis, QgsApplication, QgsCoordinateReferenceSystem, QgsCoordinateTransform, QgsFeature,
                       QgsGeometry, QgsProcessingException, QgsProcessingFeedback, QgsProject, QgsRasterLayer, QgsRectangle, QgsSettings,
                       QgsTask, QgsVectorLayer)

from desktop_iface import DesktopIface
from test_raster import GEOTIFF_DIR, make_tif, noise
from test_server import REPO, TOKEN, LiveServer, checkpoint, geopackage_with_a_layer, rasters  # noqa: F401 - fixtures

from backend.defaults import Limits
from plugin import deps
from plugin.settings import PluginSettings

SHARED = [GEOTIFF_DIR / n for n in ("naip_m_4709963_se_14_2020.tif", "colorado_aerial_0p15m.tif")]
HAVE_SHARED = all(p.is_file() for p in SHARED)


# -- helpers --
def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        QgsApplication.processEvents()
        time.sleep(0.02)


def with_checked(box, checked: bool, action):
    """action() with a dock check box set to `checked`, then set back."""
    before = box.isChecked()
    box.setChecked(checked)
    try:
        return action()
    finally:
        box.setChecked(before)


def run_dock(dock, kind: str, start, timeout: float = 120.0):
    """Call start() (a dock action), process events until its taskDone(kind) arrives; the error."""
    got = []

    def seen(k, error):
        if k == kind:
            if isinstance(error, BaseException):
                # its frames would keep the panel's layers alive past the test, to be collected at a
                # random later time (once, during QGIS's own teardown, which then failed)
                error.__traceback__ = None
            got.append(error)

    dock.taskDone.connect(seen)
    try:
        start()
        wait_until(lambda: got, timeout, f"the {kind} task")
    finally:
        dock.taskDone.disconnect(seen)
    return got[0]


def build_zip(tmp_path: Path) -> Path:
    out = tmp_path / "skyprompt.zip"
    subprocess.run([sys.executable, str(REPO / "tools" / "build_plugin_zip.py"), "--out", str(out)], check=True,
                   capture_output=True)
    return out


def layer_rect(layer: QgsRasterLayer, frac: tuple[float, float, float, float]) -> QgsRectangle:
    e = layer.extent()
    return QgsRectangle(e.xMinimum() + frac[0] * e.width(), e.yMinimum() + frac[1] * e.height(),
                        e.xMinimum() + frac[2] * e.width(), e.yMinimum() + frac[3] * e.height())


# -- fixtures --
@pytest.fixture(scope="module")
def live(checkpoint, rasters, tmp_path_factory):  # noqa: F811
    roots = [rasters["folder"]] + ([GEOTIFF_DIR] if GEOTIFF_DIR.is_dir() else [])
    server = LiveServer(checkpoint, tmp_path_factory.mktemp("plugin-backend") / "d", roots).start()
    yield server
    server.stop()


@pytest.fixture()
def settings(live):
    s = PluginSettings.load()
    s.address, s.token, s.threshold = live.address, TOKEN, 0.5
    s.save()
    yield s
    QgsSettings().remove("skyprompt")


@pytest.fixture()
def iface(qgis_app, monkeypatch):
    import qgis.utils

    desk = DesktopIface()
    monkeypatch.setattr(qgis.utils, "iface", desk)
    QgsProject.instance().clear()
    yield desk
    QgsProject.instance().clear()
    desk.close()


@pytest.fixture()
def dock(iface, settings, tmp_path):
    from plugin.dock import SkyPromptDock

    d = SkyPromptDock(iface, str(tmp_path / "deps"), iface.mainWindow())
    yield d
    d.shutdown()
    d.deleteLater()


def test_processing_extent_crs_that_qgis_cannot_read_is_refused(layers, skyprompt_processing, tmp_path):
    """An Extent typed with a CRS QGIS cannot read ("[4326]", "[EPSG 4326]", "[garbage]", an unknown
    code) is refused, naming the text and what to write: QGIS put the project's CRS in its place, and
    the algorithms ran on other ground. What QGIS reads ([EPSG:4326], [epsg:4326]) still works."""
    import processing

    layer = layers[0]
    before = QgsCoordinateReferenceSystem(QgsProject.instance().crs())
    QgsProject.instance().setCrs(QgsCoordinateReferenceSystem("EPSG:3857"))
    lonlat = QgsCoordinateTransform(layer.crs(), QgsCoordinateReferenceSystem("EPSG:4326"),
                                    QgsProject.instance()).transformBoundingBox(layer_rect(layer, (0.4, 0.4, 0.6, 0.6)))
    numbers = f"{lonlat.xMinimum()},{lonlat.xMaximum()},{lonlat.yMinimum()},{lonlat.yMaximum()}"
    algorithms = {"searchtiles": {"QUERY": "roads"}, "prompttopolygons": {"INPUT": layer, "PROMPTS": "roads"}}
    try:
        for typed, advice in (("4326", "write it as [EPSG:4326]"), ("EPSG 4326", "write it as [EPSG:4326]"),
                              ("garbage", "name one QGIS knows, as [EPSG:code]"),
                              ("EPSG:999999", "name one QGIS knows, as [EPSG:code]")):
            for algorithm, params in algorithms.items():
                with pytest.raises(QgsProcessingException) as err:
                    processing.run(f"skyprompt:{algorithm}", {**params, "EXTENT": f"{numbers} [{typed}]",
                                                              "OUTPUT": str(tmp_path / "refused.gpkg")})
                assert str(err.value).startswith(f"Extent's CRS '{typed}' is not recognised: {advice}"), \
                    (algorithm, str(err.value))
                del err
        assert not (tmp_path / "refused.gpkg").exists()
        for i, typed in enumerate(("EPSG:4326", "epsg:4326")):
            out = processing.run("skyprompt:prompttopolygons", {**algorithms["prompttopolygons"], "THRESHOLD": 0.0,
                                                                "EXTENT": f"{numbers} [{typed}]",
                                                                "OUTPUT": str(tmp_path / f"read{i}.gpkg")})
            assert QgsVectorLayerFrom(out["OUTPUT"]).featureCount() > 0, typed
    finally:
        QgsProject.instance().setCrs(before)


def test_processing_extent_off_its_globe_is_said_in_processings_words(skyprompt_processing, rasters,  # noqa: F811
                                                                      tmp_path):
    """An Extent in an orthographic CRS made from a PROJ string, wholly off its globe: both algorithms
    name the Extent, and that CRS by its PROJ string (Search named it "" and called it a local grid;
    Prompt to polygons said "layer 'x''s CRS" and told the user to pan a map Processing has not).
    An Extent on the far side of the globe from a layer in such a CRS is said to be off what the
    layer's CRS holds."""
    import processing
    from qgis.core import QgsReferencedRectangle

    proj = "+proj=ortho +lat_0=0 +lon_0=0 +datum=WGS84 +units=m"
    ortho = QgsCoordinateReferenceSystem.fromProj(proj)
    off_globe = QgsReferencedRectangle(QgsRectangle(-8.3e6, -9.5e5, -8.2e6, -9.0e5), ortho)
    outside = f"Extent lies outside what its CRS ({ortho.toProj()}) places on the globe"
    assert ortho.toProj().startswith(proj)
    for algorithm, params, said in (
            ("prompttopolygons", {"INPUT": str(rasters["rgb"]), "PROMPTS": "roads"},
             f"{outside}: give an Extent over the layer"),
            ("searchtiles", {"QUERY": "roads"}, outside)):
        with pytest.raises(QgsProcessingException) as err:
            processing.run(f"skyprompt:{algorithm}", {**params, "EXTENT": off_globe,
                                                      "OUTPUT": str(tmp_path / "x.gpkg")})
        assert str(err.value) == said, algorithm
        del err
    # a layer on that globe, and an Extent on its far side
    from plugin.sources import crs_name

    globe = QgsRasterLayer(str(make_tif(tmp_path / "globe.tif", noise((3, 64, 64), seed=4),
                                        geotransform=(0.0, 10.0, 0.0, 640.0, 0.0, -10.0), crs=proj)), "globe")
    assert globe.isValid() and crs_name(globe.crs()).startswith("+proj=ortho")      # not GDAL's "unknown"
    with pytest.raises(QgsProcessingException) as err:
        processing.run("skyprompt:prompttopolygons", {"INPUT": globe, "PROMPTS": "roads",
                                                      "EXTENT": "170,171,0,1 [EPSG:4326]",
                                                      "OUTPUT": str(tmp_path / "y.gpkg")})
    assert str(err.value) == (f"Extent lies off the part of the globe the CRS of layer 'globe' "
                              f"({crs_name(globe.crs())}) holds: give an Extent over the layer")
    del err, globe


@pytest.fixture()
def layers(rasters):  # noqa: F811
    paths = SHARED if HAVE_SHARED else [rasters["rgb"], rasters["rgba"]]
    out = [QgsRasterLayer(str(p), p.stem) for p in paths]
    assert all(layer.isValid() for layer in out)
    QgsProject.instance().addMapLayers(out)
    return out


# -- packaging and loading --
def test_zip_layout_and_metadata(tmp_path):
    with zipfile.ZipFile(build_zip(tmp_path)) as z:
        names = z.namelist()
        meta = configparser.ConfigParser()
        meta.read_string(z.read("skyprompt/metadata.txt").decode())
        grpc_stub = z.read("skyprompt/rpc/skyprompt_pb2_grpc.py").decode()
    assert all(n.startswith("skyprompt/") for n in names)
    for required in ("skyprompt/__init__.py", "skyprompt/metadata.txt", "skyprompt/LICENSE", "skyprompt/icon.svg",
                     "skyprompt/rpc/skyprompt_pb2.py", "skyprompt/rpc/skyprompt_pb2_grpc.py"):
        assert required in names
    assert not [n for n in names if n.endswith((".pyc", ".safetensors", ".pt")) or "test" in n or "__pycache__" in n]
    general = meta["general"]
    for field in ("name", "qgisMinimumVersion", "description", "about", "version", "author", "email"):
        assert general.get(field), field
    version = next(line.split('"')[1] for line in (REPO / "pyproject.toml").read_text().splitlines()
                   if line.startswith("version"))
    assert general["version"] == version and general["hasProcessingProvider"] == "yes"
    assert f"skyprompt/{general['icon']}" in names       # the Plugin Manager shows the plugin's own icon
    # the stubs' grpcio and protobuf exist for Python 3.10 and newer only: said before installing
    assert "needs QGIS's Python to be 3.10 or newer" in general["about"]
    assert "from . import skyprompt_pb2" in grpc_stub and "from skyprompt.v1" not in grpc_stub


def _install(zip_path: Path, profile: Path) -> Path:
    plugins = profile / "python" / "plugins"
    plugins.mkdir(parents=True)
    with zipfile.ZipFile(zip_path) as z:
        z.extractall(plugins)
    return plugins


def test_installed_zip_loads_and_unloads_twice_leaving_nothing(iface, tmp_path, monkeypatch):
    import qgis.utils

    plugins = _install(build_zip(tmp_path), tmp_path / "profile")
    monkeypatch.syspath_prepend(str(plugins))
    monkeypatch.setattr(qgis.utils, "plugin_paths", [str(plugins)])
    qgis.utils.updateAvailablePlugins()              # what QGIS does at start: reads metadata.txt
    assert "skyprompt" in qgis.utils.available_plugins
    assert qgis.utils.pluginMetadata("skyprompt", "name") == "SkyPrompt"
    registry = QgsApplication.processingRegistry()
    for _ in range(2):
        assert qgis.utils.loadPlugin("skyprompt") and qgis.utils.startPlugin("skyprompt")
        plugin = qgis.utils.plugins["skyprompt"]
        assert plugin.action in iface.toolbar.actions() and "&SkyPrompt" in iface.menus
        provider = registry.providerById("skyprompt")
        assert sorted(a.name() for a in provider.algorithms()) == ["indexraster", "prompttopolygons", "searchtiles"]
        plugin.action.trigger()                      # opens the dock
        assert [d.objectName() for d in iface.docks()] == ["SkyPromptDock"] and plugin.dock.isVisible()
        assert qgis.utils.unloadPlugin("skyprompt")
        QgsApplication.processEvents()
        assert not iface.toolbar.actions() and not iface.menus
        assert registry.providerById("skyprompt") is None
        assert not [d for d in iface.docks() if d.parent() is not None]
        assert not [t for t in QgsApplication.taskManager().activeTasks() if "SkyPrompt" in t.description()]
        for name in [m for m in sys.modules if m == "skyprompt" or m.startswith("skyprompt.")]:
            del sys.modules[name]


def _copy_packages(site: Path, target: Path) -> None:
    """What `pip install --target` leaves: the venv's grpc and protobuf (same Python version)."""
    for name in ("grpc", "google/protobuf", "google/_upb"):
        if (site / name).exists():
            shutil.copytree(site / name, target / name)
    shutil.copy(site / "typing_extensions.py", target)


SYSTEM_SCRIPT = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])                       # the tests folder: desktop_iface
sys.path.insert(0, sys.argv[2])                       # the profile's plugins folder
from qgis.core import QgsApplication
app = QgsApplication([], True); app.initQgis()
import qgis.utils
from desktop_iface import DesktopIface
qgis.utils.iface = iface = DesktopIface()
qgis.utils.plugin_paths = [sys.argv[2]]
qgis.utils.updateAvailablePlugins()
out = {"python": sys.executable, "venv": sys.prefix != sys.base_prefix}
out["loaded"] = qgis.utils.loadPlugin("skyprompt") and qgis.utils.startPlugin("skyprompt")
plugin = qgis.utils.plugins["skyprompt"]
from qgis.core import QgsSettings
QgsSettings().setValue("skyprompt/address", sys.argv[3]); QgsSettings().setValue("skyprompt/token", sys.argv[4])
plugin.action.trigger()
dock = plugin.dock
out["deps_problem"] = dock.deps_problem
out["deps_folder"] = plugin.deps_folder
if not dock.deps_problem:
    deadline = time.time() + 60
    while dock.health_state != "SERVING" and time.time() < deadline:
        app.processEvents(); time.sleep(0.05)
    out["info"] = dock.info.text()
out["health"] = dock.health_state
out["unloaded"] = qgis.utils.unloadPlugin("skyprompt")
print("RESULT " + json.dumps(out))
app.exitQgis()
"""


def test_system_python_loads_the_zip_reports_missing_packages_then_uses_private_ones(live, tmp_path):
    system_python = "/usr/bin/python3"
    if not os.path.exists(system_python):
        pytest.skip("no system Python at /usr/bin/python3")
    plugins = _install(build_zip(tmp_path), tmp_path / "profile")
    config = tmp_path / "qgis-config"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.update(QT_QPA_PLATFORM="offscreen", QGIS_CUSTOM_CONFIG_PATH=str(config), PATH="/usr/bin:/bin")

    def run() -> dict:
        proc = subprocess.run([system_python, "-c", SYSTEM_SCRIPT, str(Path(__file__).parent), str(plugins),
                               live.address, TOKEN], env=env, capture_output=True, text=True, timeout=180)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        assert proc.returncode == 0 and line, proc.stdout + proc.stderr
        return json.loads(line[0][7:])

    first = run()
    assert first["python"] == system_python and not first["venv"] and first["loaded"] and first["unloaded"]
    assert "grpcio" in first["deps_problem"] and first["health"] == "MISSING"
    # the plugin's private folder, as its installer fills it; then the same QGIS Python uses it
    import grpc
    _copy_packages(Path(grpc.__file__).parents[1], Path(first["deps_folder"]))
    second = run()
    assert second["deps_problem"] is None and second["health"] == "SERVING", second
    assert "tiny" in second["info"] and second["unloaded"]


def _hand_made_wheel(folder: Path) -> Path:
    """A real wheel (zip + dist-info) with one module, so pip can install it without a network."""
    path = folder / "skyprompt_probe-1.0-py3-none-any.whl"
    files = {"skyprompt_probe.py": "VALUE = 42\n",
             "skyprompt_probe-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: skyprompt-probe\nVersion: 1.0\n",
             "skyprompt_probe-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                   "Tag: py3-none-any\n"}
    record = "".join(f"{name},,\n" for name in files) + "skyprompt_probe-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
        z.writestr("skyprompt_probe-1.0.dist-info/RECORD", record)
    return path


def test_an_old_grpcio_is_named_as_grpcio_not_protobuf(monkeypatch):
    """The stubs refuse a grpcio older than they were generated for; the panel said protobuf."""
    import grpc

    import plugin.rpc

    monkeypatch.setattr(grpc, "__version__", "1.0.0")
    monkeypatch.delitem(sys.modules, "plugin.rpc.skyprompt_pb2_grpc", raising=False)
    monkeypatch.delattr(plugin.rpc, "skyprompt_pb2_grpc", raising=False)
    problem = deps.missing()
    assert problem.startswith("the installed grpcio is older than the plugin needs") and "1.0.0" in problem


def test_dependency_installer_pip_installs_into_the_private_folder_and_imports(tmp_path, monkeypatch):
    wheel = _hand_made_wheel(tmp_path)
    folder = deps.private_folder(tmp_path / "settings")
    monkeypatch.setattr(sys, "path", list(sys.path))
    lines = []
    deps.install(folder, packages=[str(wheel)], pip_args=["--no-index"], log=lines.append,
                 python="/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable)
    assert sys.path[0] == str(folder) and (folder / "skyprompt_probe.py").is_file()
    import skyprompt_probe
    assert skyprompt_probe.VALUE == 42 and any("pip" in line for line in lines)
    with pytest.raises(deps.DependencyError, match="pip could not install"):
        deps.install(folder, packages=["skyprompt-no-such-package==9"], pip_args=["--no-index"], log=lambda _: None)
    # the requirements follow the stubs' own generator versions
    proto_version = next(line.split(": ")[1] for line in (REPO / "plugin/rpc/skyprompt_pb2.py").read_text()
                         .splitlines() if "Protobuf Python Version" in line)
    assert f"protobuf>={proto_version},<{int(proto_version.split('.')[0]) + 1}" in deps.requirements()


# -- the dock against a live backend --
def test_index_search_results_layer_and_zoom(dock, layers, iface):
    assert run_dock(dock, "health", dock.refresh_health) is None and dock.health_state == "SERVING"
    assert run_dock(dock, "index", dock.index_layers) is None
    assert set(dock.indexed) == {layer.id() for layer in layers}
    dock.query.setText("roads and houses")
    dock.k.setValue(7)
    assert run_dock(dock, "search", dock.search) is None
    result = dock.last_layer
    assert result.name() == "SkyPrompt: roads and houses" and result.featureCount() == 7
    assert run_dock(dock, "search", dock.search) is None          # the same search again: told apart
    assert dock.last_layer.name() == "SkyPrompt: roads and houses (2)"
    assert PluginSettings.load().k == 7
    assert dock.result_list.count() == 7 and not dock.result_list.item(0).icon().isNull()
    scores = [f["score"] for f in result.getFeatures()]
    assert scores == sorted(scores, reverse=True) and result.renderer().type() == "graduatedSymbol"
    by_name = {layer.name(): layer for layer in layers}
    for f in result.getFeatures():
        raster = by_name[f["layer"]]
        geom = QgsGeometry(f.geometry())
        if result.crs() != raster.crs():
            geom.transform(QgsCoordinateTransform(result.crs(), raster.crs(), QgsProject.instance()))
        tolerance = raster.rasterUnitsPerPixelX()
        outer = layer_rect(raster, (0, 0, 1, 1))
        outer.grow(tolerance)
        assert outer.contains(geom.boundingBox())
    before = iface.canvas.extent()
    dock.zoom_to_result(dock.result_list.item(0))
    assert iface.canvas.extent() != before



def test_search_keeps_to_the_ticked_layers_in_a_later_session(dock, layers, iface):
    from qgis.PyQt.QtCore import Qt

    assert run_dock(dock, "index", dock.index_layers) is None
    dock.indexed.clear()                  # as after restarting QGIS: the index remains, this session's ids do not
    keep = layers[0]
    for i in range(dock.layer_list.count()):
        item = dock.layer_list.item(i)
        item.setCheckState(Qt.Checked if item.data(Qt.UserRole) == keep.id() else Qt.Unchecked)
    dock.query.setText("roads and houses")
    dock.k.setValue(50)
    assert run_dock(dock, "search", dock.search) is None
    assert dock.last_layer.featureCount() > 0
    assert {f["layer"] for f in dock.last_layer.getFeatures()} == {keep.name()}
    # none ticked: refused with a message, not the whole index searched
    for i in range(dock.layer_list.count()):
        dock.layer_list.item(i).setCheckState(Qt.Unchecked)
    before, searched = len(iface.message_bar.messages), dock.last_layer
    assert run_dock(dock, "search", dock.search) == "no layer ticked"
    assert dock.last_layer is searched
    assert "tick the layers to search" in " ".join(text or "" for _, text, _ in iface.message_bar.messages[before:])


def test_a_map_view_is_sent_as_an_area_the_backend_can_take(qgis_app, live):
    """A longitude/latitude map zoomed out past the world shows latitudes past 90 degrees, which the
    backend refuses: clipped to the world. A projected view goes as it is, also past its CRS's area
    of use (a layer in the next UTM zone is still in view) or past the globe (an orthographic view
    zoomed out), and the backend takes it."""
    from backend.rpc import skyprompt_pb2 as pb
    from plugin.sources import within_crs_area, wire_extent

    wgs84 = QgsCoordinateReferenceSystem("EPSG:4326")
    clipped = within_crs_area(QgsRectangle(-400, -120, 400, 120), wgs84)
    assert (clipped.xMinimum(), clipped.yMinimum(), clipped.xMaximum(), clipped.yMaximum()) == (-180, -90, 180, 90)
    # panned across 180 degrees, either way: the longitudes past it are kept, not cut off at 180
    for west, east, sent in ((175, 185, (175, 185)), (-185, -175, (175, 185)), (530, 545, (170, 185))):
        across = within_crs_area(QgsRectangle(west, -10, east, 10), wgs84)
        assert (across.xMinimum(), across.xMaximum()) == pytest.approx(sent), (west, east)
        request = pb.SearchRequest(query="fields", k=1, extent=wire_extent(pb, across, wgs84))
        live.stub.Search(request, metadata=live.metadata)          # taken: no error
    assert within_crs_area(QgsRectangle(0, 95, 10, 120), wgs84).isEmpty()     # wholly past the pole
    views = [(QgsRectangle(-6e7, -6e7, 6e7, 6e7), QgsCoordinateReferenceSystem("EPSG:3857")),
             # EPSG:32614's area of use ends at 96 degrees west; this view reaches 93.7
             (QgsRectangle(600000, 5000000, 900000, 5200000), QgsCoordinateReferenceSystem("EPSG:32614")),
             # North Pole orthographic: the corners of this view lie off the globe
             (QgsRectangle(-3e7, -3e7, 3e7, 3e7), QgsCoordinateReferenceSystem("ESRI:102035"))]
    for rect, crs in views:
        assert within_crs_area(rect, crs) == rect
        request = pb.SearchRequest(query="fields", k=1, extent=wire_extent(pb, rect, crs))
        live.stub.Search(request, metadata=live.metadata)          # taken: no error


def test_search_only_in_the_map_view(dock, layers, iface, skyprompt_processing, tmp_path):
    """'Only in the map view' keeps hits to the tiles the map shows; Processing's Extent does the same.
    A view with no indexed tile says so, rather than 'index some layers'."""
    import processing
    from qgis.PyQt.QtCore import Qt

    from plugin import results

    layer = layers[0]
    for i in range(dock.layer_list.count()):
        item = dock.layer_list.item(i)
        item.setCheckState(Qt.Checked if item.data(Qt.UserRole) == layer.id() else Qt.Unchecked)
    assert run_dock(dock, "index", dock.index_layers) is None
    QgsProject.instance().setCrs(layer.crs())
    iface.canvas.setDestinationCrs(layer.crs())
    iface.canvas.setExtent(layer_rect(layer, (0.0, 0.0, 0.3, 0.3)))     # (widened to the map's shape)
    view = QgsGeometry.fromRect(iface.canvas.extent())
    assert not view.contains(QgsGeometry.fromRect(layer.extent()))
    dock.query.setText("roads and houses")
    dock.k.setValue(1000)
    assert run_dock(dock, "search", dock.search) is None
    everywhere = dock.last_layer.featureCount()
    dock.search_in_view.setChecked(True)
    assert run_dock(dock, "search", dock.search) is None
    shown = list(dock.last_layer.getFeatures())
    assert 0 < len(shown) < everywhere
    assert all(f.geometry().intersects(view) for f in shown)
    assert PluginSettings.load().search_in_view          # remembered for the next session
    # Processing: the same area as its Extent
    e = iface.canvas.extent()
    found = QgsVectorLayerFrom(processing.run("skyprompt:searchtiles", {
        "QUERY": "roads and houses", "K": 1000, "LAYERS": [layer],
        "EXTENT": f"{e.xMinimum()},{e.xMaximum()},{e.yMinimum()},{e.yMaximum()} [{layer.crs().authid()}]",
        "OUTPUT": str(tmp_path / "in_view.gpkg")})["OUTPUT"])
    assert {f["tile_id"] for f in found.getFeatures()} == {f["tile_id"] for f in shown}
    # a map turned 30 degrees shows a turned rectangle: the tiles in the box round it but beside it
    # are not in view (they were before: the box was searched)
    iface.canvas.setExtent(layer_rect(layer, (0.1, 0.1, 0.6, 0.6)))
    iface.canvas.setRotation(30.0)
    try:
        turned = results.visible_polygon(iface.canvas.mapSettings())
        box = QgsGeometry.fromRect(iface.canvas.extent())
        assert run_dock(dock, "search", dock.search) is None
        shown = list(dock.last_layer.getFeatures())
        assert shown and all(f.geometry().intersects(turned) for f in shown)
        dock.search_in_view.setChecked(False)
        assert run_dock(dock, "search", dock.search) is None
        beside = [f for f in dock.last_layer.getFeatures()
                  if f.geometry().intersects(box) and not f.geometry().intersects(turned)]
        assert beside and {f["tile_id"] for f in shown} == {f["tile_id"] for f in dock.last_layer.getFeatures()
                                                             if f.geometry().intersects(turned)}
        dock.search_in_view.setChecked(True)
    finally:
        iface.canvas.setRotation(0.0)
    # far from every layer: said so
    far = layer_rect(layer, (0.0, 0.0, 1.0, 1.0))
    far.setXMinimum(far.xMinimum() + 50 * far.width())
    far.setXMaximum(far.xMinimum() + 1000)
    iface.canvas.setExtent(far)
    before = len(iface.message_bar.messages)
    assert run_dock(dock, "search", dock.search) is None
    said = " ".join(text or "" for _, text, _ in iface.message_bar.messages[before:])
    assert "no indexed tile of the layers searched lies in the map view" in said, said
    assert dock.result_list.count() == 0
    # a map with no CRS, or in a local grid: its view cannot be placed, and the panel says so in its own words
    site_grid = QgsCoordinateReferenceSystem.fromWkt(
        'ENGCRS["Site grid",EDATUM["Site"],CS[Cartesian,2],AXIS["x",east,ORDER[1],LENGTHUNIT["metre",1]],'
        'AXIS["y",north,ORDER[2],LENGTHUNIT["metre",1]]]')
    for crs, why, words in ((QgsCoordinateReferenceSystem(), "no_crs", "the map view has no CRS"),
                            (site_grid, "local", "the map view is in Site grid, a CRS with no place on the globe")):
        QgsProject.instance().setCrs(crs)
        iface.canvas.setDestinationCrs(crs)
        before = len(iface.message_bar.messages)
        assert run_dock(dock, "search", dock.search) == f"map view: {why}"
        said = " ".join(text or "" for _, text, _ in iface.message_bar.messages[before:])
        assert words in said and "Extent.crs" not in said and "ENGCRS" not in said, said


def test_processing_extent_typed_with_latitude_first_or_across_180(layers, skyprompt_processing, tmp_path):
    """Processing's Extent, typed: latitudes first (past 90) are pointed out; a west edge east of the
    east edge is across 180 degrees, as the client takes it (QGIS alone would swap the two, and search
    the 340 degrees between)."""
    import processing

    layer = layers[0]
    with pytest.raises(QgsProcessingException, match="were its latitudes given first"):
        processing.run("skyprompt:searchtiles", {"QUERY": "roads", "EXTENT": "10,20,100,110 [EPSG:4326]",
                                                 "OUTPUT": str(tmp_path / "lat_first.gpkg")})
    # Prompt to polygons too (it told the user to pan the map, which Processing has not)
    with pytest.raises(QgsProcessingException, match="Extent lies past the poles: were its latitudes given first"):
        processing.run("skyprompt:prompttopolygons", {"INPUT": layer, "PROMPTS": "roads",
                                                      "EXTENT": "10,20,100,110 [EPSG:4326]",
                                                      "OUTPUT": str(tmp_path / "lat_first_segment.gpkg")})
    processing.run("skyprompt:indexraster", {"INPUT": layer})
    lonlat = QgsCoordinateTransform(layer.crs(), QgsCoordinateReferenceSystem("EPSG:4326"),
                                    QgsProject.instance()).transformBoundingBox(layer.extent())
    south_north = f"{lonlat.yMinimum()},{lonlat.yMaximum()} [EPSG:4326]"
    for west_east, finds in (("170,-170", False), (f"{lonlat.xMinimum()},{lonlat.xMaximum()}", True)):
        feedback = RecordingFeedback()
        found = processing.run("skyprompt:searchtiles", {
            "QUERY": "roads", "K": 1000, "LAYERS": [layer], "OUTPUT": str(tmp_path / f"{finds}.gpkg"),
            "EXTENT": f"{west_east},{south_north}"}, feedback=feedback)["OUTPUT"]
        assert (QgsVectorLayerFrom(found).featureCount() > 0) == finds, west_east
        if not finds:
            assert any("no indexed tile of the layers searched lies in Extent: give an Extent where they are" in w
                       for w in feedback.warnings), feedback.warnings


def test_the_indexed_rasters_window_lists_removes_and_adds_to_the_map(dock, iface, rasters, own_backend,  # noqa: F811
                                                                       monkeypatch):
    """Indexed…: the backend's index as a table (one raster changed on disk since, marked so), Remove
    from index after a question (the files stay; this session forgets the ids), Add to map."""
    import shutil

    from qgis.PyQt.QtCore import QItemSelectionModel
    from qgis.PyQt.QtWidgets import QMessageBox

    _, address = own_backend.start()
    dock.settings.address = address
    kept, edited = rasters["folder"] / "kept_in_index.tif", rasters["folder"] / "edited_in_index.tif"
    gone = rasters["folder"] / "gone_from_disk.tif"
    shutil.copy(rasters["rgb"], kept)
    shutil.copy(rasters["rgba"], edited)
    shutil.copy(rasters["grey16"], gone)
    project = QgsProject.instance()
    for path in (kept, edited, gone):
        project.addMapLayer(QgsRasterLayer(str(path), path.stem))
    try:
        assert run_dock(dock, "index", dock.index_layers) is None
        make_tif(edited, noise((4, 160, 160), seed=79))              # written again after Index
        project.removeMapLayer(project.mapLayersByName("gone_from_disk")[0].id())
        gone.unlink()                                                 # deleted after Index
        assert run_dock(dock, "list", dock.open_index_dialog) is None
        window = dock.index_dialog
        rows = {window.table.item(r, 0).text(): r for r in range(window.table.rowCount())}
        assert set(rows) == {"kept_in_index.tif", "edited_in_index.tif", "gone_from_disk.tif"}
        assert window.table.item(rows["kept_in_index.tif"], 4).text() == "up to date"
        assert window.table.item(rows["edited_in_index.tif"], 4).text().startswith("changed on disk")
        assert window.table.item(rows["gone_from_disk.tif"], 4).text().startswith("moved or deleted")
        assert "(client" not in window.table.item(rows["gone_from_disk.tif"], 4).toolTip()   # the panel's words
        assert "3 raster(s)" in window.summary.text() and "2 not up to date" in window.summary.text()
        window.table.selectRow(rows["gone_from_disk.tif"])
        assert run_dock(dock, "list", dock.list_indexed) is None
        assert window.selected() == []          # a refreshed list may hold other rasters in those rows
        rows = {window.table.item(r, 0).text(): r for r in range(window.table.rowCount())}
        assert not window.remove_button.isEnabled()                   # nothing selected yet
        window.table.selectionModel().select(window.table.model().index(rows["edited_in_index.tif"], 0),
                                             QItemSelectionModel.Select | QItemSelectionModel.Rows)
        assert window.remove_button.isEnabled()
        # answered No: nothing is removed, no task starts
        monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.No)
        window.remove_selected()
        assert dock.running.get("remove", 0) == 0
        monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.Yes)
        edited_id = window.selected()[0].raster_id
        assert run_dock(dock, "remove", window.remove_selected) is None
        wait_until(lambda: window.table.rowCount() == 2, 60, "the list after the removal")
        assert "edited_in_index.tif" not in {window.table.item(r, 0).text() for r in range(2)} and edited.exists()
        assert all(edited_id not in ids for ids in dock.indexed.values())
        # Add to map: the kept raster as a new layer
        window.table.selectRow([window.table.item(r, 0).text() for r in range(2)].index("kept_in_index.tif"))
        before = len(project.mapLayers())
        window.add_selected()
        added = [l for l in project.mapLayers().values() if l.name() == "kept_in_index.tif"]
        assert len(project.mapLayers()) == before + 1 and added and added[0].isValid()
        # another backend address: the list is not that backend's, nor is an answer still on its way
        listed, old = list(window.rasters), dock.settings.address
        dock.list_indexed()
        dock.address.setText("127.0.0.1:1")
        dock._address_edited()
        assert window.table.rowCount() == 0 and "address changed" in window.summary.text()
        wait_until(lambda: dock.running.get("list", 0) == 0, 60, "the listing begun before the change")
        assert window.table.rowCount() == 0
        # and a list of the old backend never removes from the new one (its ids are other rasters there)
        window.show_rasters(listed, old)
        window.table.selectRow(0)
        before = len(iface.message_bar.messages)
        assert run_dock(dock, "remove", window.remove_selected) == "another backend"
        said = " ".join(text or "" for _, text, _ in iface.message_bar.messages[before:])
        assert f"that list is of the backend at {old}" in said and "nothing removed" in said
    finally:
        project.removeAllMapLayers()
        kept.unlink()
        edited.unlink()


def test_index_says_so_while_another_client_indexes_the_same_file(dock, iface, rasters, live):  # noqa: F811
    """The backend indexes one file for one request at a time: Index waiting for another client's
    indexing of the same file says so, rather than sitting at 0%, then finds it indexed."""
    from qgis.PyQt.QtCore import Qt

    from backend.rpc import skyprompt_pb2 as pb

    path = slow_raster(rasters)
    layer = QgsProject.instance().addMapLayer(QgsRasterLayer(str(path), "being indexed elsewhere"))
    dock.tick_none.click()
    dock.layer_list.item(0).setCheckState(Qt.Checked)
    assert dock.checked_layers() == [layer]
    other = live.stub.IndexRaster(pb.IndexRasterRequest(source=pb.RasterSource(path=str(path)), force=True),
                                  metadata=live.metadata, timeout=300)
    next(m for m in other if m.stage == pb.INDEX_STAGE_EMBEDDING and m.tiles_done > 0)
    before = len(iface.message_bar.messages)
    assert run_dock(dock, "index", dock.index_layers) is None
    said = [text for _, text, _ in iface.message_bar.messages[before:]]
    assert any(f"waiting: another request is indexing {path.name}" in (t or "") for t in said), said
    assert list(other)[-1].result.outcome in (pb.INDEX_OUTCOME_INDEXED, pb.INDEX_OUTCOME_REPLACED)
    assert any("1 unchanged" in (t or "") for t in said), said          # found indexed by the other


def test_index_goes_on_past_a_layer_the_backend_refuses(dock, iface, rasters, tmp_path):  # noqa: F811
    """Of several ticked layers, one the backend refuses (here: a file outside its allowed folders)
    is named with the reason, and the others are indexed all the same."""
    import shutil

    from qgis.PyQt.QtCore import Qt

    project = QgsProject.instance()
    outside = tmp_path / "outside_the_roots.tif"
    shutil.copy(rasters["rgb"], outside)
    good = project.addMapLayer(QgsRasterLayer(str(rasters["rgba"]), "allowed"))
    refused = project.addMapLayer(QgsRasterLayer(str(outside), "not allowed"))
    dock.tick_all.click()
    before = len(iface.message_bar.messages)
    assert run_dock(dock, "index", dock.index_layers) is None
    said = [(text or "", level) for _, text, level in iface.message_bar.messages[before:]]
    assert any(t.startswith("indexed 1 layer(s)") for t, _ in said), said
    assert any(t.startswith("'not allowed' not indexed: ") and "outside the allowed roots" in t
               and level == int(Qgis.Warning) for t, level in said), said
    assert good.id() in dock.indexed and refused.id() not in dock.indexed
    # alone, it is the task's error, as before
    dock.tick_none.click()
    dock.layer_list.item([dock.layer_list.item(i).text() for i in range(dock.layer_list.count())]
                         .index("not allowed")).setCheckState(Qt.Checked)
    error = run_dock(dock, "index", dock.index_layers)
    assert error.message.startswith("'not allowed' not indexed: ") and "outside the allowed roots" in error.message


def test_another_backend_gets_none_of_the_last_ones_ids_and_file_layers_go_by_path(dock, layers, iface, rasters,
                                                                                      tmp_path):  # noqa: F811
    """Raster and tile ids are each backend's own: a file layer is searched by its path, and a new
    address forgets this session's ids and the results shown (their tile ids are the old backend's).
    A ticked file layer no backend indexed is named, with what to do, in the panel's words."""
    import shutil

    live_address = dock.settings.address
    assert run_dock(dock, "index", dock.index_layers) is None
    for layer in layers:
        dock.indexed[layer.id()] = {"999999"}        # ids that name nothing, or another raster, here
    dock.query.setText("roads")
    assert run_dock(dock, "search", dock.search) is None
    assert {f["layer"] for f in dock.last_layer.getFeatures()} <= {layer.name() for layer in layers}
    assert dock.result_list.count() > 0
    dock.address.setText("127.0.0.1:1")
    dock.address.editingFinished.emit()
    assert dock.indexed == {} and dock.result_list.count() == 0 and dock.hits == []
    dock.address.setText(live_address)
    dock.address.editingFinished.emit()
    # emptied: the address in use stays, and the field shows it again (it showed "" and called the old one)
    dock.address.setText("  ")
    dock.address.editingFinished.emit()
    assert dock.address.text() == dock.settings.address == PluginSettings.load().address == live_address
    # a file no backend indexed, ticked alone
    fresh = rasters["folder"] / "never_indexed.tif"
    shutil.copy(rasters["rgb"], fresh)
    never = QgsProject.instance().addMapLayer(QgsRasterLayer(str(fresh), "never indexed"))
    try:
        from qgis.PyQt.QtCore import Qt

        for i in range(dock.layer_list.count()):
            item = dock.layer_list.item(i)
            item.setCheckState(Qt.Checked if item.data(Qt.UserRole) == never.id() else Qt.Unchecked)
        before = len(iface.message_bar.messages)
        error = run_dock(dock, "search", dock.search)
        assert error is not None and error.code == "NOT_FOUND"
        said = " ".join(text or "" for _, text, _ in iface.message_bar.messages[before:])
        assert "layer 'never indexed' is not indexed on the backend at" in said and "press Index" in said, said
    finally:
        QgsProject.instance().removeMapLayer(never.id())
        fresh.unlink()


def test_the_local_backend_refuses_tls_and_keeps_the_settings_it_started_with(qgis_app, settings):
    """It serves plaintext: with Use TLS on, every call would fail after it started. The address it
    started at is the one it is checked at, whatever the panel's fields say meanwhile."""
    import dataclasses

    from plugin.local_backend import LocalBackend

    backend, failures, served, found = LocalBackend(), [], [], []
    backend.failed.connect(failures.append)
    backend.serving.connect(served.append)
    backend.already_serving.connect(found.append)
    assert backend.start(dataclasses.replace(settings, use_tls=True)) is False
    assert "Use TLS is on" in failures[0] and "untick it" in failures[0] and not backend.running
    assert backend.start(dataclasses.replace(settings, address="192.0.2.1:50051")) is False   # another machine's
    assert "starts a backend on this machine" in failures[1] and "127.0.0.1:PORT" in failures[1]
    asked = dataclasses.replace(settings)
    # one serves there already: used, and said to be one of its own settings, not started with these
    assert backend.start(asked) is True and found == [settings.address] and served == []
    asked.address = "127.0.0.1:1"                                            # the field edited afterwards
    assert backend.settings is not asked and backend.settings.address == settings.address


def test_settings_the_running_local_backend_started_with_are_said_to_need_a_restart(dock, iface, monkeypatch):
    """The dialog's exec_ stands in for the user changing Device and pressing OK (a modal loop
    cannot run in a test); the rest is the panel's own code."""
    import plugin.dock as dock_module

    def changed_and_ok(dialog):
        dock.settings.device = "cuda"
        return True

    before = len(iface.message_bar.messages)
    with monkeypatch.context() as patched:
        patched.setattr(dock_module.SettingsDialog, "exec_", changed_and_ok)
        patched.setattr(type(dock.backend), "running", property(lambda self: True))   # as if it had started one
        dock.open_settings()
    said = " ".join(text or "" for _, text, _ in iface.message_bar.messages[before:])
    assert "Device changed: stop and start the local backend to use it" in said


def test_the_layers_to_search_follow_the_layers_panel_and_renames(dock, iface, rasters):  # noqa: F811
    from qgis.PyQt.QtCore import Qt

    project = QgsProject.instance()
    first = project.addMapLayer(QgsRasterLayer(str(rasters["rgb"]), "zeta imagery"))
    second = project.addMapLayer(QgsRasterLayer(str(rasters["rgba"]), "alpha imagery"))
    listed = lambda: [dock.layer_list.item(i).text() for i in range(dock.layer_list.count())]  # noqa: E731
    order = [layer.name() for layer in project.layerTreeRoot().layerOrder()]
    assert listed() == order                 # as in the Layers panel, not by id
    dock.layer_list.item(order.index("alpha imagery")).setCheckState(Qt.Unchecked)
    second.setName("wheat fields 2020")
    assert "wheat fields 2020" in listed() and "alpha imagery" not in listed()
    renamed = dock.layer_list.item(listed().index("wheat fields 2020"))
    assert renamed.checkState() == Qt.Unchecked       # its tick kept through the rename
    assert first in dock.checked_layers() and second not in dock.checked_layers()
    # All and None tick and untick every layer listed; Index follows
    dock.tick_none.click()
    assert dock.checked_layers() == [] and not dock.index_button.isEnabled()
    dock.tick_all.click()
    assert len(dock.checked_layers()) == dock.layer_list.count() >= 2 and dock.index_button.isEnabled()
    project.removeAllMapLayers()
    assert dock.layer_list.count() == 0 and not dock.tick_all.isEnabled() and not dock.tick_none.isEnabled()


def test_two_layers_of_one_file_in_other_bands_are_not_indexed_over_each_other(dock, iface, rasters):  # noqa: F811
    from qgis.core import QgsMultiBandColorRenderer
    from qgis.PyQt.QtCore import Qt

    project = QgsProject.instance()
    natural = project.addMapLayer(QgsRasterLayer(str(rasters["rgb"]), "natural"))
    swapped = project.addMapLayer(QgsRasterLayer(str(rasters["rgb"]), "swapped"))
    try:
        swapped.setRenderer(QgsMultiBandColorRenderer(swapped.dataProvider(), 3, 2, 1))
        for i in range(dock.layer_list.count()):
            dock.layer_list.item(i).setCheckState(Qt.Checked)
        before = len(iface.message_bar.messages)
        error = run_dock(dock, "index", dock.index_layers)
        assert error is not None and "show different bands of one file" in str(error)
        said = " ".join(text or "" for _, text, _ in iface.message_bar.messages[before:])
        assert "'natural' and 'swapped'" in said or "'swapped' and 'natural'" in said, said
        swapped.setRenderer(QgsMultiBandColorRenderer(swapped.dataProvider(), 1, 2, 3))    # the same bands: fine
        assert run_dock(dock, "index", dock.index_layers) is None
    finally:
        project.removeMapLayers([natural.id(), swapped.id()])


def test_the_panels_values_and_switches_are_kept_for_the_next_session_as_soon_as_changed(dock, iface, tmp_path):
    from plugin.dock import SkyPromptDock

    dock.k.setValue(9)
    dock.threshold.setValue(0.3)
    dock.min_area.setValue(25.0)
    dock.rotation_views.setChecked(True)
    dock.expand_query.setChecked(True)
    dock.match_captions.setChecked(False)
    dock.follow_edges.setChecked(False)
    saved = PluginSettings.load()        # nothing was run: saved on the change itself
    assert (saved.k, saved.threshold, saved.min_area_m2) == (9, 0.3, 25.0)
    assert (saved.rotation_views, saved.expand_query, saved.match_captions, saved.follow_edges) == \
        (True, True, False, False)
    later = SkyPromptDock(iface, str(tmp_path / "deps2"), iface.mainWindow())     # the next session's panel
    try:
        assert later.k.value() == 9 and later.threshold.value() == 0.3 and later.min_area.value() == 25.0
        assert later.rotation_views.isChecked() and later.expand_query.isChecked()
        assert not later.match_captions.isChecked() and not later.follow_edges.isChecked()
    finally:
        later.shutdown()
        later.deleteLater()


def test_a_backend_that_refuses_the_plugins_token_shows_on_the_light(dock, iface):
    assert run_dock(dock, "health", dock.refresh_health) is None and dock.health_state == "SERVING"
    dock.settings.token = "not-the-token"
    assert run_dock(dock, "health", dock.refresh_health) is None
    assert dock.health_state == "REFUSED" and "refuses this plugin" in dock.light.text()
    assert "fix it in SkyPrompt settings" in dock.info.text() and "token" in dock.info.text()


def test_a_refused_token_is_said_in_the_panels_words(dock, iface):
    """The backend's refusal of a token names the wire's metadata and the command-line client's
    options: the info line and a failed call's message say what to fix in SkyPrompt settings instead."""
    dock.settings.token = "not-the-token"
    assert run_dock(dock, "health", dock.refresh_health) is None and dock.health_state == "REFUSED"
    dock.query.setText("fields")
    before = len(iface.message_bar.messages)
    assert run_dock(dock, "search", dock.search).code == "UNAUTHENTICATED"
    failed = [text for _, text, level in iface.message_bar.messages[before:] if level == int(Qgis.Critical)]
    assert len(failed) == 1, failed
    for said in (dock.info.text(), failed[0]):
        assert "missing or wrong token: fix it in SkyPrompt settings (Token: the one the backend was started with)" \
            in said, said
        assert not any(jargon in said for jargon in ("metadata", "Bearer", "client", "--token")), said


def test_index_with_rotation_views_reaches_the_backend(dock, layers, iface):
    """The dock's "Rotation views" box asks for 4 views per tile: other views than the layers' index
    holds re-index them, the same again does not, and unticked goes back to the backend's default."""
    def index_message():
        before = len(iface.message_bar.messages)
        assert run_dock(dock, "index", dock.index_layers) is None
        return " ".join(text or "" for _, text, _ in iface.message_bar.messages[before:])

    n = len(layers)
    assert "indexed" in index_message()                     # with the backend's default views (or already)
    assert f"({n} unchanged)" in index_message()
    dock.rotation_views.setChecked(True)
    try:
        assert f"({n} replaced)" in index_message()
        assert f"({n} unchanged)" in index_message()
    finally:
        dock.rotation_views.setChecked(False)
    assert f"({n} replaced)" in index_message()

def test_more_like_the_best_hits_expands_the_query(dock, layers, live):
    """The dock's "More like the best hits" box asks for query expansion from operations.EXPAND_TILES
    tiles: its hits are those of the same search over the wire with that expand, and not the plain ones."""
    from backend.rpc import skyprompt_pb2 as pb
    from plugin import operations

    assert run_dock(dock, "index", dock.index_layers) is None
    raster_ids = sorted({rid for layer in layers for rid in dock.indexed[layer.id()]})
    dock.query.setText("roads and houses")
    dock.k.setValue(6)

    def dock_hits():
        assert run_dock(dock, "search", dock.search) is None
        return [(f["score"], f["layer"]) for f in dock.last_layer.getFeatures()]

    def wire_scores(**kw):
        request = pb.SearchRequest(query="roads and houses", k=6, raster_ids=raster_ids, **kw)
        return [h.score for h in live.stub.Search(request, metadata=live.metadata).hits]

    plain = dock_hits()
    expanded = with_checked(dock.expand_query, True, dock_hits)
    assert [s for s, _ in plain] == pytest.approx(wire_scores(), abs=1e-5)
    assert [s for s, _ in expanded] == pytest.approx(wire_scores(expand=operations.EXPAND_TILES), abs=1e-5)
    assert [s for s, _ in expanded] != pytest.approx([s for s, _ in plain], abs=1e-5)


def test_more_like_this_tile_searches_by_the_selected_result(dock, layers):
    """"More like this tile" is off until a result is selected; then it searches for tiles like it,
    which puts that tile first (score 1)."""
    assert run_dock(dock, "index", dock.index_layers) is None
    dock.query.setText("roads and houses")
    dock.k.setValue(5)
    assert run_dock(dock, "search", dock.search) is None
    assert not dock.like_button.isEnabled()
    dock.result_list.setCurrentRow(3)
    assert dock.like_button.isEnabled()
    chosen = dock.hits[3]
    assert run_dock(dock, "search", dock.like_button.click) is None
    # named with its raster, as the list names it: a tile number alone says nothing of where it lies
    listed = dock.result_list.item(3).text().split("\n")[1]
    assert dock.last_layer.name() == f"SkyPrompt: like tile {chosen.tile_id} of {listed}"
    assert listed in {layer.name() for layer in layers}
    assert dock.hits[0].tile_id == chosen.tile_id and dock.hits[0].score == pytest.approx(1.0, abs=1e-3)
    assert not dock.like_button.isEnabled()                       # a new list, nothing selected


def test_results_of_a_backend_restarted_with_another_model_are_cleared(dock, iface, rasters, checkpoint,  # noqa: F811
                                                                     tiny_config, tokenizer, tmp_path):
    """Results name tiles of the index of the backend that found them: "More like this tile" on one
    whose raster was indexed again says so in the panel's words (not the wire's SearchHit.tile_id);
    a health check that finds the backend restarted with another model at the same address clears
    them; and searching a layer indexed with the model before says to press Index, as the Indexed
    window says "indexed with another model"."""
    import torch
    from backend.model import MaMMUT
    from backend.model.checkpoint import save_checkpoint
    from backend.server import Server

    def serve(model: Path, port: int = 0) -> Server:
        server = Server(model, port=port, device="cpu", data_dir=tmp_path / "data", allowed_roots=[rasters["folder"]],
                        token=TOKEN)
        server.start()
        return server

    server = serve(checkpoint)
    try:
        address = dock.settings.address = f"127.0.0.1:{server.port}"
        QgsProject.instance().addMapLayer(QgsRasterLayer(str(rasters["rgb"]), "ortho"))
        assert run_dock(dock, "index", dock.index_layers) is None
        assert run_dock(dock, "health", dock.refresh_health) is None
        dock.query.setText("fields")
        assert run_dock(dock, "search", dock.search) is None and dock.hits
        # indexed again with other settings: its tiles have new ids
        assert with_checked(dock.rotation_views, True, lambda: run_dock(dock, "index", dock.index_layers)) is None
        dock.result_list.setCurrentRow(0)
        error = run_dock(dock, "search", dock.search_like_selected)
        assert error.message == "this result is from before the raster was indexed again: search again"
        assert dock.result_list.count() > 0                                 # the same model still: kept
        assert run_dock(dock, "health", dock.refresh_health) is None and dock.result_list.count() > 0
        # restarted at the same address with another model
        server.stop(grace=1.0)
        torch.manual_seed(7)
        server = serve(save_checkpoint(MaMMUT(tiny_config).eval(), tokenizer, tmp_path / "other"), int(server.port))
        before = len(iface.message_bar.messages)
        assert run_dock(dock, "health", dock.refresh_health) is None and dock.health_state == "SERVING"
        assert not dock.hits and dock.result_list.count() == 0
        said = [text for _, text, _ in iface.message_bar.messages[before:]]
        assert any("now runs another model than the one the results listed came from" in t for t in said), said
        error = run_dock(dock, "search", dock.search)
        assert error.message == (f"layer 'ortho' on the backend at {address} is indexed with another model: "
                                 "press Index, then search")
    finally:
        server.stop(grace=1.0)


def test_search_warns_of_words_the_model_barely_knows(dock, layers, iface):
    """SearchResponse.unfamiliar_words (the test checkpoint's word list has "roads" and "houses", not
    "quarries") becomes a warning in the message bar; a query of familiar words gets none."""
    assert run_dock(dock, "index", dock.index_layers) is None

    def warnings_for(query):
        before = len(iface.message_bar.messages)
        dock.query.setText(query)
        assert run_dock(dock, "search", dock.search) is None
        return [text for _, text, level in iface.message_bar.messages[before:] if level == int(Qgis.Warning)]

    assert warnings_for("roads and houses") == []
    warned = warnings_for("roads and quarries")
    assert len(warned) == 1 and "rarely or never saw 'quarries' in training" in warned[0]
    warned = warnings_for("roads and hoouses")                    # a typing error gets its fix offered
    assert len(warned) == 1 and "'hoouses' (close in spelling: 'houses')" in warned[0]
    # Segment's prompts too, one warning for all of them (over a small part of a layer)
    layer = layers[0]
    QgsProject.instance().setCrs(layer.crs())
    iface.canvas.setDestinationCrs(layer.crs())
    iface.canvas.setExtent(layer_rect(layer, (0.4, 0.4, 0.6, 0.6)))
    dock.area.setCurrentIndex(0)                                  # the canvas extent
    dock.segment_layer.setLayer(layer)
    dock.prompts.setText("roads, quarries, scree")
    dock.threshold.setValue(0.0)                                  # polygons found: no warning of none
    before = len(iface.message_bar.messages)
    assert run_dock(dock, "segment", dock.segment) is None
    warned = [text for _, text, level in iface.message_bar.messages[before:] if level == int(Qgis.Warning)]
    assert len(warned) == 1 and "rarely or never saw 'quarries', 'scree' in training" in warned[0], warned


def test_segment_canvas_extent_in_another_project_crs_lands_on_the_right_ground(dock, layers, iface, tmp_path):
    layer = layers[-1] if HAVE_SHARED else layers[0]           # a layer without transparent parts
    mercator = QgsCoordinateReferenceSystem("EPSG:3857")
    assert layer.crs() != mercator
    QgsProject.instance().setCrs(mercator)
    iface.canvas.setDestinationCrs(mercator)
    wanted = layer_rect(layer, (0.2, 0.25, 0.7, 0.8))                       # in the layer's CRS
    to_map = QgsCoordinateTransform(layer.crs(), mercator, QgsProject.instance())
    iface.canvas.setExtent(to_map.transformBoundingBox(wanted))
    iface.canvas.refresh()
    shown = QgsCoordinateTransform(mercator, layer.crs(), QgsProject.instance()).transformBoundingBox(
        iface.canvas.extent()).intersect(layer.extent())
    dock.segment_layer.setLayer(layer)
    dock.prompts.setText("buildings, trees")
    dock.threshold.setValue(0.0)                         # everything passes: polygons must cover the view
    target = tmp_path / "segments.gpkg"
    kept = ogr.GetDriverByName("GPKG").CreateDataSource(str(target))   # the user's own layer in the file
    kept.CreateLayer("roads", None, ogr.wkbLineString)
    kept = None
    dock.output.setFilePath(str(target))
    # a layer of that name in the project (an earlier run kept in memory) numbers the map layer, not the
    # file's new table (it was "... (2)" in a file that had no table of that name)
    earlier = QgsProject.instance().addMapLayer(QgsVectorLayer("Point?crs=EPSG:4326", "SkyPrompt: buildings, trees",
                                                               "memory"))
    assert run_dock(dock, "segment", dock.segment) is None
    QgsProject.instance().removeMapLayer(earlier.id())
    out = dock.last_layer
    assert out.name() == "SkyPrompt: buildings, trees (2)"
    assert out.providerType() == "ogr" and target.is_file()
    layers_in = lambda: sorted(l.GetName() for l in ogr.Open(str(target)))   # noqa: E731
    assert layers_in() == ["SkyPrompt: buildings, trees", "roads"]
    assert out.crs() == layer.crs() and out.featureCount() >= 2
    assert {f["prompt"] for f in out.getFeatures()} == {"buildings", "trees"}
    union = QgsGeometry.unaryUnion([f.geometry() for f in out.getFeatures() if f["prompt"] == "buildings"])
    pixel = layer.rasterUnitsPerPixelX()
    grown = QgsRectangle(shown)
    grown.grow(2 * pixel)
    assert grown.contains(union.boundingBox())                    # nothing outside the view...
    assert union.area() > 0.9 * shown.area()                      # ...and the view is covered
    assert all(f["area_m2"] > 0 for f in out.getFeatures())
    # again into the same file: a new layer beside the first, which keeps its polygons
    first_count = out.featureCount()
    out.setName("first run")                    # on the map: the next run's layer is then the file's own name
    assert run_dock(dock, "segment", dock.segment) is None
    assert layers_in() == ["SkyPrompt: buildings, trees", "SkyPrompt: buildings, trees (2)", "roads"]
    assert dock.last_layer.name() == "SkyPrompt: buildings, trees (2)" and out.featureCount() == first_count
    # a file that is not a GeoPackage is refused before any work, and left as it was
    other = tmp_path / "notes.gpkg"
    other.write_text("my notes")
    dock.output.setFilePath(str(other))
    before = len(iface.message_bar.messages)
    assert dock.segment() is None and other.read_text() == "my notes"
    assert any("is not a GeoPackage" in text for _, text, _ in iface.message_bar.messages[before:])
    dock.output.setFilePath("")


def test_segment_and_describe_of_a_rotated_map_keep_to_what_it_shows(dock, iface, rasters):  # noqa: F811
    """A rotated map's extent is the box round the turned view (up to twice the ground it shows):
    Segment's polygons are cut to what the map shows, none lies beside it, and the message says the
    box was segmented; Describe, whose request takes a rectangle only, says its caption is of the box."""
    layer = QgsRasterLayer(str(rasters["rgb"]), "ortho")
    QgsProject.instance().addMapLayer(layer)
    mercator = QgsCoordinateReferenceSystem("EPSG:3857")
    iface.canvas.setDestinationCrs(mercator)
    to_map = QgsCoordinateTransform(layer.crs(), mercator, QgsProject.instance())
    iface.canvas.setExtent(to_map.transformBoundingBox(layer_rect(layer, (0.35, 0.35, 0.65, 0.65))))
    iface.canvas.setRotation(30.0)
    try:
        from plugin.results import in_crs, visible_polygon

        view = in_crs(visible_polygon(iface.canvas.mapSettings()), mercator, layer.crs())
        box = to_map.transformBoundingBox(iface.canvas.extent(), QgsCoordinateTransform.ReverseTransform)
        assert box.width() * box.height() > 1.3 * view.area()           # the box holds ground beside the view
        dock.area.setCurrentIndex(0)
        dock.segment_layer.setLayer(layer)
        dock.prompts.setText("fields")
        dock.threshold.setValue(0.0)                                     # everything passes: the area covered
        before = len(iface.message_bar.messages)
        assert run_dock(dock, "segment", dock.segment) is None
        said = [text for _, text, _ in iface.message_bar.messages[before:]]
        assert any("the map is rotated: its box was segmented" in t for t in said), said
        union = QgsGeometry.unaryUnion([f.geometry() for f in dock.last_layer.getFeatures()])
        pixel = layer.rasterUnitsPerPixelX()
        assert view.buffer(pixel, 4).contains(union)                     # nothing beside the view...
        assert union.area() > 0.9 * view.area()                          # ...and the view covered
        assert all(0 < f["area_m2"] < 1.01 * view.area() for f in dock.last_layer.getFeatures())
        dock.describe_layer.setLayer(layer)
        before = len(iface.message_bar.messages)
        assert run_dock(dock, "caption", dock.describe) is None
        said = [text for _, text, _ in iface.message_bar.messages[before:]]
        assert any("the caption is of the box round the view" in t for t in said), said
    finally:
        iface.canvas.setRotation(0.0)
        dock.threshold.setValue(0.5)


def test_drawn_rectangle_and_min_area(dock, layers, iface):
    layer = layers[0]
    iface.canvas.setDestinationCrs(layer.crs())
    iface.canvas.setExtent(layer.extent())
    dock.draw_rectangle()
    assert iface.canvas.mapTool() is dock.extent_tool
    rect = layer_rect(layer, (0.1, 0.1, 0.4, 0.5))
    dock.extent_tool.extentChanged.emit(rect)                     # what dragging on the map emits
    assert dock.area.currentIndex() == 1 and iface.canvas.mapTool() is not dock.extent_tool
    dock.segment_layer.setLayer(layer)
    dock.prompts.setText("fields")
    dock.threshold.setValue(0.0)
    assert run_dock(dock, "segment", dock.segment) is None
    area = sum(f["area_m2"] for f in dock.last_layer.getFeatures())
    assert dock.last_layer.featureCount() >= 1
    assert QgsGeometry.unaryUnion([f.geometry() for f in dock.last_layer.getFeatures()]).boundingBox().width() \
        <= rect.width() + 2 * layer.rasterUnitsPerPixelX()
    dock.min_area.setValue(area * 10)                             # bigger than everything found
    before, last = len(iface.message_bar.messages), dock.last_layer
    assert run_dock(dock, "segment", dock.segment) is None
    assert dock.last_layer is last                                # no empty layer
    # dropped by the backend (the request's min_area_m2), which counts them for the message
    assert any(text.startswith("0 polygon(s) for fields, ") and "smaller than the minimum area dropped: lower "
               "Minimum area to keep them" in text and level == int(Qgis.Warning)
               for _, text, level in iface.message_bar.messages[before:]), iface.message_bar.messages[before:]
    remembered = PluginSettings.load()                             # what the next QGIS session starts with
    assert (remembered.threshold, remembered.min_area_m2) == (0.0, pytest.approx(area * 10))
    dock.min_area.setValue(0.0)
    # edge refinement on (the default) and off: the same area, other relevance inside the polygons
    scores = {}
    for follow in (True, False):
        dock.follow_edges.setChecked(follow)
        assert run_dock(dock, "segment", dock.segment) is None
        scores[follow] = sorted(round(f["score"], 6) for f in dock.last_layer.getFeatures())
    dock.follow_edges.setChecked(True)
    assert scores[True] and scores[False] and scores[True] != scores[False]


def test_a_segment_that_finds_nothing_says_how_near_it_came_and_adds_no_layer(dock, iface, rasters):  # noqa: F811
    """No pixel over the threshold: a warning with each prompt's highest relevance and the advice to
    lower the Threshold, not a success and an empty layer."""
    segment_whole_layer_setup(dock, iface, QgsRasterLayer(str(rasters["rgb"]), "ortho"), "fields, roads")
    dock.threshold.setValue(1.0)
    layers_before = set(QgsProject.instance().mapLayers())
    before = len(iface.message_bar.messages)
    try:
        assert run_dock(dock, "segment", dock.segment) is None
    finally:
        dock.threshold.setValue(0.5)
    assert set(QgsProject.instance().mapLayers()) == layers_before
    said = [(text, level) for _, text, level in iface.message_bar.messages[before:]]
    assert len(said) == 1 and said[0][1] == int(Qgis.Warning), said
    assert re.fullmatch(r"0 polygon\(s\) for fields, roads: no pixel reached the Threshold of 1\.00 \(the highest "
                        r"relevance was 0\.\d\d \(fields\), 0\.\d\d \(roads\)\): lower the Threshold to find some",
                        said[0][0]), said


def test_layer_the_backend_cannot_open_is_sent_as_pixels(dock, iface):
    path = "/vsimem/skyprompt-plugin-test.tif"
    data = noise((3, 120, 160), seed=5)
    ds = gdal.GetDriverByName("GTiff").Create(path, 160, 120, 3, gdal.GDT_Byte)
    ds.SetGeoTransform((300000.0, 2.0, 0.0, 4000000.0, 0.0, -2.0))
    ds.SetProjection(QgsCoordinateReferenceSystem("EPSG:32633").toWkt())
    for i in range(3):
        ds.GetRasterBand(i + 1).WriteArray(data[i])
    ds = None
    layer = QgsRasterLayer(path, "in memory")
    assert layer.isValid()
    QgsProject.instance().addMapLayer(layer)
    iface.canvas.setDestinationCrs(layer.crs())
    iface.canvas.setExtent(layer.extent())
    dock.segment_layer.setLayer(layer)
    dock.describe_layer.setLayer(layer)
    dock.prompts.setText("water")
    dock.threshold.setValue(0.0)
    dock.settings.max_pixel_side = 100                            # smaller than the layer: capped, and said so
    assert run_dock(dock, "segment", dock.segment) is None
    out = dock.last_layer
    assert out.crs() == layer.crs() and out.featureCount() >= 1
    extent = layer.extent()
    extent.grow(4.0)
    assert extent.contains(out.extent())
    assert any("capped at 100 px" in (text or "") for _, text, _ in iface.message_bar.messages)
    assert run_dock(dock, "caption", dock.describe) is None
    assert dock.caption.toPlainText().strip()
    # a view beside the layer: said so at once, no task, no INTERNAL error
    far = layer.extent()
    far.setXMinimum(far.xMaximum() + 1000.0)
    far.setXMaximum(far.xMinimum() + 300.0)
    iface.canvas.setExtent(far)
    before = len(iface.message_bar.messages)
    assert dock.describe() is None
    shown = [text for _, text, _ in iface.message_bar.messages[before:]]
    assert any("does not overlap layer 'in memory'" in t for t in shown) and not any("INTERNAL" in t for t in shown)
    gdal.Unlink(path)


def paletted_tif(path: Path) -> Path:
    """A colour-table GeoTIFF, 40 x 30 px: index 0 green (0, 200, 0) on the left half, 1 blue
    (0, 0, 255) on the right, one pixel of the no-data index 7 at the top left."""
    indices = np.zeros((30, 40), np.uint8)
    indices[:, 20:] = 1
    indices[0, 0] = 7
    make_tif(path, indices, nodata=7)
    ds = gdal.Open(str(path), gdal.GA_Update)
    table = gdal.ColorTable()
    table.SetColorEntry(0, (0, 200, 0, 255))
    table.SetColorEntry(1, (0, 0, 255, 255))
    band = ds.GetRasterBand(1)
    band.SetColorTable(table)
    band.SetColorInterpretation(gdal.GCI_PaletteIndex)
    ds = None
    return path


def test_a_paletted_layer_is_sent_as_its_colours_as_the_backend_reads_the_file(qgis_app, tmp_path):
    """A colour-table raster read as pixels (a file read coarser for a caption, a GeoPackage raster, a
    service) is sent as the palette's colours, not its indices: the backend sees the same image as
    when it opens the file itself."""
    from backend.raster import open_raster, raster_from_pixels
    from plugin.rpc import skyprompt_pb2 as pb
    from plugin.sources import PixelReader

    path = paletted_tif(tmp_path / "paletted.tif")
    layer = QgsRasterLayer(str(path), "paletted")
    assert layer.isValid()
    source, note = PixelReader(layer).read(pb, layer.extent(), 1000)
    pixels = source.pixels
    assert not note and (pixels.width, pixels.height, pixels.band_count, pixels.alpha_band) == (40, 30, 4, 4)
    sent = raster_from_pixels(pixels.data, pixels.width, pixels.height, pixels.band_count, int(pixels.data_type),
                              list(pixels.geotransform), pixels.crs, alpha_band=pixels.alpha_band)
    opened = open_raster(path)
    try:
        rgb, valid = sent.read_window(0, 0, 40, 30)
        file_rgb, file_valid = opened.read_window(0, 0, 40, 30)
    finally:
        sent.close()
        opened.close()
    assert (rgb[:, 5, 5].tolist(), rgb[:, 5, 30].tolist()) == ([0, 200, 0], [0, 0, 255])
    assert not valid[0, 0] and valid.sum() == 40 * 30 - 1
    assert np.array_equal(rgb, file_rgb) and np.array_equal(valid, file_valid)
    # read coarser (the caption's path for a file over its limit), inside the no-data pixel's corner:
    # entries picked, never indices averaged into other colours, and no alpha band when all is valid
    inside = layer_rect(layer, (0.1, 0.0, 0.9, 0.9))
    coarse = PixelReader(layer).read(pb, inside, 16)[0].pixels
    colours = np.frombuffer(coarse.data, np.uint8).reshape(3, coarse.height, coarse.width)
    assert coarse.band_count == 3 and coarse.alpha_band == 0
    assert {tuple(c) for c in colours.reshape(3, -1).T} == {(0, 200, 0), (0, 0, 255)}


def test_a_file_with_no_crs_given_one_in_qgis_is_segmented_there(dock, iface, rasters):  # noqa: F811
    """A georeferenced file with no CRS, to which the user assigned one in QGIS: sent as pixels with
    that CRS (the backend refuses the file itself), so Segment works and lands where QGIS shows it."""
    from plugin.sources import SourceError, prepare_source

    path = rasters["folder"] / "no_crs_utm.tif"          # where the backend may read files
    if not path.exists():
        make_tif(path, noise((3, 60, 80), seed=11), geotransform=(300000.0, 5.0, 0.0, 4000000.0, 0.0, -5.0),
                 crs=None)
    layer = QgsRasterLayer(str(path), "no crs")
    assert layer.isValid() and not layer.crs().isValid()
    # nothing assigned: refused with the advice a QGIS user can follow, as for a layer read as pixels
    with pytest.raises(SourceError, match="has no CRS, so its pixels have no place on the ground: set one in its "
                                          "Layer Properties"):
        prepare_source(layer)
    layer.setCrs(QgsCoordinateReferenceSystem("EPSG:32633"))
    assert_segmented_where_qgis_shows_it(dock, iface, layer)


def test_a_layer_with_no_crs_is_the_same_warning_for_index_segment_and_describe(dock, iface, tmp_path):
    """A layer with no CRS is refused before any call, at one level whichever button was pressed (Index
    said it as critical, Segment and Describe as a warning)."""
    path = make_tif(tmp_path / "scan.tif", noise((3, 40, 40), seed=12), crs=None,
                    geotransform=(300000.0, 5.0, 0.0, 4000000.0, 0.0, -5.0))
    layer = QgsProject.instance().addMapLayer(QgsRasterLayer(str(path), "scan"))
    iface.canvas.setDestinationCrs(QgsCoordinateReferenceSystem())
    iface.canvas.setExtent(layer.extent())
    dock.segment_layer.setLayer(layer)
    dock.describe_layer.setLayer(layer)
    dock.prompts.setText("fields")
    for kind, action in (("index", dock.index_layers), ("segment", dock.segment), ("caption", dock.describe)):
        before = len(iface.message_bar.messages)
        assert "layer 'scan' has no CRS" in str(run_dock(dock, kind, action))
        levels = [level for _, text, level in iface.message_bar.messages[before:] if "has no CRS" in text]
        assert levels == [int(Qgis.Warning)], (kind, levels)


def assert_segmented_where_qgis_shows_it(dock, iface, layer):
    """Segment of the whole layer through the panel: polygons in the layer's CRS, within its extent."""
    segment_whole_layer_setup(dock, iface, layer, prompts="fields")
    dock.threshold.setValue(0.0)
    assert run_dock(dock, "segment", dock.segment) is None
    out = dock.last_layer
    assert out.crs() == layer.crs() and out.featureCount() >= 1
    grown = layer.extent()
    grown.grow(10.0)
    assert grown.contains(out.extent()), (out.extent().toString(), layer.extent().toString())


def test_a_file_whose_crs_was_overridden_in_qgis_is_segmented_in_that_crs(dock, iface, rasters):  # noqa: F811
    """A file with a wrong CRS of its own, which the user overrode in QGIS (Layer Properties > Source):
    sent as pixels with the layer's CRS, so Segment lands where QGIS shows it; unchanged, it goes by path."""
    from plugin.sources import prepare_source

    path = rasters["folder"] / "wrong_crs_utm.tif"       # where the backend may read files
    if not path.exists():
        make_tif(path, noise((3, 60, 80), seed=12), geotransform=(500000.0, 5.0, 0.0, 5000000.0, 0.0, -5.0),
                 crs="EPSG:32633")
    layer = QgsRasterLayer(str(path), "wrong crs")
    assert layer.isValid() and layer.crs().authid() == "EPSG:32633"
    assert prepare_source(layer) == str(path)        # the file's own CRS: by path, at full resolution
    layer.setCrs(QgsCoordinateReferenceSystem("EPSG:32634"))
    assert not isinstance(prepare_source(layer), str)
    assert_segmented_where_qgis_shows_it(dock, iface, layer)
    assert dock.last_layer.crs().authid() == "EPSG:32634"


def test_a_layer_read_error_in_a_task_is_the_users_to_fix_not_internal(settings):
    from plugin.sources import SourceError
    from plugin.tasks import BackendTask, start

    def work(conn, task):
        raise SourceError("the requested area does not overlap layer 'x'")

    got, keep = [], set()
    start(BackendTask("read", settings, work, lambda result, error: got.append(error)), keep)
    wait_until(lambda: got, 30, "the task to end")
    assert got[0].code == "INVALID_ARGUMENT" and "does not overlap layer 'x'" in got[0].message


def test_backend_down_gives_a_clear_message_without_hanging(dock, layers, iface):
    from backend.server import free_port

    dock.settings.address = f"127.0.0.1:{free_port()}"
    dock.query.setText("roads")
    started = time.monotonic()
    error = run_dock(dock, "search", dock.search, timeout=30)
    assert error is not None and error.code == "UNAVAILABLE" and time.monotonic() - started < 30
    failed = [text or "" for _, text, _ in iface.message_bar.messages if "no SkyPrompt backend answers" in (text or "")]
    # the bar's title is SkyPrompt already: the text does not say it again
    assert failed and not [t for t in failed if t.startswith("SkyPrompt")], failed
    assert run_dock(dock, "health", dock.refresh_health) is None and dock.health_state == "UNREACHABLE"
    assert "no backend" in dock.light.text()          # in words, not by colour alone


# -- the panel as a user sees it --
def test_the_panel_fits_a_narrow_dock_and_says_its_state_in_words(dock, iface):
    from qgis.PyQt.QtCore import Qt

    # QGIS docks are often ~300 px wide, and narrower on a laptop: no row or tab may force the panel wider
    assert dock.widget().minimumSizeHint().width() <= 260, dock.widget().minimumSizeHint()
    assert run_dock(dock, "health", dock.refresh_health) is None and "serving" in dock.light.text()
    iface.addDockWidget(Qt.RightDockWidgetArea, dock)
    iface.main_window.resizeDocks([dock], [260], Qt.Horizontal)
    dock.tabs.setCurrentIndex(1)
    QgsApplication.processEvents()
    for w in (dock.area, dock.draw_button, dock.min_area, dock.follow_edges, dock.segment_button):
        assert w.width() >= w.minimumSizeHint().width(), (w, w.width(), w.minimumSizeHint())


def test_index_segment_describe_are_off_without_a_raster_layer(dock, rasters):  # noqa: F811
    from qgis.core import QgsVectorLayer
    from qgis.PyQt.QtCore import Qt

    project = QgsProject.instance()
    buttons = (dock.index_button, dock.segment_button, dock.describe_button)
    project.addMapLayer(QgsVectorLayer("Polygon?crs=EPSG:4326", "fields", "memory"))   # not a raster
    assert not any(b.isEnabled() for b in buttons)
    assert "No raster layers" in dock.layers_label.text()
    raster = QgsRasterLayer(str(rasters["rgb"]), "rgb")
    project.addMapLayer(raster)
    assert all(b.isEnabled() for b in buttons) and dock.layers_label.text() == "Raster layers to search"
    dock.layer_list.item(0).setCheckState(Qt.Unchecked)       # nothing ticked: nothing to index
    assert not dock.index_button.isEnabled() and dock.segment_button.isEnabled()
    dock.layer_list.item(0).setCheckState(Qt.Checked)
    assert dock.index_button.isEnabled()
    project.removeMapLayer(raster.id())
    assert not any(b.isEnabled() for b in buttons)


def test_work_without_a_percentage_shows_a_moving_bar_not_zero(dock, layers, iface):
    iface.canvas.setDestinationCrs(layers[0].crs())
    iface.canvas.setExtent(layers[0].extent())
    dock.describe_layer.setLayer(layers[0])
    got = []
    dock.taskDone.connect(lambda kind, error: got.append(error) if kind == "caption" else None)
    assert dock.describe() is not None
    # a caption reports no progress: the bar moves until the answer, instead of standing at 0%
    assert not dock.progress.isHidden() and dock.progress.maximum() == 0
    # a second press would start a second task: the button waits for the first
    assert not dock.describe_button.isEnabled() and "Running" in dock.describe_button.toolTip()
    assert dock.segment_button.isEnabled()
    wait_until(lambda: got, 120, "the caption")
    assert got == [None] and dock.progress.isHidden() and dock.progress.maximum() == 100
    assert dock.describe_button.isEnabled() and dock.running == {"caption": 0}
    assert dock.caption.toPlainText()


def test_controls_whose_use_is_not_obvious_have_tooltips(dock, iface, rasters):  # noqa: F811
    """The numbers, fields and buttons whose effect the label does not tell say it in a tooltip (the
    Segment and Describe buttons too once they are on), and a result's tooltip says what its score is
    made of: a score past 1 is the keyword match added to the cosine similarity."""
    from plugin.dock import SettingsDialog
    from plugin.rpc import skyprompt_pb2 as pb

    QgsProject.instance().addMapLayer(QgsRasterLayer(str(rasters["rgb"]), "ortho"))
    assert dock.segment_button.isEnabled() and dock.describe_button.isEnabled()
    settings = SettingsDialog(dock.settings, dock)
    for control in (dock.k, dock.threshold, dock.min_area, dock.area, dock.prompts, dock.start_button,
                    dock.check_button, dock.segment_button, dock.describe_button, settings.token, settings.device,
                    settings.max_side):
        assert control.toolTip(), control
    assert "commas, semicolons or line breaks" in dock.prompts.toolTip()
    settings.deleteLater()
    square = "POLYGON((0 0,1 0,1 1,0 1,0 0))"
    hits = [pb.SearchHit(score=1.25, keyword_score=0.5, tile_id=1, raster_name="a.tif", crs=pb.Crs(authid="EPSG:4326"),
                         footprint_wkt=square, footprint_wgs84_wkt=square),
            pb.SearchHit(score=0.5, tile_id=2, raster_name="a.tif", crs=pb.Crs(authid="EPSG:4326"),
                         footprint_wkt=square, footprint_wgs84_wkt=square)]
    dock.show_hits("roads", hits, {})
    assert ("score 1.250 = 0.750 for how like the query the tile is (cosine similarity, at most 1) + 0.500 for "
            "the query's words in its caption ('Match tile captions'), which can take it past 1") \
        in dock.result_list.item(0).toolTip()
    assert "cosine similarity, at most 1" in dock.result_list.item(1).toolTip()


def test_settings_ca_file_is_editable_only_with_tls(qgis_app):
    from plugin.dock import SettingsDialog

    dialog = SettingsDialog(PluginSettings())
    assert not dialog.use_tls.isChecked() and not dialog.tls_ca.isEnabled()    # read only over TLS
    dialog.use_tls.setChecked(True)
    assert dialog.tls_ca.isEnabled()
    dialog.deleteLater()


# -- Processing --
def test_processing_numbers_have_the_panels_defaults_and_ranges(qgis_app):
    """K, Threshold and Minimum area of the algorithms offer what the panel's fields do
    (PluginSettings' defaults and RANGES); Minimum area is open above, for scripts."""
    from qgis.core import QgsProcessingParameterNumber
    from plugin.processing_provider import SkyPromptProvider

    provider = SkyPromptProvider()
    QgsApplication.processingRegistry().addProvider(provider)
    try:
        integer, double = QgsProcessingParameterNumber.Integer, QgsProcessingParameterNumber.Double
        for algorithm, name, setting, kind in (("searchtiles", "K", "k", integer),
                                               ("prompttopolygons", "THRESHOLD", "threshold", double),
                                               ("prompttopolygons", "MIN_AREA", "min_area_m2", double)):
            parameter = provider.algorithm(algorithm).parameterDefinition(name)
            default, (low, high) = getattr(PluginSettings(), setting), PluginSettings.RANGES[setting]
            assert (parameter.dataType(), parameter.defaultValue(), parameter.minimum()) == (kind, default, low), name
            if name == "MIN_AREA":
                assert parameter.maximum() > high
            else:
                assert parameter.maximum() == high, name
    finally:
        QgsApplication.processingRegistry().removeProvider(provider)


def test_processing_help_names_parameters_by_their_labels_and_lists_what_is_written(qgis_app):
    """Each algorithm's help names the parameters it speaks of by their labels (Index raster said
    "Force", Search "Layers" and "Like tile") and lists its outputs: Index raster's values, and the
    attributes Search tiles by text and Prompt to polygons write."""
    import re

    from plugin import results
    from plugin.processing_provider import SkyPromptProvider

    provider = SkyPromptProvider()
    QgsApplication.processingRegistry().addProvider(provider)
    try:
        index, search, segment = (provider.algorithm(name) for name in ("indexraster", "searchtiles",
                                                                         "prompttopolygons"))
        for algorithm, name in ((index, "FORCE"), (search, "LAYERS"), (search, "EXTENT")):
            assert algorithm.parameterDefinition(name).description() in algorithm.shortHelpString(), name
        label = search.parameterDefinition("LIKE_TILE").description()
        assert label.split(" instead")[0] in search.shortHelpString()
        assert "Force" not in index.shortHelpString() and "with Layers" not in search.shortHelpString()
        written = ((index, [output.name() for output in index.outputDefinitions()]),
                   (search, results.search_fields().names()), (segment, results.segment_fields().names()))
        for algorithm, names in written:
            missing = [n for n in names if not re.search(rf"\b{n}\b", algorithm.shortHelpString())]
            assert not missing, (algorithm.name(), missing)
    finally:
        QgsApplication.processingRegistry().removeProvider(provider)


def test_processing_algorithms(qgis_processing, settings, layers, live, tmp_path):
    import processing
    from qgis.core import QgsProcessingException
    from plugin.processing_provider import VIEW_CHOICES, SkyPromptProvider

    provider = SkyPromptProvider()
    QgsApplication.processingRegistry().addProvider(provider)
    try:
        layer = layers[0]
        indexed = processing.run("skyprompt:indexraster", {"INPUT": layer, "FORCE": False})
        assert indexed["TILE_COUNT"] > 0 and indexed["RASTER_ID"] and indexed["OUTCOME"] in ("indexed", "unchanged")
        # views per tile reach the backend: other views re-index, the same views again do not
        four = [v for v, _ in VIEW_CHOICES].index(4)
        again = processing.run("skyprompt:indexraster", {"INPUT": layer, "VIEWS": four})
        assert again["OUTCOME"] == "replaced" and again["TILE_COUNT"] == indexed["TILE_COUNT"]
        assert processing.run("skyprompt:indexraster", {"INPUT": layer, "VIEWS": four})["OUTCOME"] == "unchanged"
        assert processing.run("skyprompt:indexraster", {"INPUT": layer})["OUTCOME"] == "replaced"
        # file outputs: a memory layer handed back by processing.run outlives QGIS's exit and crashes it
        found = QgsVectorLayerFrom(processing.run("skyprompt:searchtiles", {
            "QUERY": "farmland", "K": 4, "LAYERS": [layer], "OUTPUT": str(tmp_path / "tiles.gpkg")})["OUTPUT"])
        assert found.featureCount() == 4 and {f["layer"] for f in found.getFeatures()} == {layer.name()}
        assert all(f["caption"] for f in found.getFeatures())      # what the model wrote for each tile
        # query expansion reaches the backend: it changes the scores, and one above the limit is refused
        expanded = QgsVectorLayerFrom(processing.run("skyprompt:searchtiles", {
            "QUERY": "farmland", "K": 4, "LAYERS": [layer], "EXPAND": 2, "OUTPUT": str(tmp_path / "x.gpkg")})["OUTPUT"])
        assert expanded.featureCount() == 4
        assert [f["score"] for f in expanded.getFeatures()] != pytest.approx([f["score"] for f in found.getFeatures()])
        # words the model barely knows come back as a warning of the run
        from qgis.core import QgsProcessingFeedback

        class Warnings(QgsProcessingFeedback):
            def __init__(self):
                super().__init__()
                self.seen, self.warnings = [], []

            def pushWarning(self, text):  # noqa: N802 - QGIS API
                self.seen.append(text)
                self.warnings.append(text)

            def pushInfo(self, text):  # noqa: N802 - QGIS API
                self.seen.append(text)

        feedback = Warnings()
        processing.run("skyprompt:searchtiles", {"QUERY": "quarries", "K": 2, "LAYERS": [layer],
                                                 "OUTPUT": str(tmp_path / "q.gpkg")}, feedback=feedback)
        assert any("rarely or never saw 'quarries'" in w for w in feedback.seen), feedback.seen
        # a layer read as pixels cannot restrict the search: named, never widened to the whole index
        ds = gdal.GetDriverByName("GTiff").Create("/vsimem/skyprompt-search.tif", 64, 64, 3, gdal.GDT_Byte)
        ds.SetGeoTransform((300000.0, 2.0, 0.0, 4000000.0, 0.0, -2.0))
        ds.SetProjection(QgsCoordinateReferenceSystem("EPSG:32633").toWkt())
        ds = None
        # in the project while used, removed after (see the del at the end)
        in_memory = QgsProject.instance().addMapLayer(QgsRasterLayer("/vsimem/skyprompt-search.tif", "in memory"))
        with pytest.raises(QgsProcessingException, match="cannot search only in in memory"):
            processing.run("skyprompt:searchtiles", {"QUERY": "farmland", "LAYERS": [in_memory],
                                                     "OUTPUT": str(tmp_path / "m.gpkg")})
        mixed_feedback = Warnings()
        mixed = QgsVectorLayerFrom(processing.run("skyprompt:searchtiles", {
            "QUERY": "farmland", "K": 4, "LAYERS": [layer, in_memory], "OUTPUT": str(tmp_path / "mixed.gpkg")},
            feedback=mixed_feedback)["OUTPUT"])
        assert {f["layer"] for f in mixed.getFeatures()} == {layer.name()}
        assert any("not searched: in memory" in w for w in mixed_feedback.seen), mixed_feedback.seen
        QgsProject.instance().removeMapLayer(in_memory.id())
        gdal.Unlink("/vsimem/skyprompt-search.tif")
        # tiles like a tile: that tile first, with score 1
        tile = next(found.getFeatures())["tile_id"]
        like = QgsVectorLayerFrom(processing.run("skyprompt:searchtiles", {
            "LIKE_TILE": tile, "K": 3, "LAYERS": [layer], "OUTPUT": str(tmp_path / "like.gpkg")})["OUTPUT"])
        best = next(like.getFeatures())
        assert best["tile_id"] == tile and best["score"] == pytest.approx(1.0, abs=1e-3)
        with pytest.raises(QgsProcessingException, match="not both"):
            processing.run("skyprompt:searchtiles", {"QUERY": "farmland", "LIKE_TILE": tile,
                                                     "OUTPUT": str(tmp_path / "z.gpkg")})
        with pytest.raises(QgsProcessingException, match="expand 5000"):
            processing.run("skyprompt:searchtiles", {"QUERY": "farmland", "LAYERS": [layer], "EXPAND": 5000,
                                                     "OUTPUT": str(tmp_path / "y.gpkg")})
        tiles = QgsProject.instance().addMapLayer(make_xyz_layer(tmp_path))
        with pytest.raises(QgsProcessingException, match="is a tile service"):    # not the world at 2048 px
            processing.run("skyprompt:indexraster", {"INPUT": tiles})
        QgsProject.instance().removeMapLayer(tiles.id())
        e = layer_rect(layer, (0.3, 0.3, 0.6, 0.6))
        extent = f"{e.xMinimum()},{e.xMaximum()},{e.yMinimum()},{e.yMaximum()} [{layer.crs().authid()}]"
        out_path = str(tmp_path / "polygons.gpkg")
        feedback = Warnings()
        polygons = processing.run("skyprompt:prompttopolygons", {
            "INPUT": layer, "PROMPTS": "houses, water", "EXTENT": extent, "THRESHOLD": 0.0, "MIN_AREA": 0.0,
            "OUTPUT": out_path}, feedback=feedback)["OUTPUT"]
        assert [w for w in feedback.seen if "rarely or never saw" in w] == [
            "the model rarely or never saw 'water' in training and can hardly follow it; other words for the same "
            "thing may work better"]
        result = QgsVectorLayerFrom(polygons)
        assert result.featureCount() >= 2 and result.crs() == layer.crs()
        grown = QgsRectangle(e)
        grown.grow(2 * layer.rasterUnitsPerPixelX())
        assert grown.contains(result.extent())
        # the minimum area (m² of ground) goes to the backend, which drops and counts what is smaller
        found_m2 = sum(f["area_m2"] for f in result.getFeatures())
        feedback = Warnings()
        small = QgsVectorLayerFrom(processing.run("skyprompt:prompttopolygons", {
            "INPUT": layer, "PROMPTS": "houses, water", "EXTENT": extent, "THRESHOLD": 0.0,
            "MIN_AREA": 10 * found_m2, "OUTPUT": str(tmp_path / "none_big_enough.gpkg")}, feedback=feedback)["OUTPUT"])
        assert small.featureCount() == 0
        # no polygon is a warning that says why and what to change, in the algorithm's parameter names
        assert any(w.startswith("0 polygon(s) for houses, water, ") and "smaller than the minimum area dropped: "
                   "lower Minimum area" in w for w in feedback.warnings), feedback.seen
        feedback = Warnings()
        none_above = QgsVectorLayerFrom(processing.run("skyprompt:prompttopolygons", {
            "INPUT": layer, "PROMPTS": "houses", "EXTENT": extent, "THRESHOLD": 1.0, "MIN_AREA": 0.0,
            "OUTPUT": str(tmp_path / "none_above.gpkg")}, feedback=feedback)["OUTPUT"])
        assert none_above.featureCount() == 0
        assert any(re.fullmatch(r"0 polygon\(s\) for houses: no pixel reached the Threshold of 1\.00 \(the highest "
                                r"relevance was 0\.\d\d\): lower the Threshold to find some", w)
                   for w in feedback.warnings), feedback.seen
        del small, none_above
        # the edge refinement radius reaches the backend: one above its limit is refused by name
        with pytest.raises(QgsProcessingException, match="edge_radius 5000"):
            processing.run("skyprompt:prompttopolygons", {"INPUT": layer, "PROMPTS": "houses", "EXTENT": extent,
                                                          "EDGE_RADIUS": 5000, "OUTPUT": str(tmp_path / "e.gpkg")})
        # the traceback pytest keeps from raises() holds this frame: layers alive in it would be
        # destroyed after QGIS's exit, which crashes Python's teardown
        del found, expanded, like, best, result, mixed, in_memory, tiles
        with pytest.raises(QgsProcessingException, match="no SkyPrompt backend answers"):
            from backend.server import free_port
            processing.run("skyprompt:searchtiles", {"QUERY": "farmland", "SERVER": f"127.0.0.1:{free_port()}",
                                                     "OUTPUT": str(tmp_path / "none.gpkg")})
    finally:
        QgsApplication.processingRegistry().removeProvider(provider)


def QgsVectorLayerFrom(source):  # noqa: N802
    from qgis.core import QgsVectorLayer

    return source if isinstance(source, QgsVectorLayer) else QgsVectorLayer(source, "out", "ogr")


# -- the local backend launcher --
def test_start_local_backend_then_unload_stops_it(iface, checkpoint, tmp_path, monkeypatch):  # noqa: F811
    from backend.server import free_port
    from plugin.plugin import SkyPromptPlugin

    s = PluginSettings.load()
    s.address, s.token = f"127.0.0.1:{free_port()}", ""
    s.python, s.backend_dir, s.checkpoint, s.device = sys.executable, str(REPO), str(checkpoint), "cpu"
    s.save()
    monkeypatch.setenv("SKYPROMPT_DATA_DIR", str(tmp_path / "data"))
    plugin = SkyPromptPlugin(iface)
    plugin.initGui()
    try:
        plugin.show_dock(True)
        dock = plugin.dock
        dock.toggle_backend()
        wait_until(lambda: dock.health_state == "SERVING", 180, "the local backend to serve")
        process = dock.backend.process
        assert dock.backend.running and dock.start_button.text() == "Stop local backend"
        pid = process.processId()
        assert pid > 0 and Path(f"/proc/{pid}").exists()
        # it watches QGIS's process, so a QGIS killed without unloading leaves no backend on the port
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert f"SKYPROMPT_PARENT_PID={os.getpid()}".encode() in environ
        logged = []

        def log(text, tag, level):
            logged.append(text)

        QgsApplication.messageLog().messageReceived.connect(log)
    finally:
        plugin.unload()
        QgsSettings().remove("skyprompt")
    QgsApplication.messageLog().messageReceived.disconnect(log)
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    # stopped by closing its standard input, the way that works on every OS, and cleanly: not killed
    assert any("standard input closed: shutting down" in line for line in logged), logged[-5:]
    assert process.exitStatus() == process.NormalExit and process.exitCode() == 0


def test_local_backend_with_a_wrong_python_fails_clearly(dock, iface):
    from backend.server import free_port

    dock.settings.address = f"127.0.0.1:{free_port()}"
    dock.settings.python = "/nonexistent/python3"
    failures = []
    dock.backend.failed.connect(failures.append)
    dock.toggle_backend()
    wait_until(lambda: failures, 30, "the launcher to give up")
    assert "could not run" in failures[0] and not dock.backend.running
    # the button is usable again, not stuck at "Cancel start"
    wait_until(lambda: dock.start_button.isEnabled(), 5, "the start button to come back")
    assert dock.start_button.text() == "Start local backend"


def test_local_backend_with_an_unreadable_ca_file_fails_clearly(dock, iface, tmp_path):
    from backend.server import free_port

    address, use_tls, tls_ca = dock.settings.address, dock.settings.use_tls, dock.settings.tls_ca
    dock.settings.address = f"127.0.0.1:{free_port()}"
    dock.settings.use_tls, dock.settings.tls_ca = True, str(tmp_path / "missing-ca.pem")
    failures = []
    dock.backend.failed.connect(failures.append)
    try:
        dock.toggle_backend()                                      # no exception reaches QGIS
        assert failures and "missing-ca.pem" in failures[0] and not dock.backend.running
        assert failures[0].count("fix it in SkyPrompt settings") == 1
        assert dock.start_button.isEnabled() and dock.start_button.text() == "Start local backend"
    finally:
        dock.settings.address, dock.settings.use_tls, dock.settings.tls_ca = address, use_tls, tls_ca


def _use_local_backend(dock, python: str, folder, checkpoint_dir=None) -> list[str]:  # noqa: F811
    """Point the dock's launcher at a free port and this command; the failures it reports, as a list."""
    from backend.server import free_port

    dock.settings.address, dock.settings.token = f"127.0.0.1:{free_port()}", ""
    dock.settings.python, dock.settings.backend_dir, dock.settings.device = python, str(folder), "cpu"
    dock.settings.checkpoint = str(checkpoint_dir or "")
    failures = []
    dock.backend.failed.connect(failures.append)
    return failures


def _listens(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def test_local_backend_that_dies_while_serving_is_reported_and_starts_again(dock, iface, checkpoint, tmp_path,  # noqa: F811
                                                                            monkeypatch):
    import signal

    monkeypatch.setenv("SKYPROMPT_DATA_DIR", str(tmp_path / "data"))
    failures = _use_local_backend(dock, sys.executable, REPO, checkpoint)
    stops = []
    dock.backend.stopped.connect(lambda: stops.append(1))
    dock.start_button.click()
    wait_until(lambda: dock.health_state == "SERVING", 180, "the local backend to serve")
    pid = dock.backend.process.processId()
    os.kill(pid, signal.SIGKILL)            # out of memory, or killed from a terminal
    wait_until(lambda: failures, 10, "the panel to notice")
    assert "crashed while serving" in failures[0] and "Start local backend" in failures[0], failures
    assert any("crashed while serving" in text for _, text, _ in iface.message_bar.messages)
    assert not dock.backend.running and dock.start_button.text() == "Start local backend" and stops == [1]
    wait_until(lambda: dock.health_state == "UNREACHABLE", 10, "the light to say no backend answers")
    dock.start_button.click()               # and it starts again
    wait_until(lambda: dock.health_state == "SERVING", 180, "the local backend to serve again")
    pid = dock.backend.process.processId()
    dock.start_button.click()               # a stop the user asked for is no failure, and says so once
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    assert len(failures) == 1 and stops == [1, 1] and dock.start_button.text() == "Start local backend"


def test_local_backend_failures_name_the_setting_to_change(dock, iface, checkpoint, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("SKYPROMPT_DATA_DIR", str(tmp_path / "data"))
    no_site = f"{sys.executable} -S"        # a Python without the backend's packages (no site-packages)

    def start_and_fail(python, folder, checkpoint_dir=None) -> str:
        failures = _use_local_backend(dock, python, folder, checkpoint_dir)
        dock.start_button.click()
        wait_until(lambda: failures, 180, "the launcher to give up")
        wait_until(lambda: not dock.backend.running, 5, "the launcher to stop")
        return failures[0]

    # the default settings' folder: one without backend/
    assert "set Backend folder" in start_and_fail(no_site, tmp_path)
    assert "set Backend Python" in start_and_fail(no_site, REPO)
    # a backend from before serve --stop-on-stdin-close: its argparse refuses the option
    older = tmp_path / "older"
    (older / "backend").mkdir(parents=True)
    (older / "backend" / "__init__.py").write_text("")
    (older / "backend" / "__main__.py").write_text(
        "import argparse\nparser = argparse.ArgumentParser(prog='skyprompt')\ncommands = parser.add_subparsers()\n"
        "serve = commands.add_parser('serve')\nfor name in ('--host', '--port', '--device', '--checkpoint'):\n"
        "    serve.add_argument(name)\nparser.parse_args()\n")
    assert "older than this plugin" in start_and_fail(sys.executable, older)
    # a checkpoint folder that is not there: the setting, not the command-line option, is named
    assert "set Checkpoint in SkyPrompt settings" in start_and_fail(sys.executable, REPO, tmp_path / "no_such_ckpt")
    # another program holds the port
    with_port = _use_local_backend(dock, sys.executable, REPO, checkpoint)
    port = dock.settings.port
    other = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: _listens(port), 10, "the other program to listen")
        dock.start_button.click()
        wait_until(lambda: with_port, 180, "the launcher to give up")
        assert "port is in use" in with_port[0] and "address field" in with_port[0], with_port
        assert not dock.backend.running and dock.start_button.text() == "Start local backend"
    finally:
        other.kill()
        other.wait()


def test_local_backend_settings_with_a_tilde_and_the_advice_for_device_and_data_folder(dock, tmp_path, monkeypatch):
    """QProcess runs no shell: '~' in Backend Python or Checkpoint named no file. A device the
    machine lacks names the Device setting, not the backend's --device; the data folder advice
    names every place the backend looks, in its order."""
    from plugin.local_backend import LocalBackend
    from plugin.settings import PluginSettings

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "venvpy").symlink_to(sys.executable)
    program, args = LocalBackend.command(dock.backend, PluginSettings(python="~/venvpy", checkpoint="~/ckpt"))
    assert program == str(tmp_path / "venvpy") and args[args.index("--checkpoint") + 1] == str(tmp_path / "ckpt")
    program, args = LocalBackend.command(dock.backend, PluginSettings(python="~/bin/python -X utf8"))
    assert program == str(tmp_path / "bin" / "python") and args[:2] == ["-X", "utf8"]
    # an unmatched quote: a message naming the setting, where shlex's ValueError was a traceback that
    # left the button reading "Cancel start"
    failures = []
    dock.backend.failed.connect(failures.append)
    try:
        assert dock.backend.start(PluginSettings(python='python3 -X "utf8')) is False
    finally:
        dock.backend.failed.disconnect(failures.append)
    assert "Backend Python" in failures[0] and "no closing quotation" in failures[0] and not dock.backend.running
    backend = dock.backend
    monkeypatch.setattr(backend, "_log_tail", [
        "skyprompt serve: device 'cuda:7' asked for, but this machine (or this torch build) has no CUDA GPU; use "
        "--device cpu"])
    assert backend._why().endswith("; set Device in SkyPrompt settings (auto, cpu, or cuda:N for a GPU this "
                                   "machine has)")
    backend._log_tail = ["skyprompt serve: cannot use /ro/skyprompt/index: Permission denied; give a writable "
                         "folder (--data-dir)"]
    assert "$SKYPROMPT_DATA_DIR, else $XDG_DATA_HOME/skyprompt, else ~/.local/share/skyprompt" in backend._why()


def test_local_backend_refuses_an_address_with_no_port(dock, iface, tmp_path):
    failures = _use_local_backend(dock, sys.executable, REPO)
    dock.settings.address = "127.0.0.1"     # the backend would serve on 50051; the checks would ask port 443
    dock.start_button.click()
    assert failures and "has no port" in failures[0] and "HOST:PORT" in failures[0], failures
    assert not dock.backend.running and dock.start_button.text() == "Start local backend"


def test_a_start_that_does_not_serve_can_be_cancelled(dock, iface, tmp_path):
    never_serves = tmp_path / "python"
    never_serves.write_text("#!/bin/sh\nexec sleep 600\n")
    never_serves.chmod(0o755)
    failures = _use_local_backend(dock, str(never_serves), tmp_path)
    dock.start_button.click()
    assert dock.backend.running and dock.start_button.isEnabled() and dock.start_button.text() == "Cancel start"
    pid = dock.backend.process.processId()
    dock.start_button.click()
    assert not dock.backend.running and dock.start_button.text() == "Start local backend"
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    QgsApplication.processEvents()
    assert failures == []                  # the user's own cancel is no failure


def test_dependency_installer_runs_once_at_a_time_and_fails_in_one_line(dock, iface, monkeypatch):
    # nothing is downloaded: pip looks in no index for a package that exists nowhere
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setattr(deps, "requirements", lambda: ["skyprompt-no-such-package==9"])
    logged, got = [], []

    def log(text, tag, level):
        logged.append((tag, text))

    QgsApplication.messageLog().messageReceived.connect(log)
    dock.taskDone.connect(lambda kind, error: got.append(error) if kind == "install" else None)
    try:
        dock.install_dependencies()
        assert not dock.install_button.isEnabled()
        dock.install_dependencies()         # a second press while pip runs starts no second pip
        assert len(dock.tasks) == 1
        wait_until(lambda: got, 120, "the installer")
    finally:
        QgsApplication.messageLog().messageReceived.disconnect(log)
    message = str(got[0])
    assert "pip could not install skyprompt-no-such-package==9" in message and "\n" not in message, message
    assert "No matching distribution" in message and dock.install_button.isEnabled()
    assert any(tag == "SkyPrompt" and text.startswith("ERROR:") for tag, text in logged)   # pip's own words


@pytest.mark.skipif(not HAVE_SHARED, reason=f"shared rasters not found in {GEOTIFF_DIR}")
def test_screenshot_tool_draws_the_dock_with_results(tmp_path):
    from qgis.PyQt.QtGui import QImage

    out = tmp_path / "shot.png"
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "screenshots.py"), "--out", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    image = QImage(str(out))
    assert image.width() >= 1000 and image.height() >= 500
    # the map half shows imagery, not an empty canvas: many distinct colours
    colours = {image.pixel(x, y) for x in range(60, 860, 20) for y in range(40, 620, 20)}
    assert len(colours) > 100


def make_xyz_layer(tmp_path: Path) -> QgsRasterLayer:
    """An XYZ layer of local file:// tiles made by gdal2tiles from a 512 px ramp image in EPSG:3857."""
    from osgeo_utils import gdal2tiles

    yy, xx = np.mgrid[0:512, 0:512]
    ramps = np.stack([xx / 2, yy / 2, np.full_like(xx, 90)]).astype(np.uint8)   # red grows east, green south
    source = make_tif(tmp_path / "src.tif", ramps, geotransform=(1113194.9, 2.0, 0.0, 6800000.0, 0.0, -2.0),
                      crs="EPSG:3857")
    gdal2tiles.main(["gdal2tiles", "--xyz", "-z", "14-16", "-w", "none", "-q", str(source), str(tmp_path / "tiles")])
    layer = QgsRasterLayer(f"type=xyz&url=file://{tmp_path}/tiles/{{z}}/{{x}}/{{y}}.png&zmin=14&zmax=16", "tiles", "wms")
    assert layer.isValid()
    return layer


def test_xyz_tile_layer_is_read_in_qgis_and_segmented(dock, iface, tmp_path):
    """An XYZ layer (local file:// tiles made by gdal2tiles): pixels come from QGIS's own provider."""
    layer = make_xyz_layer(tmp_path)
    QgsProject.instance().addMapLayer(layer)
    from backend.rpc import skyprompt_pb2 as pb
    from plugin.sources import PixelReader

    area = QgsRectangle(1113194.9 + 100, 6800000.0 - 900, 1113194.9 + 900, 6800000.0 - 100)
    reader = PixelReader(layer)             # made on the main thread, read in a task: as the dock does
    got = {}
    task = QgsTask.fromFunction("read tiles", lambda t: reader.read(pb, area, 200, resolution=2.0),
                                on_finished=lambda e, r=None: got.update(error=e, result=r))
    QgsApplication.taskManager().addTask(task)
    wait_until(lambda: got, 60, "the tile read")
    assert got["error"] is None
    src, note = got["result"]
    px = src.pixels
    rgba = np.frombuffer(px.data, np.uint8).reshape(4, px.height, px.width)
    assert (px.width, px.height, px.alpha_band) == (200, 200, 4) and "capped at 200 px" in note
    assert np.corrcoef(rgba[0].mean(axis=0), np.arange(px.width))[0, 1] > 0.95      # east ramp kept
    assert np.corrcoef(rgba[1].mean(axis=1), np.arange(px.height))[0, 1] > 0.95     # south ramp kept
    assert abs(float(rgba[2].mean()) - 90) < 3
    iface.canvas.setDestinationCrs(layer.crs())
    iface.canvas.setExtent(area)
    dock.segment_layer.setLayer(layer)
    dock.prompts.setText("fields")
    dock.threshold.setValue(0.0)
    assert run_dock(dock, "segment", dock.segment) is None
    out = dock.last_layer
    shown = iface.canvas.extent()
    shown.grow(20.0)
    assert out.crs().authid() == "EPSG:3857" and out.featureCount() >= 1 and shown.contains(out.extent())
    # Index reads a tile service's current view at the map's resolution, not the whole world at 2048 px
    from qgis.PyQt.QtCore import Qt

    for i in range(dock.layer_list.count()):
        item = dock.layer_list.item(i)
        item.setCheckState(Qt.Checked if item.data(Qt.UserRole) == layer.id() else Qt.Unchecked)
    before = len(iface.message_bar.messages)
    assert run_dock(dock, "index", dock.index_layers) is None
    assert any("tile service" in text for _, text, _ in iface.message_bar.messages[before:])
    assert layer.id() in dock.indexed
    dock.query.setText("fields")
    dock.k.setValue(50)
    assert run_dock(dock, "search", dock.search) is None
    hits = dock.last_layer
    assert hits.featureCount() >= 1
    footprints = QgsGeometry.unaryUnion([f.geometry() for f in hits.getFeatures()]).boundingBox()
    if hits.crs() != layer.crs():
        footprints = QgsCoordinateTransform(hits.crs(), layer.crs(), QgsProject.instance()).transformBoundingBox(
            footprints)
    assert shown.contains(footprints), (footprints.toString(), shown.toString())


# -- limits, cancels, unloading and errors the user can fix --
class OwnBackends:
    """Real backends in this process, for a test to configure (limits, which the command line does not
    set) or to stop in the middle of a call as SIGTERM does; all stopped at the end."""

    def __init__(self, checkpoint: Path, roots: list[Path], data: Path):
        self.checkpoint, self.roots, self.data = checkpoint, roots, data
        self.servers, self.stopping = [], []

    def start(self, **kw):
        """(Server, address) of a new backend; `kw` as for backend.server.Server."""
        from backend.server import Server

        server = Server(self.checkpoint, port=0, device="cpu", data_dir=self.data / f"backend{len(self.servers)}",
                        allowed_roots=self.roots, token=TOKEN, **kw)
        server.start()
        self.servers.append(server)
        return server, f"127.0.0.1:{server.port}"

    def stop_soon(self, server) -> None:
        """What SIGTERM does (Server.stop: running calls are cancelled, then the server drains), without
        blocking the caller."""
        thread = threading.Thread(target=server.stop, kwargs={"grace": 5.0}, daemon=True)
        thread.start()
        self.stopping.append(thread)

    def close(self) -> None:
        for thread in self.stopping:
            thread.join(30)
        for server in self.servers:
            server.stop(grace=1.0)


@pytest.fixture()
def own_backend(checkpoint, rasters, tmp_path):  # noqa: F811
    backends = OwnBackends(checkpoint, [rasters["folder"]], tmp_path)
    yield backends
    backends.close()


@pytest.fixture()
def skyprompt_processing(qgis_processing, settings):
    from plugin.processing_provider import SkyPromptProvider

    provider = SkyPromptProvider()
    QgsApplication.processingRegistry().addProvider(provider)
    yield
    QgsApplication.processingRegistry().removeProvider(provider)


def slow_raster(rasters) -> Path:  # noqa: F811
    """A 1200 x 1200 px file: Segment over it takes the test checkpoint seconds on a CPU, so a call is
    still running when a test acts on it."""
    path = rasters["folder"] / "slow_utm.tif"
    if not path.exists():
        yy, xx = np.mgrid[0:1200, 0:1200]
        bands = np.stack([xx // 3 % 256, yy // 5 % 256, (xx + yy) // 7 % 256]).astype(np.uint8)
        make_tif(path, bands, geotransform=(500000.0, 0.5, 0.0, 5000000.0, 0.0, -0.5),
                 options=["COMPRESS=DEFLATE", "TILED=YES"])
    return path


class RecordingFeedback(QgsProcessingFeedback):
    """Keeps a run's messages, and calls `on_progress` (once) at the first progress the plugin reports."""

    def __init__(self, on_progress=None):
        super().__init__()
        self.infos, self.warnings, self.on_progress = [], [], on_progress

    def pushInfo(self, text):  # noqa: N802 - QGIS API
        self.infos.append(text)

    def pushWarning(self, text):  # noqa: N802 - QGIS API
        self.warnings.append(text)

    def setProgress(self, value):  # noqa: N802 - QGIS API
        act, self.on_progress = self.on_progress, None
        if act is not None:
            act()
        super().setProgress(value)


def segment_whole_layer_setup(dock, iface, layer, prompts: str = "fields") -> None:
    """Add `layer`, fit the map to it and set the panel to segment `prompts` over the map's extent."""
    QgsProject.instance().addMapLayer(layer)
    iface.canvas.setDestinationCrs(layer.crs())
    iface.canvas.setExtent(layer.extent())
    dock.area.setCurrentIndex(0)
    dock.segment_layer.setLayer(layer)
    dock.prompts.setText(prompts)


def test_segment_of_a_file_area_over_the_backends_limit_is_read_coarser(dock, iface, rasters, own_backend):  # noqa: F811
    """A file layer is sent by path: an area with more pixels than the backend's max_extent_pixels
    is segmented at a coarser target_resolution (and the message bar says so), not refused."""
    limit = 200 * 200
    _, address = own_backend.start(limits=Limits(max_extent_pixels=limit))
    dock.settings.address = address
    layer = QgsRasterLayer(str(rasters["rgb"]), "ortho")                  # 400 x 300 px of 10 m
    segment_whole_layer_setup(dock, iface, layer)
    dock.threshold.setValue(0.0)                                          # polygons cover what was read
    before = len(iface.message_bar.messages)
    assert run_dock(dock, "segment", dock.segment) is None
    said = [text for _, text, _ in iface.message_bar.messages[before:]]
    assert any("over the backend's limit" in t and "coarser" in t for t in said), said
    out = dock.last_layer
    assert out.featureCount() >= 1
    union = QgsGeometry.unaryUnion([f.geometry() for f in out.getFeatures()])
    assert union.area() > 0.9 * layer.extent().width() * layer.extent().height()
    # an area under the limit is segmented at the layer's own resolution, with nothing said
    dock.drawn_rect = (layer_rect(layer, (0.1, 0.1, 0.45, 0.5)), layer.crs())       # 140 x 120 px
    dock.area.setCurrentIndex(1)
    before = len(iface.message_bar.messages)
    assert run_dock(dock, "segment", dock.segment) is None
    assert not [t for _, t, _ in iface.message_bar.messages[before:] if "coarser" in (t or "")]
    dock.area.setCurrentIndex(0)


def test_a_segment_that_fails_does_not_say_it_was_read_coarser(dock, iface, rasters, own_backend):  # noqa: F811
    """The note that an area over the backend's limit is segmented at a coarser resolution comes
    only with polygons: a Segment the backend refuses did no such thing."""
    _, address = own_backend.start(limits=Limits(max_extent_pixels=200 * 200))
    dock.settings.address = address
    segment_whole_layer_setup(dock, iface, QgsRasterLayer(str(rasters["rgb"]), "ortho"), "houses, Houses.")
    before = len(iface.message_bar.messages)
    assert run_dock(dock, "segment", dock.segment).code == "INVALID_ARGUMENT"      # prompts the model reads as one
    said = [text for _, text, _ in iface.message_bar.messages[before:]]
    assert any("read the same to the model" in t for t in said) and not any("coarser" in t for t in said), said


def test_describe_of_a_view_a_few_pixels_wide_is_refused(dock, iface, rasters):  # noqa: F811
    """Enlarged to the model's input, three pixels are a blur that still gets a confident caption."""
    layer = QgsProject.instance().addMapLayer(QgsRasterLayer(str(rasters["rgb"]), "rgb"))
    pixel = layer.rasterUnitsPerPixelX()
    centre = layer.extent().center()
    iface.canvas.setDestinationCrs(layer.crs())
    iface.canvas.setExtent(QgsRectangle(centre.x(), centre.y(), centre.x() + 3 * pixel, centre.y() + 3 * pixel))
    dock.describe_layer.setLayer(layer)
    before = len(iface.message_bar.messages)
    assert dock.describe() is None
    shown = " ".join(text or "" for _, text, _ in iface.message_bar.messages[before:])
    assert "pixels of layer 'rgb': zoom out to describe it (at least 8 x 8)" in shown, shown
    iface.canvas.setExtent(layer.extent())
    assert run_dock(dock, "caption", dock.describe) is None and dock.caption.toPlainText().strip()


def test_describe_of_a_file_area_over_the_caption_limit_is_read_coarser(dock, iface, rasters, own_backend):  # noqa: F811
    """CaptionRequest has no target_resolution: a file layer's view with more pixels than the backend
    takes for a caption (16 x max_extent_pixels) is read in QGIS at the coarser resolution that fits
    and sent as pixels, so the user gets a caption (and the message bar says so), not the refusal."""
    from plugin.connection import BackendError

    limit = 50 * 50                                       # a caption: 16 x 2,500 = 40,000 px
    _, address = own_backend.start(limits=Limits(max_extent_pixels=limit))
    dock.settings.address = address
    layer = QgsRasterLayer(str(rasters["rgb"]), "ortho")                  # 400 x 300 px of 10 m
    QgsProject.instance().addMapLayer(layer)
    iface.canvas.setDestinationCrs(layer.crs())
    iface.canvas.setExtent(layer.extent())
    dock.describe_layer.setLayer(layer)
    with dock.settings.connection() as conn:              # the file sent by path, as it was: refused
        with pytest.raises(BackendError) as refused:
            conn.caption(conn.pb.CaptionRequest(source=conn.pb.RasterSource(path=str(rasters["rgb"]))))
    assert refused.value.code == "RESOURCE_EXHAUSTED"
    before = len(iface.message_bar.messages)
    assert run_dock(dock, "caption", dock.describe) is None
    assert dock.caption.toPlainText().strip()
    said = [text or "" for _, text, _ in iface.message_bar.messages[before:]]
    # 120,000 px over 40,000: 10 m x sqrt(3) x 1.02 = 17.7 m, read as 226 x 170 px
    assert any("over the backend's limit of 0.04 million for a caption" in t
               and "coarser 17.7 map units per pixel" in t for t in said), said
    # a view under the limit is sent by path at the layer's own resolution, with nothing said
    dock.caption.clear()
    iface.canvas.setExtent(layer_rect(layer, (0.1, 0.1, 0.35, 0.4)))          # about 100 x 90 px
    before = len(iface.message_bar.messages)
    assert run_dock(dock, "caption", dock.describe) is None
    assert dock.caption.toPlainText().strip()
    assert not [t for _, t, _ in iface.message_bar.messages[before:] if "coarser" in (t or "")]


def test_processing_prompt_to_polygons_resolution(skyprompt_processing, rasters, own_backend, tmp_path):  # noqa: F811
    """Automatic: an extent over the backend's limit is segmented coarser, and the log says so;
    RESOLUTION (advanced) sets it: too fine is the backend's refusal, coarse enough works."""
    import processing
    from qgis.core import QgsProcessingException

    _, address = own_backend.start(limits=Limits(max_extent_pixels=200 * 200))
    params = {"INPUT": str(rasters["rgb"]), "PROMPTS": "fields", "THRESHOLD": 0.0, "SERVER": address}
    feedback = RecordingFeedback()
    out = QgsVectorLayerFrom(processing.run("skyprompt:prompttopolygons", {
        **params, "OUTPUT": str(tmp_path / "auto.gpkg")}, feedback=feedback)["OUTPUT"])
    assert out.featureCount() >= 1
    assert any("coarser" in t for t in feedback.infos), feedback.infos
    feedback = RecordingFeedback()
    coarse = QgsVectorLayerFrom(processing.run("skyprompt:prompttopolygons", {
        **params, "RESOLUTION": 25.0, "OUTPUT": str(tmp_path / "coarse.gpkg")}, feedback=feedback)["OUTPUT"])
    assert coarse.featureCount() >= 1 and not any("coarser" in t for t in feedback.infos)
    del out, coarse
    with pytest.raises(QgsProcessingException, match="RESOURCE_EXHAUSTED"):     # 800 x 600 px at 5 m
        processing.run("skyprompt:prompttopolygons", {**params, "RESOLUTION": 5.0,
                                                      "OUTPUT": str(tmp_path / "fine.gpkg")})


def test_processing_prompt_to_polygons_survives_its_layer_removed_and_checks_its_output_first(
        skyprompt_processing, rasters, own_backend, tmp_path):  # noqa: F811
    """The input layer removed from the project while the backend works: the polygons are still
    written, in the layer's CRS (read before the call). An output in a folder that does not exist is
    refused before any work: with no backend at the address, the folder is what the error names.
    Prompts split on semicolons too, as in the panel."""
    import processing
    from qgis.core import QgsProcessingException

    with pytest.raises(QgsProcessingException, match="its folder .* does not exist"):
        processing.run("skyprompt:prompttopolygons", {"INPUT": str(rasters["rgb"]), "PROMPTS": "fields",
                                                      "SERVER": "127.0.0.1:9", "OUTPUT": str(tmp_path / "no" / "x.gpkg")})
    with pytest.raises(QgsProcessingException, match="its folder .* does not exist"):
        processing.run("skyprompt:searchtiles", {"QUERY": "fields", "SERVER": "127.0.0.1:9",
                                                 "OUTPUT": str(tmp_path / "no" / "y.gpkg")})
    _, address = own_backend.start()
    layer = QgsProject.instance().addMapLayer(QgsRasterLayer(str(rasters["rgb"]), "going"))
    crs = layer.crs().authid()
    feedback = RecordingFeedback(on_progress=lambda: QgsProject.instance().removeMapLayer(layer.id()))
    out = QgsVectorLayerFrom(processing.run("skyprompt:prompttopolygons", {
        "INPUT": layer, "PROMPTS": "fields; water", "THRESHOLD": 0.0, "SERVER": address,
        "OUTPUT": str(tmp_path / "kept.gpkg")}, feedback=feedback)["OUTPUT"])
    assert not QgsProject.instance().mapLayersByName("going")     # it was removed mid-run
    assert out.crs().authid() == crs and out.featureCount() >= 2
    assert {f["prompt"] for f in out.getFeatures()} == {"fields", "water"}
    del out, feedback, layer     # before QGIS exits: a wrapper of the removed layer must not outlive the test


def test_gpkg_layer_names_differing_only_in_case_do_not_replace_each_other(qgis_app, tmp_path):
    from plugin import results

    def result(name: str, n: int):
        features = []
        for i in range(n):
            f = QgsFeature(results.segment_fields())
            f.setGeometry(QgsGeometry.fromWkt(f"POLYGON(({i} 0,{i + 1} 0,{i + 1} 1,{i} 0))"))
            f.setAttributes(["trees", 0.5, 0.6, 1.0])
            features.append(f)
        layer = results.memory_layer(name, QgsCoordinateReferenceSystem("EPSG:32611"), results.segment_fields(),
                                     features)
        results.style_by_prompt(layer, ["trees"])
        return layer

    path = str(tmp_path / "out.gpkg")
    first = results.write_gpkg(result("SkyPrompt: Trees", 5), path)
    second = results.write_gpkg(result("SkyPrompt: trees", 2), path)
    got = (second.name(), first.featureCount(), second.featureCount())
    del first, second                  # no layer alive in a failure's traceback (a crash at exit)
    assert got == ("SkyPrompt: trees (2)", 5, 2)
    assert sorted(results.gpkg_layer_names(path)) == ["SkyPrompt: Trees", "SkyPrompt: trees (2)"]
    # a prompt with "|" (which ends the path in an OGR layer source): the layer opened is the one written
    piped = results.write_gpkg(result("SkyPrompt: roads | highways", 3), path)
    got = (piped.isValid(), piped.featureCount(), piped.name())
    del piped
    assert got == (True, 3, "SkyPrompt: roads / highways")
    # a layer in the project named as the file's next table ("trees (3)"): the layer opened is the
    # name wanted, numbered against the project's layers, not the table's name numbered again
    earlier = QgsProject.instance().addMapLayer(result("SkyPrompt: trees (3)", 1))
    try:
        third = results.write_gpkg(result("SkyPrompt: trees", 1), path)
        got = third.name()
        del third
        assert got == "SkyPrompt: trees" and "SkyPrompt: trees (3)" in results.gpkg_layer_names(path)
    finally:
        QgsProject.instance().removeMapLayer(earlier.id())


def test_a_backend_that_stops_during_segment_is_an_error_in_the_panel(dock, iface, rasters, own_backend):  # noqa: F811
    """The backend cancels running calls when it stops (Stop local backend, SIGTERM): not the user's
    cancel, so the panel says Segment failed instead of showing nothing, and checks the light again
    (it stayed on "serving")."""
    server, address = own_backend.start()
    dock.settings.address = address
    assert run_dock(dock, "health", dock.refresh_health) is None and dock.health_state == "SERVING"
    layer = QgsRasterLayer(str(slow_raster(rasters)), "slow")
    segment_whole_layer_setup(dock, iface, layer)
    stopping = []

    def stop_once(_):
        if not stopping:                                        # at the first progress: the call is running
            stopping.append(True)
            own_backend.stop_soon(server)

    def start():
        dock.segment().progressChanged.connect(stop_once)

    before = len(iface.message_bar.messages)
    error = run_dock(dock, "segment", start)
    assert stopping and error is not None and error.code == "CANCELLED"
    failed = [text for _, text, level in iface.message_bar.messages[before:] if level == int(Qgis.Critical)]
    assert len(failed) == 1 and "failed: the backend cancelled the call" in failed[0], failed
    wait_until(lambda: dock.health_state != "SERVING", 30, "the light checked again after the backend stopped")


def test_processing_a_backend_that_stops_mid_run_is_an_error(skyprompt_processing, rasters, own_backend, tmp_path):  # noqa: F811
    """Prompt to polygons and Index raster raise when the backend stops under them, instead of an
    empty layer (or {}) reported as a success."""
    import processing
    from qgis.core import QgsProcessingException

    path = str(slow_raster(rasters))
    server, address = own_backend.start()
    with pytest.raises(QgsProcessingException, match="backend cancelled the call"):
        processing.run("skyprompt:prompttopolygons", {"INPUT": path, "PROMPTS": "fields", "SERVER": address,
                                                      "OUTPUT": str(tmp_path / "p.gpkg")},
                       feedback=RecordingFeedback(on_progress=lambda: own_backend.stop_soon(server)))
    server, address = own_backend.start()
    with pytest.raises(QgsProcessingException, match="backend cancelled the call"):
        processing.run("skyprompt:indexraster", {"INPUT": path, "SERVER": address},
                       feedback=RecordingFeedback(on_progress=lambda: own_backend.stop_soon(server)))


def test_unloading_while_a_task_runs_is_quick_and_quiet(iface, settings, rasters, monkeypatch):  # noqa: F811
    """Unload with a Segment running: the cancel reaches the backend at once, and the task's end,
    which comes after the dock is deleted, touches none of its widgets."""
    from qgis.PyQt.QtCore import QEvent
    from plugin.plugin import SkyPromptPlugin

    errors = []
    monkeypatch.setattr(sys, "excepthook", lambda kind, value, tb: errors.append(f"{kind.__name__}: {value}"))
    layer = QgsRasterLayer(str(slow_raster(rasters)), "slow")
    QgsProject.instance().addMapLayer(layer)
    iface.canvas.setDestinationCrs(layer.crs())
    iface.canvas.setExtent(layer.extent())
    plugin = SkyPromptPlugin(iface)
    plugin.initGui()
    plugin.show_dock(True)
    dock = plugin.dock
    dock.segment_layer.setLayer(layer)
    dock.prompts.setText("fields")
    task = dock.segment()
    wait_until(lambda: task.status() == QgsTask.Running, 30, "the Segment task to run")
    time.sleep(0.3)                                              # the call is at the backend
    started = time.monotonic()
    plugin.unload()
    took = time.monotonic() - started
    QgsApplication.sendPostedEvents(None, QEvent.DeferredDelete)           # the dock is deleted
    wait_until(lambda: not [t for t in QgsApplication.taskManager().activeTasks()
                            if "SkyPrompt" in t.description()], 30, "the task to end")
    end = time.monotonic() + 0.5
    while time.monotonic() < end:                                # its finished() runs on the main thread
        QgsApplication.processEvents()
        time.sleep(0.02)
    assert took < 2.0 and errors == [], (took, errors)


def test_a_tile_service_indexed_in_several_views_is_searched_in_all(dock, iface, tmp_path):
    from qgis.PyQt.QtCore import Qt

    layer = make_xyz_layer(tmp_path)
    QgsProject.instance().addMapLayer(layer)
    for i in range(dock.layer_list.count()):
        item = dock.layer_list.item(i)
        item.setCheckState(Qt.Checked if item.data(Qt.UserRole) == layer.id() else Qt.Unchecked)
    iface.canvas.setDestinationCrs(layer.crs())
    x0, y0 = 1113194.9, 6800000.0
    for dx in (0, 500):                                          # two views, side by side, indexed in turn
        iface.canvas.setExtent(QgsRectangle(x0 + dx, y0 - 500, x0 + dx + 400, y0 - 100))
        iface.canvas.refresh()
        assert run_dock(dock, "index", dock.index_layers) is None
    views = dock.indexed[layer.id()]
    assert len(views) == 2
    dock.query.setText("fields")
    dock.k.setValue(200)
    assert run_dock(dock, "search", dock.search) is None
    assert {f["raster_id"] for f in dock.last_layer.getFeatures()} == views


def test_processing_prompt_to_polygons_on_a_tile_service_needs_an_extent(skyprompt_processing, tmp_path):
    import processing
    from qgis.core import QgsProcessingException

    tiles = QgsProject.instance().addMapLayer(make_xyz_layer(tmp_path))
    try:
        with pytest.raises(QgsProcessingException, match="is a tile service") as err:   # not the planet at 2048 px
            processing.run("skyprompt:prompttopolygons", {"INPUT": tiles, "PROMPTS": "fields",
                                                          "OUTPUT": str(tmp_path / "p.gpkg")})
        assert "set Extent" in str(err.value)
    finally:
        QgsProject.instance().removeMapLayer(tiles.id())
        del tiles


def gpkg_with_a_roads_layer(path: Path) -> Path:
    """A user's GeoPackage with one layer of their own ("roads", one line) in it."""
    ds = ogr.GetDriverByName("GPKG").CreateDataSource(str(path))
    roads = ds.CreateLayer("roads", geom_type=ogr.wkbLineString)
    f = ogr.Feature(roads.GetLayerDefn())
    f.SetGeometry(ogr.CreateGeometryFromWkt("LINESTRING (0 0, 1 1)"))
    roads.CreateFeature(f)
    ds = roads = f = None
    return path


def test_processing_outputs_as_a_user_types_them(skyprompt_processing, settings, rasters, tmp_path):
    """An existing GeoPackage typed without .gpkg keeps its other layers (Processing adds the
    extension, and would replace the file); a memory output holds MultiPolygons, as its type says;
    a shapefile's cut text is said in the log; prompts split on line breaks; a cancelled search
    writes nothing; hits are named after the project's layer of their file, Layers given or not."""
    import processing
    from qgis.core import QgsProcessingContext, QgsProcessingException, QgsWkbTypes
    from plugin.results import gpkg_layer_names

    survey = gpkg_with_a_roads_layer(tmp_path / "survey.gpkg")
    layer = QgsProject.instance().addMapLayer(QgsRasterLayer(str(rasters["rgb"]), "Survey ortho"))
    try:
        processing.run("skyprompt:indexraster", {"INPUT": layer})
        processing.run("skyprompt:searchtiles", {"QUERY": "fields", "K": 2, "OUTPUT": str(tmp_path / "survey")})
        processing.run("skyprompt:prompttopolygons", {"INPUT": layer, "PROMPTS": "fields\nwater", "THRESHOLD": 0.0,
                                                      "OUTPUT": str(tmp_path / "survey")})
        assert sorted(gpkg_layer_names(str(survey))) == ["roads", "survey", "survey (2)"]
        polygons = QgsVectorLayerFrom(f"{survey}|layername=survey (2)")
        assert {f["prompt"] for f in polygons.getFeatures()} == {"fields", "water"}      # two prompts, not one
        # hits named after the project's layer of their file, with no Layers given
        hits = QgsVectorLayerFrom(f"{survey}|layername=survey")
        assert {f["layer"] for f in hits.getFeatures()} == {"Survey ortho"}
        del polygons, hits
        # a memory output, read from the run's own context (a layer handed back by processing.run
        # would outlive QGIS's exit)
        context = QgsProcessingContext()
        context.setProject(QgsProject.instance())
        out = processing.run("skyprompt:searchtiles", {"QUERY": "fields", "K": 3, "OUTPUT": "memory:"},
                             context=context)["OUTPUT"]
        memory = out if not isinstance(out, str) else context.getMapLayer(out)
        kinds = {QgsWkbTypes.isMultiType(f.geometry().wkbType()) for f in memory.getFeatures()}
        assert memory.featureCount() == 3 and kinds == {True}, kinds
        del memory, out
        context.temporaryLayerStore().removeAllMapLayers()
        # a path a shapefile cuts short (a raster deep in folders): said in the log (prompts that long are
        # past what the model reads, and refused)
        deep = rasters["folder"].joinpath(*[f"survey_{i}_" + "x" * 50 for i in range(5)])
        deep.mkdir(parents=True, exist_ok=True)
        shutil.copy(rasters["rgb"], deep / "ortho.tif")
        deep_layer = QgsProject.instance().addMapLayer(QgsRasterLayer(str(deep / "ortho.tif"), "Deep ortho"))
        processing.run("skyprompt:indexraster", {"INPUT": deep_layer})
        feedback = RecordingFeedback()
        processing.run("skyprompt:searchtiles", {"QUERY": "fields", "K": 50, "OUTPUT": str(tmp_path / "long.shp")},
                       feedback=feedback)
        assert any("a shapefile keeps 254 bytes of text: path values" in w for w in feedback.warnings), \
            feedback.warnings
        QgsProject.instance().removeMapLayer(deep_layer.id())
        feedback = RecordingFeedback()
        processing.run("skyprompt:prompttopolygons", {"INPUT": layer, "PROMPTS": "fields", "THRESHOLD": 0.0,
                                                      "OUTPUT": str(tmp_path / "short.shp")}, feedback=feedback)
        assert not any("shapefile" in w for w in feedback.warnings), feedback.warnings
        # cancelled before the call: nothing written
        feedback = RecordingFeedback()
        feedback.cancel()
        assert processing.run("skyprompt:searchtiles", {"QUERY": "fields", "OUTPUT": str(tmp_path / "c.gpkg")},
                              feedback=feedback) == {}
        assert not (tmp_path / "c.gpkg").exists() and "cancelled: nothing written" in feedback.infos
        # an address copied with its scheme is named as the mistake
        with pytest.raises(QgsProcessingException, match=r"starts with 'http://': give it as HOST:PORT, e.g. 127.0.0.1:9"):
            processing.run("skyprompt:searchtiles", {"QUERY": "fields", "SERVER": "http://127.0.0.1:9/",
                                                     "OUTPUT": str(tmp_path / "d.gpkg")})
    finally:
        QgsProject.instance().removeMapLayer(layer.id())
        del layer


def test_processing_outputs_to_geopackages_with_dots_in_their_names(skyprompt_processing, settings, rasters, tmp_path):
    """"site.v2.gpkg" typed as "site.v2" is the existing GeoPackage (Processing adds .gpkg to a
    suffix that names no format): its other layers stay, as for "survey"; a rerun into a dotted
    name adds a layer (QGIS found no format for "v2.gpkg" and failed), loaded into the project as
    OUTPUT asks; a search with no hits from a script's context without a project writes an empty
    WGS 84 layer (it raised AttributeError)."""
    import processing
    from qgis.core import QgsProcessingContext, QgsProcessingOutputLayerDefinition
    from plugin.results import gpkg_layer_names

    site = gpkg_with_a_roads_layer(tmp_path / "site.v2.gpkg")
    layer = QgsProject.instance().addMapLayer(QgsRasterLayer(str(rasters["rgb"]), "Survey ortho"))
    try:
        processing.run("skyprompt:indexraster", {"INPUT": layer})
        processing.run("skyprompt:searchtiles", {"QUERY": "fields", "K": 2, "OUTPUT": str(tmp_path / "site.v2"),
                                                 "SERVER": "  "})      # blanks: the settings' address
        assert sorted(gpkg_layer_names(str(site))) == ["roads", "site.v2"]
        assert QgsVectorLayerFrom(f"{site}|layername=site.v2").featureCount() == 2
        ortho = tmp_path / "ortho_0.15m.gpkg"
        for _ in range(2):
            processing.run("skyprompt:prompttopolygons", {"INPUT": layer, "PROMPTS": "fields", "THRESHOLD": 0.0,
                                                          "OUTPUT": str(ortho)})
        assert len(gpkg_layer_names(str(ortho))) == 2
        # the second run's layer is loaded at the end, as Processing loads its own outputs
        context = QgsProcessingContext()
        context.setProject(QgsProject.instance())
        output = QgsProcessingOutputLayerDefinition(str(ortho), QgsProject.instance())
        dest = processing.run("skyprompt:prompttopolygons", {"INPUT": layer, "PROMPTS": "water", "THRESHOLD": 0.0,
                                                             "OUTPUT": output}, context=context)["OUTPUT"]
        assert len(gpkg_layer_names(str(ortho))) == 3 and dest in context.layersToLoadOnCompletion()
        assert {f["prompt"] for f in QgsVectorLayerFrom(dest).getFeatures()} == {"water"}
        # no hits, no project: an empty layer in WGS 84
        empty = tmp_path / "nothing.gpkg"
        processing.run("skyprompt:searchtiles", {"QUERY": "fields", "EXTENT": "0,1,0,1 [EPSG:4326]",
                                                 "OUTPUT": str(empty)}, context=QgsProcessingContext())
        out = QgsVectorLayerFrom(str(empty))
        assert out.featureCount() == 0 and out.crs().authid() == "EPSG:4326"
        del out
    finally:
        QgsProject.instance().removeMapLayer(layer.id())
        del layer


def test_processing_errors_the_user_can_fix_are_one_line_not_a_traceback(skyprompt_processing, settings, tmp_path):
    import processing
    from qgis.core import QgsProcessingException

    path = "/vsimem/skyprompt-outside.tif"
    ds = gdal.GetDriverByName("GTiff").Create(path, 64, 64, 3, gdal.GDT_Byte)
    ds.SetGeoTransform((300000.0, 2.0, 0.0, 4000000.0, 0.0, -2.0))
    ds.SetProjection(QgsCoordinateReferenceSystem("EPSG:32633").toWkt())
    ds = None
    in_memory = QgsProject.instance().addMapLayer(QgsRasterLayer(path, "in memory"))   # read as pixels
    try:
        # an extent beside a layer read as pixels
        with pytest.raises(QgsProcessingException) as err:
            processing.run("skyprompt:prompttopolygons", {"INPUT": in_memory, "PROMPTS": "trees",
                                                          "EXTENT": "0,10,0,10 [EPSG:32633]",
                                                          "OUTPUT": str(tmp_path / "a.gpkg")})
        assert str(err.value) == "the requested area does not overlap layer 'in memory'"
        # a TLS CA file that is not there
        settings.use_tls, settings.tls_ca = True, str(tmp_path / "missing-ca.pem")
        settings.save()
        with pytest.raises(QgsProcessingException) as err:
            processing.run("skyprompt:searchtiles", {"QUERY": "trees", "OUTPUT": str(tmp_path / "b.gpkg")})
        message = str(err.value)
        assert "missing-ca.pem" in message and "Traceback" not in message and "\n" not in message.strip(), message
    finally:
        QgsProject.instance().removeMapLayer(in_memory.id())
        gdal.Unlink(path)
        del in_memory



def test_processing_a_layer_with_no_crs_or_not_a_raster_is_named_as_such(skyprompt_processing, tmp_path):
    """A raster read as pixels with no CRS, and a vector layer among the search's layers: the error
    says what is wrong with the layer (not a backend field, nor "does not overlap")."""
    import processing
    from qgis.core import QgsProcessingException, QgsVectorLayer

    path = "/vsimem/skyprompt-no-crs.tif"
    ds = gdal.GetDriverByName("GTiff").Create(path, 64, 64, 3, gdal.GDT_Byte)
    ds.SetGeoTransform((1000.0, 1.0, 0.0, 2000.0, 0.0, -1.0))
    ds = None
    no_crs = QgsProject.instance().addMapLayer(QgsRasterLayer(path, "scan"))
    roads = QgsProject.instance().addMapLayer(QgsVectorLayer("LineString?crs=EPSG:4326", "roads", "memory"))
    try:
        assert not no_crs.crs().isValid()
        for algorithm, params in (("indexraster", {}),
                                  ("prompttopolygons", {"PROMPTS": "trees", "OUTPUT": str(tmp_path / "a.gpkg")}),
                                  ("prompttopolygons", {"PROMPTS": "trees", "EXTENT": "1010,1050,1910,1990 [EPSG:32633]",
                                                        "OUTPUT": str(tmp_path / "b.gpkg")})):
            with pytest.raises(QgsProcessingException) as err:
                processing.run(f"skyprompt:{algorithm}", {"INPUT": no_crs, **params})
            assert str(err.value).startswith("layer 'scan' has no CRS, so its pixels have no place on the ground: "
                                             "set one in its Layer Properties"), (algorithm, str(err.value))
        # the same file on disk (sent by path, were it georeferenced): the same words, not the backend's
        on_disk = tmp_path / "scan.tif"
        gdal.Translate(str(on_disk), path)
        file_layer = QgsProject.instance().addMapLayer(QgsRasterLayer(str(on_disk), "scan"))
        try:
            with pytest.raises(QgsProcessingException) as err:
                processing.run("skyprompt:indexraster", {"INPUT": file_layer})
            assert "has no CRS, so its pixels have no place on the ground" in str(err.value)
        finally:
            QgsProject.instance().removeMapLayer(file_layer.id())
        with pytest.raises(QgsProcessingException) as err:
            processing.run("skyprompt:searchtiles", {"QUERY": "trees", "LAYERS": [roads],
                                                     "OUTPUT": str(tmp_path / "c.gpkg")})
        assert str(err.value).startswith("roads: not a raster layer"), str(err.value)
    finally:
        QgsProject.instance().removeMapLayers([no_crs.id(), roads.id()])
        gdal.Unlink(path)
        del no_crs, roads, err


def gpkg_contents(path: Path) -> dict:
    """{layer name: feature count} of a GeoPackage."""
    ds = gdal.OpenEx(str(path), gdal.OF_VECTOR)
    try:
        return {ds.GetLayer(i).GetName(): ds.GetLayer(i).GetFeatureCount() for i in range(ds.GetLayerCount())}
    finally:
        ds = None


def test_processing_output_to_an_existing_geopackage_keeps_its_other_layers(skyprompt_processing, rasters, tmp_path):  # noqa: F811
    """OUTPUT as the path of a GeoPackage that holds other layers: the result is a new layer of that
    file named after it (" (2)" on a rerun, or when the user's own layer has that name, as in a file
    QGIS's "Save Features As" made), the others stay; Processing alone replaces the whole file. A
    GeoPackage of raster tiles alone takes the polygons beside its raster."""
    import processing
    from qgis.core import QgsProcessingException

    out = geopackage_with_a_layer(tmp_path / "survey.gpkg", "roads", "LINESTRING (0 0, 1 1)")
    params = {"INPUT": str(rasters["rgb"]), "PROMPTS": "fields, houses", "THRESHOLD": 0.0, "OUTPUT": str(out)}
    dest = processing.run("skyprompt:prompttopolygons", params)["OUTPUT"]
    first = gpkg_contents(out)
    assert first.keys() == {"roads", "survey"} and first["roads"] == 1 and first["survey"] >= 2, first
    assert dest.endswith("|layername=survey")
    # the rerun adds a layer of its own, and what is loaded is that layer alone
    before = set(QgsProject.instance().mapLayers())
    processing.runAndLoadResults("skyprompt:prompttopolygons", params)
    assert gpkg_contents(out) == {**first, "survey (2)": first["survey"]}
    loaded = [layer for i, layer in QgsProject.instance().mapLayers().items() if i not in before]
    try:
        assert [layer.source() for layer in loaded] == [f"{out}|layername=survey (2)"]
        assert loaded[0].featureCount() == first["survey"] and loaded[0].crs().authid() == "EPSG:32633"
    finally:
        QgsProject.instance().removeMapLayers([layer.id() for layer in loaded])
        del loaded
    # a one-layer file named after its layer: the user's layer is never the one replaced
    parcels = geopackage_with_a_layer(tmp_path / "Parcels.gpkg", "parcels", "POINT (1 2)")
    processing.run("skyprompt:prompttopolygons", {**params, "OUTPUT": str(parcels)})
    assert gpkg_contents(parcels)["parcels"] == 1 and gpkg_contents(parcels)["Parcels (2)"] == first["survey"]
    # raster tiles only: the polygons go in beside them
    ortho = tmp_path / "ortho.gpkg"
    gdal.Translate(str(ortho), str(rasters["rgb"]), format="GPKG")
    processing.run("skyprompt:prompttopolygons", {**params, "OUTPUT": str(ortho)})
    assert gpkg_contents(ortho) == {"ortho (2)": first["survey"]}
    assert gdal.OpenEx(str(ortho), gdal.OF_RASTER) is not None
    (tmp_path / "notes.gpkg").write_text("not a GeoPackage")
    with pytest.raises(QgsProcessingException, match="exists and is not a GeoPackage"):
        processing.run("skyprompt:prompttopolygons", {**params, "OUTPUT": str(tmp_path / "notes.gpkg")})
    assert (tmp_path / "notes.gpkg").read_text() == "not a GeoPackage"


def test_processing_output_to_an_empty_gpkg_file_writes_a_new_geopackage(skyprompt_processing, rasters,  # noqa: F811
                                                                           tmp_path):
    """An empty file named .gpkg (tempfile.mkstemp's) is no file: the output is written there (it was
    refused as "exists and is not a GeoPackage", though it holds nothing to lose)."""
    import tempfile

    import processing

    handle, path = tempfile.mkstemp(suffix=".gpkg", dir=tmp_path)
    os.close(handle)
    dest = processing.run("skyprompt:prompttopolygons", {"INPUT": str(rasters["rgb"]), "PROMPTS": "fields",
                                                         "THRESHOLD": 0.0, "OUTPUT": path})["OUTPUT"]
    name = Path(path).stem
    assert dest == f"{path}|layername={name}"
    assert list(gpkg_contents(Path(path))) == [name] and QgsVectorLayerFrom(dest).featureCount() > 0


def test_processing_reruns_into_one_new_geopackage_each_load_into_the_project(skyprompt_processing, rasters,  # noqa: F811
                                                                              tmp_path):
    """Prompt to polygons run again into the GeoPackage its first run made, its output opened as the
    toolbox opens it: each run's layer is loaded (the rerun's was "not correctly generated": QGIS
    reused the file as it had opened it for the first layer, loaded by the file's name alone, and
    found no layer "r (2)" in it)."""
    import processing

    out = tmp_path / "r.gpkg"
    params = {"INPUT": str(rasters["rgb"]), "PROMPTS": "fields", "THRESHOLD": 0.0, "OUTPUT": str(out)}
    before = set(QgsProject.instance().mapLayers())
    loaded = []
    try:
        for _ in range(2):
            processing.runAndLoadResults("skyprompt:prompttopolygons", params)
        loaded = [layer for i, layer in QgsProject.instance().mapLayers().items() if i not in before]
        assert sorted(layer.source() for layer in loaded) == [f"{out}|layername=r", f"{out}|layername=r (2)"]
        assert all(layer.isValid() and layer.featureCount() > 0 for layer in loaded)
        # the first run's layer keeps the output's name, as Processing shows its own; the rerun's is numbered
        assert sorted(layer.name() for layer in loaded) == ["Polygons", "r (2)"]
    finally:
        QgsProject.instance().removeMapLayers([layer.id() for layer in loaded])
        del loaded


def test_processing_cancelled_prompt_to_polygons_leaves_the_output_as_it_was(skyprompt_processing, rasters,  # noqa: F811
                                                                              tmp_path):
    """A cancel while the backend segments: no output is written (an existing file is not replaced by an
    empty layer), and the log says it was cancelled, not "0 polygons"."""
    import processing

    out = tmp_path / "earlier.geojson"
    earlier = '{"type": "FeatureCollection", "features": []}\n'
    out.write_text(earlier)
    feedback = RecordingFeedback()
    feedback.on_progress = feedback.cancel
    outputs = processing.run("skyprompt:prompttopolygons", {"INPUT": str(slow_raster(rasters)), "PROMPTS": "fields",
                                                            "OUTPUT": str(out)}, feedback=feedback)
    assert feedback.isCanceled() and "OUTPUT" not in outputs, outputs
    assert out.read_text() == earlier
    assert "cancelled: nothing written" in feedback.infos and not [t for t in feedback.infos if "polygons for" in t]


def test_processing_search_with_no_hits_and_no_project_crs_writes_wgs84(skyprompt_processing, own_backend,
                                                                          tmp_path):
    """A script has no project CRS: a search with no hits (an empty index) still writes a layer with
    a CRS, WGS 84, instead of one with none."""
    import processing

    _, address = own_backend.start()
    project = QgsProject.instance()
    before = project.crs()
    project.setCrs(QgsCoordinateReferenceSystem())
    try:
        out = processing.run("skyprompt:searchtiles", {"QUERY": "fields", "SERVER": address,
                                                       "OUTPUT": str(tmp_path / "none.gpkg")})["OUTPUT"]
    finally:
        project.setCrs(before)
    ds = gdal.OpenEx(out.split("|")[0], gdal.OF_VECTOR)
    try:
        layer = ds.GetLayer(0)
        assert layer.GetFeatureCount() == 0
        srs = layer.GetSpatialRef()
        assert srs is not None and srs.GetAuthorityCode(None) == "4326"
    finally:
        ds = None


def test_processing_search_to_a_shapefile_keeps_tile_id_an_integer(skyprompt_processing, rasters, own_backend,  # noqa: F811
                                                                   tmp_path):
    """QGIS writes a 64-bit integer with no length to a shapefile as a decimal (418.0): tile_id is
    written with a length a shapefile keeps as an integer, and a GeoPackage output stays Integer64."""
    import processing

    _, address = own_backend.start()
    processing.run("skyprompt:indexraster", {"INPUT": str(rasters["rgb"]), "SERVER": address})
    types = {}
    for name in ("tiles.shp", "tiles.gpkg"):
        out = processing.run("skyprompt:searchtiles", {"QUERY": "fields", "K": 5, "SERVER": address,
                                                       "OUTPUT": str(tmp_path / name)})["OUTPUT"]
        ds = ogr.Open(out.split("|")[0])
        try:
            layer = ds.GetLayer(0)
            defn = layer.GetLayerDefn().GetFieldDefn(layer.GetLayerDefn().GetFieldIndex("tile_id"))
            types[name] = defn.GetType()
            values = [f.GetField("tile_id") for f in layer]
        finally:
            ds = None
        assert len(values) == 5 and all(isinstance(v, int) and v > 0 for v in values), (name, values)
    assert types == {"tiles.shp": ogr.OFTInteger64, "tiles.gpkg": ogr.OFTInteger64}, types


def test_backend_python_path_with_spaces_or_backslashes_is_one_program(qgis_app, tmp_path):
    from plugin.local_backend import LocalBackend

    launcher = LocalBackend()
    settings = PluginSettings(address="127.0.0.1:50999")
    for folder in ("My Projects/.venv/bin", "C:\\Users\\me\\Python 3.11"):     # a Windows path, as a name here
        program = tmp_path / folder / "python"
        program.parent.mkdir(parents=True)
        program.symlink_to(sys.executable)
        settings.python = str(program)
        got, args = launcher.command(settings)
        assert got == str(program) and args[:3] == ["-m", "backend", "serve"]
        assert subprocess.run([got, "-c", "print(42)"], capture_output=True, text=True).stdout == "42\n"
    settings.python = f"{sys.executable} -X utf8"                # not a file: a command line, split
    assert launcher.command(settings) == (sys.executable, ["-X", "utf8", "-m", "backend", "serve", "--host",
                                                           "127.0.0.1", "--port", "50999", "--device", "auto",
                                                           "--stop-on-stdin-close"])


def test_plugin_caption_limit_factor_is_the_backends(qgis_app):
    """The plugin ships without the backend, so it names the factor itself: kept in step here."""
    from backend.service import CAPTION_EXTENT_FACTOR
    from plugin.operations import CAPTION_LIMIT_FACTOR

    assert CAPTION_LIMIT_FACTOR == CAPTION_EXTENT_FACTOR


# -- the settings' address, the launcher's processes, the health light, a narrow panel, pip's failures --
def test_an_address_with_no_port_is_refused_where_the_port_is_read(qgis_app):
    from plugin.local_backend import LocalBackend
    from plugin.settings import AddressError

    for address in ("127.0.0.1", "localhost:", "127.0.0.1:port", "127.0.0.1:70000"):
        with pytest.raises(AddressError) as err:
            PluginSettings(address=address).port
        assert "give the address as HOST:PORT, e.g. 127.0.0.1:50051" in str(err.value), err.value
        with pytest.raises(AddressError):       # the launcher never starts a backend on a port of its own
            LocalBackend().command(PluginSettings(address=address))
    assert PluginSettings(address=" 127.0.0.1:50999 ").port == 50999 and PluginSettings(address="[::1]:7").port == 7


def test_a_late_finish_of_an_earlier_backend_process_leaves_the_current_one_alone(qgis_app, tmp_path):
    from qgis.PyQt.QtCore import QProcess
    from backend.server import free_port
    from plugin.local_backend import LocalBackend

    never_serves = tmp_path / "python"
    never_serves.write_text("#!/bin/sh\nexec sleep 600\n")
    never_serves.chmod(0o755)
    settings = PluginSettings(address=f"127.0.0.1:{free_port()}", python=str(never_serves), backend_dir=str(tmp_path))
    launcher = LocalBackend()
    failures, stops = [], []
    launcher.failed.connect(failures.append)
    launcher.stopped.connect(lambda: stops.append(1))
    try:
        assert launcher.start(settings)
        first = launcher.process
        launcher.stop(wait_ms=500)          # sleep ignores its closed stdin: killed
        assert launcher.start(settings)                     # the second start
        second = launcher.process
        assert second is not first and stops == [1]
        # the first process's finished() arriving now, as it does when stop() gave up waiting for it
        first.finished.emit(0, QProcess.NormalExit)
        QgsApplication.processEvents()
        assert launcher.process is second and launcher.running and failures == [] and stops == [1]
    finally:
        launcher.stop(wait_ms=500)
    assert failures == [] and stops == [1, 1]


def test_stored_settings_out_of_range_are_read_as_the_defaults(qgis_app):
    """A hand-edited QGIS3.ini or another version's value: k 99999999999 overflowed the panel's spin
    box at every opening (the panel never opened), a max pixel side of 0 sent layers as one pixel."""
    stored = {"k": "99999999999", "threshold": "nan", "min_area_m2": "-5", "max_pixel_side": "0",
              "start_timeout_s": "-1"}
    try:
        for name, value in stored.items():
            QgsSettings().setValue(f"skyprompt/{name}", value)
        loaded, defaults = PluginSettings.load(), PluginSettings()
        assert [getattr(loaded, n) for n in stored] == [getattr(defaults, n) for n in stored]
        QgsSettings().setValue("skyprompt/k", "50")
        QgsSettings().setValue("skyprompt/start_timeout_s", "600")
        assert (PluginSettings.load().k, PluginSettings.load().start_timeout_s) == (50, 600.0)
    finally:
        QgsSettings().remove("skyprompt")


def test_a_start_that_times_out_gives_up_without_blocking_qgis(qgis_app, tmp_path):
    """The start timeout passed: the failure is said and the process given up on at once. stop()
    waited there for up to STOP_WAIT_MS (15 s) on QGIS's main thread, for a backend that loads its
    model and does not yet answer. One that does not leave when its pipe closes is killed later."""
    from backend.server import free_port
    from plugin.local_backend import LocalBackend

    never_serves = tmp_path / "python"
    never_serves.write_text("#!/bin/sh\nexec sleep 600\n")
    never_serves.chmod(0o755)
    settings = PluginSettings(address=f"127.0.0.1:{free_port()}", python=str(never_serves), backend_dir=str(tmp_path),
                              start_timeout_s=1)
    launcher = LocalBackend()
    launcher.CANCEL_START_WAIT_MS = 300
    failures, stops = [], []
    launcher.failed.connect(failures.append)
    launcher.stopped.connect(lambda: stops.append(1))
    assert launcher.start(settings)
    process = launcher.process
    longest, last, deadline = 0.0, time.monotonic(), time.monotonic() + 20
    while not failures and time.monotonic() < deadline:
        QgsApplication.processEvents()
        now = time.monotonic()
        longest, last = max(longest, now - last), now
        time.sleep(0.01)
    assert failures and "did not answer" in failures[0] and "Start timeout" in failures[0], failures
    assert longest < 1.0 and stops == [1] and launcher.process is None and not launcher.running
    ended = []
    process.finished.connect(lambda *_: ended.append(1))
    while not ended and time.monotonic() < deadline:
        QgsApplication.processEvents()          # the kill comes from a timer
        time.sleep(0.05)
    assert ended
    assert len(failures) == 1                   # its end, after the timeout, is not a second failure


def test_a_health_check_that_answers_late_does_not_replace_a_newer_answer(dock):
    """Two checks, the older one answering last: the light keeps the newer answer."""
    import dataclasses
    from concurrent import futures

    import grpc

    def slow_not_serving(request, context):
        time.sleep(1.0)
        return b"\x08\x02"                                 # HealthCheckResponse{status: NOT_SERVING}

    slow = grpc.server(futures.ThreadPoolExecutor(2))
    slow.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health", {"Check": grpc.unary_unary_rpc_method_handler(slow_not_serving)}),))
    port = slow.add_insecure_port("127.0.0.1:0")
    slow.start()
    serving = dock.settings
    answers = []
    dock.taskDone.connect(lambda kind, error: answers.append(error) if kind == "health" else None)
    try:
        dock.settings = dataclasses.replace(serving, address=f"127.0.0.1:{port}")
        dock.refresh_health()                                 # the older check: NOT_SERVING, in a second
        dock.settings = serving
        dock.refresh_health()                                 # the newer one: SERVING at once
        wait_until(lambda: len(answers) == 2, 30, "both health checks")
        assert answers == [None, None] and dock.health_state == "SERVING" and "serving" in dock.light.text()
        assert "rasters" in dock.info.text()
    finally:
        dock.settings = serving
        slow.stop(0)


def test_server_info_is_asked_once_per_backend_across_segments(dock, iface, rasters, own_backend,  # noqa: F811
                                                                monkeypatch):
    """GetInfo walks the index: two Segments of a file layer ask it once; a health check asks afresh."""
    from backend.service import SkyPromptService

    asked = []
    get_info = SkyPromptService.GetInfo

    def counted(self, request, context):
        asked.append(1)
        return get_info(self, request, context)

    monkeypatch.setattr(SkyPromptService, "GetInfo", counted)      # before the server binds its methods
    _, address = own_backend.start()
    dock.settings.address = address
    segment_whole_layer_setup(dock, iface, QgsRasterLayer(str(rasters["rgb"]), "ortho"))
    assert run_dock(dock, "segment", dock.segment) is None and run_dock(dock, "segment", dock.segment) is None
    assert len(asked) == 1, asked
    assert run_dock(dock, "health", dock.refresh_health) is None and len(asked) == 2
    assert run_dock(dock, "segment", dock.segment) is None and len(asked) == 2


def test_a_narrow_panel_keeps_the_query_readable_and_elides_long_result_rows(dock, iface, rasters):  # noqa: F811
    from qgis.PyQt.QtCore import Qt

    name = "orthophoto of the northern districts, spring flight, second pass, corrected"
    layer = QgsRasterLayer(str(rasters["rgb"]), name)
    QgsProject.instance().addMapLayer(layer)
    assert dock.tabs.widget(0).minimumSizeHint().width() <= 260, dock.tabs.widget(0).minimumSizeHint()
    iface.addDockWidget(Qt.RightDockWidgetArea, dock)
    iface.main_window.resizeDocks([dock], [260], Qt.Horizontal)
    dock.tabs.setCurrentIndex(0)
    QgsApplication.processEvents()
    for w in (dock.query, dock.k, dock.search_button, dock.result_list):
        assert w.width() >= w.minimumSizeHint().width(), (w, w.width(), w.minimumSizeHint())
    # the query has the row to itself, and a longer one than it shows is whole in its tooltip
    assert dock.query.width() >= dock.result_list.width() - 2, (dock.query.width(), dock.result_list.width())
    dock.query.setText("parking lots next to a highway with trees along both sides of it")
    assert dock.query.toolTip() == dock.query.text()
    assert run_dock(dock, "index", dock.index_layers) is None
    dock.query.setText("roads")
    assert run_dock(dock, "search", dock.search) is None and dock.result_list.count()
    QgsApplication.processEvents()
    item, rows = dock.result_list.item(0), dock.result_list
    row, room = rows.visualItemRect(item), rows.viewport().width()
    # the row is cut to the list, which the delegate paints with an ellipsis, not scrolled sideways
    assert rows.textElideMode() == Qt.ElideRight and row.right() < room and rows.horizontalScrollBar().maximum() == 0
    assert rows.fontMetrics().horizontalAdvance(name) > row.width(), (row, name)
    tip = item.toolTip()
    assert item.text().endswith(name) and tip.startswith(item.text()) and str(rasters["rgb"]) in tip


def test_pip_failures_say_network_only_when_pip_could_not_reach_the_index(tmp_path):
    """pip's own output, as it printed it: the message bar line names the cause it shows."""
    folder, packages = tmp_path / "deps", ["grpcio>=1.85.1", "protobuf>=6.31.1,<7"]
    refused = [
        "Looking in indexes: http://127.0.0.1:9/simple",
        "WARNING: Retrying (Retry(total=0, connect=None, read=None, redirect=None, status=None)) after connection "
        "broken by 'NewConnectionError(\"HTTPConnection(host='127.0.0.1', port=9): Failed to establish a new "
        "connection: [Errno 111] Connection refused\")': /simple/grpcio/",
        "ERROR: Could not find a version that satisfies the requirement grpcio (from versions: none)",
        "ERROR: No matching distribution found for grpcio"]
    no_dns = [
        "Collecting grpcio>=1.85.1",
        "ERROR: Could not install packages due to an OSError: HTTPSConnectionPool(host='files.pythonhosted.org', "
        "port=443): Max retries exceeded with url: /packages/grpcio-1.85.1-cp311-cp311-manylinux_2_17_x86_64.whl "
        "(Caused by NewConnectionError('<pip._vendor.urllib3.connection.HTTPSConnection object at 0x7f3a2c1b5d50>: "
        "Failed to establish a new connection: [Errno -3] Temporary failure in name resolution'))",
        ""]
    disk_full = [
        "Installing collected packages: typing-extensions, protobuf, grpcio",
        "ERROR: Could not install packages due to an OSError: [Errno 28] No space left on device: "
        f"'{folder}/grpc/_cython/cygrpc.cpython-311-x86_64-linux-gnu.so'",
        ""]
    bad_requirement = [
        "ERROR: Invalid requirement: 'grpcio>>1': Expected semicolon (after name with no version specifier) or end",
        "    grpcio>>1",
        "          ^"]
    for output in (refused, no_dns):
        message = deps.pip_failure(packages, folder, output)
        assert "check the network connection" in message and "\n" not in message, message
    assert "No matching distribution found for grpcio" in deps.pip_failure(packages, folder, refused)
    message = deps.pip_failure(packages, folder, disk_full)
    assert "no space left on device" in message and "check the network" not in message, message
    # the index answered, but no wheel fits this Python (an older QGIS): not the network's fault
    no_fit = ["Collecting grpcio>=1.85.1",
              "ERROR: Could not find a version that satisfies the requirement grpcio>=1.85.1 (from versions: 1.60.0, "
              "1.62.1)",
              "ERROR: No matching distribution found for grpcio>=1.85.1"]
    message = deps.pip_failure(packages, folder, no_fit)
    assert "check the network" not in message and "fits this QGIS's Python" in message, message
    message = deps.pip_failure(packages, folder, bad_requirement)
    assert "Invalid requirement: 'grpcio>>1'" in message and "check the network" not in message, message
    assert f"pip could not install {' '.join(packages)} into {folder}" in message


def test_a_file_layer_is_opened_with_gdal_once_per_version_of_the_file(qgis_app, rasters, tmp_path,  # noqa: F811
                                                                       monkeypatch):
    from osgeo import gdal as osgeo_gdal
    from plugin.sources import local_path

    path = tmp_path / "ortho.tif"
    shutil.copy(rasters["rgb"], path)
    layer = QgsRasterLayer(str(path), "ortho")
    opened = []
    open_ex = osgeo_gdal.OpenEx

    def counted(*args, **kw):
        opened.append(args[0])
        return open_ex(*args, **kw)

    monkeypatch.setattr(osgeo_gdal, "OpenEx", counted)
    assert local_path(layer) == str(path) and local_path(layer) == str(path)
    assert opened == [str(path)]
    mtime = path.stat().st_mtime_ns
    os.utime(path, ns=(mtime, mtime + 2_000_000_000))          # the file written again
    assert local_path(layer) == str(path) and opened == [str(path)] * 2
    # a sidecar a CRS may come from (.prj, .aux.xml) is part of the file's georeferencing: a new or
    # changed one is asked about again (whether GDAL takes the CRS from it depends on the format)
    (tmp_path / "ortho.prj").write_text(QgsCoordinateReferenceSystem("EPSG:3035").toWkt())
    assert local_path(layer) == str(path) and opened == [str(path)] * 3
    (tmp_path / "ortho.prj").unlink()
    (tmp_path / "ortho.tif.aux.xml").write_text("<PAMDataset></PAMDataset>")
    assert local_path(layer) == str(path) and opened == [str(path)] * 4


def test_a_layer_opened_through_a_link_is_named_in_search_results(dock, iface, rasters, own_backend,  # noqa: F811
                                                                  skyprompt_processing, tmp_path):
    """The backend answers with a raster's real path (links followed): a layer opened through a link
    is matched to its hits all the same, in the panel's list and results layer and in Processing's."""
    import processing

    _, address = own_backend.start()
    dock.settings.address = address
    link = tmp_path / "linked.tif"
    link.symlink_to(rasters["rgb"])
    layer = QgsRasterLayer(str(link), "through a link")
    QgsProject.instance().addMapLayer(layer)
    assert run_dock(dock, "index", dock.index_layers) is None
    dock.query.setText("fields")
    dock.k.setValue(3)
    assert run_dock(dock, "search", dock.search) is None
    assert {f["layer"] for f in dock.last_layer.getFeatures()} == {"through a link"}
    assert dock.result_list.item(0).text().endswith("through a link")
    found = QgsVectorLayerFrom(processing.run("skyprompt:searchtiles", {
        "QUERY": "fields", "K": 3, "LAYERS": [layer], "SERVER": address,
        "OUTPUT": str(tmp_path / "tiles.gpkg")})["OUTPUT"])
    assert found.featureCount() == 3 and {f["layer"] for f in found.getFeatures()} == {"through a link"}


def test_hits_of_a_raster_across_180_lie_on_it_and_a_tile_the_map_cannot_show_is_said(dock, iface, rasters):
    """A raster stored in longitudes 179.5..180.5: its result footprints lie where QGIS draws it, not
    360 degrees away; clicking a result the map cannot show (on the far side of an orthographic globe)
    says so, rather than raising in the click's slot."""
    from qgis.PyQt.QtCore import Qt

    path = make_tif(rasters["folder"] / "across_180_east.tif", noise((3, 128, 512), seed=9),
                    geotransform=(179.488, 0.002, 0.0, -17.0, 0.0, -0.002), crs="EPSG:4326")
    layer = QgsProject.instance().addMapLayer(QgsRasterLayer(str(path), "across 180"))
    try:
        for i in range(dock.layer_list.count()):
            item = dock.layer_list.item(i)
            item.setCheckState(Qt.Checked if item.data(Qt.UserRole) == layer.id() else Qt.Unchecked)
        assert run_dock(dock, "index", dock.index_layers) is None
        dock.search_in_view.setChecked(False)
        dock.query.setText("fields")
        dock.k.setValue(100)
        assert run_dock(dock, "search", dock.search) is None
        footprints = [f.geometry() for f in dock.last_layer.getFeatures()]
        assert len(footprints) > 4
        assert all(g.intersects(QgsGeometry.fromRect(layer.extent())) for g in footprints)
        assert any(g.boundingBox().xMaximum() > 180.0 for g in footprints)     # east of 180, as drawn
        # the map in an orthographic CRS centred on the other side of the globe
        far_side = QgsCoordinateReferenceSystem.fromProj("+proj=ortho +lat_0=0 +lon_0=0 +datum=WGS84 +units=m")
        iface.canvas.setDestinationCrs(far_side)
        before = len(iface.message_bar.messages)
        dock.zoom_to_result(dock.result_list.item(0))
        said = " ".join(text or "" for _, text, _ in iface.message_bar.messages[before:])
        assert "cannot be shown in this map" in said, said
    finally:
        QgsProject.instance().removeMapLayer(layer.id())
        iface.canvas.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:4326"))


def test_hits_from_a_file_changed_since_indexing_are_flagged(dock, iface, rasters, own_backend,  # noqa: F811
                                                           skyprompt_processing, tmp_path):
    """A layer's file written again after Index: its hits show it as it was. The panel and Processing
    say so, naming the layer and what to do, and the panel's list marks those hits."""
    import shutil

    import processing
    from qgis.PyQt.QtCore import Qt

    _, address = own_backend.start()
    dock.settings.address = address
    path = rasters["folder"] / "edited_later.tif"
    shutil.copy(rasters["rgb"], path)
    layer = QgsProject.instance().addMapLayer(QgsRasterLayer(str(path), "edited later"))
    for i in range(dock.layer_list.count()):
        item = dock.layer_list.item(i)
        item.setCheckState(Qt.Checked if item.data(Qt.UserRole) == layer.id() else Qt.Unchecked)
    try:
        assert run_dock(dock, "index", dock.index_layers) is None
        dock.query.setText("fields")
        dock.k.setValue(3)
        assert run_dock(dock, "search", dock.search) is None
        assert not any("changed" in dock.result_list.item(i).text() for i in range(dock.result_list.count()))
        make_tif(path, noise((3, 300, 400), seed=78))      # the file written again, with other pixels
        before = len(iface.message_bar.messages)
        assert run_dock(dock, "search", dock.search) is None
        said = " ".join(text or "" for _, text, _ in iface.message_bar.messages[before:])
        assert "3 of 3 hits are from 'edited later', which was changed on disk" in said, said
        assert "Index it again" in said
        assert all(dock.result_list.item(i).text().endswith("(changed since indexed)") for i in range(3))
        feedback = RecordingFeedback()
        processing.run("skyprompt:searchtiles", {"QUERY": "fields", "K": 3, "LAYERS": [layer], "SERVER": address,
                                                  "OUTPUT": str(tmp_path / "tiles.gpkg")}, feedback=feedback)
        assert any("'edited later', which was changed" in w for w in feedback.warnings), feedback.warnings
        # then deleted: said so, with what to do about it
        path.unlink()
        before = len(iface.message_bar.messages)
        assert run_dock(dock, "search", dock.search) is None
        said = " ".join(text or "" for _, text, _ in iface.message_bar.messages[before:])
        assert "from 'edited later', which was moved or deleted on disk" in said, said      # named by its layer
        assert "remove the old entry" in said
        assert all(dock.result_list.item(i).text().endswith("(moved or deleted since indexed)") for i in range(3))
        assert {f["layer"] for f in dock.last_layer.getFeatures()} == {"edited later"}
        # Index of it is refused by name, not made from the pixels QGIS still holds of the file
        before = len(iface.message_bar.messages)
        assert run_dock(dock, "index", dock.index_layers) is not None
        said = " ".join(text or "" for _, text, _ in iface.message_bar.messages[before:])
        assert "edited later" in said and "does not exist" in said, said
        from plugin import operations
        from plugin.connection import BackendConnection

        with BackendConnection(address, token=TOKEN) as conn:
            listed = operations.indexed_rasters(conn)
        assert not any(r.raster_name == "edited later" and not r.raster_path for r in listed)   # no pixel copy
        # Processing searches it as that file's layer too, flagging its hits
        feedback = RecordingFeedback()
        processing.run("skyprompt:searchtiles", {"QUERY": "fields", "K": 3, "LAYERS": [layer], "SERVER": address,
                                                  "OUTPUT": str(tmp_path / "gone.gpkg")}, feedback=feedback)
        assert any("'edited later', which was moved or deleted" in w for w in feedback.warnings), feedback.warnings
    finally:
        QgsProject.instance().removeMapLayer(layer.id())
        path.unlink(missing_ok=True)


def vsimem_layer(path: str, name: str, width: int = 160, height: int = 120) -> QgsRasterLayer:
    """A GeoTIFF in GDAL's memory, which the backend cannot open: the plugin sends it as pixels."""
    ds = gdal.GetDriverByName("GTiff").Create(path, width, height, 3, gdal.GDT_Byte)
    ds.SetGeoTransform((300000.0, 2.0, 0.0, 4000000.0, 0.0, -2.0))
    ds.SetProjection(QgsCoordinateReferenceSystem("EPSG:32633").toWkt())
    data = noise((3, height, width), seed=6)
    for i in range(3):
        ds.GetRasterBand(i + 1).WriteArray(data[i])
    ds = None
    layer = QgsRasterLayer(path, name)
    assert layer.isValid()
    return layer


def test_a_max_side_above_the_backends_pixel_limit_reads_at_the_limit(dock, iface, own_backend):
    """The Max side setting goes up to 16384, a backend takes pixel sources up to its
    limits.max_pixel_source_side: a layer sent as pixels is read at most that, not refused."""
    _, address = own_backend.start(limits=Limits(max_pixel_source_side=64))
    dock.settings.address = address
    dock.settings.max_pixel_side = 1000
    layer = vsimem_layer("/vsimem/skyprompt-pixel-limit.tif", "in memory")          # 160 x 120 px
    try:
        segment_whole_layer_setup(dock, iface, layer, "water")
        dock.threshold.setValue(0.0)
        assert run_dock(dock, "segment", dock.segment) is None
        assert dock.last_layer.featureCount() >= 1
        assert any("capped at 64 px" in (text or "") for _, text, _ in iface.message_bar.messages)
    finally:
        gdal.Unlink("/vsimem/skyprompt-pixel-limit.tif")


@pytest.mark.parametrize("limit", [None, 100])
def test_a_layer_name_longer_than_the_backends_label_limit_is_cut_to_it(dock, iface, own_backend, limit):
    """PixelSource.label takes limits.max_label_chars characters (code points, as the backend counts
    them; 256 by default): a longer layer name is cut to the backend's limit, so the layer is indexed
    under it rather than refused."""
    import grpc
    from backend.rpc import skyprompt_pb2, skyprompt_pb2_grpc

    _, address = own_backend.start(**({} if limit is None else {"limits": Limits(max_label_chars=limit)}))
    dock.settings.address = address
    name = "satellite \U0001F6F0 " * 40                # 480 code points, each satellite two UTF-16 units
    layer = vsimem_layer("/vsimem/skyprompt-long-name.tif", name)
    try:
        QgsProject.instance().addMapLayer(layer)
        assert run_dock(dock, "index", dock.index_layers) is None
    finally:
        gdal.Unlink("/vsimem/skyprompt-long-name.tif")
    with grpc.insecure_channel(address) as channel:
        listed = skyprompt_pb2_grpc.SkyPromptStub(channel).ListRasters(
            skyprompt_pb2.ListRastersRequest(), metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=30)
    assert [r.raster_name for r in listed.rasters] == [name[:limit or 256]]


def test_search_without_a_thumbnail_size_uses_the_backends_smaller_limit(own_backend, rasters):  # noqa: F811
    """A backend whose limits.max_thumbnail_side is under the default of 128 px sends thumbnails at
    its limit when none is asked for, rather than refusing a request that named no size."""
    import grpc
    from PyQt5.QtGui import QImage
    from backend.rpc import skyprompt_pb2, skyprompt_pb2_grpc

    _, address = own_backend.start(limits=Limits(max_thumbnail_side=48))
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    with grpc.insecure_channel(address) as channel:
        stub = skyprompt_pb2_grpc.SkyPromptStub(channel)
        for _ in stub.IndexRaster(skyprompt_pb2.IndexRasterRequest(
                source=skyprompt_pb2.RasterSource(path=str(rasters["rgb"]))), metadata=metadata, timeout=120):
            pass
        hits = stub.Search(skyprompt_pb2.SearchRequest(query="fields", k=2, include_thumbnails=True),
                           metadata=metadata, timeout=30).hits
        with pytest.raises(grpc.RpcError) as refused:
            stub.Search(skyprompt_pb2.SearchRequest(query="fields", k=2, include_thumbnails=True, thumbnail_size=64),
                        metadata=metadata, timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "limit of 48" in refused.value.details()
    assert len(hits) == 2
    for hit in hits:
        image = QImage.fromData(hit.thumbnail_png, "PNG")
        assert not image.isNull() and max(image.width(), image.height()) == 48


def test_the_model_sees_the_bands_the_layer_shows(qgis_app, own_backend, rasters):  # noqa: F811
    """A stack of four 16-bit bands marks no colours: the backend alone would read bands 1, 2, 3 as
    red, green, blue. The plugin sends the bands the layer's renderer shows, by path (BandMapping:
    other bands are another index entry) and as pixels (those bands, in that order); a bare path
    gets the backend's word on its guess, which the plugin passes on."""
    from qgis.core import QgsMultiBandColorRenderer, QgsSingleBandGrayRenderer

    from plugin import operations
    from plugin.connection import BackendConnection
    from plugin.rpc import skyprompt_pb2 as pb
    from plugin.sources import LayerPath, PixelReader, prepare_source

    bands = noise((4, 64, 64), np.uint16, 100, 3000, seed=21)
    path = make_tif(rasters["folder"] / "four_band_stack.tif", bands,
                    geotransform=(300000.0, 2.0, 0.0, 4000000.0, 0.0, -2.0))
    layer = QgsRasterLayer(str(path), "stack")
    assert layer.isValid()
    _, address = own_backend.start()

    def index(prepared) -> tuple[str, list]:
        notes = []
        result = operations.index_layer(conn, prepared, 1024, lambda p: None, lambda: False, notes=notes)
        return operations.outcome_word(result), notes

    with BackendConnection(address, token=TOKEN) as conn:
        layer.setRenderer(QgsMultiBandColorRenderer(layer.dataProvider(), 1, 2, 3))
        shown = prepare_source(layer)
        assert isinstance(shown, LayerPath) and shown.bands == (1, 2, 3)
        assert index(shown) == ("indexed", [])
        layer.setRenderer(QgsMultiBandColorRenderer(layer.dataProvider(), 3, 2, 1))
        assert index(prepare_source(layer)) == ("replaced", [])
        assert index(prepare_source(layer)) == ("unchanged", [])
        outcome, notes = index(str(path))                              # no bands named: the backend guesses
        assert outcome == "replaced" and len(notes) == 1 and "bands 1, 2, 3 were read" in notes[0]
        assert notes[0].endswith(operations.BAND_NOTE_ADVICE)

    sent = PixelReader(layer).read(pb, layer.extent(), 1000)[0].pixels
    planes = np.frombuffer(sent.data, np.uint16).reshape(sent.band_count, sent.height, sent.width)
    assert sent.band_count == 3 and np.array_equal(planes, bands[[2, 1, 0]])
    layer.setRenderer(QgsSingleBandGrayRenderer(layer.dataProvider(), 4))
    assert prepare_source(layer).bands == (4,)
    sent = PixelReader(layer).read(pb, layer.extent(), 1000)[0].pixels
    assert sent.band_count == 1 and np.array_equal(np.frombuffer(sent.data, np.uint16).reshape(64, 64), bands[3])
    layer.renderer().setAlphaBand(2)            # the renderer's transparency band goes along as alpha
    sent = PixelReader(layer).read(pb, layer.extent(), 1000)[0].pixels
    planes = np.frombuffer(sent.data, np.uint16).reshape(2, 64, 64)
    assert (sent.band_count, sent.alpha_band) == (2, 2) and np.array_equal(planes, bands[[3, 1]])


def test_match_words_in_tile_captions_reaches_the_backend(dock, iface, rasters, tmp_path,  # noqa: F811
                                                         qgis_processing):
    """The Search tab's "Match tile captions" (on: the backend's default keyword matching;
    off: keyword_weight 0), on the bundled checkpoint, whose captions tell the made raster's water
    tiles ("... river or lake.") from its grass, jumble and sand."""
    from test_server import ground_cover_raster

    from backend.defaults import BUNDLED_CHECKPOINT

    backends = OwnBackends(BUNDLED_CHECKPOINT, [rasters["folder"]], tmp_path)
    try:
        _, address = backends.start()
        dock.settings.address = address
        layer = QgsRasterLayer(str(ground_cover_raster(rasters["folder"] / "ground_cover.tif")), "ground")
        assert layer.isValid()
        QgsProject.instance().addMapLayer(layer)
        assert run_dock(dock, "index", dock.index_layers) is None
        dock.query.setText("a lake")
        dock.k.setValue(8)

        def dock_hits():
            assert run_dock(dock, "search", dock.search) is None
            return [(f["score"], f["caption"]) for f in dock.last_layer.getFeatures()]

        assert dock.match_captions.isChecked()
        matched = dock_hits()
        plain = with_checked(dock.match_captions, False, dock_hits)
        lake = [score for score, caption in matched if "lake" in caption]
        assert len(lake) == 2 and [s for s, _ in matched][:2] == lake
        # off: the cosines alone, so the water tiles score less than with their words matched
        assert sorted(s for s, c in plain if "lake" in c)[-1] < min(lake)
        assert [s for s, _ in plain] == sorted((s for s, _ in plain), reverse=True)
        # Processing's Search tiles by text: the same switch (MATCH_CAPTIONS, on by default)
        import processing
        from plugin.processing_provider import SkyPromptProvider

        provider = SkyPromptProvider()
        QgsApplication.processingRegistry().addProvider(provider)
        try:
            def processing_hits(**extra):
                out = processing.run("skyprompt:searchtiles", {"QUERY": "a lake", "K": 8, "LAYERS": [layer],
                                                               "SERVER": address,
                                                               "OUTPUT": str(tmp_path / f"p{len(extra)}.gpkg"), **extra})
                return [(f["score"], f["caption"]) for f in QgsVectorLayerFrom(out["OUTPUT"]).getFeatures()]

            assert [s for s, _ in processing_hits()] == pytest.approx([s for s, _ in matched], abs=1e-5)
            assert [s for s, _ in processing_hits(MATCH_CAPTIONS=False)] == pytest.approx([s for s, _ in plain],
                                                                                         abs=1e-5)
        finally:
            QgsApplication.processingRegistry().removeProvider(provider)
    finally:
        QgsProject.instance().removeAllMapLayers()
        backends.close()


def test_a_raster_the_backend_left_out_of_a_search_is_named_after_its_layer(qgis_app):
    """SearchResponse.unsearchable_rasters become one warning each, naming the project's layer of the
    file where there is one (the panel and Processing show these lines)."""
    from plugin import operations
    from plugin.rpc import skyprompt_pb2 as pb

    response = pb.SearchResponse()
    response.unsearchable_rasters.add(raster_id="3", raster_path="/data/north.tif", raster_name="north.tif",
                                      reason="its embedding file is damaged: re-index it")
    response.unsearchable_rasters.add(raster_id="4", raster_path="", raster_name="scan",
                                      reason="its embedding file cannot be read (Permission denied)")
    assert operations.unsearchable_notes(response, {"/data/north.tif": "North ortho"}) == [
        "not searched: 'North ortho' on the backend: its embedding file is damaged: re-index it",
        "not searched: 'scan' on the backend: its embedding file cannot be read (Permission denied)"]
    assert operations.unsearchable_notes(pb.SearchResponse()) == []
    # after a checkpoint change every raster is left out: three named, the rest counted
    for i in range(5, 12):
        response.unsearchable_rasters.add(raster_id=str(i), raster_name=f"r{i}.tif", reason="indexed with checkpoint x")
    notes = operations.unsearchable_notes(response)
    assert len(notes) == 4 and notes[-1].startswith("... and 6 more rasters not searched")
    response.unsearchable_rasters.add(raster_name="40 more rasters", reason="indexed with checkpoint x", raster_count=40)
    assert operations.unsearchable_notes(response)[-1].startswith("... and 46 more rasters not searched")


def test_start_local_backend_failures_get_advice_for_what_the_plugin_can_change(qgis_app, checkpoint, tmp_path):  # noqa: F811
    """The backend's own last lines for a damaged checkpoint, and for an index another backend holds,
    get what to do in QGIS (the Checkpoint setting; stop the other backend or use it), not only advice
    about command-line options the plugin does not show."""
    import shutil

    from backend.index import TileIndex
    from plugin.local_backend import LocalBackend

    def last_line(*args):
        r = subprocess.run([sys.executable, "-m", "backend", "serve", "--port", "0", "--device", "cpu", *args],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stderr
        return r.stderr.strip().splitlines()[-1]

    launcher = LocalBackend()
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    (broken / "model.safetensors").write_bytes((broken / "model.safetensors").read_bytes()[:100])
    launcher._log_tail = [last_line("--checkpoint", str(broken), "--data-dir", str(tmp_path / "d1"))]
    assert launcher._why().endswith("set Checkpoint in SkyPrompt settings (empty: the bundled one)"), launcher._why()
    with TileIndex(tmp_path / "d2" / "index"):
        launcher._log_tail = [last_line("--checkpoint", str(checkpoint), "--data-dir", str(tmp_path / "d2"))]
    assert "another SkyPrompt backend" in launcher._why() and "put its address in the SkyPrompt panel" in \
        launcher._why(), launcher._why()


def test_answers_that_come_too_late_are_dropped_and_a_search_runs_once(dock, layers, iface, live, monkeypatch):
    """Search is off while a search runs (Enter in the query box too); an answer that comes after
    the backend address changed, or after the project was closed, is dropped rather than shown for
    the new backend or added to the new project; a failure is logged once."""
    from qgis.core import QgsMessageLog
    from qgis.PyQt.QtCore import Qt

    layer = layers[0]
    source = layer.source()
    for i in range(dock.layer_list.count()):
        item = dock.layer_list.item(i)
        item.setCheckState(Qt.Checked if item.data(Qt.UserRole) == layer.id() else Qt.Unchecked)
    assert run_dock(dock, "index", dock.index_layers) is None
    iface.canvas.setDestinationCrs(layer.crs())
    iface.canvas.setExtent(layer.extent())
    dock.query.setText("roads and houses")
    got = []
    dock.taskDone.connect(lambda kind, error: got.append(kind))
    task = dock.search()
    assert task is not None and not dock.search_button.isEnabled()
    assert dock._search("again", None) is None              # what Enter in the query box calls
    dock.address.setText("127.0.0.1:1")
    dock._address_edited()
    wait_until(lambda: got.count("search") == 2, 60, "the search begun before the address changed")
    assert dock.result_list.count() == 0 and dock.search_button.isEnabled()
    said = " ".join(text or "" for _, text, _ in iface.message_bar.messages)
    assert "a search is running" in said and "the answer came after the backend address changed" in said
    # back to the backend: a Segment whose project is closed while it runs adds nothing to the next one
    dock.address.setText(live.address)
    dock._address_edited()
    dock.segment_layer.setLayer(layer)
    dock.area.setCurrentIndex(0)
    dock.prompts.setText("fields")
    dock.output.setFilePath("")
    logged = []
    monkeypatch.setattr(QgsMessageLog, "logMessage", staticmethod(lambda text, *a, **k: logged.append(text)))
    assert run_dock(dock, "segment", lambda: (dock.segment(), QgsProject.instance().clear())) is None
    assert not [l for l in QgsProject.instance().mapLayers().values() if l.name().startswith("SkyPrompt")]
    assert any("the project was closed" in t for t in logged), logged
    # a failing call: one line in the log, not the task's and the panel's
    logged.clear()
    dock.address.setText("127.0.0.1:1")
    dock._address_edited()
    QgsProject.instance().addMapLayer(QgsRasterLayer(source, "again"))     # the clear deleted the others
    dock.query.setText("fields")
    asked = dock._health_asked
    assert run_dock(dock, "search", dock.search) is not None
    assert sum("no SkyPrompt backend answers" in t for t in logged) == 1, logged
    # the backend unreachable: the light is checked again, not left as it was
    assert dock._health_asked == asked + 1


def test_an_index_answered_after_the_project_closed_says_the_backend_indexed_it(dock, iface, rasters):  # noqa: F811
    """The panel drops an Index answer that comes after the project was closed, but the backend did
    index the file: the message says so, not that the indexing was dropped."""
    QgsProject.instance().addMapLayer(QgsRasterLayer(str(rasters["rgb"]), "ortho"))
    before = len(iface.message_bar.messages)
    assert run_dock(dock, "index", lambda: (dock.index_layers(), QgsProject.instance().clear())) is None
    said = [text for _, text, _ in iface.message_bar.messages[before:]]
    assert f"indexing 1 layer(s): the backend at {dock.settings.address} indexed 1 of them, but the answer came " \
           "after the project was closed, so only the panel's report of it was dropped" in said, said


def test_describe_of_a_map_off_its_globe_is_one_line(dock, layers, iface):
    """An orthographic map panned into empty space: the view has no place in the layer's CRS. A
    message, not a Python error out of the button."""
    layer = layers[0]
    ortho = QgsCoordinateReferenceSystem()
    ortho.createFromProj("+proj=ortho +lat_0=0 +lon_0=0 +R=6370997 +units=m +no_defs")
    iface.canvas.setDestinationCrs(ortho)
    iface.canvas.setExtent(QgsRectangle(2e7, 2e7, 2.1e7, 2.1e7))
    dock.describe_layer.setLayer(layer)
    error = run_dock(dock, "caption", dock.describe)
    assert error is not None and f"cannot be placed in the CRS of layer {layer.name()!r}" in str(error), error


def test_segment_and_describe_of_a_layer_across_180_degrees_on_a_pacific_map(dock, iface, rasters, live):  # noqa: F811
    """A longitude/latitude layer across 180 degrees on a Pacific Mercator map (EPSG:3832): GDAL's
    box of the map's rectangle in the layer's CRS wraps round the world; the backend places it on the
    raster (backend.raster), and both work, as QGIS shows the layer."""
    from qgis.core import QgsCoordinateTransform

    path = rasters["folder"] / "across_180.tif"
    if not path.exists():
        make_tif(path, noise((3, 400, 400), seed=31), geotransform=(179.9, 0.0005, 0.0, -16.0, 0.0, -0.0005),
                 crs="EPSG:4326")
    layer = QgsRasterLayer(str(path), "across 180")
    segment_whole_layer_setup(dock, iface, layer, "trees")
    pacific = QgsCoordinateReferenceSystem("EPSG:3832")
    iface.canvas.setDestinationCrs(pacific)
    iface.canvas.setExtent(QgsCoordinateTransform(layer.crs(), pacific, QgsProject.instance())
                           .transformBoundingBox(layer.extent()))
    dock.describe_layer.setLayer(layer)
    try:
        assert run_dock(dock, "segment", dock.segment) is None
        assert run_dock(dock, "caption", dock.describe) is None and dock.caption.toPlainText()
    finally:
        QgsProject.instance().removeAllMapLayers()
        del layer


def test_processing_without_prompt_or_query_says_what_to_type(skyprompt_processing, rasters, tmp_path):  # noqa: F811
    """Empty PROMPTS (or only separators) and an empty QUERY: the message says what to type, not
    QGIS's 'Incorrect parameter value for PROMPTS'; no backend is asked (none answers here)."""
    import processing
    from qgis.core import QgsProcessingException

    for prompts in ("", " ,; \n"):
        with pytest.raises(QgsProcessingException, match="no prompt given: type what to outline"):
            processing.run("skyprompt:prompttopolygons", {"INPUT": str(rasters["rgb"]), "PROMPTS": prompts,
                                                          "SERVER": "127.0.0.1:9", "OUTPUT": str(tmp_path / "p.gpkg")})
    for query in ("", "   "):
        with pytest.raises(QgsProcessingException, match="the query is empty: type what to look for"):
            processing.run("skyprompt:searchtiles", {"QUERY": query, "SERVER": "127.0.0.1:9",
                                                     "OUTPUT": str(tmp_path / "s.gpkg")})


def test_segment_and_describe_fall_back_to_the_layers_rectangle_with_an_older_backend():
    """A backend from before "extent_placement" refused a Pacific map's rectangle ("does not map to a
    usable rectangle"): the plugin then sends the rectangle QGIS placed in the layer's CRS. Such a
    backend is another version, which cannot run here: a stand-in gives its answers."""
    from backend.rpc import skyprompt_pb2 as pb

    from plugin.connection import BackendError
    from plugin.operations import _placed_for_older_backend

    class OlderBackend:
        def __init__(self, capabilities):
            self.pb, self.sent, self._capabilities = pb, [], capabilities

        def info(self, cancelled=None):
            return pb.ServerInfo(capabilities=self._capabilities)

        def caption(self, request, cancelled=None):
            self.sent.append(pb.Extent.FromString(request.extent.SerializeToString()))
            if request.extent.crs:
                raise BackendError("INVALID_ARGUMENT", "extent (1, 2, 3, 4) in EPSG:3832 does not map to a usable "
                                                       "rectangle in the raster's CRS EPSG:4326; give it in that CRS instead")
            return pb.CaptionResponse(caption="a forest")

    in_layer = QgsRectangle(179.9, -16.2, 180.1, -16.0)
    request = pb.CaptionRequest(extent=pb.Extent(xmin=1, ymin=2, xmax=3, ymax=4, crs="EPSG:3832"))
    older = OlderBackend(["caption"])
    assert _placed_for_older_backend(older, older.caption, request, in_layer).caption == "a forest"
    assert [e.crs for e in older.sent] == ["EPSG:3832", ""] and older.sent[1].xmax == pytest.approx(180.1)
    # a backend that places extents itself: its refusal is its answer
    current = OlderBackend(["caption", "extent_placement"])
    request = pb.CaptionRequest(extent=pb.Extent(xmin=1, ymin=2, xmax=3, ymax=4, crs="EPSG:3832"))
    with pytest.raises(BackendError, match="does not map"):
        _placed_for_older_backend(current, current.caption, request, in_layer)


# -- a backend found serving, a URL for an address, the backend's log levels, the zip's files, teardown, old Pythons --
def test_start_local_backend_where_one_already_serves_says_its_settings_are_not_used(dock, iface):
    """'Start local backend' with a backend (started elsewhere) at the address uses that one: the
    message bar said "backend serving at ...", as for one started with the Checkpoint and Device settings."""
    dock.settings.checkpoint, dock.settings.device = "/nowhere/my-checkpoint", "cuda:0"
    iface.message_bar.messages.clear()
    dock.start_button.click()
    assert not dock.backend.running and dock.start_button.text() == "Start local backend"
    said = [(text, level) for _, text, level in iface.message_bar.messages]
    assert len(said) == 1 and said[0][1] == int(Qgis.Warning), said
    text = said[0][0]
    assert f"a backend already runs at {dock.settings.address}" in text and "none was started" in text, text
    assert "not your Checkpoint and Device settings" in text and "stop that backend" in text, text
    host, port = dock.settings.address.rsplit(":", 1)
    assert f"another port in the address field (e.g. {host}:{int(port) + 1})" in text, text
    assert not any("backend serving at" in t for t, _ in said)
    wait_until(lambda: dock.health_state == "SERVING", 10, "the light to show the backend used")


def test_an_address_with_a_scheme_or_a_path_is_said_to_be_host_port(dock, iface):
    """"http://127.0.0.1:50051/" was "has no port": it has one; it is a URL, and the address is HOST:PORT."""
    from plugin.settings import AddressError

    for address, what in (("http://127.0.0.1:50051/", "a scheme and a path"), ("grpc://localhost:7", "a scheme"),
                          ("127.0.0.1:50051/skyprompt", "a path")):
        with pytest.raises(AddressError) as err:
            PluginSettings(address=address).port
        message = str(err.value)
        assert "has no port" not in message and f"has {what}" in message, message
        assert "give it as HOST:PORT, without a scheme (http://) or a path (/...)" in message, message
    from plugin.settings import address_problem

    assert "e.g. 127.0.0.1:50051," in address_problem("http://127.0.0.1:50051/")
    assert "e.g. localhost:7," in address_problem("grpc://localhost:7")
    assert "e.g. 127.0.0.1:50051," in address_problem("https://example.org/")     # no port in it: the default's
    assert address_problem("127.0.0.1:50051") is None and address_problem("[::1]:7") is None
    assert address_problem("backend.lan") is None      # no port is said where the port is read, as before
    # gRPC's own target names, which a channel takes as they are
    assert address_problem("dns:///backend.lan:50051") is None and address_problem("unix:///run/sp.sock") is None
    # the panel: the field keeps what was typed, the message bar and the line below the light say what to write
    iface.message_bar.messages.clear()
    dock.address.setText("http://127.0.0.1:50051/")
    dock.address.editingFinished.emit()
    assert dock.address.text() == "http://127.0.0.1:50051/" == dock.settings.address
    assert any(level == int(Qgis.Warning) and "without a scheme (http://)" in text
               for _, text, level in iface.message_bar.messages), iface.message_bar.messages
    wait_until(lambda: "without a scheme" in dock.info.text(), 10, "the health check's line")
    assert "no backend answers" not in dock.info.text()
    failures = []
    dock.backend.failed.connect(failures.append)
    dock.start_button.click()
    assert failures and "without a scheme" in failures[0] and "has no port" not in failures[0], failures
    assert not dock.backend.running and dock.start_button.text() == "Start local backend"


def test_the_backends_warnings_errors_and_tracebacks_are_logged_at_their_level(qgis_app, tmp_path):
    """Every line the backend wrote was Info in the SkyPrompt log. A line cut in two by a read (here
    by a pause in the middle of its level field), and a last line with no newline, are whole lines."""
    from backend.server import free_port
    from plugin.local_backend import LocalBackend

    stamp = "2025-01-02 03:04:05,678"
    backend = tmp_path / "python"
    backend.write_text(
        "#!/bin/sh\n"
        f"echo '{stamp} INFO backend.server: loading the model'\n"
        f"echo '{stamp} WARNING backend.service: slow tile'\n"
        f"echo '{stamp} ERROR backend.service: Segment failed'\n"
        "echo 'Traceback (most recent call last):'\n"
        "echo '  File \"/x/backend/service.py\", line 1, in segment'\n"
        "echo '    raise ValueError(\"boom\")'\n"
        "echo 'ValueError: boom'\n"
        "echo 'a plain line'\n"
        f"printf '{stamp} WARN'\nsleep 0.5\nprintf 'ING backend.index: split in two\\n'\n"
        f"echo '{stamp} CRITICAL backend.server: cannot serve'\n"
        f"printf '{stamp} WARNING backend.server: no newline at the end'\n"
        "exit 3\n")
    backend.chmod(0o755)
    logged = []

    def log(text, tag, level):
        if tag == "SkyPrompt" and not text.startswith("starting backend"):
            logged.append((text.split(" backend.")[-1] if text.startswith(stamp) else text, int(level)))

    launcher = LocalBackend()
    failures = []
    launcher.failed.connect(failures.append)
    QgsApplication.messageLog().messageReceived.connect(log)
    try:
        assert launcher.start(PluginSettings(address=f"127.0.0.1:{free_port()}", python=str(backend),
                                             backend_dir=str(tmp_path)))
        wait_until(lambda: failures, 30, "the backend to exit")
    finally:
        QgsApplication.messageLog().messageReceived.disconnect(log)
        launcher.stop(wait_ms=500)
    info, warning, critical = int(Qgis.Info), int(Qgis.Warning), int(Qgis.Critical)
    assert logged == [("server: loading the model", info), ("service: slow tile", warning),
                      ("service: Segment failed", critical), ("Traceback (most recent call last):", critical),
                      ('  File "/x/backend/service.py", line 1, in segment', critical),
                      ('    raise ValueError("boom")', critical), ("ValueError: boom", critical),
                      ("a plain line", info), ("index: split in two", warning), ("server: cannot serve", critical),
                      ("server: no newline at the end", warning)], logged
    assert "exited with code 3" in failures[0] and "no newline at the end" in failures[0], failures


def _plugin_source_copy(root: Path) -> Path:
    """The files tools/build_plugin_zip.py reads, copied to `root` (a source tree of its own)."""
    for name in ("metadata.txt", "LICENSE", "pyproject.toml", ".gitignore", "tools/build_plugin_zip.py",
                 "tools/build_proto.py"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, root / name)
    shutil.copytree(REPO / "plugin", root / "plugin", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_the_zip_ships_the_files_git_tracks_readable_by_all(tmp_path):
    """A scratch file beside the plugin's modules went into the zip; metadata.txt was rw------- there."""
    if shutil.which("git") is None:
        pytest.skip("no git")
    source = _plugin_source_copy(tmp_path / "src")
    subprocess.run(["git", "init", "-q", str(source)], check=True)
    subprocess.run(["git", "-C", str(source), "add", "plugin"], check=True)     # plugin/rpc is ignored: generated
    (source / "plugin" / "scratch_notes.py").write_text("# notes\n")
    (source / "plugin" / "rpc" / "scratch_rpc.py").write_text("# notes\n")

    said = []

    def build() -> dict:
        out = tmp_path / "skyprompt.zip"
        done = subprocess.run([sys.executable, str(source / "tools" / "build_plugin_zip.py"), "--out", str(out)],
                              check=True, capture_output=True, text=True, cwd=tmp_path)
        said.append(done.stderr)
        with zipfile.ZipFile(out) as z:
            return {i.filename: i.external_attr >> 16 for i in z.infolist()}

    modes = build()
    assert "skyprompt/scratch_notes.py" not in modes and "skyprompt/rpc/scratch_rpc.py" not in modes, sorted(modes)
    assert "plugin/scratch_notes.py" in said[-1] and "git does not track" in said[-1]      # said, not dropped silently
    for name in ("skyprompt/__init__.py", "skyprompt/dock.py", "skyprompt/icon.svg", "skyprompt/metadata.txt",
                 "skyprompt/LICENSE", "skyprompt/rpc/__init__.py", "skyprompt/rpc/skyprompt_pb2.py",
                 "skyprompt/rpc/skyprompt_pb2_grpc.py"):
        assert modes.get(name) == 0o100644, (name, oct(modes.get(name, 0)))
    assert {n: m for n, m in modes.items() if n.endswith("/")} == {"skyprompt/": 0o040755, "skyprompt/rpc/": 0o040755}
    assert all(m in (0o100644, 0o040755) for m in modes.values()), {n: oct(m) for n, m in modes.items()}
    # a source tarball has no repository: every file that matches is shipped
    shutil.rmtree(source / ".git")
    assert "skyprompt/scratch_notes.py" in build()
    # nor has a tree inside another repository that tracks none of it (a home folder's): it shipped
    # no plugin module at all
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    modes = build()
    assert "skyprompt/__init__.py" in modes and "skyprompt/dock.py" in modes, sorted(modes)


def test_tearing_the_launcher_down_while_its_backend_runs_raises_nothing(qgis_app, tmp_path, monkeypatch):
    """QGIS exiting without unloading the plugin deletes the launcher and its QProcess, whose
    destructor kills the backend and sends finished() to handlers whose QTimer was deleted first."""
    from qgis.PyQt import sip
    from qgis.PyQt.QtCore import QObject
    from backend.server import free_port
    from plugin.local_backend import LocalBackend

    never_serves = tmp_path / "python"
    never_serves.write_text("#!/bin/sh\necho 'loading'\nexec sleep 600\n")
    never_serves.chmod(0o755)
    errors = []
    monkeypatch.setattr(sys, "excepthook", lambda kind, value, tb: errors.append(f"{kind.__name__}: {value}"))
    for starting in (True, False):
        window = QObject()          # the main window, say, that the panel and its launcher live in
        launcher = LocalBackend(window)
        failures, stops = [], []
        launcher.failed.connect(failures.append)
        launcher.stopped.connect(lambda: stops.append(1))
        assert launcher.start(PluginSettings(address=f"127.0.0.1:{free_port()}", python=str(never_serves),
                                             backend_dir=str(tmp_path)))
        pid = launcher.process.processId()
        wait_until(lambda: launcher.process.bytesAvailable() or launcher._log_tail, 10, "its first line")
        if not starting:
            launcher._stop_polling()     # as one that serves: its timer no longer runs
        sip.delete(window)
        QgsApplication.processEvents()
        assert errors == [] and failures == [] and stops == [], (errors, failures)
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()


def test_a_qgis_python_older_than_3_10_is_told_it_cannot_work_not_to_install_by_hand(dock, iface, monkeypatch):
    """grpcio and protobuf as new as the stubs need have no release for Python 3.9 (some Windows builds
    of QGIS 3.22 to 3.28): pip found none, and the message said to install them by hand."""
    problem = deps.python_problem((3, 9, 18))
    assert problem.startswith("the plugin needs QGIS's Python to be 3.10 or newer, and this QGIS runs Python 3.9")
    assert "QGIS 3.22 on Debian 12 has 3.11" in problem and "some Windows builds of QGIS 3.22 to 3.28 ship 3.9" in problem
    assert "by hand" not in problem and deps.python_problem((3, 10, 0)) is None and deps.python_problem() is None
    monkeypatch.setattr(deps, "_VERSION", (3, 9, 18))
    assert deps.missing() == problem
    with pytest.raises(deps.DependencyError) as err:    # no pip is run for releases that do not exist
        deps.install(Path(dock.deps_folder), python="/nonexistent/python3.9", log=pytest.fail)
    assert str(err.value) == problem
    dock.check_dependencies()
    assert dock.deps_box.isVisibleTo(dock) and dock.install_button.isHidden()
    assert dock.deps_label.text() == f"SkyPrompt cannot work in this QGIS: {problem}."
    assert not dock.start_button.isEnabled() and dock.health_state == "MISSING"
    monkeypatch.undo()
    dock.check_dependencies()
    assert not dock.deps_box.isVisibleTo(dock) and not dock.install_button.isHidden()


def test_processing_search_stops_at_cancel_while_the_backend_does_not_answer(skyprompt_processing, tmp_path):
    """Search tiles waited 20 s (gRPC's wait for a first frame) after Cancel for a backend that
    accepts and never answers; and a failure names the backend's address once."""
    import socket
    import threading
    import time

    import processing

    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen()
    address = f"127.0.0.1:{hung.getsockname()[1]}"
    try:
        feedback = QgsProcessingFeedback()
        threading.Timer(0.5, feedback.cancel).start()
        started = time.monotonic()
        out = processing.run("skyprompt:searchtiles", {"QUERY": "farmland", "SERVER": address,
                                                       "OUTPUT": str(tmp_path / "s.gpkg")}, feedback=feedback)
        assert time.monotonic() - started < 3.0 and out == {}
        assert not (tmp_path / "s.gpkg").exists()
    finally:
        hung.close()
    from backend.server import free_port

    nobody = f"127.0.0.1:{free_port()}"
    with pytest.raises(QgsProcessingException) as err:
        processing.run("skyprompt:searchtiles", {"QUERY": "farmland", "SERVER": nobody,
                                                 "OUTPUT": str(tmp_path / "none.gpkg")})
    assert str(err.value).count(f"at {nobody}") == 1, str(err.value)     # (gRPC's own detail names it too)
    del err


def test_an_address_with_no_port_is_said_on_the_light(dock):
    """A hand-edited address with no port ("127.0.0.1:abc") was 'no backend answers: start one with
    Start local backend', which Start then refused for having no port: the line says what Start says."""
    for address in ("127.0.0.1:abc", "backend.lan"):
        dock.settings.address = address
        assert run_dock(dock, "health", dock.refresh_health) is None
        assert dock.info.text() == (f"no backend answers at {address}: the address has no port; give it as HOST:PORT, "
                                    "e.g. 127.0.0.1:50051, in SkyPrompt settings"), dock.info.text()


def test_a_reopened_project_keeps_the_layers_list_following_renames_and_forgets_the_drawn_rectangle(
        dock, layers, iface, tmp_path):
    """A project read again brings its layers back with their ids: the panel, which watched renames by
    id, no longer heard the new layers' renames. A rectangle drawn on the last project's map stayed
    the Area of the next, where Segment silently used it. And result layers in memory came back empty
    (QGIS saves no memory layer's features) without a word."""
    assert run_dock(dock, "index", dock.index_layers) is None
    dock.query.setText("roads")
    assert run_dock(dock, "search", dock.search) is None and dock.last_layer.featureCount() > 0
    found = dock.last_layer.name()
    dock._rectangle_drawn(layer_rect(layers[0], (0.2, 0.2, 0.4, 0.4)))
    assert dock.area.currentIndex() == 1 and dock.drawn_rect is not None
    project = QgsProject.instance()
    path, first = str(tmp_path / "day.qgz"), layers[0].id()
    assert project.write(path)
    project.clear()
    assert dock.drawn_rect is None and dock.area.currentIndex() == 0
    before = len(iface.message_bar.messages)
    assert project.read(path)
    said = [(text, level) for _, text, level in iface.message_bar.messages[before:]]
    assert said == [(f"1 SkyPrompt result layer(s) of this project were temporary (in memory) and came back empty: "
                     f"{found}. Search or segment again; to keep results, give Segment an Output GeoPackage, or use "
                     "Make Permanent on a layer before saving", int(Qgis.Warning))], said
    again = project.mapLayer(first)
    assert again is not None
    again.setName("renamed after reopening")
    listed = [dock.layer_list.item(i).text() for i in range(dock.layer_list.count())]
    assert "renamed after reopening" in listed, listed
