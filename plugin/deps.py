"""The plugin's Python dependencies (grpcio, protobuf): check, private folder, install with pip.

QGIS runs plugins in its own Python (on Debian the system one), which often has no grpc, or a
protobuf older than the one the bundled stubs were generated for. So the check imports the stubs
themselves, not just `grpc`. Missing packages are installed with pip into a folder private to the
plugin (outside the plugin folder, so reinstalling the plugin keeps them), which goes first on
sys.path. Nothing here imports QGIS: the plugin passes the folder in.
"""
from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

RPC_DIR = Path(__file__).resolve().parent / "rpc"

# The grpcio and protobuf the shipped stubs need (requirements()) have no release for an older Python,
# so no package installed into such a QGIS makes the plugin work: it needs a QGIS whose Python is newer
# (some Windows builds of QGIS 3.22 to 3.28 ship Python 3.9; QGIS 3.22 on Debian 12 has 3.11)
MIN_PYTHON = (3, 10)
_VERSION = tuple(sys.version_info[:3])     # this QGIS's Python (a name of its own, for the tests)


class DependencyError(RuntimeError):
    """The dependencies could not be installed; the message says why and what to do."""


def private_folder(settings_dir: str | os.PathLike) -> Path:
    """Where pip puts the plugin's packages: per Python version, since wheels are built per version."""
    return Path(settings_dir) / "skyprompt" / f"python{sys.version_info.major}.{sys.version_info.minor}"


def activate(folder: str | os.PathLike) -> bool:
    """Put `folder` first on sys.path (if it exists); True when it was added now."""
    folder = str(folder)
    if not os.path.isdir(folder):
        return False
    if folder in sys.path:
        sys.path.remove(folder)
        sys.path.insert(0, folder)
        return False
    sys.path.insert(0, folder)
    importlib.invalidate_caches()
    return True


def _stub_versions() -> tuple[str | None, str | None]:
    """(protobuf, grpcio) versions the generated stubs were made with, read from their headers."""
    proto = grpc = None
    try:
        m = re.search(r"Protobuf Python Version: ([\d.]+)", (RPC_DIR / "skyprompt_pb2.py").read_text())
        proto = m.group(1) if m else None
        m = re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", (RPC_DIR / "skyprompt_pb2_grpc.py").read_text())
        grpc = m.group(1) if m else None
    except OSError:
        pass
    return proto, grpc


def python_problem(version: tuple | None = None) -> str | None:
    """None when QGIS's Python (or `version`) is new enough for the plugin; else the sentence that
    says it is not, and that only another QGIS helps."""
    major, minor = tuple(version or _VERSION)[:2]
    if (major, minor) >= MIN_PYTHON:
        return None
    need = ".".join(map(str, MIN_PYTHON))
    return (f"the plugin needs QGIS's Python to be {need} or newer, and this QGIS runs Python {major}.{minor}: the "
            f"grpcio and protobuf it needs ({', '.join(requirements())}) have no release for Python {major}.{minor}, so "
            f"no install can make it work here; use a QGIS whose Python is {need} or newer (QGIS 3.22 on Debian 12 "
            "has 3.11; some Windows builds of QGIS 3.22 to 3.28 ship 3.9)")


def requirements() -> list[str]:
    """pip requirement strings that satisfy the bundled stubs."""
    proto, grpc = _stub_versions()
    reqs = [f"grpcio>={grpc}" if grpc else "grpcio"]
    if proto:
        major = int(proto.split(".")[0])
        reqs.append(f"protobuf>={proto},<{major + 1}")
    else:
        reqs.append("protobuf")
    return reqs


def missing() -> str | None:
    """None when grpc and the stubs import; else a sentence saying what is wrong."""
    too_old = python_problem()
    if too_old:     # first: grpcio or protobuf missing would offer an install that cannot work
        return too_old
    try:
        import grpc  # noqa: F401
    except ImportError:
        return "the Python package grpcio is not installed in QGIS's Python"
    try:
        from .rpc import skyprompt_pb2, skyprompt_pb2_grpc  # noqa: F401
    except ImportError as e:
        if "protobuf" in str(e).lower() or "google" in str(e).lower():
            return f"the Python package protobuf is missing or too old in QGIS's Python ({e})"
        return f"the plugin's gRPC stubs do not import ({e}); reinstall the plugin"
    except Exception as e:
        # the gRPC stubs check grpcio's version with a RuntimeError that names "grpc"; protobuf's
        # gencode check raises VersionError, a plain Exception subclass
        if isinstance(e, RuntimeError) and "grpc package" in str(e):
            return f"the installed grpcio is older than the plugin needs ({e})"
        return f"the installed protobuf is older than the plugin needs ({e})"
    return None


def python_executable() -> str:
    """The interpreter QGIS runs (sys.executable is the qgis binary on some platforms)."""
    exe = Path(sys.executable)
    if exe.name.startswith("python"):
        return str(exe)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (Path(sys.exec_prefix) / "bin" / version, Path(sys.exec_prefix) / "python.exe",
                      shutil.which(version), shutil.which("python3")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    raise DependencyError(f"cannot find the Python interpreter of this QGIS (looked for {version})")


def _run(cmd: list[str], log: Callable[[str], None]) -> int:
    log("$ " + " ".join(cmd))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with proc.stdout:
        for line in proc.stdout:
            log(line.rstrip())
    return proc.wait()


# pip's words when it could not reach the package index (or found nothing there to install)
# pip could not talk to the index (its "no matching distribution" alone is also what a reachable
# index says when no version fits this Python or platform: that one lists the versions it saw)
NETWORK_SIGNS = ("ConnectionError", "Max retries", "Temporary failure in name resolution",
                 "Failed to establish a new connection", "Read timed out", "Network is unreachable",
                 "(from versions: none)")
NO_FIT_SIGN = "No matching distribution"
DISK_FULL_SIGN = "No space left on device"


def pip_failure(packages: list[str], folder: str | os.PathLike, output: list[str]) -> str:
    """One line for the message bar from a failed pip's output: its cause, and what to do about it."""
    text = "\n".join(output)
    errors = [line[len("ERROR:"):].strip() for line in output if line.startswith("ERROR:")]
    reason = errors[-1] if errors else (output[-1].strip() if output else "no output")
    where = f"pip could not install {' '.join(packages)} into {folder}"
    log = "(pip's output is in the SkyPrompt log)"
    if DISK_FULL_SIGN.lower() in text.lower():
        return f"{where}: no space left on device; free some space on that disk and try again {log}"
    if any(sign.lower() in text.lower() for sign in NETWORK_SIGNS):
        return f"{where}: {reason}; check the network connection and try again {log}"
    # no fit on a Python too old for every release is not seen here: install() refuses it before pip runs
    if NO_FIT_SIGN.lower() in text.lower():
        return (f"{where}: {reason}; no version of it fits this QGIS's Python or platform: install a QGIS with a "
                f"newer Python, or the packages by hand {log}")
    return f"{where}: {reason} {log}"


def _pip_works(python: str) -> bool:
    return subprocess.run([python, "-m", "pip", "--version"], capture_output=True).returncode == 0


def install(folder: str | os.PathLike, packages: list[str] | None = None, pip_args: list[str] | None = None,
            log: Callable[[str], None] = print, python: str | None = None) -> None:
    """pip install `packages` (default: requirements()) into `folder`, then make them importable.

    Uses `python -m pip` of QGIS's interpreter; where that has no pip (Debian without python3-pip),
    a throwaway virtual environment supplies one. Raises DependencyError with pip's last words
    (see pip_failure).
    """
    too_old = python_problem()
    if too_old:     # pip would look for releases that do not exist, and say only that
        raise DependencyError(too_old)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    python = python or python_executable()
    packages = packages or requirements()
    with tempfile.TemporaryDirectory(prefix="skyprompt-pip-") as tmp:
        pip_python = python
        if not _pip_works(python):
            log("this Python has no pip: making a temporary environment that has one")
            if _run([python, "-m", "venv", tmp], log) != 0:
                raise DependencyError("QGIS's Python has no pip and cannot make a virtual environment; "
                                      "install pip (Debian: apt install python3-pip) and try again")
            pip_python = str(Path(tmp) / ("Scripts/python.exe" if os.name == "nt" else "bin/python"))
        lines: list[str] = []

        def keep(line: str) -> None:
            lines.append(line)
            log(line)

        cmd = [pip_python, "-m", "pip", "install", "--upgrade", "--target", str(folder),
               "--disable-pip-version-check", "--no-warn-script-location", *(pip_args or []), *packages]
        if _run(cmd, keep) != 0:      # pip's whole output went to `log`
            raise DependencyError(pip_failure(packages, folder, lines))
    # Python drops modules whose import failed, so the next import finds the new packages; a
    # protobuf or grpcio that did load (too old) stays loaded: missing() then still says so, and only a
    # QGIS restart replaces it (unloading C extensions in a running process is not safe).
    activate(folder)

