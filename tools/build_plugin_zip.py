#!/usr/bin/env python3
"""Build the installable QGIS plugin: dist/skyprompt.zip.

The zip holds one folder, `skyprompt/`: metadata.txt (with `version=` taken from pyproject.toml,
the project's one version), LICENSE, the plugin's Python modules, its icon and the generated gRPC
stubs (plugin/rpc, relative imports). Nothing else: no tests, caches or weights.

Usage:  python tools/build_plugin_zip.py [--out dist/skyprompt.zip]
"""
from __future__ import annotations

import argparse
import re
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PLUGIN = REPO / "plugin"
TOP = "skyprompt"
SHIPPED = ("*.py", "icon.svg", "rpc/*.py")


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


def plugin_files() -> list[Path]:
    if not (PLUGIN / "rpc" / "skyprompt_pb2.py").is_file():
        raise SystemExit("plugin/rpc has no generated stubs: run `make proto` first")
    files = sorted({p for pattern in SHIPPED for p in PLUGIN.glob(pattern)})
    return [p for p in files if "__pycache__" not in p.parts]


def build(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".zip.part")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(f"{TOP}/metadata.txt", metadata_text())
        z.write(REPO / "LICENSE", f"{TOP}/LICENSE")
        for path in plugin_files():
            z.write(path, f"{TOP}/{path.relative_to(PLUGIN).as_posix()}")
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
