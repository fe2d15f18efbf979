"""Caption tokenizer: training, round trips, fixed special ids, batching, file I/O, the CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backend.model.config import MaMMUTConfig
from backend.model.tokenizer import (
    SPECIAL_TOKENS,
    Tokenizer,
    TokenizerError,
    train_tokenizer,
)
from training.tokenizer import main as cli_main
from training.tokenizer import read_caption_texts

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / ".." / "shared" / "data"

CORPUS = [
    "There is a piece of farmland .",
    "Many planes are parked next to a long building in an airport.",
    "Two white storage tanks stand beside a road, near 3 small houses.",
    "A river with green trees on both sides; the water is dark-green!",
    "Lots of cars are parked in the parking lot (about 40 of them).",
    "Some buildings and green trees are around a playground with a 400 m track.",
    "A bridge crosses the river; 2 roads meet at its end?",
    "It's a dense residential area: houses, lawns & swimming pools.",
]
HELD_OUT = [
    "Three baseball fields, 1 tennis court and 12 cars.",
    "An airport with 7 planes; runway 09/27 is empty!",
    "The harbor's boats (white & blue) are docked at pier #4.",
    "Storage Tanks   next to a FREEWAY, 100% covered.",
    "",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(CORPUS * 20, vocab_size=400, min_frequency=2)


def test_special_tokens_take_fixed_ids(tok):
    assert SPECIAL_TOKENS == ("<pad>", "<bos>", "<eos>", "<unk>")
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    cfg = MaMMUTConfig()
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (cfg.pad_id, cfg.bos_id, cfg.eos_id)
    assert 260 < tok.vocab_size <= 400


def test_round_trip_is_lowercased_text(tok):
    for text in CORPUS + HELD_OUT:
        ids = tok.encode(text)
        assert all(i >= len(SPECIAL_TOKENS) for i in ids), "encode must not add or produce special tokens"
        assert tok.decode(ids) == text.lower()
        assert tok.normalize(text) == text.lower()


def test_normalisation_strips_and_folds_unicode(tok):
    assert tok.decode(tok.encode("  Ｐａｒｋｉｎｇ LOT\t")) == "parking lot"
    # a word gets the same tokens at the start of a caption as in the middle
    assert tok.encode("farmland")[-1] == tok.encode("a farmland")[-1]


def test_bpe_learns_merges(tok):
    # trained words take far fewer tokens than their bytes
    text = "There is a piece of farmland ."
    assert len(tok.encode(text)) < len(text.encode()) / 2


def test_decode_stops_at_eos_and_skips_specials(tok):
    ids = tok.encode("a river")
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, *tok.encode("junk"), tok.pad_id]) == "a river"
    assert tok.decode(torch.tensor([tok.bos_id, *ids, tok.eos_id])) == "a river"
    assert tok.decode([]) == ""


def test_is_shown_says_which_ids_decode_turns_into_text(tok):
    # model output may hold special ids and ids past the vocabulary (its embedding table can be larger)
    hidden = [*range(len(SPECIAL_TOKENS)), tok.vocab_size, tok.vocab_size + 7]
    assert not any(tok.is_shown(i) for i in hidden)
    assert all(tok.is_shown(i) for i in range(len(SPECIAL_TOKENS), tok.vocab_size))
    words = tok.encode("a river")
    mixed = [words[0], tok.unk_id, tok.vocab_size + 7, *words[1:], tok.bos_id]
    assert tok.decode(mixed) == tok.decode([i for i in mixed if tok.is_shown(i)]) == "a river"


def test_special_token_names_in_text_are_text(tok):
    # a query that says "<eos>" or "<pad>" is words, not an early end or a hole in the pooled text
    for text in ("a <eos> b", "<pad> road", "<bos><unk>"):
        ids = tok.encode(text)
        assert all(i >= len(SPECIAL_TOKENS) for i in ids) and tok.decode(ids) == tok.normalize(text)
    row = tok("a <eos> b", context_length=16)[0].tolist()
    assert row.count(tok.eos_id) == 1 and tok.pad_id not in row[:row.index(tok.eos_id)]


def test_empty_string_is_bos_eos(tok):
    assert tok.encode("") == []
    assert tok("", context_length=4).tolist() == [[1, 2, 0, 0]]


def test_batch_shape_padding_and_truncation_keeps_eos(tok):
    texts = ["a river", CORPUS[1] * 5, ""]
    batch = tok(texts, context_length=16)
    assert batch.dtype == torch.long and batch.shape == (3, 16)
    short = tok.encode("a river")
    assert batch[0].tolist() == [1, *short, 2] + [0] * (16 - len(short) - 2)
    long = tok.encode(CORPUS[1] * 5)
    assert len(long) > 16
    assert batch[1].tolist() == [1, *long[:14], 2]
    assert batch[2].tolist() == [1, 2] + [0] * 14
    for row in batch:
        assert (row == tok.eos_id).sum() == 1
    assert tok("a river", context_length=8).shape == (1, 8)
    with pytest.raises(ValueError):
        tok("a river", context_length=1)


def test_save_then_load_gives_identical_ids(tok, tmp_path):
    path = tok.save(tmp_path / "ckpt" / "tokenizer.json")
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"], "no temp file may be left behind"
    # readable as any new file is (a server running as another user loads it), not owner-only
    from backend.files import current_umask
    assert path.stat().st_mode & 0o777 == 0o666 & ~current_umask()
    for loaded in (Tokenizer.load(path), Tokenizer.load(path.parent), Tokenizer.from_str(path.read_text())):
        assert loaded.vocab_size == tok.vocab_size
        for text in CORPUS + HELD_OUT:
            assert loaded.encode(text) == tok.encode(text)
        assert torch.equal(loaded(HELD_OUT, 32), tok(HELD_OUT, 32))


def test_load_missing_file(tmp_path):
    path = tmp_path / "nowhere" / "tokenizer.json"
    with pytest.raises(TokenizerError, match="does not exist") as err:
        Tokenizer.load(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("content", [b"{not json", b"\x89PNG\r\n\x1a\n\x00\xff", b'{"version": "1.0"}', b""])
def test_load_corrupt_file(tmp_path, content):
    path = tmp_path / "tokenizer.json"
    path.write_bytes(content)
    with pytest.raises(TokenizerError, match="not a SkyPrompt tokenizer") as err:
        Tokenizer.load(path)
    assert str(path) in str(err.value)
    assert "python -m training.tokenizer" in str(err.value)


def test_load_foreign_tokenizer(tok, tmp_path):
    # a valid tokenizer.json whose special tokens are not at 0..3 (as in most public tokenizers)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    vocab["<pad>"], vocab["<eos>"] = vocab["<eos>"], vocab["<pad>"]
    for added in data["added_tokens"]:
        added["id"] = vocab[added["content"]]
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data))
    with pytest.raises(TokenizerError, match="not a SkyPrompt tokenizer") as err:
        Tokenizer.load(path)
    assert str(path) in str(err.value) and "<pad> has id 2" in str(err.value)


def test_training_rejects_bad_input():
    with pytest.raises(TokenizerError, match="no text"):
        train_tokenizer([])
    with pytest.raises(TokenizerError, match="too small"):
        train_tokenizer(CORPUS, vocab_size=100)


def test_read_caption_texts(tmp_path):
    txt = tmp_path / "caps.txt"
    txt.write_text("A road .\n\n   \nTwo cars .\n")
    jsonl = tmp_path / "captions.jsonl"
    jsonl.write_text(
        json.dumps({"image": "a.jpg", "captions": ["A beach .", " "]}) + "\n\n"
        + json.dumps({"image": "b.jpg", "caption": "A pond ."}) + "\n"
        + json.dumps({"image": "c.jpg"}) + "\n"
    )
    assert list(read_caption_texts([txt, jsonl])) == ["A road .", "Two cars .", "A beach .", "A pond ."]
    assert list(read_caption_texts(str(txt))) == ["A road .", "Two cars ."]
    jsonl.write_text('{"captions": ["ok"]}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"captions.jsonl:2"):
        list(read_caption_texts(jsonl))
    # the tokenizer reads a manifest's captions as training does: "captions" when there, else "caption"
    from training.data import manifest_records

    (tmp_path / "a.jpg").write_bytes(b"")
    jsonl.write_text(json.dumps({"image": "a.jpg", "captions": ["A beach ."], "caption": "A summary ."}) + "\n"
                     + json.dumps({"image": "a.jpg", "captions": "A bay ."}) + "\n")
    assert list(read_caption_texts(jsonl)) == ["A beach .", "A bay ."]
    assert [c for r in manifest_records(jsonl) for c in r.captions] == ["A beach .", "A bay ."]
    jsonl.write_text(json.dumps({"image": "a.jpg", "captions": ["fine", 3]}) + "\n")
    with pytest.raises(ValueError, match=r"captions.jsonl:1: \"captions\" must be a list of strings"):
        list(read_caption_texts(jsonl))


def test_read_caption_texts_of_json_files(tmp_path):
    karpathy = tmp_path / "dataset_x.json"
    karpathy.write_text(json.dumps({"images": [{"filename": "a.jpg", "sentences": [{"raw": "A port ."}, {"raw": " "}]},
                                               {"filename": "b.jpg", "sentences": [{"raw": "Two ships ."}]}]}))
    listed = tmp_path / "pairs.json"
    listed.write_text(json.dumps([{"image": "a.jpg", "captions": ["A farm ."]}, {"image": "b.jpg", "caption": "A dam ."}]))
    lines = tmp_path / "lines.json"                      # JSONL under a .json name, as manifests may be
    lines.write_text(json.dumps({"image": "a.jpg", "caption": "A golf course ."}) + "\n"
                     + json.dumps({"image": "b.jpg", "captions": ["A lake ."]}) + "\n")
    assert list(read_caption_texts([karpathy, listed, lines])) == [
        "A port .", "Two ships .", "A farm .", "A dam .", "A golf course .", "A lake ."]


def test_cli_refuses_an_out_it_cannot_or_should_not_write(tmp_path, tiny_model, tokenizer):
    from backend.model.checkpoint import save_checkpoint

    tok = tokenizer     # the conftest tokenizer, which fits the tiny model
    caps = tmp_path / "caps.txt"
    caps.write_text("\n".join(CORPUS * 10) + "\n")
    checkpoint = save_checkpoint(tiny_model, tok, tmp_path / "ckpt")
    before = (checkpoint / "tokenizer.json").read_bytes()
    result = run_cli("--captions", str(caps), "--vocab-size", "300", "--out", str(checkpoint))
    assert result.returncode == 2 and "checkpoint folder" in result.stderr
    assert (checkpoint / "tokenizer.json").read_bytes() == before
    (tmp_path / "afile").write_text("x")
    result = run_cli("--captions", str(caps), "--vocab-size", "300", "--out", str(tmp_path / "afile" / "tok.json"))
    assert result.returncode == 2 and "is a file, not a folder" in result.stderr and "Traceback" not in result.stderr


def test_real_ucm_captions():
    path = DATA / "captions" / "ucm_train_caps.txt"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    texts = list(read_caption_texts(path))
    assert len(texts) > 1000
    tok = train_tokenizer(texts, vocab_size=2048)
    for text in texts[::97]:
        assert tok.decode(tok.encode(text)) == text.lower()
    mean = sum(len(tok.encode(t)) for t in texts) / len(texts)
    assert mean < 15, f"BPE barely merged: {mean:.1f} tokens per caption"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "training.tokenizer", *args],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )


def test_cli_writes_a_loadable_tokenizer(tmp_path):
    caps = tmp_path / "caps.txt"
    caps.write_text("\n".join(CORPUS * 10) + "\n")
    words = tmp_path / "classes.txt"
    words.write_text("golf course\nrailway station\n")
    out = tmp_path / "out" / "tokenizer.json"
    result = run_cli("--captions", str(caps), "--vocab-size", "512", "--extra-words", "storage tanks", str(words),
                     "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert f"trained on {len(CORPUS) * 10} captions" in result.stdout
    assert "decode:" in result.stdout
    tok = Tokenizer.load(out)
    assert f"vocab size: {tok.vocab_size}" in result.stdout
    for text in CORPUS + ["golf course", "railway station"]:
        assert tok.decode(tok.encode(text)) == text.lower()
    # extra words were in the corpus, so BPE learned them as whole words
    assert len(tok.encode("railway station")) == 2
    # a mistyped file name is refused, not learnt as a phrase
    for typo in (str(tmp_path / "clases.txt"), "classes.txt"):
        result = run_cli("--captions", str(caps), "--extra-words", typo, "--out", str(tmp_path / "typo.json"))
        assert result.returncode == 2 and f"--extra-words {typo}: no such file" in result.stderr, result.stderr
    assert not (tmp_path / "typo.json").exists()


def test_cli_out_ending_with_a_slash_is_a_folder(tmp_path, capsys):
    """`--out runs/tok/`, a folder not made yet, gets runs/tok/tokenizer.json, as --help says, not a
    file named runs/tok."""
    caps = tmp_path / "caps.txt"
    caps.write_text("\n".join(CORPUS * 10) + "\n")
    assert cli_main(["--captions", str(caps), "--vocab-size", "300", "--out", f"{tmp_path / 'tok'}/"]) == 0
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    assert Tokenizer.load(tmp_path / "tok").vocab_size > 0
    # where nothing can be written (/sys refuses even root; a read-only disk does the same): one line
    assert cli_main(["--captions", str(caps), "--vocab-size", "300", "--out", "/sys/skyprompt-tokenizer.json"]) == 2
    err = capsys.readouterr().err
    assert "cannot write --out /sys/skyprompt-tokenizer.json" in err and "Traceback" not in err, err


def test_cli_out_that_is_an_input_or_no_tokenizer_is_refused(tmp_path, capsys):
    """`--captions caps.txt --out caps.txt` replaced the captions with the tokenizer; an --out that is
    an earlier tokenizer may be replaced, any other existing file is refused."""
    caps = tmp_path / "caps.txt"
    caps.write_text("\n".join(CORPUS * 10) + "\n")
    kept = caps.read_text()
    with pytest.raises(SystemExit) as e:
        cli_main(["--captions", str(caps), "--vocab-size", "300", "--out", str(caps)])
    assert e.value.code == 2 and "is one of the input files" in capsys.readouterr().err
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}')
    with pytest.raises(SystemExit):
        cli_main(["--captions", str(caps), "--vocab-size", "300", "--out", str(notes)])
    assert "exists and is not a tokenizer file" in capsys.readouterr().err
    assert caps.read_text() == kept and notes.read_text() == '{"mine": 1}'
    out = tmp_path / "tokenizer.json"
    assert cli_main(["--captions", str(caps), "--vocab-size", "300", "--out", str(out)]) == 0
    assert cli_main(["--captions", str(caps), "--vocab-size", "320", "--out", str(out)]) == 0   # a rerun replaces it


def test_cli_missing_captions_path(tmp_path):
    missing = tmp_path / "no_such_caps.txt"
    result = run_cli("--captions", str(missing), "--out", str(tmp_path / "tokenizer.json"))
    assert result.returncode == 2
    assert str(missing) in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "tokenizer.json").exists()


def test_cli_captions_without_text(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(SystemExit) as exit_:
        cli_main(["--captions", str(empty), "--out", str(tmp_path / "tokenizer.json")])
    assert exit_.value.code == 2
    assert "no caption text" in capsys.readouterr().err


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--captions", "--vocab-size", "--min-frequency", "--extra-words", "--out"):
        assert flag in out
