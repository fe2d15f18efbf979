#!/usr/bin/env python3
"""Draw the README's plugin screenshot: the SkyPrompt dock with search results over a real layer.

Starts a backend with the bundled checkpoint on a free loopback port (its index in a temporary
folder), opens QGIS headless with the plugin's dock, indexes the shared NAIP and aerial GeoTIFFs,
searches, and grabs the window into docs/images/plugin-search.png. Run it with `make screenshots`
(under Xvfb) or with QT_QPA_PLATFORM=offscreen.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]
GEOTIFFS = REPO.parent / "shared" / "data" / "geotiff"
LAYERS = ("naip_m_4709963_se_14_2020.tif", "colorado_aerial_0p15m.tif")


def start_backend(tmp: Path) -> tuple[subprocess.Popen, str]:
    port_file = tmp / "port"
    proc = subprocess.Popen([sys.executable, "-m", "backend", "serve", "--port", "0", "--port-file", str(port_file),
                             "--data-dir", str(tmp / "index"), "--device", "cpu"], cwd=REPO)
    deadline = time.monotonic() + 120
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the backend did not start")
        time.sleep(0.2)
    return proc, f"127.0.0.1:{port_file.read_text()}"


def wait(dock, kind: str, start) -> None:
    from qgis.core import QgsApplication

    got = []
    dock.taskDone.connect(lambda k, e: got.append(e) if k == kind else None)
    start()
    while not got:
        QgsApplication.processEvents()
        time.sleep(0.02)
    if got[0] is not None:
        raise SystemExit(f"{kind} failed: {got[0]}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--query", default="a lake")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images" / "plugin-search.png")
    args = parser.parse_args(argv)
    missing = [n for n in LAYERS if not (GEOTIFFS / n).is_file()]
    if missing:
        raise SystemExit(f"shared rasters not found in {GEOTIFFS}: {', '.join(missing)}")
    from qgis.core import QgsApplication, QgsProject, QgsRasterLayer

    app = QgsApplication([], True)
    app.initQgis()
    from desktop_iface import DesktopIface
    from plugin.dock import SkyPromptDock
    from plugin.settings import PluginSettings

    with tempfile.TemporaryDirectory(prefix="skyprompt-shot-") as tmp:
        os.environ["QGIS_CUSTOM_CONFIG_PATH"] = tmp
        proc, address = start_backend(Path(tmp))
        try:
            settings = PluginSettings.load()
            settings.address, settings.k = address, 8
            settings.save()
            iface = DesktopIface(900, 840)
            layers = [QgsRasterLayer(str(GEOTIFFS / n), Path(n).stem) for n in LAYERS]
            QgsProject.instance().addMapLayers(layers)
            iface.canvas.setDestinationCrs(layers[0].crs())
            iface.canvas.setLayers(layers)
            iface.canvas.setExtent(layers[0].extent())
            dock = SkyPromptDock(iface, str(Path(tmp) / "deps"), iface.mainWindow())
            from qgis.PyQt.QtCore import Qt

            iface.addDockWidget(Qt.RightDockWidgetArea, dock)
            iface.mainWindow().resizeDocks([dock], [400], Qt.Horizontal)     # as wide as a dock usually is
            wait(dock, "health", dock.refresh_health)
            wait(dock, "index", dock.index_layers)
            dock.query.setText(args.query)
            wait(dock, "search", dock.search)
            wait(dock, "health", dock.refresh_health)   # index counts in the connection bar
            iface.canvas.setLayers([dock.last_layer] + layers)
            shown = layers[0].extent()
            shown.scale(0.8)        # the map is taller than the layer: filled with it, not with blank margins
            iface.canvas.setExtent(shown)
            iface.canvas.refresh()
            iface.canvas.waitWhileRendering()
            for _ in range(50):
                app.processEvents()
                time.sleep(0.02)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            iface.mainWindow().grab().save(str(args.out))
            print(f"wrote {args.out}")
            dock.shutdown()
        finally:
            proc.terminate()
            proc.wait(30)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    # Python's teardown destroys QGIS's widgets in an order Qt does not survive: leave at once
    os._exit(code)
