"""SkyPromptPlugin: what QGIS loads. initGui adds the action, the dock and the Processing provider;
unload removes every one of them, cancels running tasks and stops a backend the plugin started."""
from __future__ import annotations

import os

from qgis.core import QgsApplication
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtGui import QIcon
from qgis.PyQt.QtWidgets import QAction

from . import deps
from .processing_provider import SkyPromptProvider

ICON = os.path.join(os.path.dirname(__file__), "icon.svg")
MENU = "&SkyPrompt"


class SkyPromptPlugin:
    def __init__(self, iface):
        self.iface = iface
        self.action: QAction | None = None
        self.dock = None
        self.provider: SkyPromptProvider | None = None
        self.deps_folder = str(deps.private_folder(QgsApplication.qgisSettingsDirPath()))
        # packages installed by an earlier session come first, before anything imports grpc
        deps.activate(self.deps_folder)

    def initProcessing(self) -> None:
        if self.provider is not None:  # QGIS may call this before initGui, which calls it again
            return
        self.provider = SkyPromptProvider()
        QgsApplication.processingRegistry().addProvider(self.provider)

    def initGui(self) -> None:
        self.initProcessing()
        self.action = QAction(QIcon(ICON), "SkyPrompt", self.iface.mainWindow())
        self.action.setCheckable(True)
        self.action.setToolTip("Search layers by text and turn prompts into polygons")
        self.action.toggled.connect(self.show_dock)
        self.iface.addToolBarIcon(self.action)
        self.iface.addPluginToMenu(MENU, self.action)

    def show_dock(self, visible: bool = True) -> None:
        if self.dock is None:
            if not visible:
                return
            from .dock import SkyPromptDock

            self.dock = SkyPromptDock(self.iface, self.deps_folder, self.iface.mainWindow())
            self.iface.addDockWidget(Qt.RightDockWidgetArea, self.dock)
            self.dock.visibilityChanged.connect(self._dock_visibility)
        self.dock.setVisible(visible)
        if visible and not self.dock.deps_problem:
            self.dock.refresh_health()

    def _dock_visibility(self, visible: bool) -> None:
        if self.action is not None and self.action.isChecked() != visible:
            self.action.blockSignals(True)
            self.action.setChecked(visible)
            self.action.blockSignals(False)

    def unload(self) -> None:
        if self.dock is not None:
            self.dock.shutdown()
            self.iface.removeDockWidget(self.dock)
            self.dock.setParent(None)
            self.dock.deleteLater()
            self.dock = None
        if self.action is not None:
            self.iface.removePluginMenu(MENU, self.action)
            self.iface.removeToolBarIcon(self.action)
            self.action.deleteLater()
            self.action = None
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None
