"""A QgisInterface for plugin tests, built on real Qt and QGIS widgets.

The QGIS desktop application (the `qgis` binary, whose QgisApp provides `iface`) is not installed
here; python3-qgis is. This class stands in for QgisApp's interface only: a real QMainWindow with
real dock areas, a real QgsMapCanvas and a real QgsMessageBar, plus the menu/toolbar bookkeeping a
plugin uses, so tests can check that unload() leaves nothing behind. Imports only QGIS and PyQt, so
the system interpreter can use it too.
"""
from __future__ import annotations

from qgis.gui import QgsMapCanvas, QgsMessageBar
from qgis.PyQt.QtCore import QSize
from qgis.PyQt.QtWidgets import QDockWidget, QMainWindow, QMenu, QToolBar


class RecordingMessageBar(QgsMessageBar):
    """A real message bar that also remembers what was pushed, for assertions."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.messages: list[tuple[str, str, int]] = []

    def pushMessage(self, title, text=None, level=0, duration=-1):  # noqa: N802 - QGIS API
        self.messages.append((title, text, int(level)))
        return super().pushMessage(title, text or "", level, duration)


class DesktopIface:
    def __init__(self, width: int = 900, height: int = 600):
        self.main_window = QMainWindow()
        self.main_window.resize(QSize(width + 420, height))
        self.canvas = QgsMapCanvas(self.main_window)
        self.canvas.resize(QSize(width, height))
        self.main_window.setCentralWidget(self.canvas)
        self.message_bar = RecordingMessageBar(self.main_window)
        self.toolbar = QToolBar("Plugins", self.main_window)
        self.main_window.addToolBar(self.toolbar)
        self.plugin_menu = QMenu("Plugins", self.main_window)
        self.menus: dict[str, QMenu] = {}
        self.main_window.show()   # offscreen or Xvfb: docks are visible only in a shown window

    # what plugins call
    def mainWindow(self):  # noqa: N802
        return self.main_window

    def mapCanvas(self):  # noqa: N802
        return self.canvas

    def messageBar(self):  # noqa: N802
        return self.message_bar

    def addToolBarIcon(self, action):  # noqa: N802
        self.toolbar.addAction(action)

    def removeToolBarIcon(self, action):  # noqa: N802
        self.toolbar.removeAction(action)

    def addPluginToMenu(self, name, action):  # noqa: N802
        menu = self.menus.get(name)
        if menu is None:
            menu = self.menus[name] = self.plugin_menu.addMenu(name)
        menu.addAction(action)

    def removePluginMenu(self, name, action):  # noqa: N802
        menu = self.menus.get(name)
        if menu is None:
            return
        menu.removeAction(action)
        if not menu.actions():
            self.plugin_menu.removeAction(menu.menuAction())
            del self.menus[name]

    def addDockWidget(self, area, dock):  # noqa: N802
        self.main_window.addDockWidget(area, dock)

    def removeDockWidget(self, dock):  # noqa: N802
        self.main_window.removeDockWidget(dock)

    def close(self) -> None:
        """Delete the window and its canvas now: a canvas that outlives QGIS's exit crashes Python's teardown."""
        from qgis.core import QgsApplication
        from qgis.PyQt.QtCore import QEvent

        self.main_window.close()
        self.main_window.deleteLater()
        QgsApplication.sendPostedEvents(None, QEvent.DeferredDelete)

    # for assertions
    def docks(self) -> list[QDockWidget]:
        return [d for d in self.main_window.findChildren(QDockWidget)]
