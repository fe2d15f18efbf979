"""Backend calls as QgsTasks: run() talks to the backend in a worker thread and never touches layers or
widgets; finished() hands the result (or the error) to a callback on the main thread."""
from __future__ import annotations

import traceback
from typing import Any, Callable

from qgis.core import Qgis, QgsApplication, QgsMessageLog, QgsTask
from qgis.PyQt.QtCore import pyqtSignal

from .settings import LOG_TAG
from .sources import SourceError


class BackendTask(QgsTask):
    """`work(conn, task)` runs in the worker thread with a fresh connection; `done(result, error)` on the
    main thread, error being a BackendError (code, message) or None. `work` reports progress with
    task.setProgress(0..100), checks task.isCanceled(), and may tell the user something while it
    runs with task.said.emit(text) (shown on the main thread)."""

    said = pyqtSignal(str)

    def __init__(self, description: str, settings, work: Callable[[Any, "BackendTask"], Any],
                 done: Callable[[Any, Any], None] | None = None):
        super().__init__(description, QgsTask.CanCancel)
        self.settings, self.work, self.done = settings, work, done
        self.result = None
        self.error = None
        self.notes: list[str] = []   # messages for the user from the worker (e.g. a pixel cap)

    def run(self) -> bool:
        from .connection import BackendError

        try:
            with self.settings.connection() as conn:
                self.result = self.work(conn, self)
            return not self.isCanceled()
        except BackendError as e:
            self.error = e
        except SourceError as e:   # the layer's pixels could not be read as asked: the user's to fix
            self.error = BackendError("INVALID_ARGUMENT", str(e))
        except Exception as e:  # a bug or an unexpected layer: log it whole, show one line
            QgsMessageLog.logMessage(traceback.format_exc(), LOG_TAG, Qgis.Critical)
            self.error = BackendError("INTERNAL", f"{type(e).__name__}: {e}")
        return False

    def finished(self, ok: bool) -> None:
        from .connection import BackendError

        if not ok and self.error is None:
            self.error = BackendError("CANCELLED", "cancelled")
        if self.done:       # it tells the user (message bar and log), once
            self.done(self.result if ok else None, self.error)
            return
        for note in self.notes:
            QgsMessageLog.logMessage(note, LOG_TAG, Qgis.Info)
        if self.error is not None:
            QgsMessageLog.logMessage(f"{self.description()}: {self.error}", LOG_TAG, Qgis.Warning)


def start(task: QgsTask, keep: set) -> QgsTask:
    """Add to the task manager, keeping a reference until it ends (a collected task never finishes)."""
    keep.add(task)
    task.taskCompleted.connect(lambda: keep.discard(task))
    task.taskTerminated.connect(lambda: keep.discard(task))
    QgsApplication.taskManager().addTask(task)
    return task
