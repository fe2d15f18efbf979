"""Start and stop a backend on this machine as a child process of QGIS.

`python -m backend serve` runs under QProcess (no thread of ours blocks); its log lines go to the
QGIS log panel under the SkyPrompt tag; a timer polls the health service until it serves, fails
or times out. If a backend already serves at the address, it is used and not started again
(`already_serving`, not `serving`: it runs with its own checkpoint and device, not the settings').
The backend's WARNING lines are logged as warnings, its ERROR and CRITICAL lines and tracebacks as
critical. QGIS may end without unloading the plugin: the process's last signals, sent while this
object is destroyed, are then ignored.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shlex

from qgis.core import Qgis, QgsMessageLog
from qgis.PyQt import sip
from qgis.PyQt.QtCore import QObject, QProcess, QProcessEnvironment, QTimer, pyqtSignal

from .settings import LOG_TAG, PluginSettings, SettingError


# addresses of this machine only: a backend the plugin starts listens on loopback, without TLS
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "")

# the backend logs "%(asctime)s %(levelname)s %(name)s: %(message)s" (backend.server); its level
# field, after a date and time, decides the QGIS log level of the line
LOG_LEVEL = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:[,.]\d+)? (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")
QGIS_LEVEL = {"WARNING": Qgis.Warning, "ERROR": Qgis.Critical, "CRITICAL": Qgis.Critical}
TRACEBACK = "Traceback (most recent call last):"
# the lines that join two tracebacks of one chained exception
CHAINED = ("During handling of the above exception, another exception occurred:",
           "The above exception was the direct cause of the following exception:")


def _gone(obj) -> bool:
    """True when the Qt object behind `obj` has been deleted, or is being (a parent deleting its children)."""
    try:
        return sip.isdeleted(obj)
    except TypeError:
        return False


class LocalBackend(QObject):
    serving = pyqtSignal(str)   # address: the backend this object started serves there
    already_serving = pyqtSignal(str)   # address: one started elsewhere served there already, and is used
    failed = pyqtSignal(str)    # what went wrong, for the message bar
    stopped = pyqtSignal()

    POLL_MS = 500
    # how long stop() waits for a backend to exit before killing it: one that serves drains its calls
    # and closes its index; one still starting has none to drain, and QGIS waits meanwhile
    STOP_WAIT_MS = 15000
    CANCEL_START_WAIT_MS = 2000
    MAX_LINE = 1 << 16      # bytes of output kept while waiting for the end of a line

    def __init__(self, parent=None):
        super().__init__(parent)
        self.process: QProcess | None = None
        self.settings: PluginSettings | None = None
        self._timer = QTimer(self)
        self._timer.timeout.connect(self._poll)
        self._waited_ms = 0
        self._log_tail: list[str] = []
        self._pending = b""     # the backend's output after its last newline: the start of a line
        self._in_traceback = False
        self._probe = None   # (connection, health future) in flight while waiting for the backend
        self._stopping = False   # stop() asked for the exit: not a crash to report

    def command(self, settings: PluginSettings) -> tuple[str, list[str]]:
        """(program, arguments) that serve at settings.address; SettingError when it has no port, or
        Backend Python is a command line that does not split (an unmatched quote)."""
        host = settings.host or "127.0.0.1"
        # --stop-on-stdin-close: stop() closes the pipe to stop it, on Windows too (no SIGTERM there),
        # and a QGIS that ends in any way closes it as well
        args = ["-m", "backend", "serve", "--host", host, "--port", str(settings.port), "--device", settings.device,
                "--stop-on-stdin-close"]
        # QProcess runs no shell: a "~" typed in a setting is expanded here, or it names no file
        if settings.checkpoint:
            args += ["--checkpoint", os.path.expanduser(settings.checkpoint)]
        # a path to an interpreter as it is (spaces, Windows backslashes); else a command line to split
        python = os.path.expanduser(settings.python)
        if os.path.isfile(python):
            return python, args
        try:
            program, *pre = shlex.split(settings.python) or ["python3"]
        except ValueError as e:     # "No closing quotation"
            raise SettingError(f"Backend Python {settings.python!r} is not a command line ({str(e).lower()}): "
                               "fix it in SkyPrompt settings, e.g. /path/to/.venv/bin/python") from None
        return os.path.expanduser(program), pre + args

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.state() != QProcess.NotRunning

    @property
    def starting(self) -> bool:
        """Started and not yet serving (its health is still being polled)."""
        return self.running and self._timer.isActive()

    def start(self, settings: PluginSettings) -> bool:
        """Start (asynchronous): `serving` or `failed` follows. False when one of ours already runs."""
        if self.running:
            return False
        # a copy: the address it starts at and is checked at, whatever the panel's fields say meanwhile
        self.settings = settings = dataclasses.replace(settings)
        try:
            program, args = self.command(settings)
        except SettingError as e:
            self.failed.emit(str(e))
            return False
        try:
            with settings.connection() as conn:
                if conn.health(timeout=1.0) == "SERVING":
                    QgsMessageLog.logMessage(f"a backend already serves at {settings.address}: using it, not one "
                                             "started with the Checkpoint and Device settings", LOG_TAG, Qgis.Warning)
                    self.already_serving.emit(settings.address)
                    return True
        except Exception as e:  # a bad address, or a TLS CA file that cannot be read
            advice = "" if "SkyPrompt settings" in str(e) else "; fix it in SkyPrompt settings"
            self.failed.emit(f"cannot reach the backend at {settings.address}: {e}{advice}")
            return False
        # none serves there: one is started, on this machine
        if settings.use_tls:
            # it serves plaintext (the plugin has no certificate to give it): every call over TLS would fail
            self.failed.emit("Use TLS is on in SkyPrompt settings, but a local backend serves without TLS: untick "
                             "it to start one here (TLS is for a backend on another machine)")
            return False
        if settings.host.lower() not in LOCAL_HOSTS:
            self.failed.emit(f"'Start local backend' starts a backend on this machine, for this QGIS only: give the "
                             f"address as 127.0.0.1:PORT (now {settings.address}); a backend for other machines is "
                             "started by hand with a token and TLS (see the README)")
            return False
        self.process = QProcess(self)
        if settings.backend_dir:
            folder = os.path.expanduser(settings.backend_dir)
            if not os.path.isdir(folder):
                self.failed.emit(f"backend folder {settings.backend_dir} does not exist: fix it in SkyPrompt settings")
                self.process = None
                return False
            self.process.setWorkingDirectory(folder)
        env = QProcessEnvironment.systemEnvironment()
        if settings.token:
            env.insert("SKYPROMPT_TOKEN", settings.token)
        # the backend watches QGIS's process: killed or crashed, QGIS never unloads the plugin that
        # would stop it, and an orphan would hold the port (backend.server.PARENT_PID_ENV)
        env.insert("SKYPROMPT_PARENT_PID", str(os.getpid()))
        self.process.setProcessEnvironment(env)
        self.process.setProcessChannelMode(QProcess.MergedChannels)
        # each handler is told which process spoke: one from an earlier start (that stop() gave up
        # waiting for) must not read as, or end, the current one
        process = self.process
        process.readyReadStandardOutput.connect(lambda: self._read_output(process))
        process.errorOccurred.connect(lambda error: self._process_error(process, error))
        process.finished.connect(lambda code, status: self._process_finished(process, code, status))
        self._log_tail, self._pending, self._in_traceback = [], b"", False
        QgsMessageLog.logMessage(f"starting backend: {program} {' '.join(args)}", LOG_TAG, Qgis.Info)
        self.process.start(program, args)
        self._waited_ms = 0
        self._timer.start(self.POLL_MS)
        return True

    def _stop_polling(self) -> None:
        self._timer.stop()
        if self._probe is not None:
            self._probe[0].close()
            self._probe = None

    def _ask_to_exit(self) -> QProcess | None:
        """What stop() and _give_up_start() both do first: stop polling, and close the running backend's
        standard input, which asks it to exit (`serve --stop-on-stdin-close`). Returns that process, still
        self.process; None, with self.process cleared, when none of ours runs. Waiting for the exit, and
        the kill if it does not come, are the caller's: stop() may block QGIS, _give_up_start() may not."""
        self._stop_polling()
        if not self.running:
            self.process = None
            return None
        self.process.closeWriteChannel()
        return self.process

    def stop(self, wait_ms: int | None = None) -> None:
        """Close the backend's standard input (it then drains and closes its index: `serve
        --stop-on-stdin-close`), then kill it if it does not exit within `wait_ms` (None:
        CANCEL_START_WAIT_MS for one still starting, else STOP_WAIT_MS)."""
        if wait_ms is None:
            wait_ms = self.CANCEL_START_WAIT_MS if self.starting else self.STOP_WAIT_MS
        process = self._ask_to_exit()
        if process is None:
            return
        self._stopping = True
        try:
            if not process.waitForFinished(wait_ms):
                process.kill()
                process.waitForFinished(5000)
        finally:
            self._stopping = False
        if self.process is process:   # finished() (sent inside waitForFinished) has not said so already
            self.process = None
            self.stopped.emit()

    def _give_up_start(self) -> None:
        """Leave a start that failed (timed out, or cannot be checked) without blocking QGIS: the pipe is
        closed, which a backend still loading its model leaves on, and the process is killed if it
        has not left within CANCEL_START_WAIT_MS. Whatever it does after, it is no longer ours."""
        process = self._ask_to_exit()
        self.process = None     # its signals are no longer read as the current backend's (_ours)
        if process is not None:
            # the process is this object's child: gone with it if QGIS ends meanwhile
            QTimer.singleShot(self.CANCEL_START_WAIT_MS,
                              lambda: process.kill() if not _gone(process) and process.state() != QProcess.NotRunning
                              else None)
            process.finished.connect(process.deleteLater)
        self.stopped.emit()

    def _ours(self, process: QProcess) -> bool:
        """`process` is the current one, and neither it nor this object is being destroyed: QGIS that
        exits without unloading the plugin deletes this object, then its child QProcess, whose
        destructor kills the backend and sends its last signals to handlers whose timer is gone."""
        return not _gone(self) and not _gone(process) and process is self.process

    def _level(self, line: str):
        """The QGIS log level of one line of the backend's output: its level field, or a traceback's."""
        if line.startswith(TRACEBACK) or line in CHAINED:
            self._in_traceback = True
            return Qgis.Critical
        level = LOG_LEVEL.match(line)
        if self._in_traceback and not level:
            # a traceback's frames are indented; its last line, the exception, is not
            self._in_traceback = line[:1].isspace()
            return Qgis.Critical
        self._in_traceback = False
        return QGIS_LEVEL.get(level.group(1), Qgis.Info) if level else Qgis.Info

    def _log_lines(self, data: bytes) -> None:
        for line in data.decode("utf-8", "replace").splitlines():
            if line.strip():
                self._log_tail = (self._log_tail + [line])[-20:]
                QgsMessageLog.logMessage(line, LOG_TAG, self._level(line))

    def _read_output(self, process: QProcess, flush: bool = False) -> None:
        if not self._ours(process):
            return
        # whole lines only: a read can end inside one (its level field, or a UTF-8 character, cut in two)
        data = self._pending + bytes(process.readAllStandardOutput())
        data, newline, self._pending = data.rpartition(b"\n")
        data += newline
        if flush or len(self._pending) > self.MAX_LINE:     # the last line; one without end, in pieces
            data, self._pending = data + self._pending, b""
        self._log_lines(data)

    def _process_error(self, process: QProcess, error) -> None:
        if self._ours(process) and error == QProcess.FailedToStart:
            self._stop_polling()
            self.failed.emit(f"could not run {self.settings.python!r}: set the Python that has SkyPrompt's backend "
                             "in SkyPrompt settings")
            self.process = None
            self.stopped.emit()   # Qt sends no `finished` for a process that never started

    def _why(self) -> str:
        """The backend's last log line, and what to change in the settings where the cause is a known one."""
        last = self._log_tail[-1] if self._log_tail else "no output"
        text = "\n".join(self._log_tail)
        missing = re.search(r"No module named '?([\w.]+)'?", text)
        if missing and missing.group(1).split(".")[0] == "backend":
            return (f"{last}; set Backend folder to the SkyPrompt project folder (the one that holds backend/) "
                    "in SkyPrompt settings")
        if missing:
            return (f"{last}; this Python lacks the backend's packages: set Backend Python to the Python of "
                    "SkyPrompt's environment (e.g. <project>/.venv/bin/python) in SkyPrompt settings")
        if re.search(r"unrecognized arguments:.*--stop-on-stdin-close", text):
            # the plugin stops its backend by closing that pipe: a backend without the option predates it
            return (f"{last}; the backend in the Backend folder is older than this plugin: update it "
                    "(e.g. git pull there), or point Backend folder at a newer one in SkyPrompt settings")
        if "port is in use" in text:
            return f"{last}; change the port in the SkyPrompt address field, or stop the program that uses it"
        if "is open in another process" in last:
            return (f"{last}; another SkyPrompt backend (a `serve` started in a terminal, or another QGIS) uses this "
                    "index: stop it, or put its address in the SkyPrompt panel and use it instead")
        if "--checkpoint" in last or re.search(r"checkpoint|model\.safetensors|config\.json|tokenizer\.json", last):
            return f"{last}; set Checkpoint in SkyPrompt settings (empty: the bundled one)"
        if "--data-dir" in last:
            # the plugin starts the backend without --data-dir: its index is at the default place
            return (f"{last} (a backend started from QGIS keeps its index in $SKYPROMPT_DATA_DIR, else "
                    "$XDG_DATA_HOME/skyprompt, else ~/.local/share/skyprompt: set SKYPROMPT_DATA_DIR in QGIS's "
                    "Settings > Options > System > Environment for another)")
        if re.search(r"\bdevice '[^']*'", last) or "cannot load the model on" in last:
            return f"{last}; set Device in SkyPrompt settings (auto, cpu, or cuda:N for a GPU this machine has)"
        return last

    def _process_finished(self, process: QProcess, code, status) -> None:
        if not self._ours(process):    # an earlier start's process (the current one still runs), or QGIS exits
            return
        self._read_output(process, flush=True)     # its last line, if it ended with no newline
        how = "crashed" if status == QProcess.CrashExit else f"exited with code {code}"
        if self._timer.isActive():  # died before it served
            self._stop_polling()
            self.failed.emit(f"the backend {how} before serving: {self._why()} (see the SkyPrompt log)")
        elif not self._stopping:    # it served, then died (killed, out of memory): the panel must say so
            self.failed.emit(f"the backend {how} while serving (its last log line: {self._why()}); press "
                             "'Start local backend' to start it again")
        self.process = None
        self.stopped.emit()

    def _poll(self) -> None:
        """One timer tick: read the last health check if it has answered, else start one. Checks
        run as gRPC futures, so a slow backend never blocks QGIS's main thread."""
        self._waited_ms += self.POLL_MS
        healthy = False
        if self._probe is not None and self._probe[1].done():
            conn, future = self._probe
            healthy = conn.health_result(future) == "SERVING"
            conn.close()
            self._probe = None
        if self._probe is None and not healthy:
            try:
                conn = self.settings.connection()
                self._probe = (conn, conn.health_async(timeout=self.POLL_MS / 1000 * 4))
            except Exception as e:  # a bad address or TLS file: report it rather than wait for the timeout
                self.failed.emit(f"cannot reach the backend at {self.settings.address}: {e}")
                self._give_up_start()
                return
        if healthy:
            self._stop_polling()
            self.serving.emit(self.settings.address)
        elif self._waited_ms >= self.settings.start_timeout_s * 1000:
            self.failed.emit(f"the backend did not answer at {self.settings.address} within "
                             f"{self.settings.start_timeout_s:.0f} s (see the SkyPrompt log; a model that loads "
                             "slowly needs a longer Start timeout in SkyPrompt settings)")
            self._give_up_start()
