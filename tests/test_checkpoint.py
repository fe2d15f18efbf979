"""Checkpoint directories: save -> load round trip, atomic saves, and clear errors on damage."""
from __future__ import annotations

import json
import os

import pytest
import torch

from backend.model import MaMMUT
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


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json"])
def test_missing_file_is_named(saved, name):
    (saved / name).unlink()
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.") + " is missing"):
        load_checkpoint(saved)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")


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


def test_corrupt_tokenizer(saved):
    (saved / "tokenizer.json").write_text("[]")
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        load_checkpoint(saved)
