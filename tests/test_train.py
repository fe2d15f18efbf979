"""The training loop: a tiny run end to end, exact resume, SIGKILL + resume, and DDP == one process."""
from __future__ import annotations

import json
import re
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from backend.model.checkpoint import load_checkpoint
from conftest import run_main

REPO = Path(__file__).resolve().parents[1]
CLASSES = {"red": "red roofs", "green": "green fields", "blue": "blue water"}


def make_scene_folder(root: Path, per_class: int = 8) -> Path:
    """A folder-of-classes set the tests make: 3 classes x `per_class` noisy colour images, and
    classes.json (the class map) beside it."""
    rng = np.random.default_rng(0)
    base = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (30, 60, 200)}
    for cls, rgb in base.items():
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            arr = np.clip(np.array(rgb) + rng.normal(0, 25, (72, 72, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / cls / f"{cls}_{i}.jpg")
    (root.parent / "classes.json").write_text(json.dumps(CLASSES))
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_scene_folder(tmp_path_factory.mktemp("scenes") / "scenes")


def _args(folder: Path, out: Path, steps: int, *extra: str) -> list[str]:
    # a checkpoint or a tokenizer given brings its own vocabulary: a --vocab-size beside it is refused
    vocab = [] if {"--init-checkpoint", "--tokenizer"} & set(extra) else ["--vocab-size", "300"]
    return ["--folder", str(folder), "--classnames", str(folder.parent / "classes.json"), "--preset", "tiny",
            *vocab, "--out", str(out), "--steps", str(steps), "--batch-size", "8",
            "--warmup-steps", "2", "--lr", "1e-3", "--workers", "0", "--log-every", "1", "--save-every", "3",
            "--keep-last", "5", "--device", "cpu", "--precision", "fp32", *extra]


def _train_losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def _run(args: list[str], env_extra: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "training.train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_tiny_run_end_to_end(folder, tmp_path):
    out = tmp_path / "run"
    r = _run(_args(folder, out, 6, "--export-fp16", str(tmp_path / "fp16"), "--val-per-class", "2",
                   "--eval-every", "6", "--template-mix", "0.3"))
    assert r.returncode == 0, r.stderr[-3000:]
    losses = _train_losses(out)
    assert sorted(losses) == list(range(1, 7))
    assert all(np.isfinite(v) for v in losses.values())
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step_0000003", "step_0000006"]
    assert f"the final checkpoint is {out / 'checkpoints' / 'step_0000006'}" in r.stderr
    # the export is written: the last line says where, rather than how to make one
    assert f"its fp16 export, to serve, is {tmp_path / 'fp16'}" in r.stderr and "training.export" not in r.stderr
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert evals and 0.0 <= evals[-1][f"{folder.name}/top1"] <= 100.0
    assert "eval {" in r.stderr and "]eval {" not in r.stderr   # its own line, not run on from the bar's
    model, tok = load_checkpoint(tmp_path / "fp16")
    assert model.config.preset == "tiny" and tok.vocab_size <= 300
    assert (out / "tokenizer.json").is_file() and (out / "train_config.json").is_file()
    config = json.loads((out / "train_config.json").read_text())
    assert config["template_mix"] == 0.3 and config["augment"] == "overhead"
    # each checkpoint and the export carry the words the run trained on: the class names and their
    # templates (this set has no other captions); a word of no caption is unfamiliar
    from backend.model.vocabulary import TrainingWords
    for path in (out / "checkpoints" / "step_0000006", tmp_path / "fp16"):
        words = TrainingWords.load(path)
        assert words is not None and words.count("roofs") >= 3 and words.count("aerial") >= 3
        assert words.unfamiliar("an aerial photo of red roofs, a quarry") == ["quarry"]


def test_resume_continues_exactly(folder, tmp_path):
    full = tmp_path / "full"
    assert _run(_args(folder, full, 6)).returncode == 0
    reference = _train_losses(full)
    # lose the last checkpoint and the metrics after step 3, then resume from step 3
    import shutil

    shutil.rmtree(full / "checkpoints" / "step_0000006")
    rows = (full / "metrics.jsonl").read_text().splitlines()
    (full / "metrics.jsonl").write_text("\n".join(r for r in rows if json.loads(r)["step"] <= 3) + "\n")
    r = _run(_args(folder, full, 6, "--resume"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stderr
    resumed = _train_losses(full)
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-4, abs=1e-5)


def test_sigkill_mid_run_then_resume(folder, tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "training.train", *_args(folder, out, 400)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline:
        done = [p for p in (out / "checkpoints").glob("step_*")] if (out / "checkpoints").is_dir() else []
        if len(done) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # every complete checkpoint loads; nothing half-written is left in its place
    for ckpt in (out / "checkpoints").glob("step_*"):
        load_checkpoint(ckpt)
    last = max(int(p.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*"))
    # what a run killed between checkpoints leaves behind: a logged step the checkpoint lacks, a cut line
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"kind": "train", "step": last + 1, "loss": 9.9}) + '\n{"kind": "tr')
    r = _run(_args(folder, out, last + 3, "--resume"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"(step {last})" in r.stderr
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    assert max(_train_losses(out)) == last + 3
    # rows the killed run logged after its last checkpoint are gone: each step once, in order
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, last + 4))


def test_sigterm_stops_a_run_as_ctrl_c_does(folder, tmp_path):
    """A scheduler's or `timeout`'s SIGTERM: the run says which checkpoint to resume from, as on Ctrl-C."""
    out = tmp_path / "terminated"
    proc = subprocess.Popen([sys.executable, "-m", "training.train", *_args(folder, out, 400)], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and not list((out / "checkpoints").glob("step_*")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert re.search(r"interrupted: continue from step_\d{7} with the same command and --resume", err), err[-2000:]
    assert "Traceback" not in err


def test_a_run_stopped_before_its_first_checkpoint_leaves_no_rows_behind(folder, tmp_path):
    """Its rows (steps 1, 2, 3 and a cut line) go when the next run starts at step 0, resumed or not:
    each step is in metrics.jsonl once."""
    earlier = "".join(json.dumps({"kind": "train", "step": s, "loss": 9.9}) + "\n" for s in (1, 2, 3)) + '{"kind": "tr'
    for out, extra in ((tmp_path / "resumed", ["--resume"]), (tmp_path / "fresh", [])):
        out.mkdir()
        (out / "metrics.jsonl").write_text(earlier)
        r = _run(_args(folder, out, 2, *extra))
        assert r.returncode == 0, r.stderr[-3000:]
        assert "dropped 4 row(s) past step 0" in r.stderr
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert [row["step"] for row in rows] == [1, 2] and all(row["loss"] != 9.9 for row in rows)


def test_help_examples_keep_their_line_breaks():
    r = _run(["--help"])
    assert r.returncode == 0 and "--master_port=29500 \\\n" in r.stdout, r.stdout[:1500]


def test_a_tokenizer_left_by_an_earlier_attempt_is_reused_only_for_the_same_captions(folder, tmp_path):
    """An attempt that stops before its first checkpoint (here: a batch larger than the data) leaves its
    tokenizer in --out; the next run there on other data must not tokenize with it."""
    out = tmp_path / "run"
    r = _run(_args(folder, out, 1, "--batch-size", "100"))
    assert r.returncode == 2 and "fewer than one batch" in r.stderr and (out / "tokenizer.json").is_file()
    earlier = (out / "tokenizer.json").read_text()
    lines = [json.dumps({"image": str(p), "caption": f"a harbour with {p.stem.split('_')[0]} boats"})
             for p in sorted(folder.glob("*/*.jpg"))]
    manifest = tmp_path / "harbour.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    other_data = [*_args(folder, out, 1)[4:], "--manifest", str(manifest)]   # the manifest, not the folder
    r = _run(other_data)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "not from this run's captions" in r.stderr and "training a tokenizer on 3 captions" in r.stderr
    assert (out / "tokenizer.json").read_text() != earlier
    _, tok = load_checkpoint(out / "checkpoints" / "step_0000001")
    assert tok.decode(tok.encode("harbour boats")).strip() == "harbour boats"
    # --vocab-size is a ceiling: three captions give fewer tokens, and the log says how many
    assert tok.vocab_size < 300 and "(at most --vocab-size 300 tokens)" in r.stderr
    assert f"the tokenizer has {tok.vocab_size} tokens (the captions have too few recurring pieces for more)" in r.stderr
    # the same captions again (a stopped first attempt, resumed): its tokenizer is kept, not retrained
    r = _run([*other_data, "--resume", "--steps", "2"])
    assert r.returncode == 0 and "training a tokenizer" not in r.stderr, r.stderr[-3000:]


def test_a_tokenizer_of_unchanged_shard_files_is_reused_without_reading_their_text(folder, tmp_path, monkeypatch,
                                                                                    capsys):
    """A tokenizer left in --out is checked against the shard files' sizes and times first; their
    text is read only when those differ, and the tokenizer is still reused only for the same text."""
    import io
    import tarfile

    from training import data, train

    _write_shards(folder, tmp_path / "shards", per_shard=6)
    sources = [{"kind": "shards", "urls": [str(tmp_path / "shards" / "*.tar")], "name": "shards"}]
    out = tmp_path / "run"
    out.mkdir()

    def tokenizer_of_this_run(vocab_size: int = 300) -> tuple[int, bool]:
        """(shard passes so far, whether a tokenizer was trained)"""
        train._get_tokenizer(train.TrainConfig(out=str(out), vocab_size=vocab_size), out, sources)
        return len(reads), "training a tokenizer" in capsys.readouterr().err

    reads = []
    read_shard_captions = data.shard_captions
    monkeypatch.setattr(data, "shard_captions", lambda urls: reads.append(urls) or read_shard_captions(urls))
    assert tokenizer_of_this_run() == (1, True)
    assert tokenizer_of_this_run() == (1, False)      # the same shard files: their text is not read
    # a shard touched, its text the same: read once, reused, and the next check is cheap again
    shard = sorted((tmp_path / "shards").glob("*.tar"))[0]
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    assert tokenizer_of_this_run() == (2, False)
    assert tokenizer_of_this_run() == (2, False)
    # another --vocab-size, or another caption in the shards: a new tokenizer
    assert tokenizer_of_this_run(vocab_size=280) == (3, True)
    assert tokenizer_of_this_run() == (4, True)
    with tarfile.open(tmp_path / "shards" / "part-999.tar", "w") as tar:
        payload = b"a harbour with moored boats"
        info = tarfile.TarInfo("harbour.txt")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    assert tokenizer_of_this_run() == (5, True)
    assert json.loads((out / "tokenizer_source.json").read_text())["captions"] == 4     # the 3 and the harbour


def test_preset_and_stem_beside_a_checkpoint_must_be_its_own(folder, tmp_path, tiny_model, tokenizer, capsys):
    """The model comes from the checkpoint a run continues or starts from: another --preset or
    --conv-stem asked for with it is refused, not dropped; a mistyped preset is refused before any work."""
    from backend.model.checkpoint import save_checkpoint

    r = _refused(_args(folder, tmp_path / "typo", 1, "--preset", "smal"), capsys)
    assert r.returncode == 2 and "invalid choice: 'smal'" in r.stderr and not (tmp_path / "typo").exists()
    out = tmp_path / "run"
    r = _run(_args(folder, out, 3, "--eval-every", "1"))                  # a tiny model, linear stem
    assert r.returncode == 0, r.stderr[-2000:]
    # nothing held out to validate on: said, not silently skipped
    assert "--eval-every 1 has nothing to validate: no images are held out" in r.stdout + r.stderr
    for flags, message in ((["--preset", "small"], "--preset small: "), (["--conv-stem"], "--conv-stem: ")):
        r = _refused(_args(folder, out, 4, "--resume", *flags), capsys)
        assert r.returncode == 2 and message in r.stderr and "step_0000003 is a" in r.stderr, r.stderr[-2000:]
        assert "give another --out for a new one" in r.stderr and "Traceback" not in r.stderr
    init = save_checkpoint(tiny_model, tokenizer, tmp_path / "init")
    r = _refused(_args(folder, tmp_path / "tuned", 1, "--init-checkpoint", str(init), "--preset", "base"), capsys)
    assert r.returncode == 2 and "--preset base: " in r.stderr and "is a tiny model" in r.stderr
    assert not (tmp_path / "tuned" / "checkpoints").exists()
    r = _run(_args(folder, out, 4, "--resume"))                            # _args' own --preset tiny
    assert r.returncode == 0 and "resuming from" in r.stderr, r.stderr[-2000:]



def test_without_preset_a_run_from_a_checkpoint_records_the_checkpoint_preset(folder, tmp_path, tiny_model,
                                                                              tokenizer):
    """--preset left out beside --init-checkpoint is the checkpoint's, not the default's ("small"),
    so train_config.json names the model the run trains."""
    from backend.model.checkpoint import save_checkpoint
    from training.train import parse_args

    init = save_checkpoint(tiny_model, tokenizer, tmp_path / "init")
    without_preset = [a for a in _args(folder, tmp_path / "a", 1, "--init-checkpoint", str(init))
                      if a not in ("--preset", "tiny")]
    assert parse_args(without_preset).preset == "tiny"
    assert parse_args([a for a in _args(folder, tmp_path / "a", 1) if a not in ("--preset", "tiny")]).preset == "small"


def test_a_tokenizer_option_a_run_would_not_use_is_refused(folder, tmp_path, tiny_model, tokenizer, capsys):
    """--init-checkpoint brings its own tokenizer: a --tokenizer or --vocab-size beside it was dropped
    unsaid; so was --vocab-size beside --tokenizer. A resume with the first run's own command goes on."""
    from backend.model.checkpoint import save_checkpoint

    init = save_checkpoint(tiny_model, tokenizer, tmp_path / "init")
    other = tmp_path / "other.json"
    other.write_text((init / "tokenizer.json").read_text())
    base = _args(folder, tmp_path / "run", 1, "--tokenizer", str(other))       # no --vocab-size in it
    for extra, said in ((["--vocab-size", "300"], "--vocab-size 300 sizes the tokenizer a run trains"),
                        (["--init-checkpoint", str(init)], "--tokenizer: --init-checkpoint"),):
        r = _refused([*base, *extra], capsys)
        assert r.returncode == 2 and said in r.stderr, r.stderr
    fine_tune = _args(folder, tmp_path / "run", 1, "--init-checkpoint", str(init))
    r = _refused([*fine_tune, "--vocab-size", "500"], capsys)
    assert r.returncode == 2 and "--vocab-size: --init-checkpoint" in r.stderr and "brings its own tokenizer" in r.stderr
    assert not (tmp_path / "run").exists()
    # shards carry no classes: --class-aware is refused before a tokenizer is trained over them
    r = _refused(["--shards", str(tmp_path / "pairs-{000000..000001}.tar"), "--class-aware", "--preset", "tiny",
                  "--out", str(tmp_path / "shards")], capsys)
    assert r.returncode == 2 and "--class-aware needs the class of each image" in r.stderr, r.stderr
    assert not (tmp_path / "shards").exists()

@pytest.mark.parametrize("loss_flags", [[], ["--class-aware"], ["--images-on-device"], ["--fsdp"]],
                         ids=["plain", "class-aware", "image-bank", "fsdp"])
def test_two_process_ddp_matches_one_process(folder, tmp_path, loss_flags):
    one, two = tmp_path / "one", tmp_path / "two"
    # the reference is one process with the same loss settings (--fsdp needs several)
    assert _run(_args(folder, one, 3, *[f for f in loss_flags if f != "--fsdp"])).returncode == 0
    env = {"MASTER_ADDR": "127.0.0.1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "training.train",
                        *_args(folder, two, 3, "--tokenizer", str(one / "tokenizer.json"), *loss_flags)],
                       cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _train_losses(one), _train_losses(two)
    for step in (1, 2, 3):
        assert b[step] == pytest.approx(a[step], rel=2e-3)


def test_fsdp_run_validates_and_exports_a_whole_model(folder, tmp_path, capsys):
    r = _refused(_args(folder, tmp_path / "alone", 2, "--fsdp"), capsys)
    assert r.returncode == 2 and "start the run with torchrun" in r.stderr and "Traceback" not in r.stderr
    out = tmp_path / "fsdp"
    # training.train's own main, with its weight gathers counted (each is a collective over every rank
    # and a full copy in host memory)
    counted = tmp_path / "counted_train.py"
    counted.write_text(
        "import os, sys\nimport training.train as t\nfull, gathers = t.full_state_dict, []\n"
        "def counting(model, fsdp):\n    gathers.append(fsdp)\n    return full(model, fsdp)\n"
        "t.full_state_dict = counting\ncode = t.main(sys.argv[1:])\n"
        "open(os.path.join(sys.argv[sys.argv.index('--out') + 1], 'gathers_' + os.environ['RANK']), 'w')"
        ".write(str(sum(gathers)))\nsys.exit(code)\n")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(counted), *_args(folder, out, 4, "--fsdp", "--val-per-class", "2",
                                             "--eval-every", "2", "--export-fp16", str(tmp_path / "fp16"))],
                       cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
                                      "PYTHONPATH": str(REPO)},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # validation at steps 2 and 4, checkpoints at 3 and 4, the export after 4: one gather per step
    assert [(out / f"gathers_{rank}").read_text() for rank in "01"] == ["3", "3"]
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert [e["step"] for e in evals] == [2, 4] and all(0 <= e[f"{folder.name}/top1"] <= 100 for e in evals)
    model, _ = load_checkpoint(tmp_path / "fp16")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fine_tuning_at_another_resolution_records_it(folder, tmp_path, tiny_model, tokenizer, capsys):
    """A checkpoint records the resolution it learned at: the backend tiles at it."""
    from backend.model.checkpoint import save_checkpoint

    init = save_checkpoint(tiny_model, tokenizer, tmp_path / "init")     # tiny: 64 px
    out = tmp_path / "run"
    args = _args(folder, out, 2, "--init-checkpoint", str(init), "--image-size", "32",
                 "--export-fp16", str(tmp_path / "fp16"))
    r = _run(args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "64 px checkpoint: training and saving at 32 px" in r.stderr
    for path in (out / "checkpoints" / "step_0000002", tmp_path / "fp16"):
        model, _ = load_checkpoint(path)
        assert model.config.image_size == 32 and model.visual.pos_embed.shape[1] == 16
    # a fine-tuned checkpoint knows the words of its starting checkpoint and of its own run
    from backend.model.vocabulary import TrainingWords
    TrainingWords({"quarry": 7}, "earlier run").save(init)
    r = _run(_args(folder, tmp_path / "run2", 1, "--init-checkpoint", str(init), "--export-fp16",
                   str(tmp_path / "fp16b")))
    assert r.returncode == 0, r.stderr[-3000:]
    words = TrainingWords.load(tmp_path / "fp16b")
    assert words.count("quarry") == 7 and words.count("roofs") >= 3 and "earlier run" in words.source
    r = _refused(_args(folder, tmp_path / "bad", 1, "--init-checkpoint", str(init), "--image-size", "30"), capsys)
    assert r.returncode == 2 and "give a positive multiple of the model's patch size, 8" in r.stderr
    assert "Traceback" not in r.stderr


def test_freeze_image_trains_the_text_side_only(folder, tmp_path, tiny_model, tokenizer, capsys):
    """Locked-image tuning: image tower and attention pool come out bit for bit as they went in, so
    every image embedding is unchanged; the text decoder and the temperature learn."""
    from backend.model.checkpoint import save_checkpoint

    init = save_checkpoint(tiny_model, tokenizer, tmp_path / "init")
    r = _run(_args(folder, tmp_path / "run", 3, "--init-checkpoint", str(init), "--freeze-image", "--class-aware"))
    assert r.returncode == 0, r.stderr[-3000:]
    before, _ = load_checkpoint(init)
    after, _ = load_checkpoint(tmp_path / "run" / "checkpoints" / "step_0000003")
    b, a = before.state_dict(), after.state_dict()
    image = [k for k in b if k.startswith(("visual.", "attn_pool."))]
    text = [k for k in b if k.startswith("text.")]
    assert image and text
    assert all(torch.equal(b[k], a[k]) for k in image)
    assert sum(not torch.equal(b[k], a[k]) for k in text) > len(text) // 2
    assert not torch.equal(b["logit_scale"], a["logit_scale"])
    # a random image tower would stay random: refused before anything runs
    r = _refused(_args(folder, tmp_path / "bad", 1, "--freeze-image"), capsys)
    assert r.returncode == 2 and "--freeze-image keeps the image tower of --init-checkpoint" in r.stderr
    assert "Traceback" not in r.stderr


def _refused(args: list[str], capsys) -> subprocess.CompletedProcess:
    """training.train's main in this process (conftest.run_main): a refusal never gets as far as
    training, and a new interpreter per case would cost seconds each."""
    from training import train as training_main

    return run_main(training_main.main, args, capsys)


def test_bad_arguments_give_clear_errors(folder, tmp_path, capsys):
    r = _refused(["--folder", str(folder), "--out", str(tmp_path / "x")], capsys)
    assert r.returncode == 2 and "one --classnames per --folder" in r.stderr
    r = _refused(["--folder", str(folder), "--classnames", "nonexistent_map", "--out", str(tmp_path / "x"),
                  "--preset", "tiny", "--steps", "1"], capsys)
    assert r.returncode == 2 and "class-name map nonexistent_map does not exist" in r.stderr and "Traceback" not in r.stderr
    r = _refused(_args(folder, tmp_path / "x", 1, "--template-mix", "1.5"), capsys)
    assert r.returncode == 2 and "--template-mix is a probability" in r.stderr and "Traceback" not in r.stderr
    for flags, message in ((["--steps", "0"], "--steps must be at least 1"),
                           (["--batch-size", "0"], "--batch-size must be at least 1"),
                           (["--save-every", "0"], "--save-every must be at least 1"),
                           (["--workers", "-1"], "--workers must be at least 0"),
                           (["--lr", "-1"], "give --lr > 0"),
                           (["--val-per-class", "-1"], "--val-per-class must be at least 0"),
                           (["--recipe", str(folder.parent / "classes.json"), "--val-per-class", "2"],
                            "--val-per-class 2 is for --folder/--manifest sources"),
                           (["--device", "gpu"], "use auto, cpu or cuda[:N]"),
                           # checked here, not after a tokenizer was trained or the data read
                           (["--image-size", "65"], "--image-size 65: give a positive multiple of the model's patch size, 8"),
                           (["--image-size", "0"], "--image-size 0: give a positive multiple"),
                           (["--vocab-size", "10"], "--vocab-size must be at least 260"),
                           (["--grad-accum", "3"], "--batch-size 8 must be divisible by processes x --grad-accum (1 x 3)")):
        r = _refused(_args(folder, tmp_path / "y", 1, *flags), capsys)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (flags, r.stderr)
    assert not (tmp_path / "y").exists()     # refused before anything is written
    (tmp_path / "file").write_text("")
    r = _refused(_args(folder, tmp_path / "file", 1), capsys)
    assert r.returncode == 2 and "is a file" in r.stderr
    # a folder that cannot be made (/sys refuses even root; a read-only disk does the same)
    r = _refused(_args(folder, Path("/sys/skyprompt-run"), 1), capsys)
    assert r.returncode == 2 and "cannot make --out /sys/skyprompt-run" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    # a second run into a run directory: refused unless it resumes
    done = tmp_path / "done"
    (done / "checkpoints" / "step_0000003").mkdir(parents=True)
    r = _refused(_args(folder, done, 1), capsys)
    assert r.returncode == 2 and "already holds a run (checkpoints up to step_0000003)" in r.stderr
    assert "add --resume" in r.stderr
    # a checkpoint folder as --out: the run's tokenizer would replace the one its model reads with
    served = tmp_path / "served"
    served.mkdir()
    (served / "config.json").write_text("{}")
    (served / "tokenizer.json").write_text("the model's tokenizer")
    r = _refused(_args(folder, served, 1), capsys)
    assert r.returncode == 2 and f"give --init-checkpoint {served} and a new --out" in r.stderr
    assert (served / "tokenizer.json").read_text() == "the model's tokenizer"
    # that run's folder given as the checkpoint to fine-tune: its checkpoints are named
    r = _refused(_args(folder, tmp_path / "tuned", 1, "--init-checkpoint", str(done)), capsys)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"give one of its checkpoints, e.g. {done / 'checkpoints' / 'step_0000003'}" in r.stderr


def test_a_class_folder_missing_from_the_map_is_named_in_training_s_terms(folder, tmp_path, capsys):
    """training has no --files (evaluate has): its refusal says to add the folder to the map, and no more."""
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({k: v for k, v in CLASSES.items() if k != "blue"}))
    args = [a if a != str(folder.parent / "classes.json") else str(partial) for a in _args(folder, tmp_path / "x", 1)]
    r = _refused(args, capsys)
    assert r.returncode == 2 and "1 class folder(s) have no entry in the class-name map: blue" in r.stderr, r.stderr
    assert 'add them as "folder": "human name"' in r.stderr and "--files" not in r.stderr


def test_classes_of_the_map_without_images_are_named(tmp_path, capsys):
    """An empty class folder, or a map entry with no folder, trains nothing but stays a candidate of the
    zero-shot validation: most often a mistake, said before training."""
    scenes = make_scene_folder(tmp_path / "scenes", per_class=4)
    (scenes / "grey").mkdir()
    (scenes / "grey" / "notes.txt").write_text("no images yet")
    (tmp_path / "classes.json").write_text(json.dumps({**CLASSES, "grey": "grey roofs", "white": "snow"}))
    r = _refused(_args(scenes, tmp_path / "run", 1, "--val-per-class", "1"), capsys)
    assert r.returncode == 0, r.stderr[-2000:]
    assert ("warning: source scenes: 2 class(es) of its class-name map have no images: grey (no images in its "
            "folder), white (no folder); they are not trained on, but are candidates in its zero-shot validation: "
            "add their images, or leave them out of the map") in r.stderr, r.stderr[-2000:]


def test_a_class_whose_images_are_all_excluded_says_so(tmp_path):
    """A class folder with images, every one of them in the source's exclude_manifest, read as an empty
    folder ("no images in its folder")."""
    from training.recipe import build_sources, classes_without_images, sources_from_args

    scenes = make_scene_folder(tmp_path / "scenes", per_class=2)
    taken = tmp_path / "blue.jsonl"
    taken.write_text("".join(json.dumps({"image": str(p), "captions": ["blue roofs"]}) + "\n"
                             for p in sorted((scenes / "blue").glob("*.jpg"))))
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"sources": [{"kind": "folder", "root": str(scenes), "name": "scenes",
                                               "classnames": str(tmp_path / "classes.json"),
                                               "exclude_manifest": str(taken)}]}))
    train, _ = build_sources(sources_from_args(str(recipe), [], [], [], [], 0), seed=0)
    assert classes_without_images(train[0], []) == [
        f"blue (all its images are left out as images of its exclude_manifest {taken})"]


def test_an_interrupted_run_says_whether_there_is_a_checkpoint_to_resume(folder, tmp_path, capsys, monkeypatch):
    from training import train as training_main

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(training_main, "train", interrupted)
    out = tmp_path / "run"
    assert training_main.main(_args(folder, out, 6)) == 130
    assert "interrupted before the first checkpoint (one every --save-every 3 steps): nothing to resume" in \
        capsys.readouterr().err
    (out / "checkpoints" / "step_0000003").mkdir(parents=True)
    assert training_main.main(_args(folder, out, 6, "--resume")) == 130
    assert "interrupted: continue from step_0000003 with the same command and --resume" in capsys.readouterr().err


def test_the_default_warm_up_is_a_tenth_of_a_short_run_and_a_longer_one_is_pointed_out(folder, tmp_path, capsys):
    from training.train import parse_args

    base = [a for a in _args(folder, tmp_path / "x", 1) if a not in ("--warmup-steps", "2")]
    assert parse_args(base + ["--steps", "50"]).warmup_steps == 5
    assert parse_args(base + ["--steps", "5000"]).warmup_steps == 100
    assert parse_args(base + ["--steps", "50", "--warmup-steps", "0"]).warmup_steps == 0
    capsys.readouterr()
    assert parse_args(base + ["--steps", "50", "--warmup-steps", "100"]).warmup_steps == 100
    said = capsys.readouterr().err
    # the advice is the default it would get (it said "a tenth of the steps (0)" for 2 steps)
    assert "--warmup-steps 100 is longer than --steps 50" in said and "the default (5 here)" in said, said
    parse_args(base + ["--steps", "2", "--warmup-steps", "100"])
    assert "the default (2 here)" in capsys.readouterr().err
    # the chosen rate and warm-up are said when training starts, not here: a data error is then the only line
    assert "learning rate: peak" not in said


def _write_shards(folder: Path, dest: Path, per_shard: int) -> None:
    """The folder's images as WebDataset shards (key.jpg + key.txt), `per_shard` samples each."""
    import io
    import tarfile

    images = sorted(folder.glob("*/*.jpg"))
    dest.mkdir()
    for n in range(0, len(images), per_shard):
        with tarfile.open(dest / f"part-{n // per_shard:03d}.tar", "w") as tar:
            for path in images[n:n + per_shard]:
                for name, payload in ((f"{path.stem}.jpg", path.read_bytes()),
                                      (f"{path.stem}.txt", f"an aerial photo of {CLASSES[path.parent.name]}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))


def test_shards_run_with_a_wildcard_and_its_own_tokenizer(folder, tmp_path):
    _write_shards(folder, tmp_path / "shards", per_shard=6)

    def train(shards: str, out: str, batch: int = 4, timeout: int = 300):
        return _run(["--shards", shards, "--out", str(tmp_path / out), "--batch-size", str(batch), "--preset", "tiny",
                     "--vocab-size", "300", "--steps", "2", "--warmup-steps", "1", "--workers", "0",
                     "--save-every", "2", "--device", "cpu", "--precision", "fp32", "--eval-every", "0"],
                    timeout=timeout)

    r = train(str(tmp_path / "shards" / "*.tar"), "run")
    assert r.returncode == 0, r.stderr
    assert "training a tokenizer on 3 captions" in r.stderr + r.stdout     # read from the shards' .txt members
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "step_0000002")[1].encode("green fields")
    # a wildcard that matches nothing, a missing shard: one clear line, at once
    r = train(str(tmp_path / "none" / "*.tar"), "a")
    assert r.returncode == 2 and "no shard matches" in r.stderr and "Traceback" not in r.stderr
    r = train(str(tmp_path / "shards" / "part-{000..009}.tar"), "b")
    assert r.returncode == 2 and "6 of 10 shards are not files" in r.stderr and "Traceback" not in r.stderr
    # fewer usable samples than one batch: an error, not a run that waits forever
    r = train(str(tmp_path / "shards" / "*.tar"), "c", batch=64, timeout=120)
    assert r.returncode == 2 and "gave no batch of 64 samples" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("bad", [6, 2], ids=["a-batch-of-only-unusable-samples", "a-shortened-batch"])
def test_streamed_batches_short_of_samples_train_on(folder, tmp_path, bad):
    """Unusable samples stream out first (the good ones wait in the shuffle buffer): with 6, the first
    batch of 4 has none left and the next has 2; with 2, the first has 2. An empty batch is skipped
    (its samples counted), and --grad-accum cuts the short one into parts that are never empty."""
    import io
    import tarfile

    _write_shards(folder, tmp_path / "shards", per_shard=6)
    with tarfile.open(tmp_path / "shards" / "unusable.tar", "w") as tar:
        for i in range(bad):           # a caption whose image member is missing
            info = tarfile.TarInfo(f"lost{i}.txt")
            info.size = len(b"an aerial photo")
            tar.addfile(info, io.BytesIO(b"an aerial photo"))
    out = tmp_path / "run"
    r = _run(["--shards", str(tmp_path / "shards" / "*.tar"), "--out", str(out), "--batch-size", "4",
              "--grad-accum", "2", "--preset", "tiny", "--vocab-size", "300", "--steps", "3", "--warmup-steps", "1",
              "--workers", "0", "--log-every", "1", "--save-every", "3", "--device", "cpu", "--precision", "fp32"])
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert all(np.isfinite(row[k]) for row in rows for k in ("loss", "contrastive_loss", "caption_loss"))
    assert rows[-1]["skipped_images"] == bad


def test_resume_keeps_its_checkpoints_and_its_resolution(folder, tmp_path):
    out = tmp_path / "run"
    assert _run(_args(folder, out, 6)).returncode == 0                    # checkpoints at steps 3 and 6
    (out / "checkpoints" / "step_0000006" / "train_state.pt").write_bytes(b"")   # damaged: resume skips it
    r = _run(_args(folder, out, 5, "--resume", "--save-every", "1", "--keep-last", "1"))
    assert r.returncode == 0 and "skipping unreadable checkpoint" in r.stderr, r.stderr[-2000:]
    assert "its train_state.pt cannot be read" in r.stderr              # the damaged file named
    # the damaged one is set aside, not deleted, and never pushes this run's newest save out
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step_0000005", "unreadable_step_0000006"], names
    assert "moved it aside" in r.stderr
    r = _run(_args(folder, out, 8, "--resume", "--image-size", "32"))
    assert r.returncode == 2 and "--image-size 32 with --resume would mix the two" in r.stderr


def test_resume_refuses_another_held_out_split(folder, tmp_path, capsys):
    """--resume with another --seed or --val-per-class would hold out other images: those held out
    before would be trained on from there, and the run's val/ lists rewritten to say otherwise."""
    out = tmp_path / "run"
    assert _run(_args(folder, out, 3, "--val-per-class", "2")).returncode == 0
    held_out = (out / "val" / f"{folder.name}.txt").read_text()
    for change in (["--val-per-class", "2", "--seed", "5"], ["--val-per-class", "3"], []):
        r = _refused(_args(folder, out, 4, "--resume", *change), capsys)
        assert r.returncode == 2 and "--resume would hold out other images than the run" in r.stderr, r.stderr[-2000:]
        assert f"{folder.name}.txt" in r.stderr and "Traceback" not in r.stderr
        assert (out / "val" / f"{folder.name}.txt").read_text() == held_out
    r = _run(_args(folder, out, 4, "--resume", "--val-per-class", "2"))
    assert r.returncode == 0 and "resuming from" in r.stderr, r.stderr[-2000:]


def test_recipe_source_names_stay_inside_the_run(tmp_path, folder):
    """A source's name becomes a folder of a packed copy and a file in val/: "..", a path or
    "recipe.json" are refused by name."""
    from training.recipe import RecipeError, sources_from_args

    for name in ("..", "a/b", "recipe.json", ".hidden", ""):
        recipe = tmp_path / "recipe.json"
        recipe.write_text(json.dumps({"sources": [{"kind": "folder", "root": str(folder), "name": name,
                                                   "classnames": str(folder.parent / "classes.json")}]}))
        with pytest.raises(RecipeError, match=f"is named {re.escape(repr(name))}; a name is letters"):
            sources_from_args(str(recipe), [], [], [], [], 0)


def test_refinement_rounds_are_ordered_by_number(tmp_path):
    from training.refine import _rounds_done

    for n in range(1, 12):
        (tmp_path / "rounds" / f"round_{n}").mkdir(parents=True)
    assert [p.name for p in _rounds_done(tmp_path)][-2:] == ["round_10", "round_11"]


def test_fit_steps_to_budget_arithmetic():
    from training.train import fit_steps_to_budget, steps_in_budget

    def fit(asked, budget_min, warmup, step, spent_s, s_per_step):
        return fit_steps_to_budget(asked, steps_in_budget(budget_min, step, spent_s, s_per_step), warmup, step)

    # 100 steps took 10 s; at 0.1 s a step the other 50 s of a minute hold 500 more
    assert steps_in_budget(1.0, 100, 10.0, 0.1) == 600 == fit(1000, 1.0, 10, 100, 10.0, 0.1)
    # a slow start counts as time spent, and the rest goes at the recent pace
    assert fit(1000, 1.0, 10, 100, 30.0, 0.1) == 400
    # never more than asked; off (0) leaves it alone
    assert fit(500, 1.0, 10, 100, 10.0, 0.1) == 500
    assert steps_in_budget(0.0, 100, 10.0, 0.1) is None and fit(1000, 0.0, 10, 100, 10.0, 0.1) == 1000
    # never below the steps done or the warm-up, also when the budget is already spent
    assert fit(1000, 0.1, 10, 100, 10.0, 0.1) == 100
    assert fit(1000, 0.1, 200, 100, 10.0, 0.1) == 201


def test_a_time_budget_shorter_than_the_warm_up_is_pointed_out(monkeypatch, capsys):
    from training import train as T

    cfg = T.TrainConfig(steps=1000, warmup_steps=100, time_budget=0.05)      # 3 s
    clock = [1000.0]
    monkeypatch.setattr(T.time, "time", lambda: clock[0])
    budget = T.TimeBudget(cfg, 0)
    for step in range(1, 120):
        clock[0] += 0.5                 # 0.5 s a step: 3 s hold 6 steps, not the 100 of the warm-up
        budget.update(step, "cpu")
    assert cfg.steps == 101
    err = capsys.readouterr().err
    assert err.count("holds fewer steps than the warm-up (100): the run goes on to step 101") == 1
    # a budget that holds the warm-up and one step more ends at the same step, but is no mistake
    cfg = T.TrainConfig(steps=1000, warmup_steps=100, time_budget=50.75 / 60)      # 101.5 steps of 0.5 s
    budget = T.TimeBudget(cfg, 0)
    step = 0
    while step + 1 < cfg.steps:             # the run ends at cfg.steps, as the budget sets it
        step += 1
        clock[0] += 0.5
        budget.update(step, "cpu")
    assert cfg.steps == 101
    assert "holds fewer steps than the warm-up" not in capsys.readouterr().err


def test_a_time_budget_of_a_few_dozen_steps_is_kept(monkeypatch):
    """The budget is estimated from the first steps after start-up, not first at step 60: 30 s of
    1 s steps end near step 30 (it ran to 60, twice the budget, at the peak of a 1,000-step schedule)."""
    from training import train as T

    cfg = T.TrainConfig(steps=1000, warmup_steps=5, time_budget=0.5)
    clock = [1000.0]
    monkeypatch.setattr(T.time, "time", lambda: clock[0])
    budget = T.TimeBudget(cfg, 0)
    step = 0
    while step < cfg.steps:
        step += 1
        clock[0] += 1.0
        budget.update(step, "cpu")
    assert 28 <= step <= 32, step


def test_time_budget_shortens_the_run_and_its_schedule(folder, tmp_path, capsys):
    out = tmp_path / "run"
    # the tiny model takes far more than 12 seconds for 5,000 steps on this CPU, and far less for 30
    # (109 fitted in a 9 s budget alone on a 2-core machine; fewer with other tests beside it)
    r = _run(_args(folder, out, 5000, "--time-budget", "0.2", "--save-every", "100000",
                   "--export-fp16", str(tmp_path / "fp16")))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "time budget" in r.stderr and "steps fit (asked for 5000)" in r.stderr
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]["step"]
    assert 30 < last < 5000
    # the learning rate followed the shortened schedule down to its floor at the last step
    assert rows[-1]["lr"] < 1e-4
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step_{last:07d}"]
    _, _ = load_checkpoint(tmp_path / "fp16")
    assert json.loads((tmp_path / "fp16" / "config.json").read_text())["training"]["step"] == last
    # resumed with the same command: the fitted schedule is finished, not a new budget begun
    r = _run(_args(folder, out, 5000, "--time-budget", "0.2", "--save-every", "100000", "--resume"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"keeping the {last} steps" in r.stderr
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()][-1] == last
    for bad in ("-1", "nan", "inf"):      # nan was taken as no budget, unsaid
        r = _refused(_args(folder, tmp_path / "y", 1, "--time-budget", bad), capsys)
        assert r.returncode == 2 and "--time-budget is in minutes" in r.stderr and "Traceback" not in r.stderr


class _EpochEcho(torch.utils.data.Dataset):
    """Items are (epoch the dataset is in, index, worker process id): shows which epoch each worker's
    copy was in when it made an item, and which process made it."""

    def __init__(self, n):
        self.n, self.epoch = n, 0

    def __len__(self):
        return self.n

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __getitem__(self, i):
        return self.epoch, i, os.getpid()


def test_one_loader_serves_every_epoch_in_order():
    from training.train import EpochItems, StepBatchSampler

    n, batch = 10, 4   # 2 steps an epoch; 2 items of each epoch are never drawn
    full = StepBatchSampler(n, batch, 0, 1, seed=3)
    it = iter(full)
    keys = [next(it) for _ in range(6)]   # 3 epochs
    assert [k[0][0] for k in keys] == [0, 0, 1, 1, 2, 2]
    for e in range(3):   # each epoch: distinct indices, a new order
        drawn = [i for k in keys[2 * e:2 * e + 2] for _, i in k]
        assert len(set(drawn)) == 8
    assert keys[0] != keys[2]
    # resuming at step 3 gives the same keys as the full run from step 3 on
    resumed = iter(StepBatchSampler(n, batch, 0, 1, seed=3, start=3))
    assert [next(resumed) for _ in range(3)] == keys[3:]
    # two ranks split each global batch
    r0, r1 = iter(StepBatchSampler(n, batch, 0, 2, seed=3)), iter(StepBatchSampler(n, batch, 1, 2, seed=3))
    assert [next(r0) + next(r1) for _ in range(6)] == keys

    loader = torch.utils.data.DataLoader(EpochItems(_EpochEcho(n)), batch_sampler=full, num_workers=2,
                                         collate_fn=lambda b: b)
    seen, workers = [], set()
    for step, items in zip(range(6), loader):
        seen.append([(epoch, i) for epoch, i, _ in items])
        workers |= {pid for _, _, pid in items}
    assert seen == keys            # each worker's copy was in the item's epoch
    assert len(workers) == 2       # the same two workers served all three epochs


def test_a_validation_set_gone_bad_is_logged_not_fatal(tiny_model, tokenizer, tmp_path):
    from training.data import Record
    from training.train import _evaluate

    gone = [Record(str(tmp_path / "deleted.jpg"), ("a caption",), "red")]
    metrics = tmp_path / "metrics.jsonl"
    _evaluate(tiny_model, tokenizer, {"scenes": {"kind": "zero-shot", "records": gone,
                                                 "classnames": {"blue": "blue water"}}},
              torch.device("cpu"), metrics, step=7)
    row = json.loads(metrics.read_text())
    assert row["step"] == 7 and "not in the class-name map" in row["scenes/error"]


def test_an_unreadable_held_out_image_is_left_out_of_validation_and_named(tmp_path, capsys):
    """It would fail every validation of its set; `training.evaluate` leaves it out alike."""
    from training.data import Record
    from training.train import leave_out_unreadable_held_out_images

    scenes = make_scene_folder(tmp_path / "scenes", per_class=1)
    broken = scenes / "red" / "broken.jpg"
    broken.write_bytes((scenes / "red" / "red_0.jpg").read_bytes()[:300])
    held = [Record(str(p), ("a caption",), p.parent.name) for p in sorted(scenes.glob("*/*.jpg"))]
    val_sets = {"scenes": {"kind": "zero-shot", "records": held, "classnames": CLASSES}}
    leave_out_unreadable_held_out_images(val_sets)
    assert [r.image for r in val_sets["scenes"]["records"]] == [r.image for r in held if r.image != str(broken)]
    err = capsys.readouterr().err
    assert f"warning: validation of scenes leaves out 1 unreadable held-out image(s): {broken} (OSError: " in err


def test_many_unreadable_held_out_images_are_counted_past_the_first_five_and_listed(tmp_path, capsys):
    """The warning named every one on one line (600 Git LFS pointers: 86,501 characters): it names five,
    counts the others, and they are all in the run's unreadable_images.txt."""
    from training.data import Record
    from training.train import UnreadableImages

    scenes = make_scene_folder(tmp_path / "scenes", per_class=1)
    pointers = [scenes / "red" / f"red_lfs{i}.jpg" for i in range(7)]
    for pointer in pointers:
        pointer.write_text("version https://git-lfs.github.com/spec/v1\n")
    held = [Record(str(p), ("a caption",), p.parent.name) for p in sorted(scenes.glob("*/*.jpg"))]
    val_sets = {"scenes": {"kind": "zero-shot", "records": held, "classnames": CLASSES}}
    run = tmp_path / "run"
    run.mkdir()
    UnreadableImages(run, resuming=False).leave_out_of_validation(val_sets)
    assert len(val_sets["scenes"]["records"]) == 3
    err = capsys.readouterr().err
    listing = run / "unreadable_images.txt"
    assert "warning: validation of scenes leaves out 7 unreadable held-out image(s): " in err
    assert err.count("(UnidentifiedImageError: ") == 5 and f"; and 2 more (all are listed in {listing})" in err, err
    assert sorted(line.split("\t")[0] for line in listing.read_text().splitlines()) == sorted(map(str, pointers))


def test_the_held_out_list_of_an_unnamed_manifest_is_not_named_like_it(folder, tmp_path):
    """`--manifest train.jsonl` holds out part of it; its list must not be `val/train.jsonl`, which
    reads as the training manifest. A named source keeps `<name>.jsonl` (runs/default/val/ucm.jsonl)."""
    from training import ablate
    from training import recipe as recipes

    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps({"image": str(p), "class": p.parent.name, "caption": f"{p.stem} seen"})
                                + "\n" for p in sorted(folder.glob("*/*.jpg"))))
    classes = str(folder.parent / "classes.json")
    sources = [{"kind": "manifest", "path": str(manifest), "classnames": classes, "val_per_class": 1},
               {"kind": "manifest", "path": str(manifest), "name": "ucm", "classnames": classes, "val_per_class": 1}]
    _, val = recipes.build_sources(sources, seed=0)
    written = recipes.write_validation_lists(sources, val, tmp_path / "val")
    assert sorted(p.name for p in written) == ["train.val.jsonl", "ucm.jsonl"]
    # the ablation's evaluation finds each list's source (its class map) and names the metrics after it
    cmds = ablate.evaluation_commands(tmp_path / "val", sources)
    assert cmds["train top-1"] == ["zero-shot", "--manifest", str(tmp_path / "val" / "train.val.jsonl"),
                                   "--classnames", classes]
    assert {"train mR", "train CIDEr-D", "ucm top-1", "ucm mR", "ucm CIDEr-D"} <= set(cmds)


def test_each_unreadable_image_is_named_once_and_all_are_listed_at_the_end(tmp_path):
    """Two loader processes, each with its copy of the dataset, meet the same damaged files: each is
    named once, on a line of its own (not run on from the progress bar's), and the end sums them up."""
    scenes = make_scene_folder(tmp_path / "scenes", per_class=4)
    truncated = scenes / "red" / "red_cut.jpg"
    truncated.write_bytes((scenes / "red" / "red_0.jpg").read_bytes()[:300])
    not_an_image = scenes / "blue" / "blue_fake.png"
    not_an_image.write_text("not an image")
    out = tmp_path / "run"
    r = _run(_args(scenes, out, 8, "--workers", "2", "--save-every", "8"))
    assert r.returncode == 0, r.stderr[-3000:]
    for bad in (truncated, not_an_image):
        named = re.findall(rf"^warning: skipping unreadable image {re.escape(str(bad))}: \w+", r.stderr, re.M)
        assert len(named) == 1, r.stderr[-3000:]
    listing = out / "unreadable_images.txt"
    assert f"2 unreadable image(s) were left out of training" in r.stderr and f"all are listed in {listing}" in r.stderr
    assert sorted(line.split("\t")[0] for line in listing.read_text().splitlines()) == sorted(
        [str(truncated), str(not_an_image)])


def test_a_run_folder_names_its_export_from_another_directory(tmp_path, monkeypatch):
    """A run's --export-fp16 was recorded as typed (relative to where training ran), and looked for from
    wherever the run folder was given: not found from another directory. It is recorded absolute now,
    and one recorded relative is found from the run folder."""
    from backend.model.checkpoint import run_folder_hint
    from training.train import TrainConfig, config_record

    work = tmp_path / "work"
    run, export = work / "runs" / "x", work / "exports" / "x16"
    (run / "checkpoints" / "step_0000003").mkdir(parents=True)
    export.mkdir(parents=True)
    (export / "config.json").write_text("{}")
    monkeypatch.chdir(work)
    recorded = config_record(TrainConfig(out="runs/x", export_fp16="exports/x16"))
    assert recorded["export_fp16"] == str(export) and recorded["out"] == "runs/x"
    (run / "train_config.json").write_text(json.dumps({**recorded, "export_fp16": "exports/x16"}))
    monkeypatch.chdir(tmp_path)         # not where training ran
    assert f"give its fp16 export {export} (the one to serve)" in run_folder_hint(run)
    assert "give its fp16 export work/exports/x16 (the one to serve)" in run_folder_hint(Path("work/runs/x"))


def test_the_list_of_unreadable_images_is_the_run_s(tmp_path, capsys):
    """A resumed run that met unreadable images wrote over the list of its earlier part; a run started
    afresh in the folder kept the list an earlier run left there."""
    scenes = make_scene_folder(tmp_path / "scenes", per_class=3)
    first, second = scenes / "red" / "red_fake.jpg", scenes / "blue" / "blue_fake.jpg"
    first.write_text("not an image")
    out = tmp_path / "run"
    listing = out / "unreadable_images.txt"
    assert _refused(_args(scenes, out, 3), capsys).returncode == 0
    first.unlink()
    second.write_text("not an image")
    r = _refused(_args(scenes, out, 6, "--resume"), capsys)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "all are listed in " in r.stderr and "with those of the run's earlier part(s)" in r.stderr
    assert sorted(line.split("\t")[0] for line in listing.read_text().splitlines()) == sorted([str(first), str(second)])
    second.unlink()
    shutil.rmtree(out / "checkpoints")
    assert _refused(_args(scenes, out, 3), capsys).returncode == 0
    assert not listing.exists()


def test_loader_processes_started_afresh_do_not_warn_of_replaced_images_again(tmp_path):
    """Loader processes started by spawn (macOS's and Windows' default) or forkserver inherit no warnings
    filter of the main process: each named every unreadable image again, in Python's warning format. The
    datasets themselves are made not to warn, and each worker's copy keeps that."""
    scenes = make_scene_folder(tmp_path / "scenes", per_class=3)
    bad = scenes / "green" / "green_fake.jpg"
    bad.write_text("not an image")
    spawned = ("import sys, torch.multiprocessing as mp; mp.set_start_method('spawn'); "
               "from training.train import main; sys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", spawned, *_args(scenes, tmp_path / "run", 3, "--workers", "2")],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ReplacedImageWarning" not in r.stderr, r.stderr[-3000:]
    assert len(re.findall(rf"^warning: skipping unreadable image {re.escape(str(bad))}: ", r.stderr, re.M)) == 1


def test_a_set_of_nothing_but_unreadable_images_is_said_to_be_so(tmp_path, capsys):
    """Every image unreadable: each batch came out empty and the step divided by zero (a traceback)."""
    bad = tmp_path / "scenes"
    for cls in CLASSES:
        (bad / cls).mkdir(parents=True)
        for i in range(3):
            (bad / cls / f"{cls}_{i}.jpg").write_bytes(b"not an image")
    (tmp_path / "classes.json").write_text(json.dumps(CLASSES))
    r = _refused(_args(bad, tmp_path / "run", 2), capsys)
    assert r.returncode == 2 and "no image could be read in 50 batches in a row" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    # the loader's warnings of them are off (the batches name them): the error itself names the first few
    assert f"(9 unreadable image(s) met: {bad}" in r.stderr, r.stderr
    assert r.stderr.count("(UnidentifiedImageError: ") == 5 and "; and 4 more): check that" in r.stderr


def test_recipe_weight_0_leaves_a_source_out_and_a_caption_pool_mapping_must_be_shipped(folder, tmp_path):
    """"weight": 0 is "left out", as the weight check says: a lone weight-0 source was trained on, and
    all at 0 ended in a traceback. An unknown caption-pool mapping name was a KeyError."""
    from training.recipe import RecipeError, sources_from_args

    def recipe(*sources) -> str:
        path = tmp_path / f"recipe_{len(list(tmp_path.glob('recipe_*')))}.json"
        path.write_text(json.dumps({"sources": list(sources)}))
        return str(path)

    classes = str(folder.parent / "classes.json")
    kept = {"kind": "folder", "root": str(folder), "classnames": classes, "name": "kept", "weight": 1.0}
    dropped = {**kept, "name": "dropped", "weight": 0}
    assert [s["name"] for s in sources_from_args(recipe(dropped, kept), [], [], [], [], 0)] == ["kept"]
    with pytest.raises(RecipeError, match="every source has weight 0"):
        sources_from_args(recipe(dropped), [], [], [], [], 0)
    from training.recipe import build_sources      # two folders of one name on the command line: no "name" to give there
    with pytest.raises(RecipeError, match="on the command line give folders or files of different names"):
        build_sources(sources_from_args(None, [str(folder)] * 2, [classes] * 2, [], [], 0), seed=0)
    pooled = {**kept, "caption_pool": {"dir": str(tmp_path), "mapping": "nosuch"}}
    with pytest.raises(RecipeError, match="caption_pool mapping 'nosuch', which is no shipped one .*rsscn7"):
        sources_from_args(recipe(pooled), [], [], [], [], 0)


def test_recipe_lists_never_replace_a_file_the_recipe_reads(folder, tmp_path, capsys):
    """A manifest source named as its file ({"name": "train", "path": "train.jsonl"}), its lists
    asked for in the manifest's own folder: the held-out lines replaced the training manifest."""
    from training.recipe import main as recipe_main

    work = tmp_path / "work"
    work.mkdir()
    manifest = work / "train.jsonl"
    manifest.write_text("".join(json.dumps({"image": str(p), "captions": [f"{p.parent.name} scene {i}"],
                                            "class": p.parent.name}) + "\n"
                                for i, p in enumerate(sorted(folder.glob("*/*.jpg")))))
    before = manifest.read_text()
    recipe = work / "recipe.json"
    recipe.write_text(json.dumps({"sources": [{"name": "train", "kind": "manifest", "path": "train.jsonl",
                                               "classnames": str(folder.parent / "classes.json"),
                                               "val_per_class": 2}]}))
    r = run_main(recipe_main, [str(recipe), "--out", str(work)], capsys)
    assert r.returncode == 2 and "train.jsonl is a file the recipe reads" in r.stderr, r.stderr
    assert manifest.read_text() == before
    r = run_main(recipe_main, [str(recipe), "--out", str(work / "val")], capsys)
    assert r.returncode == 0 and len((work / "val" / "train.jsonl").read_text().splitlines()) == 6, r.stderr
    r = run_main(recipe_main, [str(recipe), "--out", "/proc/skyprompt-val"], capsys)    # unwritable, even for root
    assert r.returncode == 2 and "cannot write the held-out lists" in r.stderr and "Traceback" not in r.stderr
    # a recipe that holds nothing out (a packed copy's): said, where nothing at all was printed
    whole = work / "whole.json"
    whole.write_text(json.dumps({"sources": [{"name": "train", "kind": "manifest", "path": "train.jsonl"}]}))
    r = run_main(recipe_main, [str(whole), "--out", str(work / "none")], capsys)
    assert r.returncode == 0 and r.stdout == "" and "holds out no images" in r.stderr, r.stderr


def test_recipe_command_names_a_file_in_the_way_and_a_folder_given_as_the_recipe(folder, tmp_path, capsys):
    """`training.recipe R --out F` with F a file (or under one) ended in a traceback; a folder given as
    the recipe was said not to exist."""
    from training.recipe import main as recipe_main

    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"sources": [{"kind": "folder", "root": str(folder), "val_per_class": 1,
                                               "classnames": str(folder.parent / "classes.json")}]}))
    (tmp_path / "a_file").write_text("notes")
    for out in (tmp_path / "a_file", tmp_path / "a_file" / "val"):
        r = run_main(recipe_main, [str(recipe), "--out", str(out)], capsys)
        assert r.returncode == 2 and "a_file is a file; give a folder for the lists" in r.stderr, r.stderr
    assert (tmp_path / "a_file").read_text() == "notes"
    r = run_main(recipe_main, [str(folder), "--out", str(tmp_path / "val")], capsys)
    assert r.returncode == 2 and "is a folder; give the recipe's JSON file" in r.stderr, r.stderr
    r = run_main(recipe_main, [str(recipe), "--out", str(tmp_path / "val")], capsys)
    assert r.returncode == 0 and (tmp_path / "val" / "scenes.txt").is_file(), r.stderr


def test_resume_with_fsdp_of_a_run_without_it_is_refused_and_rank_1_says_nothing(folder, tmp_path, capsys,
                                                                                 monkeypatch):
    """A checkpoint trained without --fsdp keys its optimizer state by number: resumed with --fsdp it
    ended in a KeyError traceback on every rank. Mistakes found while parsing are said by rank 0 only
    (under torchrun every process printed them), and a file in the way of OUT/val is one of them
    (found by rank 0 alone, the others failed with a gloo traceback)."""
    out = tmp_path / "run"
    assert _run(_args(folder, out, 2)).returncode == 0
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "training.train", *_args(folder, out, 4, "--resume", "--fsdp")],
                       cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"},
                       capture_output=True, text=True, timeout=300)
    said = "was trained without --fsdp: resume it without --fsdp"
    assert r.returncode != 0 and r.stderr.count(said) == 1, r.stderr[-3000:]      # once, by rank 0
    assert "KeyError" not in r.stderr and "train.py" not in r.stderr
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "val").write_text("notes")
    r = _refused(_args(folder, blocked, 2, "--val-per-class", "1"), capsys)
    assert r.returncode == 2 and "val is a file, where the run's folders go" in r.stderr, r.stderr
    monkeypatch.setenv("RANK", "1")
    r = _refused(_args(folder, blocked, 2, "--val-per-class", "1"), capsys)
    assert r.returncode == 2 and r.stderr == ""


def test_a_fine_tune_starts_at_the_fine_tuning_rate_with_a_warm_up_unless_told_and_says_so(folder, tmp_path,
                                                                                           tiny_model, tokenizer):
    """With --init-checkpoint and no --lr the peak rate is training.train.FINE_TUNE_LR, not the pre-training
    rate, which undid a trained model in a few steps; even a short run warms up; a line says which rate
    and warm-up were chosen and why. Given values are kept exactly, and --resume goes on with its run's own."""
    from backend.model.checkpoint import save_checkpoint
    from training.train import FINE_TUNE_LR, parse_args

    init = save_checkpoint(tiny_model, tokenizer, tmp_path / "init")
    out = tmp_path / "tuned"
    def without_schedule(args: list[str]) -> list[str]:      # _args gives --lr and --warmup-steps
        at = [args.index("--lr"), args.index("--warmup-steps")]
        return [a for i, a in enumerate(args) if i not in at and i - 1 not in at]

    r = _run(without_schedule(_args(folder, out, 2, "--init-checkpoint", str(init))))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # two steps: both are warm-up (min(steps, 5)), so the first is at half the peak
    assert [row["lr"] for row in rows if row["kind"] == "train"] == pytest.approx([FINE_TUNE_LR / 2, FINE_TUNE_LR])
    assert json.loads((out / "train_config.json").read_text())["lr"] == FINE_TUNE_LR
    assert f"learning rate: peak {FINE_TUNE_LR:g} (the fine-tuning default with --init-checkpoint" in r.stderr
    assert "2 warm-up step(s) (the default" in r.stderr

    def parsed(*extra, steps=50, out=tmp_path / "x"):
        cfg = parse_args(without_schedule(_args(folder, out, steps, *extra)))   # the first --lr: _args's own
        return cfg.lr, cfg.warmup_steps

    assert parsed() == (5e-4, 5)                                              # from scratch: as before
    assert parsed("--init-checkpoint", str(init)) == (FINE_TUNE_LR, 5)
    assert parsed("--init-checkpoint", str(init), "--lr", "3e-4", "--warmup-steps", "0") == (3e-4, 0)
    assert parsed("--lr", "1e-12", "--min-lr", "0", steps=3) == (1e-12, 3)   # a 3-step run warms up throughout
    assert [parsed(steps=n)[1] for n in (1, 4, 20, 80, 5000)] == [1, 4, 5, 8, 100]
    # --resume of a run goes on with the rate and warm-up it recorded (a run started with other defaults)
    recorded = json.loads((out / "train_config.json").read_text())
    (out / "train_config.json").write_text(json.dumps({**recorded, "lr": 5e-4, "warmup_steps": 0}))
    assert parsed("--init-checkpoint", str(init), "--resume", steps=4, out=out) == (5e-4, 0)
    assert parsed("--init-checkpoint", str(init), "--resume", "--lr", "2e-4", steps=4, out=out)[0] == 2e-4


def test_shards_train_alone_and_the_help_and_the_refusal_say_what_to_do(folder, tmp_path, capsys):
    _write_shards(folder, tmp_path / "shards", per_shard=6)
    r = _refused(_args(folder, tmp_path / "run", 1, "--shards", str(tmp_path / "shards" / "*.tar")), capsys)
    assert r.returncode == 2 and "shards train alone" in r.stderr, r.stderr
    assert "with folder sources" in r.stderr and "--init-checkpoint" in r.stderr and "--manifest" in r.stderr
    assert "write those into shards" not in r.stderr           # no tool does
    r = _refused(["--help"], capsys)
    assert r.returncode == 0 and "--shards train alone" in r.stdout and "combine freely; or" not in r.stdout
    assert "with --init-checkpoint" in r.stdout   # --lr's default
