#!/usr/bin/env python3
"""Build the installable QGIS plugin: dist/skyprompt.zip.

The zip holds one folder, `skyprompt/`: metadata.txt (with `version=` taken from pyproject.toml,
the project's one version), LICENSE, the plugin's Python modules, its icon and the generated gRPC
stubs (plugin/rpc, relative imports). Nothing else: no tests, caches or weights. In a git checkout
only the plugin files git tracks are shipped (a scratch file beside them is not), plus the stubs,
which are generated and ignored by git; without git or a repository (a source tarball) every file
that matches is. Every file in the zip is readable by all (0644), every folder 0755, whatever the
working tree's modes or umask.

Usage:  python tools/build_plugin_zip.py [--out dist/skyprompt.zip]
"""
from __future__ import annotations

import argparse
import fnmatch
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))     # its sibling, run as a script or imported
from build_proto import GENERATED_FILES  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PLUGIN = REPO / "plugin"
TOP = "skyprompt"
SHIPPED = ("*.py", "icon.svg", "rpc/*.py")
# what tools/build_proto.py writes into plugin/rpc (git ignores them): shipped whether tracked or not
# (the .pyi among them matches no SHIPPED pattern)
GENERATED = ("rpc/__init__.py", *(f"rpc/{name}" for name in GENERATED_FILES))
FILE_MODE, FOLDER_MODE = 0o644, 0o755


def project_version() -> str:
    m = re.search(r'^version\s*=\s*"([^"]+)"', (REPO / "pyproject.toml").read_text(), re.MULTILINE)
    if not m:
        raise SystemExit("pyproject.toml has no [project] version")
    return m.group(1)


def metadata_text() -> str:
    text = (REPO / "metadata.txt").read_text()
    if re.search(r"^version=", text, re.MULTILINE):
        raise SystemExit("metadata.txt must not set version=: it comes from pyproject.toml")
    return text.replace("[general]\n", f"[general]\nversion={project_version()}\n", 1)


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, check=True).stdout.decode(
        "utf-8", "surrogateescape")


def tracked_files() -> list[str] | None:
    """The files under plugin/ that git tracks, relative to it; None where git is absent or this tree
    is not a checkout of its own (a source tarball, or a tree inside another repository, e.g. a home
    folder's, which tracks none of it)."""
    try:
        if Path(_git("rev-parse", "--show-toplevel").strip()).resolve() != REPO:
            return None
        listed = _git("ls-files", "-z", "--", "plugin")
    except (OSError, subprocess.CalledProcessError):    # no git, or not a checkout
        return None
    return [name[len("plugin/"):] for name in listed.split("\0") if name.startswith("plugin/")]


def _shipped(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in SHIPPED) and "__pycache__" not in name


def plugin_files() -> list[Path]:
    if not (PLUGIN / "rpc" / "skyprompt_pb2.py").is_file():
        raise SystemExit("plugin/rpc has no generated stubs: run `make proto` first")
    present = {p.relative_to(PLUGIN).as_posix() for pattern in SHIPPED for p in PLUGIN.glob(pattern) if p.is_file()}
    tracked = tracked_files()
    if tracked is None:
        names = present
    else:
        names = {n for n in [*tracked, *GENERATED] if _shipped(n) and (PLUGIN / n).is_file()}
        left = sorted(n for n in present - names if _shipped(n))
        if left:    # a new module not yet added would be missing from the plugin, which then fails to import
            print(f"note: not shipped, as git does not track them: {', '.join('plugin/' + n for n in left)} "
                  "(git add them if the plugin needs them)", file=sys.stderr)
    if "__init__.py" not in names:
        raise SystemExit("plugin/__init__.py is not among the files to ship: the zip would hold no plugin")
    return sorted(PLUGIN / n for n in names)


def _entry(name: str, mode: int, date_time=None) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time or time.localtime()[:6])
    info.compress_type = zipfile.ZIP_DEFLATED
    info.create_system = 3      # Unix: external_attr's high bits are its mode, which unzip and pip apply
    if name.endswith("/"):
        info.external_attr = ((0o040000 | mode) << 16) | 0x10   # a folder (MS-DOS directory bit too)
        info.compress_type = zipfile.ZIP_STORED
    else:
        info.external_attr = (0o100000 | mode) << 16
    return info


def build(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".zip.part")
    files = {"metadata.txt": (metadata_text().encode(), None), "LICENSE": ((REPO / "LICENSE").read_bytes(),
                                                                           REPO / "LICENSE")}
    for path in plugin_files():
        files[path.relative_to(PLUGIN).as_posix()] = (path.read_bytes(), path)
    folders = sorted({f"{TOP}/"} | {f"{TOP}/{name.rsplit('/', 1)[0]}/" for name in files if "/" in name})
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        for folder in folders:
            z.writestr(_entry(folder, FOLDER_MODE), b"")
        for name, (data, source) in files.items():
            stamp = time.localtime(source.stat().st_mtime)[:6] if source else None
            z.writestr(_entry(f"{TOP}/{name}", FILE_MODE, stamp), data)
    tmp.replace(out)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Build dist/skyprompt.zip, the installable QGIS plugin.")
    parser.add_argument("--out", type=Path, default=REPO / "dist" / "skyprompt.zip")
    args = parser.parse_args(argv)
    path = build(args.out)
    print(f"wrote {path} ({path.stat().st_size // 1024} KiB, version {project_version()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
