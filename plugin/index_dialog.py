"""The "Indexed rasters" window: what the backend has indexed, whether each is still what was
indexed, and Remove / Add to map.

It makes no backend calls itself: `refresh` and `remove` are the dock's, which run them as tasks
and hand the answers back through `show_rasters`.
"""
from __future__ import annotations

import datetime
import os

from qgis.core import Qgis, QgsProject, QgsRasterLayer
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtWidgets import (QAbstractItemView, QDialog, QHBoxLayout, QLabel, QMessageBox, QPushButton,
                                 QTableWidget, QTableWidgetItem, QVBoxLayout)

from . import operations

COLUMNS = ("Name", "Tiles", "CRS", "Indexed", "State", "Path")


def indexed_when(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M") if seconds else ""


class IndexedRastersDialog(QDialog):
    def __init__(self, parent, refresh, remove, message):
        """`refresh()` asks the dock for the list, `remove(entries, address)` to remove those rasters
        from the index of the backend at `address`, `message(text, level)` shows a message as the dock
        does."""
        super().__init__(parent)
        self.setWindowTitle("SkyPrompt: indexed rasters")
        self._refresh, self._remove, self._message = refresh, remove, message
        self.rasters: list = []
        self.address = ""           # the backend the list is of
        self.summary = QLabel("Asking the backend…")
        self.summary.setWordWrap(True)
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.itemSelectionChanged.connect(self._update_buttons)
        self.refresh_button = QPushButton("Refresh")
        self.refresh_button.clicked.connect(self._refresh)
        self.remove_button = QPushButton("Remove from index…")
        self.remove_button.setToolTip("Remove the selected rasters' tiles from the backend's index (the files "
                                      "stay); searches no longer find them")
        self.remove_button.clicked.connect(self.remove_selected)
        self.add_button = QPushButton("Add to map")
        self.add_button.setToolTip("Add the selected rasters to the project as layers")
        self.add_button.clicked.connect(self.add_selected)
        close = QPushButton("Close")
        close.clicked.connect(self.close)
        buttons = QHBoxLayout()
        for button in (self.refresh_button, self.remove_button, self.add_button):
            buttons.addWidget(button)
        buttons.addStretch(1)
        buttons.addWidget(close)
        layout = QVBoxLayout(self)
        layout.addWidget(self.summary)
        layout.addWidget(self.table, 1)
        layout.addLayout(buttons)
        self.resize(760, 360)
        self._update_buttons()

    def show_rasters(self, rasters: list, address: str) -> None:
        """Fill the table with IndexedRaster entries (ListRastersResponse.rasters) of the backend at
        `address`."""
        self.table.clearSelection()     # the rows are about to hold other rasters
        self.rasters, self.address = list(rasters), address
        self.table.setRowCount(len(self.rasters))
        for row, r in enumerate(self.rasters):
            cells = (r.raster_name, str(r.tile_count), r.crs.authid or "(custom)", indexed_when(r.indexed_at),
                     operations.raster_state(r), r.raster_path or "(sent as pixels)")
            for column, text in enumerate(cells):
                item = QTableWidgetItem(text)
                item.setToolTip(operations.in_panel_words(r.changed_on_disk) or text)
                if column == 1:
                    item.setTextAlignment(Qt.AlignRight | Qt.AlignVCenter)
                self.table.setItem(row, column, item)
        self.table.resizeColumnsToContents()
        tiles = sum(r.tile_count for r in self.rasters)
        stale = sum(1 for r in self.rasters if operations.file_change(r) or not r.current_checkpoint)
        self.summary.setText(f"{len(self.rasters)} raster(s), {tiles} tiles in the backend's index"
                             + (f"; {stale} not up to date (see State)" if stale else "")
                             if self.rasters else "The backend's index is empty: tick layers and press Index")
        self._update_buttons()

    def clear(self, note: str) -> None:
        """Empty the table, with `note` saying why (another backend, or no answer)."""
        self.table.clearSelection()
        self.rasters, self.address = [], ""
        self.table.setRowCount(0)
        self.summary.setText(note)
        self._update_buttons()

    def selected(self) -> list:
        rows = sorted({index.row() for index in self.table.selectionModel().selectedRows()})
        return [self.rasters[row] for row in rows if row < len(self.rasters)]

    def _update_buttons(self) -> None:
        chosen = self.selected()
        self.remove_button.setEnabled(bool(chosen))
        self.add_button.setEnabled(any(r.raster_path for r in chosen))

    def remove_selected(self, confirm: bool = True) -> None:
        chosen = self.selected()
        if not chosen:
            return
        names = ", ".join(r.raster_name for r in chosen[:5]) + (f" and {len(chosen) - 5} more" if len(chosen) > 5 else "")
        tiles = sum(r.tile_count for r in chosen)
        if confirm and QMessageBox.question(
                self, "Remove from index", f"Remove {names} ({tiles} tiles) from the backend's index? The files stay; "
                                           "searching them again needs Index.") != QMessageBox.Yes:
            return
        self._remove(chosen, self.address)
        self.table.clearSelection()     # removed or refused: a second press must not send them again

    def add_selected(self) -> None:
        added, missing = [], []
        for r in self.selected():
            if not r.raster_path:
                continue
            layer = QgsRasterLayer(r.raster_path, r.raster_name) if os.path.exists(r.raster_path) else None
            if layer is None or not layer.isValid():
                missing.append(r.raster_name)
                continue
            QgsProject.instance().addMapLayer(layer)
            added.append(r.raster_name)
        if missing:
            self._message(f"cannot open {', '.join(missing)} here: the file is gone or unreadable on this machine "
                          "(a remote backend's paths are its own)", Qgis.Warning)
        if added:
            self._message(f"added {', '.join(added)} to the map", Qgis.Info)
