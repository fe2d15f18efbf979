"""The recipe ablation driver: trains variants from scratch on a tiny recipe, scores them with the
evaluation code, writes the table, and skips finished variants on a rerun."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from backend.model.checkpoint import load_checkpoint
from conftest import run_main
from training.ablate import VARIANTS, markdown_table
from training.ablate import main as ablate_main

REPO = Path(__file__).resolve().parents[1]
CLASSES = {"red": "red roofs", "green": "green fields", "blue": "blue water"}


def _recipe(tmp_path: Path, tokenizer) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    base = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (30, 60, 200)}
    lines = []
    for cls, rgb in base.items():
        for i in range(8):
            arr = np.clip(np.array(rgb) + rng.normal(0, 25, (40, 40, 3)), 0, 255).astype(np.uint8)
            (tmp_path / "scenes" / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(tmp_path / "scenes" / cls / f"{cls}_{i}.png")
            lines.append(json.dumps({"image": f"scenes/{cls}/{cls}_{i}.png", "class": cls,
                                     "captions": [f"a scene of {CLASSES[cls]} number {i}", f"{CLASSES[cls]} seen from above"]}))
    (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "classes.json").write_text(json.dumps(CLASSES))
    recipe = {"sources": [
        {"name": "scenes", "kind": "folder", "root": "scenes", "classnames": "classes.json", "val_per_class": 2},
        {"name": "captioned", "kind": "manifest", "path": "captions.jsonl", "classnames": "classes.json",
         "val_per_class": 2, "weight": 1.0}]}
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    tokenizer.save(tmp_path / "tokenizer.json")
    return tmp_path / "recipe.json", tmp_path / "tokenizer.json"


def _ablate(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "training.ablate", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_ablation_trains_scores_and_resumes(tmp_path, tokenizer):
    recipe, tok = _recipe(tmp_path, tokenizer)
    out = tmp_path / "ablation"
    args = ["--out", str(out), "--recipe", str(recipe), "--tokenizer", str(tok), "--preset", "tiny",
            "--variants", "baseline,low-then-full", "--steps", "4", "--image-size", "32", "--batch-size", "8",
            "--workers", "0", "--save-every", "2", "--caption-weight", "0.5", "--warmup-steps", "1",
            "--no-class-aware"]  # evaluation on --device auto
    r = _ablate(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert [v["variant"] for v in results["variants"]] == ["baseline", "low-then-full"]
    metrics = {"scenes top-1", "captioned top-1", "captioned mR", "captioned CIDEr-D"}
    for row in results["variants"]:
        assert set(row["scores"]) == metrics and row["train_seconds"] > 0
        assert 0 <= row["scores"]["scenes top-1"] <= 100 and 0 <= row["scores"]["captioned mR"] <= 100
    # the low-resolution variant trained 1.5x the steps at half size, then a quarter at full size
    low_cfg = json.loads((out / "low-then-full" / "16px" / "train_config.json").read_text())
    full_cfg = json.loads((out / "low-then-full" / "train_config.json").read_text())
    assert (low_cfg["steps"], low_cfg["image_size"]) == (6, 16) and (full_cfg["steps"], full_cfg["image_size"]) == (1, 32)
    assert full_cfg["init_checkpoint"].endswith("16px/fp16") and full_cfg["lr"] == 2.5e-4
    # the loss settings given to the ablation reach every phase of every variant
    base_cfg = json.loads((out / "baseline" / "train_config.json").read_text())
    for cfg in (low_cfg, full_cfg, base_cfg):
        assert (cfg["caption_weight"], cfg["warmup_steps"], cfg["class_aware"]) == (0.5, 1, False)
    model, _ = load_checkpoint(out / "low-then-full" / "fp16")
    assert model.config.image_size == 32 and model.config.patch_stem == "conv"
    table = (out / "results.md").read_text()
    assert table.splitlines()[0].startswith("| variant | what changes") and "| low-then-full |" in table
    # a rerun trains nothing and reproduces the table
    again = _ablate(*args)
    assert again.returncode == 0 and "$ " not in again.stderr
    assert (out / "results.md").read_text() == table
    # other settings into the same --out: refused, not the old scores under the new settings
    changed = [a if a != "4" else "8" for a in args]
    r = _ablate(*changed)
    assert r.returncode == 2 and "holds variants trained with other settings: --steps 4 (now 8)" in r.stderr
    assert "$ " not in r.stderr and json.loads((out / "results.json").read_text())["settings"]["steps"] == 4


def test_an_ablation_folder_from_before_the_settings_record_is_checked_against_its_results(tmp_path):
    from training.ablate import build_parser, check_settings

    args = build_parser().parse_args(["--out", str(tmp_path), "--steps", "8"])
    old = {k: v for k, v in vars(args).items() if k not in ("variants", "out")}
    (tmp_path / "results.json").write_text(json.dumps({"settings": dict(old, steps=4), "variants": []}))
    # settings no variant trained with bind nothing (a command that failed before training)
    assert check_settings(tmp_path, args) is None
    (tmp_path / "settings.json").unlink()
    (tmp_path / "baseline" / "fp16").mkdir(parents=True)
    assert "--steps 4 (now 8)" in check_settings(tmp_path, args)
    assert not (tmp_path / "settings.json").exists()
    (tmp_path / "results.json").write_text(json.dumps({"settings": old, "variants": []}))
    assert check_settings(tmp_path, args) is None
    assert json.loads((tmp_path / "settings.json").read_text())["steps"] == 8


def test_ablation_bad_arguments(tmp_path, capsys):
    def _ablate(*args):     # in this process (not the subprocess helper): refusals stop before any run
        return run_main(ablate_main, args, capsys)

    r = _ablate("--out", str(tmp_path), "--variants", "baseline,bigger-model")
    assert r.returncode == 2 and "unknown variant(s) bigger-model" in r.stderr and "Traceback" not in r.stderr
    r = _ablate("--out", str(tmp_path), "--caption-weight", "-1")
    assert r.returncode == 2 and "--caption-weight must be 0 or more" in r.stderr
    r = _ablate("--out", str(tmp_path), "--recipe", str(tmp_path / "none.json"))
    assert r.returncode == 2 and "recipe file" in r.stderr and "does not exist" in r.stderr
    # the low-resolution variant needs 4 steps (a quarter at full size); other variants do not
    r = _ablate("--out", str(tmp_path / "few"), "--steps", "2", "--variants", "low-then-full")
    assert r.returncode == 2 and "--steps must be at least 4 with low-then-full" in r.stderr, r.stderr
    r = _ablate("--out", str(tmp_path / "few"), "--steps", "0", "--variants", "baseline")
    assert r.returncode == 2 and "--steps must be at least 1" in r.stderr, r.stderr
    # a resolution the model's patches do not divide: said before OUT is written, not by the first run
    r = _ablate("--out", str(tmp_path / "sized"), "--image-size", "60", "--preset", "tiny", "--variants", "baseline")
    assert r.returncode == 2 and "--image-size 60: give a multiple of 8" in r.stderr, r.stderr
    r = _ablate("--out", str(tmp_path / "sized"), "--image-size", "72", "--preset", "tiny", "--variants",
                "baseline,low-then-full")
    assert r.returncode == 2 and "give a multiple of 16 (and half of it" in r.stderr, r.stderr
    assert not (tmp_path / "sized").exists()
    # an --out that is a file, or where nothing can be written (root may write anywhere but /proc)
    (tmp_path / "notes.txt").write_text("mine")
    for out, said in ((tmp_path / "notes.txt", "notes.txt is a file; give a folder"),
                      (Path("/proc/skyprompt-ablation"), "cannot write there")):
        r = _ablate("--out", str(out), "--variants", "baseline")
        assert r.returncode == 2 and said in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_markdown_table_rounds_per_metric():
    rows = [{"variant": "baseline", "about": VARIANTS["baseline"].about, "train_seconds": 600.0,
             "scores": {"a top-1": 51.234, "a CIDEr-D": 1.234}}]
    table = markdown_table(rows, ["a top-1", "a CIDEr-D"])
    assert "| baseline |" in table and "| 10 min | 51.2 | 1.23 |" in table


def test_an_explicit_zero_warmup_reaches_every_phase(tmp_path, tokenizer, monkeypatch):
    """--warmup-steps 0 is "no warm-up", not "the default" (a tenth of each phase's steps)."""
    from training import ablate
    from training.train import parse_args

    recipe, tok = _recipe(tmp_path, tokenizer)
    commands = []

    def fake_run(cmd, check):      # the commands, not the training runs
        commands.append(cmd)
        Path(cmd[cmd.index("--out") + 1]).mkdir(parents=True, exist_ok=True)

    monkeypatch.setattr(ablate.subprocess, "run", fake_run)
    common = ["--recipe", str(recipe), "--tokenizer", str(tok), "--steps", "40", "--preset", "tiny", "--workers", "0"]
    for given, expected in ((["--warmup-steps", "0"], [0, 0]), ([], [6, 1])):   # low-res phase: 60 steps, then 10
        commands.clear()
        out = tmp_path / ("zero" if given else "default")
        ablate.train_variant("low-then-full", ablate.build_parser().parse_args(common + given + ["--out", str(out)]))
        # each phase's command as training.train reads it
        assert [parse_args(cmd[3:]).warmup_steps for cmd in commands] == expected, given
