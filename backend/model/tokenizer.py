"""Caption tokenizer: byte-level BPE trained on remote-sensing captions.

A checkpoint carries its own tokenizer.json (written by `Tokenizer.save`), so a model and the
vocabulary it was trained with never drift apart, and nothing is downloaded at run time.

Choices, and why:
- Byte-level BPE: every string encodes (no <unk> ever comes out), including place names, units
  and symbols users type that the captions never had.
- Normalisation NFKC + lowercase + strip: the caption corpora are inconsistently cased, and a
  search for "Parking Lot" should mean the same as "parking lot". decode(encode(x)) gives back
  that normalised text exactly, punctuation, digits and inner spacing included.
- add_prefix_space: a word gets the same tokens at the start of a caption as in the middle.
- The four special tokens are trained first, so they always take ids 0..3; the model config's
  pad_id/bos_id/eos_id defaults rely on that.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from ..files import write_text_atomically

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(len(SPECIAL_TOKENS))
BYTE_ALPHABET_SIZE = 256
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + BYTE_ALPHABET_SIZE   # the smallest vocabulary train_tokenizer makes
RETRAIN_HINT = "retrain it with `python -m training.tokenizer`"


class TokenizerError(ValueError):
    """A tokenizer that cannot be trained, loaded or used as a SkyPrompt tokenizer."""


class Tokenizer:
    """A trained byte-level BPE tokenizer with SkyPrompt's fixed special-token ids."""

    def __init__(self, backend: HFTokenizer, source: str = "<in memory>", hint: str = RETRAIN_HINT):
        """`source` names the tokenizer and `hint` says what to do, in the error for one that is
        not a SkyPrompt tokenizer."""
        _check_special_tokens(backend, source, hint)
        # "<eos>" typed in a query is text, not the end of it: special ids are placed by __call__ alone
        # (an in-memory setting: tokenizer.json and the checkpoint's hash stay as they are)
        backend.encode_special_tokens = True
        self._backend = backend

    # --- loading and saving ---------------------------------------------------------------

    @classmethod
    def from_str(cls, json_text: str, source: str = "<in memory>", hint: str = RETRAIN_HINT) -> "Tokenizer":
        """A tokenizer from the text of a tokenizer.json; `source` names it in error messages and
        `hint` ends the error for text that is not a SkyPrompt tokenizer: what to do about it."""
        try:
            json.loads(json_text)
        except json.JSONDecodeError as e:
            raise TokenizerError(
                f"tokenizer.json at {source} is not a SkyPrompt tokenizer: it is not valid JSON "
                f"({e.msg} at line {e.lineno}, column {e.colno}); {hint}"
            ) from None
        try:
            backend = HFTokenizer.from_str(json_text)
        except Exception as e:  # the tokenizers library raises a bare Exception on bad content
            raise TokenizerError(
                f"tokenizer.json at {source} is not a SkyPrompt tokenizer: the tokenizers library "
                f"cannot read it ({e}); {hint}"
            ) from None
        return cls(backend, source, hint)

    @classmethod
    def load(cls, path: str | os.PathLike, hint: str = RETRAIN_HINT) -> "Tokenizer":
        """Load a tokenizer.json, or the tokenizer.json inside a checkpoint directory.

        `hint` ends the error for a file that is not a SkyPrompt tokenizer: what to do about it
        (a checkpoint's tokenizer belongs to its weights, so retraining is no advice there).
        """
        path = _tokenizer_file(path)
        if not path.is_file():
            raise TokenizerError(
                f"no tokenizer at {path}: the file does not exist; train one with "
                f"`python -m training.tokenizer --captions CAPTIONS... --out {path}`"
            )
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise TokenizerError(
                f"tokenizer.json at {path} is not a SkyPrompt tokenizer: it is not UTF-8 text "
                f"(a corrupt or binary file?); {hint}"
            ) from None
        except OSError as e:
            raise TokenizerError(f"cannot read tokenizer at {path}: {e.strerror or e}") from None
        return cls.from_str(text, source=str(path), hint=hint)

    def save(self, path: str | os.PathLike) -> Path:
        """Write tokenizer.json atomically: a crash mid-write never leaves a truncated file.

        `path` is a file, or an existing checkpoint directory (then `path/tokenizer.json`).
        Returns the file written.
        """
        path = _tokenizer_file(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_text_atomically(path, self.to_str())

    def to_str(self) -> str:
        """The tokenizer.json text."""
        return self._backend.to_str(pretty=True)

    # --- vocabulary -----------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def bos_id(self) -> int:
        return BOS_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def unk_id(self) -> int:
        return UNK_ID

    # --- text <-> ids ---------------------------------------------------------------------

    def normalize(self, text: str) -> str:
        """The text as the tokenizer sees it; decode(encode(text)) gives exactly this back."""
        return self._backend.normalizer.normalize_str(text)

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without special tokens."""
        return self._backend.encode(text, add_special_tokens=False).ids

    def tokens(self, text: str) -> list[str]:
        """The BPE pieces of one text (byte-level: 'Ġ' marks a leading space); for inspection."""
        return self._backend.encode(text, add_special_tokens=False).tokens

    def is_shown(self, token_id: int) -> bool:
        """Whether `decode` turns this id into text: special ids and ids past the end of this
        vocabulary are dropped (model output may hold those: the embedding table can be larger
        than the trained vocabulary)."""
        return len(SPECIAL_TOKENS) <= token_id < self.vocab_size

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of a token sequence: stops at the first <eos>, keeps the ids `is_shown` keeps."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        kept = []
        for i in ids:
            if i == EOS_ID:
                break
            if self.is_shown(i):
                kept.append(i)
        text = self._backend.decode(kept, skip_special_tokens=True)
        # undo add_prefix_space: the byte-level decoder keeps the space it added in front
        return text[1:] if text.startswith(" ") else text

    def __call__(self, texts: str | Sequence[str], context_length: int) -> torch.Tensor:
        """A LongTensor [B, context_length] of `<bos> tokens... <eos> <pad>...`.

        Long texts are cut so that <eos> is always present: the contrastive pass pools at it and
        the generative pass must learn to stop.
        """
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2 (room for <bos> and <eos>), got {context_length}")
        if isinstance(texts, str):
            texts = [texts]
        encodings = self._backend.encode_batch(list(texts), add_special_tokens=False)
        out = torch.full((len(encodings), context_length), PAD_ID, dtype=torch.long)
        for row, enc in enumerate(encodings):
            ids = [BOS_ID, *enc.ids[: context_length - 2], EOS_ID]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size})"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE tokenizer on caption texts.

    The result may have fewer than `vocab_size` tokens when the corpus has too few pairs seen
    `min_frequency` times; the model's vocab_size must be at least `Tokenizer.vocab_size`.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise TokenizerError(
            f"vocab_size {vocab_size} is too small: the special tokens and the 256 byte tokens "
            f"alone take {MIN_VOCAB_SIZE}"
        )
    if min_frequency < 1:
        raise TokenizerError(f"min_frequency must be at least 1, got {min_frequency}")

    backend = HFTokenizer(models.BPE(unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase(), normalizers.Strip()])
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),  # first, so they take ids 0..3
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodes, so <unk> never appears
        show_progress=False,
    )
    seen = 0

    def counted(it: Iterable[str]) -> Iterator[str]:
        nonlocal seen
        for text in it:
            if not isinstance(text, str):
                raise TokenizerError(f"training texts must be str, got {type(text).__name__}")
            seen += 1
            yield text

    backend.train_from_iterator(counted(texts), trainer)
    if seen == 0:
        raise TokenizerError("no text to train the tokenizer on")
    return Tokenizer(backend, source="<freshly trained>")


def _tokenizer_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path / "tokenizer.json" if path.is_dir() else path


def _check_special_tokens(backend: HFTokenizer, source: str, hint: str) -> None:
    wrong = [
        f"{tok} has id {backend.token_to_id(tok)}" if backend.token_to_id(tok) is not None else f"{tok} is missing"
        for want, tok in enumerate(SPECIAL_TOKENS)
        if backend.token_to_id(tok) != want
    ]
    if wrong:
        raise TokenizerError(
            f"tokenizer.json at {source} is not a SkyPrompt tokenizer: special tokens must be "
            f"{', '.join(f'{t}={i}' for i, t in enumerate(SPECIAL_TOKENS))} but {'; '.join(wrong)}; {hint}"
        )
    if backend.normalizer is None or backend.decoder is None:
        raise TokenizerError(
            f"tokenizer.json at {source} is not a SkyPrompt tokenizer: it has no "
            f"{'normalizer' if backend.normalizer is None else 'decoder'}; {hint}"
        )
