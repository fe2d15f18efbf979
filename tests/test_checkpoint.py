"""Checkpoint directories: save -> load round trip, atomic saves, and clear errors on damage."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from backend.model import ConfigError, MaMMUT
from backend.model.checkpoint import CheckpointError, checkpoint_hash, load_checkpoint, save_checkpoint


@pytest.fixture
def saved(tmp_path, tiny_model, tokenizer):
    return save_checkpoint(tiny_model, tokenizer, tmp_path / "ckpt")


def test_save_load_gives_identical_outputs(saved, tiny_model, tokenizer, images, tiny_config):
    model, tok = load_checkpoint(saved)
    assert sorted(os.listdir(saved)) == ["config.json", "model.safetensors", "tokenizer.json"]
    tokens = tokenizer(["a parking lot", "a river"], context_length=tiny_config.context_length)
    assert torch.equal(model.encode_image(images), tiny_model.encode_image(images))
    assert torch.equal(model.encode_text(tokens), tiny_model.encode_text(tokens))
    assert model.caption(images, max_len=5) == tiny_model.caption(images, max_len=5)
    assert tok.encode("storage tanks") == tokenizer.encode("storage tanks")
    assert model.config == tiny_model.config


def test_saved_checkpoint_gets_ordinary_file_permissions(tmp_path, tiny_model, tokenizer):
    """Readable by a server running as another user: the umask's permissions, not mkdtemp's private ones."""
    old = os.umask(0o022)
    try:
        path = save_checkpoint(tiny_model, tokenizer, tmp_path / "ckpt")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o755
    assert {f.name: f.stat().st_mode & 0o777 for f in path.iterdir()} == {
        "model.safetensors": 0o644, "config.json": 0o644, "tokenizer.json": 0o644}


def test_fp16_save_loads_close_to_fp32(tmp_path, tiny_model, tokenizer, images):
    path = save_checkpoint(tiny_model, tokenizer, tmp_path / "half", dtype=torch.float16)
    model, _ = load_checkpoint(path)
    assert (path / "model.safetensors").stat().st_size < 0.6 * sum(
        p.numel() * 4 for p in tiny_model.state_dict().values())
    cos = torch.nn.functional.cosine_similarity(model.encode_image(images), tiny_model.encode_image(images))
    assert cos.min() > 0.999


def test_save_replaces_an_existing_checkpoint_atomically(saved, tokenizer, tiny_config, images):
    torch.manual_seed(123)
    other = MaMMUT(tiny_config).eval()
    before = checkpoint_hash(saved)
    save_checkpoint(other, tokenizer, saved)
    assert checkpoint_hash(saved) != before
    loaded, _ = load_checkpoint(saved)
    assert torch.equal(loaded.encode_image(images), other.encode_image(images))
    leftovers = [p.name for p in saved.parent.iterdir() if p.name != saved.name]
    assert leftovers == [], "no temporary directories may be left behind"


def test_failed_save_keeps_the_old_checkpoint(saved, tiny_model, tokenizer, monkeypatch):
    before = checkpoint_hash(saved)

    def broken_save(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("backend.model.checkpoint.save_file", broken_save)
    with pytest.raises(OSError):
        save_checkpoint(tiny_model, tokenizer, saved)
    assert checkpoint_hash(saved) == before
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]


def test_save_refuses_a_target_that_is_not_a_checkpoint(tmp_path, tiny_model, tokenizer, capsys):
    """Saving replaces the whole folder: a mistyped output path must not delete a user's files."""
    from training.export import main

    data = tmp_path / "data"
    data.mkdir()
    (data / "scene.tif").write_bytes(b"precious")
    with pytest.raises(CheckpointError, match="not a SkyPrompt checkpoint .*scene.tif"):
        save_checkpoint(tiny_model, tokenizer, data)
    assert (data / "scene.tif").read_bytes() == b"precious"
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    with pytest.raises(CheckpointError, match="is not a folder"):
        save_checkpoint(tiny_model, tokenizer, notes)
    assert notes.read_text() == "keep me"
    # the export command: one clear line, exit 2, the folder untouched and no temporary folder left
    src = save_checkpoint(tiny_model, tokenizer, tmp_path / "src")
    assert main([str(src), str(data)]) == 2
    assert "not a SkyPrompt checkpoint" in capsys.readouterr().err
    assert sorted(p.name for p in data.iterdir()) == ["scene.tif"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "notes.txt", "src"]
    # an empty folder is fine
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(src), str(empty)]) == 0 and load_checkpoint(empty)
    # a training checkpoint keeps the optimizer state --resume needs: an export may not replace it,
    # a training save (which writes that state again) may
    write_state = lambda folder: (folder / "train_state.pt").write_bytes(b"state")  # noqa: E731
    step = save_checkpoint(tiny_model, tokenizer, tmp_path / "step_0000100", write_extra=write_state,
                           training_state=True)
    assert main([str(step), str(step), "--fp16"]) == 2
    assert "is a training checkpoint" in capsys.readouterr().err
    assert (step / "train_state.pt").read_bytes() == b"state"
    save_checkpoint(tiny_model, tokenizer, step, write_extra=write_state, training_state=True)
    assert (step / "train_state.pt").is_file()


def test_train_refuses_a_bad_export_target_before_training(tmp_path, capsys):
    from training.train import main as train_main

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--manifest", str(tmp_path / "pairs.jsonl"), "--steps", "1", "--out", str(tmp_path / "out"),
                    "--export-fp16", str(run)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--export-fp16" in err and "not a SkyPrompt checkpoint (metrics.jsonl)" in err
    assert (run / "metrics.jsonl").read_text() == "{}\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json"])
def test_missing_file_is_named(saved, name):
    (saved / name).unlink()
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.") + " is missing"):
        load_checkpoint(saved)


def test_a_save_interrupted_between_its_renames_says_where_the_old_checkpoint_is(saved):
    aside = saved.with_name(f".{saved.name}.old-4242")
    saved.rename(aside)                       # what a crash between the two renames leaves
    with pytest.raises(CheckpointError, match=f"interrupted.*{aside.name}"):
        load_checkpoint(saved)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")


def test_a_run_folder_or_a_weights_file_given_as_the_checkpoint_names_what_to_give(tmp_path, tiny_model, tokenizer):
    """A training run's --out, where its fp16 export is the one to serve; a file of a checkpoint, whose
    folder is the checkpoint. The backend's engine says it as training and evaluation do."""
    from backend.engine import EngineError, ModelEngine

    run = tmp_path / "run"
    for step in ("step_0000010", "step_0000020"):
        (run / "checkpoints" / step).mkdir(parents=True)
    newest = run / "checkpoints" / "step_0000020"
    with pytest.raises(CheckpointError, match=f"{run} is a training run's folder: give one of its checkpoints, "
                                              f"e.g. {newest}$"):
        load_checkpoint(run)
    # the export the run recorded (--export-fp16, anywhere), else RUN/fp16; here the recorded one
    export = save_checkpoint(tiny_model, tokenizer, tmp_path / "served", dtype=torch.float16)
    (run / "train_config.json").write_text(json.dumps({"export_fp16": str(export)}))
    hint = f"{run} is a training run's folder: give its fp16 export {export} (the one to serve), or one of its " \
           f"checkpoints, e.g. {newest}"
    for given in (run, run / "checkpoints"):
        with pytest.raises(EngineError) as e:
            ModelEngine(given, device="cpu")
        assert str(e.value).endswith(hint.replace(f"{run} is", f"{given} is")), str(e.value)
    (run / "train_config.json").write_text(json.dumps({"export_fp16": None}))
    save_checkpoint(tiny_model, tokenizer, run / "fp16", dtype=torch.float16)
    with pytest.raises(CheckpointError, match=f"give its fp16 export {run / 'fp16'} "):
        load_checkpoint(run)
    with pytest.raises(EngineError) as e:
        ModelEngine(export / "model.safetensors", device="cpu")
    assert str(e.value) == (f"checkpoint {export / 'model.safetensors'} is a file; a checkpoint is the folder that "
                            f"holds model.safetensors, config.json and tokenizer.json: give its folder, {export}")


def test_truncated_weights(saved):
    w = saved / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(saved)


def test_garbage_weights(saved):
    (saved / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(saved)


def test_config_weights_mismatch(saved):
    meta = json.loads((saved / "config.json").read_text())
    meta["model"]["vision_layers"] += 1
    (saved / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not match config.json: missing"):
        load_checkpoint(saved)
    meta["model"]["vision_layers"] -= 1
    meta["model"]["embed_dim"] *= 2
    (saved / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_checkpoint(saved)


def test_unknown_preset(saved):
    meta = json.loads((saved / "config.json").read_text())
    meta["model"]["preset"] = "gigantic"
    (saved / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="unknown model preset 'gigantic'"):
        load_checkpoint(saved)


def test_config_not_json_or_foreign(saved):
    (saved / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(saved)
    (saved / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(CheckpointError, match="not a SkyPrompt model config"):
        load_checkpoint(saved)


def test_unknown_config_key(saved):
    meta = json.loads((saved / "config.json").read_text())
    meta["model"]["flux_capacitor"] = 1
    (saved / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="unknown keys"):
        load_checkpoint(saved)


@pytest.mark.parametrize("change, message", [
    ({"image_mean": [0.5]}, "image_mean must be 3 numbers"),
    ({"image_mean": ["a", "b", "c"]}, "could not convert string to float"),
    ({"image_size": 64.0}, "image_size must be a whole number"),
    ({"text_heads": 0}, "heads and patch_size must be >= 1"),
    ({"pad_id": 5}, "the tokenizer does not belong to these weights"),
    ("format_version", "format_version must be a whole number"),
    ("model-list", "not a SkyPrompt model config"),
], ids=["one-channel-mean", "mean-of-words", "float-size", "no-heads", "special-ids", "version-text", "model-list"])
def test_damaged_config_values_are_named(saved, change, message):
    meta = json.loads((saved / "config.json").read_text())
    if change == "format_version":
        meta["format_version"] = "2"
    elif change == "model-list":
        meta["model"] = []
    else:
        meta["model"].update(change)
    (saved / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(saved)


def test_non_finite_weights_are_named(saved):
    from safetensors.torch import load_file, save_file

    state = load_file(str(saved / "model.safetensors"))
    name = sorted(state)[0]
    state[name] = state[name].clone()
    state[name].view(-1)[0] = float("inf")
    save_file(state, str(saved / "model.safetensors"), metadata={"format": "skyprompt-mammut"})
    with pytest.raises(CheckpointError, match=f"non-finite values in 1 tensor.*{name}"):
        load_checkpoint(saved)


def test_corrupt_tokenizer(saved):
    """A checkpoint's damaged tokenizer is to be copied again, not retrained: a new one would not
    match the weights. The message names the file, what is wrong with it and that advice."""
    path = saved / "tokenizer.json"
    text = path.read_text()
    foreign = json.loads(text)          # valid, but with <pad> and <eos> swapped
    vocab = foreign["model"]["vocab"]
    vocab["<pad>"], vocab["<eos>"] = vocab["<eos>"], vocab["<pad>"]
    for added in foreign["added_tokens"]:
        added["id"] = vocab[added["content"]]
    for damaged, problem in ((b"[]", "the tokenizers library cannot read it"),
                             (text[:1000].encode(), "it is not valid JSON"),
                             (b"\x89PNG\r\n\x1a\n\x00\xff", "it is not UTF-8 text"),
                             (json.dumps(foreign).encode(), "<pad> has id 2")):
        path.write_bytes(damaged)
        with pytest.raises(CheckpointError) as error:
            load_checkpoint(saved)
        message = str(error.value)
        assert f"tokenizer.json at {path} is not a SkyPrompt tokenizer" in message and problem in message
        assert message.endswith("it belongs to these weights: copy the checkpoint folder again from where it came")
        assert "retrain" not in message


def test_set_image_size_serves_the_same_model_at_another_resolution(tiny_model, tiny_config):
    half = tiny_config.image_size // 2
    x = torch.randn(2, 3, half, half, generator=torch.Generator().manual_seed(3))
    before = tiny_model.encode_image(x)             # resampled on the fly to the smaller grid
    tiny_model.set_image_size(half)
    assert tiny_model.config.image_size == half
    assert tiny_model.visual.pos_embed.shape[1] == (half // tiny_config.patch_size) ** 2
    assert torch.allclose(tiny_model.encode_image(x), before, atol=1e-6)
    with pytest.raises(ConfigError, match="multiple of patch_size"):
        tiny_model.set_image_size(half + 3)
    assert tiny_model.config.image_size == half     # a refused size leaves the model as it was


def test_export_cli_changes_the_resolution_and_keeps_dtype_and_metadata(tmp_path, tiny_model, tokenizer,
                                                                         tiny_config, capsys):
    from training.export import main, stored_dtype

    src = save_checkpoint(tiny_model, tokenizer, tmp_path / "src", dtype=torch.float16,
                          extra={"step": 7, "train_config": {"image_size": 32}})
    assert main([str(src), str(tmp_path / "out"), "--image-size", "32"]) == 0
    assert "32 px, float16" in capsys.readouterr().out
    model, _ = load_checkpoint(tmp_path / "out")
    assert model.config.image_size == 32 and model.visual.pos_embed.shape[1] == (32 // tiny_config.patch_size) ** 2
    assert stored_dtype(tmp_path / "out") == torch.float16
    meta = json.loads((tmp_path / "out" / "config.json").read_text())
    assert meta["training"]["step"] == 7 and meta["training"]["exports"] == [{"image_size": [64, 32]}]
    # in place, to fp32: the directory is replaced atomically
    assert main([str(src), str(src), "--fp32"]) == 0
    assert stored_dtype(src) == torch.float32 and load_checkpoint(src)[0].config.image_size == 64
    # in place and losing what SRC holds (no way back: 64 -> 32 -> 64 px is not the same embedding)
    capsys.readouterr()
    before = (src / "model.safetensors").read_bytes()
    for flags, said in ((["--image-size", "32"], "position embedding"), (["--fp16"], "float32 weights, narrowed"),
                        (["--average", str(tmp_path / "out")], "averaged")):
        assert main([str(src), str(src), *flags]) == 2
        err = capsys.readouterr().err
        assert "DST is SRC" in err and said in err and "write it to a new folder" in err, err
    assert (src / "model.safetensors").read_bytes() == before
    assert main([str(tmp_path / "out"), str(src), "--average", str(src)]) == 2      # DST an averaged-in one
    assert "is one of the --average checkpoints" in capsys.readouterr().err
    assert (src / "model.safetensors").read_bytes() == before
    # bad input: one clear line, exit 2, nothing written
    assert main([str(src), str(tmp_path / "bad"), "--image-size", "30"]) == 2
    err = capsys.readouterr().err
    assert "--image-size 30" in err and "multiple of patch_size" in err and not (tmp_path / "bad").exists()
    assert main([str(tmp_path / "missing"), str(tmp_path / "bad")]) == 2
    assert "does not exist" in capsys.readouterr().err
    # a DST in a folder where nothing can be made (/sys refuses even root; a read-only disk does the same)
    assert main([str(src), "/sys/skyprompt-export"]) == 2
    err = capsys.readouterr().err
    assert "/sys/skyprompt-export" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_export_average_writes_the_mean_of_checkpoints(tmp_path, tiny_config, tokenizer, capsys):
    from backend.model import get_preset
    from backend.model.tokenizer import train_tokenizer
    from training.export import main

    models = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        models.append(MaMMUT(tiny_config).eval())
    a = save_checkpoint(models[0], tokenizer, tmp_path / "a")
    b = save_checkpoint(models[1], tokenizer, tmp_path / "b")
    assert main([str(a), str(tmp_path / "mean"), "--average", str(b)]) == 0
    assert "mean of 2 checkpoints" in capsys.readouterr().out
    mean, _ = load_checkpoint(tmp_path / "mean")
    sa, sb = models[0].state_dict(), models[1].state_dict()
    for k, v in mean.state_dict().items():
        assert torch.allclose(v, (sa[k] + sb[k]) / 2, atol=1e-6), k
    meta = json.loads((tmp_path / "mean" / "config.json").read_text())
    assert meta["training"]["exports"] == [{"average_of": [str(a), str(b)]}]
    # another model or another tokenizer cannot be averaged in: a clear error, nothing written
    torch.manual_seed(3)
    other = save_checkpoint(MaMMUT(get_preset("tiny", vocab_size=tiny_config.vocab_size, embed_dim=32)), tokenizer,
                            tmp_path / "other")
    assert main([str(a), str(tmp_path / "bad"), "--average", str(other)]) == 2
    err = capsys.readouterr().err
    assert "config differs in embed_dim" in err and not (tmp_path / "bad").exists()
    retrained = train_tokenizer(["a different corpus of words"] * 20, vocab_size=280, min_frequency=1)
    c = save_checkpoint(models[1], retrained, tmp_path / "c")
    assert main([str(a), str(tmp_path / "bad"), "--average", str(c)]) == 2
    assert "another tokenizer" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_export_arguments_links_and_what_killed_saves_left(tmp_path, tiny_config, tokenizer, capsys, monkeypatch):
    """--average after DST or before it; a checkpoint counted twice, an absurd --image-size, a full
    disk and Ctrl-C are one line each; a link as DST updates the checkpoint it leads to; "." names a
    folder; the temporary copies of saves killed before their end are removed by the next save, and a
    checkpoint set aside by one killed between its renames is put back."""
    from safetensors import SafetensorError

    from training.export import main, stored_dtype

    torch.manual_seed(1)
    a = save_checkpoint(MaMMUT(tiny_config).eval(), tokenizer, tmp_path / "a")
    torch.manual_seed(2)
    b = save_checkpoint(MaMMUT(tiny_config).eval(), tokenizer, tmp_path / "b")
    assert main([str(a), "--average", str(b), str(tmp_path / "mean")]) == 0       # SRC --average X DST
    assert "mean of 2 checkpoints" in capsys.readouterr().out
    for argv, said in (([str(a), str(tmp_path / "x"), "--average", str(a)], "is given twice"),
                       ([str(a), str(tmp_path / "x"), "--image-size", "100000"], "--image-size 100000")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2 and said in capsys.readouterr().err and not (tmp_path / "x").exists()
    # a link to a checkpoint: the checkpoint is replaced, the link stays a link, nothing stray beside it
    (tmp_path / "link").symlink_to(tmp_path / "mean")
    assert main([str(a), str(tmp_path / "link"), "--fp16"]) == 0
    assert (tmp_path / "link").is_symlink() and json.loads((tmp_path / "mean" / "config.json").read_text())
    assert stored_dtype(tmp_path / "mean") == torch.float16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "link", "mean"]
    monkeypatch.chdir(tmp_path / "mean")
    assert main([".", ".", "--fp16"]) == 0
    monkeypatch.chdir(tmp_path)
    # what killed saves left: a temporary copy (removed) and the checkpoint set aside, DST gone (put back);
    # a folder of a process alive, or of another machine, is left alone
    from backend.model.checkpoint import _this_process

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = _this_process().partition("@")[2]
    gone, elsewhere, mine = f"{dead.pid}@{host}", f"{dead.pid}@another_machine", f"{os.getppid()}@{host}"
    for owner in (gone, elsewhere, mine):
        (tmp_path / f".mean.tmp-{owner}-abc").mkdir()
        (tmp_path / f".mean.tmp-{owner}-abc" / "model.safetensors").write_bytes(b"x" * 10)
    shutil.rmtree(tmp_path / "mean")
    (tmp_path / "b").rename(tmp_path / f".mean.old-{gone}")     # the only copy of "mean" there is
    assert main([str(a), str(tmp_path / "mean")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f".mean.tmp-{elsewhere}-abc",
                                                                 f".mean.tmp-{mine}-abc", "a", "link", "mean"])
    (tmp_path / f".mean.old-{gone}").mkdir()         # DST there: an aside copy is only old, removed
    assert main([str(a), str(tmp_path / "b2")]) == 0
    assert main([str(a), str(tmp_path / "mean")]) == 0
    assert not (tmp_path / f".mean.old-{gone}").exists()
    for owner in (elsewhere, mine):
        shutil.rmtree(tmp_path / f".mean.tmp-{owner}-abc")
    # put back, a training checkpoint is judged as one: an export may not replace it (its optimizer state)
    training = save_checkpoint(MaMMUT(tiny_config).eval(), tokenizer, tmp_path / "run_step",
                               write_extra=lambda d: (d / "train_state.pt").write_bytes(b"state"), training_state=True)
    training.rename(tmp_path / f".trained.old-{gone}")
    assert main([str(a), str(tmp_path / "trained")]) == 2
    assert "is a training checkpoint" in capsys.readouterr().err
    assert (tmp_path / "trained" / "train_state.pt").read_bytes() == b"state"
    shutil.rmtree(tmp_path / "trained")
    capsys.readouterr()
    # a full disk, as safetensors reports it (a real one needs a small file system mounted as root)

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr("backend.model.checkpoint.save_file", full_disk)
    assert main([str(a), str(tmp_path / "mean")]) == 2
    err = capsys.readouterr().err
    assert "cannot write" in err and "No space left" in err and "Traceback" not in err
    assert load_checkpoint(tmp_path / "mean")[0] is not None

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr("backend.model.checkpoint.save_file", ctrl_c)
    assert main([str(a), str(tmp_path / "mean")]) == 130
    assert "interrupted" in capsys.readouterr().err and load_checkpoint(tmp_path / "mean")[0] is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b2", "link", "mean"]


def test_a_checkpoint_target_under_a_file_is_refused_before_the_work(tmp_path):
    """--export-fp16 notes.txt/fp16 passed the check and failed only when training had ended."""
    from backend.model.checkpoint import check_checkpoint_target

    (tmp_path / "notes.txt").write_text("notes")
    with pytest.raises(CheckpointError, match="notes.txt is a file, not a folder"):
        check_checkpoint_target(tmp_path / "notes.txt" / "fp16")
    check_checkpoint_target(tmp_path / "new" / "fp16")         # folders yet to be made are fine
