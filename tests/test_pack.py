"""training.pack: a recipe's training split as a small self-contained copy that trains the same."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training import recipe as R
from test_train import make_scene_folder

REPO = Path(__file__).resolve().parents[1]


def _pack(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training.pack", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def _make_recipe(tmp: Path) -> Path:
    scenes = make_scene_folder(tmp / "data" / "scenes", per_class=6)
    photos = tmp / "data" / "photos"
    photos.mkdir()
    rng = np.random.default_rng(1)
    lines = []
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(photos / f"p{i}.png")
        lines.append(json.dumps({"image": f"photos/p{i}.png", "class": "ab"[i % 2],
                                 "captions": [f"photo {i} one", f"photo {i} two"]}))
    (tmp / "data" / "photos.jsonl").write_text("\n".join(lines) + "\n")
    recipe = {"sources": [
        {"name": "scenes", "kind": "folder", "root": "data/scenes", "classnames": "data/classes.json",
         "val_per_class": 2, "weight": 2.0,
         "caption_pool": {"captions": {"red": ["a roof of red tiles", "red roofs in rows"]}}},
        {"name": "photos", "kind": "manifest", "path": "data/photos.jsonl", "val_per_class": 1, "weight": 0.5},
    ]}
    path = tmp / "recipe.json"
    path.write_text(json.dumps(recipe))
    return path


def _keys(source: dict) -> list:
    return sorted((r.class_name, Path(r.image).stem, r.captions) for r in source["records"])


def test_pack_keeps_the_training_split_and_drops_the_held_out(tmp_path):
    recipe = _make_recipe(tmp_path)
    out = tmp_path / "pack"
    r = _pack("--recipe", str(recipe), "--out", str(out), "--size", "32", "--workers", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "packed 18 images (scenes 12, photos 6)" in r.stdout   # 3 classes x (6 - 2) scenes, 8 - 2 photos

    train, val = R.build_sources(R.sources_from_args(str(recipe), [], [], [], [], 0), seed=0)
    packed, packed_val = R.build_sources(R.sources_from_args(str(out / "recipe.json"), [], [], [], [], 0), seed=0)
    assert packed_val == {}   # the copy holds no validation split
    for a, b in zip(train, packed):
        assert a["name"] == b["name"] and a.get("weight") == b.get("weight") and a["class_map"] == b["class_map"]
        assert _keys(a) == _keys(b)   # same images, classes and captions (pool captions included)
    assert any("a roof of red tiles" in rec.captions for rec in packed[0]["records"])

    held = {Path(rec.image).stem for vs in val.values() for rec in vs["records"]}
    files = [p for p in out.rglob("*") if p.suffix == ".webp"]
    assert len(files) == 18 and held and not held & {p.stem for p in files}
    for p in files:
        with Image.open(p) as im:
            assert min(im.size) == 32   # shorter side resized, aspect kept
            assert im.size in ((32, 32), (43, 32))


def test_pack_refuses_bad_input_without_writing(tmp_path, capsys):
    from conftest import run_main
    from training.pack import main

    def _pack(*args):       # in this process: refusals stop before any copy is made
        return run_main(main, args, capsys)

    recipe = _make_recipe(tmp_path)
    out = tmp_path / "pack"
    (out / "keep.txt").parent.mkdir()
    (out / "keep.txt").write_text("mine")
    r = _pack("--recipe", str(recipe), "--out", str(out))
    assert r.returncode == 2 and "not an empty folder" in r.stderr and "Traceback" not in r.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    r = _pack("--recipe", str(tmp_path / "missing.json"), "--out", str(tmp_path / "p2"))
    assert r.returncode == 2 and "does not exist" in r.stderr and not (tmp_path / "p2").exists()
    shards = tmp_path / "shards.json"
    shards.write_text(json.dumps({"sources": [{"kind": "shards", "urls": ["x-{000..001}.tar"]}]}))
    r = _pack("--recipe", str(shards), "--out", str(tmp_path / "p3"))
    assert r.returncode == 2 and "shards are packed already" in r.stderr and "Traceback" not in r.stderr
    # found after --out was made and a source's manifest written: that partial copy is removed, so the
    # same command, its recipe mended, runs (it was refused as "not an empty folder ... nothing was written")
    mixed = json.loads(recipe.read_text())
    mixed["sources"].insert(1, {"name": "web", "kind": "shards", "urls": ["x-{000..001}.tar"]})
    (tmp_path / "mixed.json").write_text(json.dumps(mixed))
    r = _pack("--recipe", str(tmp_path / "mixed.json"), "--out", str(tmp_path / "p4"))
    assert r.returncode == 2 and "shards are packed already" in r.stderr and not (tmp_path / "p4").exists()
    r = _pack("--recipe", str(tmp_path / "mixed.json"), "--out", str(out))       # into a folder of the user's
    assert r.returncode == 2 and [p.name for p in out.iterdir()] == ["keep.txt"]
    # a copy a killed pack left (no recipe.json) is named as such
    (tmp_path / "p5" / "scenes").mkdir(parents=True)
    r = _pack("--recipe", str(recipe), "--out", str(tmp_path / "p5"))
    assert r.returncode == 2 and "holds no recipe.json: a pack stopped before its end" in r.stderr


def test_a_packed_copy_trains_and_records_its_pool_by_size(tmp_path):
    recipe = _make_recipe(tmp_path)
    out = tmp_path / "pack"
    assert _pack("--recipe", str(recipe), "--out", str(out), "--size", "40", "--format", "jpeg").returncode == 0
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "training.train", "--recipe", str(out / "recipe.json"), "--preset",
                        "tiny", "--vocab-size", "300", "--image-size", "32", "--steps", "2", "--batch-size", "4",
                        "--workers", "0", "--device", "cpu", "--precision", "fp32", "--class-aware",
                        "--out", str(run), "--export-fp16", str(tmp_path / "fp16")],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "18 samples" in r.stderr
    config = json.loads((tmp_path / "fp16" / "config.json").read_text())
    text = json.dumps(config)
    assert "2 captions of 1 classes, inline" in text and "a roof of red tiles" not in text


def test_an_unreadable_training_image_is_named_and_no_recipe_is_written(tmp_path):
    scenes = make_scene_folder(tmp_path / "data" / "scenes", per_class=3)
    (scenes / "red" / "red_1.jpg").write_bytes(b"not a jpeg at all")
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"sources": [{"kind": "folder", "root": "data/scenes",
                                               "classnames": "data/classes.json"}]}))
    out = tmp_path / "pack"
    r = _pack("--recipe", str(recipe), "--out", str(out), "--workers", "1")
    assert r.returncode == 2 and "1 training image(s) could not be read" in r.stderr
    assert "red_1.jpg" in r.stderr and "Traceback" not in r.stderr
    assert not (out / "recipe.json").exists()


def _png_claiming(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height (its pixels are those of a 1 x 1 image): past PIL's
    size limit, opening it raises DecompressionBombError, without the test making a huge image."""
    import struct
    import zlib

    from PIL import Image

    Image.new("RGB", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = 8 + 4 + 4                                   # signature, chunk length, "IHDR"
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    path.write_bytes(bytes(data))
    return path


def test_images_too_large_or_too_long_for_the_format_are_named_or_fitted(tmp_path):
    """An image past PIL's size limit is named among the unreadable ones (not a traceback with half a
    copy left); a strip longer than WebP holds (16383 px) is packed with its longer side fitted."""
    from PIL import Image

    scenes = make_scene_folder(tmp_path / "data" / "scenes", per_class=2)
    Image.new("RGB", (100, 20000), (200, 30, 30)).save(scenes / "red" / "strip.png")
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"sources": [{"kind": "folder", "root": "data/scenes",
                                               "classnames": "data/classes.json"}]}))
    out = tmp_path / "pack"
    r = _pack("--recipe", str(recipe), "--out", str(out), "--workers", "1")
    assert r.returncode == 0, r.stderr
    with Image.open(next((out / "scenes" / "red").glob("strip*.webp"))) as im:
        assert max(im.size) <= 16383 and im.size[0] >= 80
    _png_claiming(scenes / "green" / "huge.png", 20000, 20000)
    r = _pack("--recipe", str(recipe), "--out", str(tmp_path / "pack2"), "--workers", "1")
    assert r.returncode == 2 and "1 training image(s) could not be read" in r.stderr, r.stderr
    assert "huge.png" in r.stderr and "Traceback" not in r.stderr
    # an --out that cannot be made: one line, nothing left
    r = _pack("--recipe", str(recipe), "--out", str(tmp_path / "recipe.json" / "pack"), "--workers", "1")
    assert r.returncode == 2 and "cannot write the copy in" in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_ctrl_c_removes_the_partial_copy_so_the_same_pack_can_run_again(tmp_path, stop):
    """Ctrl-C reaches the whole process group (the pool's workers too): one line, no tracebacks, and no
    half-written --out, which would have no recipe.json and be refused as not empty by the next pack.
    SIGTERM to the pack alone (`timeout`, a job scheduler) does the same; it left the partial copy."""
    scenes = make_scene_folder(tmp_path / "data" / "scenes", per_class=1)
    for cls in ("red", "green", "blue"):   # enough images to interrupt (seconds of work): links to the one of each
        for i in range(5000):
            (scenes / cls / f"{cls}_link{i}.jpg").symlink_to(scenes / cls / f"{cls}_0.jpg")
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"sources": [{"kind": "folder", "root": "data/scenes",
                                               "classnames": "data/classes.json"}]}))
    out = tmp_path / "pack"
    proc = subprocess.Popen([sys.executable, "-m", "training.pack", "--recipe", str(recipe), "--out", str(out),
                             "--size", "16", "--workers", "2"], cwd=REPO, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,
                            # a suite started in the background has SIGINT ignored, and its children with it
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    # the copy has begun once its folders are there (a glob of the files written would itself take a while)
    while not (out / "scenes").is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)
    assert proc.poll() is None, "the pack ended before it could be interrupted"
    if stop == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, stderr[-3000:]
    assert "interrupted: removed the partial copy" in stderr and "Traceback" not in stderr, stderr[-3000:]
    assert not out.exists()
    r = _pack("--recipe", str(recipe), "--out", str(out), "--size", "16", "--workers", "2")
    assert r.returncode == 0 and "packed 15003 images" in r.stdout, r.stderr[-3000:]
