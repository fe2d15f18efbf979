"""The command-line client's outputs (polygons, relevance maps, thumbnails, standard output) when they
cannot be written as asked: a full disk, a file that appears while the server works, a path that is
a dangling link; and the messages and help around them. A real server on loopback with a tiny
checkpoint (test_server's fixtures), real GDAL files; a full disk is a small tmpfs where this runs as
root with mount, and everywhere a file-size limit (RLIMIT_FSIZE, which fails a write as a full disk
does, with EFBIG)."""
from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from osgeo import gdal, ogr

from conftest import run_main
from test_server import (REPO, checkpoint, geopackage_with_a_layer, index, rasters, server)  # noqa: F401

PROMPTS = ("--prompt", "trees", "--threshold", "0.1")


class FullDisk:
    """A folder whose files cannot grow: on a tmpfs filled up, or under a file-size limit set in the
    client's process (`limit`, the size no file may pass)."""

    def __init__(self, kind: str, folder: Path):
        self.kind, self.folder, self.limit = kind, folder, 0

    def fill(self, room_for: Path | None = None) -> None:
        """No room left; with the file-size limit, `room_for` (an existing file) may keep its size."""
        if self.kind == "tmpfs":
            with open(self.folder / "filler", "wb", buffering=0) as f:
                try:
                    while True:
                        f.write(b"\0" * 4096)
                except OSError as e:
                    assert e.errno == errno.ENOSPC
        else:
            self.limit = room_for.stat().st_size if room_for else 0

    def user_files(self) -> list[str]:
        return sorted(p.name for p in self.folder.iterdir() if p.name != "filler")

    @property
    def cause(self) -> str:
        return "the disk is full" if self.kind == "tmpfs" else "(File too large)"

    def limited(self):
        if self.kind == "tmpfs":
            return None
        limit = self.limit

        def preexec():
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)     # a write past the limit then fails with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        return preexec


def _mounted_tmpfs(folder: Path) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


@pytest.fixture()
def full_disk(tmp_path):
    """A small tmpfs filled up where this process may mount one (root), else the file-size limit: the
    limit fails every growing file of the client, gRPC's own included, which now and then aborts the
    client inside gRPC ("epoll_wait error: Bad file descriptor") before it can say anything."""
    folder = tmp_path / "disk"
    folder.mkdir()
    kind = "tmpfs" if _mounted_tmpfs(folder) else "file-size limit"
    yield FullDisk(kind, folder)
    if kind == "tmpfs":
        subprocess.run(["umount", str(folder)], check=True)


def client(server, *args, preexec=None, stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "backend", "client", *map(str, args), "--server", server.address],
                          cwd=REPO, stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=300,
                          preexec_fn=preexec, env={**os.environ, "SKYPROMPT_TOKEN": server.token})


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in text and "ERROR" not in text, text
    return lines[0]


@pytest.mark.parametrize("suffix", [".geojson", ".gpkg"])
def test_polygons_that_cannot_be_written_are_an_error_and_leave_no_file(server, rasters, full_disk, suffix):
    """A full disk under a new --output: exit 1, one line naming the file and the cause, and no file
    (GDAL's GeoJSON writer let the failure pass: exit 0, "wrote 5 polygons", a 0-byte file)."""
    target = full_disk.folder / f"polygons{suffix}"
    full_disk.fill()
    out = client(server, "segment", "--json", "--raster", rasters["rgb"], *PROMPTS, "--output", target,
                 preexec=full_disk.limited())
    assert out.returncode == 1 and out.stdout == "", (out.stdout, out.stderr)
    line = one_line(out.stderr)
    assert line.startswith(f"skyprompt client: --output {target}: ") and line.endswith("; nothing was written"), line
    assert full_disk.cause in line and "sqlite3_exec" not in line
    assert full_disk.user_files() == []          # nor a temporary file


def test_a_layer_that_cannot_be_added_to_a_geopackage_leaves_it_as_it_was(server, rasters, full_disk):
    """A full disk while the polygons go into an existing GeoPackage: one line (not kilobytes of
    SQL), the user's layer intact and no half-made layer, its table, index or triggers."""
    target = geopackage_with_a_layer(full_disk.folder / "mywork.gpkg", "my_fields", "POLYGON ((0 0, 1 0, 1 1, 0 0))")
    full_disk.fill(room_for=target)
    out = client(server, "segment", "--json", "--raster", rasters["rgb"], *PROMPTS, "--output", target,
                 preexec=full_disk.limited())
    assert out.returncode == 1, out.stderr
    line = one_line(out.stderr)
    assert line.startswith(f"skyprompt client: --output {target}: ") and "sqlite3_exec" not in line, line
    assert line.endswith("the layer 'skyprompt' was not added, and the GeoPackage's other layers are as they were")
    if full_disk.kind == "tmpfs":
        assert "the disk is full" in line
    ds = ogr.Open(str(target))
    assert [ds.GetLayer(i).GetName() for i in range(ds.GetLayerCount())] == ["my_fields"]
    assert ds.GetLayerByName("my_fields").GetFeatureCount() == 1
    tables = ds.ExecuteSQL("SELECT name FROM sqlite_master WHERE name LIKE '%skyprompt%'")
    assert [row.GetField(0) for row in tables] == []
    ds.ReleaseResultSet(tables)
    ds = None
    assert full_disk.user_files() == ["mywork.gpkg"]


def test_relevance_maps_that_cannot_be_written_name_the_option_and_file(server, rasters, full_disk):
    stem = full_disk.folder / "maps.tif"
    full_disk.fill()
    out = client(server, "segment", "--json", "--raster", rasters["rgb"], *PROMPTS, "--relevance-map", stem,
                 preexec=full_disk.limited())
    assert out.returncode == 1
    line = one_line(out.stderr)
    assert line.startswith(f"skyprompt client: --relevance-map {stem}: ") and full_disk.cause in line, line
    assert line.endswith("; nothing was written") and full_disk.user_files() == []


def test_thumbnails_that_cannot_be_written_name_the_option_and_folder(server, rasters, full_disk):
    index(server, rasters["rgb"])
    folder = full_disk.folder / "thumbs"
    folder.mkdir()
    full_disk.fill()
    out = client(server, "search", "--json", "trees", "--k", "3", "--raster", rasters["rgb"], "--thumbnails", folder,
                 preexec=full_disk.limited())
    assert out.returncode == 1
    line = one_line(out.stderr)
    assert line.startswith(f"skyprompt client: --thumbnails {folder}: ") and full_disk.cause in line, line
    assert "001_tile" in line and "were not saved" in line
    assert list(folder.iterdir()) == []          # no half PNG


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_standard_output_on_a_full_disk_is_one_line_naming_it(server):
    with open("/dev/full", "w") as full:
        out = client(server, "info", "--json", stdout=full)
    assert out.returncode == 1
    line = one_line(out.stderr)
    assert line == ("skyprompt client: standard output (/dev/full): the disk is full (No space left on device); "
                    "the answer was not written"), line


def test_an_output_that_appears_while_the_server_works_is_not_replaced(server, rasters, tmp_path, capsys,
                                                                       monkeypatch):
    """A --output or --relevance-map file that another program (or a second client given the same
    name) writes after the check before the work is left as it is: the result is kept beside it, as
    "NAME (2).EXT", stderr says where, and the exit status is 1."""
    import backend.client as client_module
    from backend.__main__ import main

    target, maps = tmp_path / "polygons.geojson", tmp_path / "maps.tif"
    theirs = '{"type": "FeatureCollection", "features": []}'
    checked = client_module.geojson_in_lonlat

    def others_write_meanwhile(*a, **kw):    # called once the server has answered, before the files are written
        target.write_text(theirs)
        maps.write_text("their map")
        return checked(*a, **kw)

    monkeypatch.setattr(client_module, "geojson_in_lonlat", others_write_meanwhile)
    handler = signal.getsignal(signal.SIGINT)
    try:
        out = run_main(main, ["client", "segment", "--json", "--server", server.address, "--token", server.token,
                              "--raster", rasters["rgb"], *PROMPTS, "--output", target, "--relevance-map", maps],
                       capsys)
    finally:
        signal.signal(signal.SIGINT, handler)
    assert out.returncode == 1, out.stderr
    assert target.read_text() == theirs and maps.read_text() == "their map"
    kept, kept_map = tmp_path / "polygons (2).geojson", tmp_path / "maps (2).tif"
    answer = json.loads(out.stdout)
    assert answer["output"] == str(kept) and answer["polygons_written"] > 0
    ds = ogr.Open(str(kept))
    assert ds.GetLayer(0).GetFeatureCount() == answer["polygons_written"]
    ds = None
    assert gdal.Open(str(kept_map)).RasterXSize > 0
    assert (f"--output {target} appeared while the server worked (another program or client wrote it) and was left "
            f"as it is; this output was saved as {kept} instead") in out.stderr
    assert f"--relevance-map {maps} appeared while the server worked" in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["maps (2).tif", "maps.tif", "polygons (2).geojson",
                                                          "polygons.geojson"]


def test_a_file_system_without_hard_links_still_never_replaces_a_file(tmp_path, monkeypatch):
    from backend.files import move_without_replacing, staged_file

    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    target = tmp_path / "out.geojson"
    move_without_replacing(staged_file(target, b"first"), target)
    assert target.read_bytes() == b"first"
    second = staged_file(target, b"second")
    with pytest.raises(FileExistsError):
        move_without_replacing(second, target)
    assert target.read_bytes() == b"first" and second.read_bytes() == b"second"


def refused(args, capsys) -> str:
    """The one line a client refusal made before any call (no server at that address)."""
    from backend.__main__ import main

    handler = signal.getsignal(signal.SIGINT)
    try:
        out = run_main(main, ["client", "--server", "127.0.0.1:9", *map(str, args)], capsys)
    finally:
        signal.signal(signal.SIGINT, handler)
    assert out.returncode == 2, out.stderr
    return one_line(out.stderr)


def test_a_reversed_extent_shows_its_numbers_as_given_and_180_degrees_only_for_degrees(rasters, capsys):
    line = refused(["segment", "--raster", rasters["rgb"], "--prompt", "trees",
                    "--extent", "500000", "4311660", "400000", "4300000"], capsys)
    assert "--extent 500000 4311660 400000 4300000 has no area" in line and "180" not in line, line
    assert "XMIN below XMAX" in line
    line = refused(["search", "trees", "--extent", "170", "10", "-170", "5"], capsys)
    assert "--extent 170 10 -170 5 has no area" in line and "an extent across 180 degrees" in line, line


def test_a_thumbnails_folder_that_cannot_be_written_in_is_named_not_a_file_in_it(tmp_path, capsys):
    readonly = tmp_path / "readonly"     # permission bits do not stop root: a sysfs folder does
    readonly.mkdir(mode=0o500)
    if os.geteuid() == 0:
        if not os.path.isdir("/sys"):
            pytest.skip("root, and no read-only folder to give")
        readonly = Path("/sys")
    line = refused(["search", "trees", "--thumbnails", readonly], capsys)
    assert line.startswith(f"skyprompt client: --thumbnails {readonly}: this folder cannot be written in"), line
    assert "001_tile0" not in line


def test_a_dangling_link_as_output_is_said_to_be_one(rasters, tmp_path, capsys):
    link = tmp_path / "out.geojson"
    link.symlink_to(tmp_path / "gone" / "out.geojson")
    line = refused(["segment", "--raster", rasters["rgb"], "--prompt", "trees", "--output", link], capsys)
    assert f"--output {link} is a link to {tmp_path / 'gone' / 'out.geojson'}, which does not exist" in line, line
    assert "folder does not exist" not in line and link.is_symlink()


def test_segment_help_says_the_geojson_crs_and_the_prompt_limit(capsys):
    from backend.__main__ import main
    from backend.defaults import Limits

    out = run_main(main, ["client", "segment", "--help"], capsys)
    text = " ".join(out.stdout.split())
    assert "longitude/latitude, EPSG:4326" in text and "has no EPSG code" in text
    assert f"up to {Limits().max_prompts} prompts" in text


def test_readme_says_index_json_prints_nothing_while_it_waits():
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Use from the command line"):readme.index("## Benchmarks")]
    assert '"waiting"' in section and "with `--json` nothing is printed while it waits" in " ".join(section.split())


def test_serve_refuses_a_data_dir_that_is_another_data_dirs_index(checkpoint, server, tmp_path):
    """--data-dir D/index of a server on D started a new, empty index nested in D/index/index."""
    inner = server.data_dir / "index"
    assert (inner / "index.sqlite3").is_file()
    out = subprocess.run([sys.executable, "-m", "backend", "serve", "--checkpoint", str(checkpoint), "--data-dir",
                          str(inner), "--port", "0", "--device", "cpu"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2, out.stderr
    assert one_line(out.stderr) == (f"skyprompt serve: --data-dir {inner} holds an index itself (index.sqlite3, "
                                    f"embeddings/): give the folder above it, {inner.resolve().parent}")
    assert not (inner / "index").exists()
    from backend.server import nested_index_problem

    assert nested_index_problem(tmp_path) is None and nested_index_problem(tmp_path / "new") is None
    assert nested_index_problem(server.data_dir) is None


def test_the_damaged_index_advice_moves_its_wal_and_shm_files_too(checkpoint, tmp_path):
    db = tmp_path / "data" / "index" / "index.sqlite3"
    db.parent.mkdir(parents=True)
    db.write_bytes(b"this is not an sqlite database " * 300)
    out = subprocess.run([sys.executable, "-m", "backend", "serve", "--checkpoint", str(checkpoint), "--data-dir",
                          str(tmp_path / "data"), "--port", "0"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "move it aside" in out.stderr, out.stderr
    assert "index.sqlite3-wal" in out.stderr and "index.sqlite3-shm" in out.stderr


def test_a_numbered_relevance_map_at_a_dangling_link_is_refused_before_the_work(rasters, tmp_path, capsys):
    """With several prompts the maps are STEM_0.tif, STEM_1.tif: a dangling link at one of them passed
    the check (exists() follows links), and its map was then saved as "STEM_0 (2).tif" with a note
    that a file had appeared while the server worked."""
    (tmp_path / "maps_0.tif").symlink_to(tmp_path / "gone.tif")
    line = refused(["segment", "--raster", rasters["rgb"], "--prompt", "trees", "--prompt", "water",
                    "--relevance-map", tmp_path / "maps.tif"], capsys)
    assert f"{tmp_path / 'maps_0.tif'} exist(s)" in line, line


def test_an_output_that_cannot_be_put_in_place_leaves_no_staged_file(tmp_path, monkeypatch):
    """write_polygons raised, naming the file, when the finished output could not be moved into place,
    but left its staged copy (".NAME.xxxx.tmp") beside it."""
    from backend import client
    from backend.client import ClientError, write_polygons

    def disk_full(staged, target):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(client, "move_without_replacing", disk_full)
    result = client.pb.SegmentResult(prompt="trees")
    with pytest.raises(ClientError, match="the disk is full"):
        write_polygons(str(tmp_path / "out.geojson"), [result])
    assert os.listdir(tmp_path) == []
