"""Re-export a checkpoint: another serving resolution, fp16 weights, an average of checkpoints.

    python -m training.export runs/x/checkpoints/step_0002000 runs/x/served --image-size 128 --fp16
    python -m training.export runs/a/fp16 runs/ab/fp16 --average runs/b/fp16

A checkpoint's `image_size` is the resolution the backend tiles at and evaluation resizes to. A
model fine-tuned at another resolution than its starting checkpoint's, or one that measures better
at another size, is re-exported here: the position embedding is resampled to the new patch grid
(`MaMMUT.set_image_size`) and the config says the new size. The training metadata is kept, with a
note of what the export changed. Writing is atomic, so DST may be SRC for a change that loses
nothing (--fp32); one that does (--average, another --image-size, --fp16 of wider weights) is
refused there.

`--average` writes the uniform mean of SRC's weights and those of other checkpoints of the same
model and tokenizer (e.g. two stages of one training run): averaged weights of nearby points of one
run often score better than either end, at no training cost.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from backend.model.checkpoint import (CONFIG, WEIGHTS, CheckpointError, check_checkpoint_target, load_checkpoint,
                                     read_config, save_checkpoint)
from backend.model.config import ConfigError
from backend.model.vocabulary import TrainingWords, VocabularyError


# a resolution past any this model family serves: its position embedding alone would take gigabytes
MAX_IMAGE_SIZE = 4096


def stored_dtype(directory: str | Path) -> torch.dtype:
    """The dtype a checkpoint stores its floating-point weights in; CheckpointError when its weights
    file cannot be read."""
    try:
        with safe_open(str(Path(directory) / WEIGHTS), framework="pt") as f:
            for key in f.keys():
                t = f.get_slice(key)
                if t.get_dtype() in ("F16", "BF16", "F32", "F64"):
                    return {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
                            "F64": torch.float64}[t.get_dtype()]
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{Path(directory) / WEIGHTS} cannot be read ({e})") from None
    return torch.float32


def average_into(model, tokenizer, others: Sequence[str | Path]) -> None:
    """Replace `model`'s floating-point weights by their mean with those of `others` (in place);
    each must have the same model config and the same tokenizer."""
    state, config = model.state_dict(), model.config.to_dict()
    total = {k: v.double() for k, v in state.items() if v.is_floating_point()}
    for other in others:
        o_model, o_tok = load_checkpoint(other)
        o_config = o_model.config.to_dict()
        if o_config != config:
            diff = sorted(k for k, v in config.items() if o_config.get(k) != v)
            raise CheckpointError(f"{other} is another model than the first checkpoint (config differs in "
                                  f"{', '.join(diff)}): only checkpoints of one model can be averaged")
        if o_tok.to_str() != tokenizer.to_str():
            raise CheckpointError(f"{other} has another tokenizer than the first checkpoint: only checkpoints "
                                  f"of one training run can be averaged")
        for k, v in o_model.state_dict().items():
            if k in total:
                total[k] += v.double()
    n = len(others) + 1
    model.load_state_dict({k: (total[k] / n).to(v.dtype) if k in total else v for k, v in state.items()})


def exported_words(checkpoints: Sequence[str | Path]) -> TrainingWords | None:
    """The word list of an export: the weights learned what their checkpoints learned, so the
    counts of all of them summed; None when one of them has no list (its words are unknown)."""
    lists = []
    for ckpt in checkpoints:
        try:
            words = TrainingWords.load(ckpt)
        except VocabularyError as e:
            raise CheckpointError(f"{e} (or export without it: remove it from {ckpt})") from None
        if words is None:
            return None
        lists.append(words)
    if len(lists) == 1:
        return lists[0]
    return TrainingWords(sum((Counter(w.counts) for w in lists), Counter()),
                         " + ".join(w.source or str(c) for w, c in zip(lists, checkpoints)))


def export_checkpoint(src: str | Path, dst: str | Path, image_size: int | None = None,
                      dtype: torch.dtype | None = None,
                      average: Sequence[str | Path] = ()) -> tuple[Path, int, torch.dtype]:
    """Write SRC (averaged with the checkpoints in `average`, if any) to DST at `image_size` and in
    `dtype` (default: both as SRC has them); returns (DST, its image size, its weight dtype)."""
    model, tokenizer = load_checkpoint(src, dtype=torch.float32)
    dtype = dtype or stored_dtype(src)
    meta = json.loads((Path(src) / CONFIG).read_text())
    extra = dict(meta.get("training") or {})
    if average:
        average_into(model, tokenizer, average)
        extra.setdefault("exports", []).append({"average_of": [str(src), *map(str, average)]})
    before = model.config.image_size
    if image_size is not None and image_size != before:
        try:
            model.set_image_size(image_size)
        except ConfigError as e:
            raise CheckpointError(f"--image-size {image_size}: {e}") from None
        extra.setdefault("exports", []).append({"image_size": [before, image_size]})
    words = exported_words([src, *average])
    return (save_checkpoint(model, tokenizer, dst, dtype=dtype, extra=extra or None,
                            write_extra=words.save if words is not None else None),
            model.config.image_size, dtype)


def _check_not_lossy_in_place(args: argparse.Namespace) -> None:
    """CheckpointError for an export over SRC itself that loses what SRC holds: weights averaged with
    others, a position embedding resampled (another size and back is not the same), weights narrowed
    to fp16. Writing is atomic, but the old folder is gone afterwards, the bundled checkpoint's too."""
    if os.path.realpath(args.dst) in {os.path.realpath(p) for p in args.average}:
        raise CheckpointError(f"DST {args.dst} is one of the --average checkpoints: the mean would replace it, with "
                              "no way back; write it to a new folder")
    if os.path.realpath(args.dst) != os.path.realpath(args.src) or not (Path(args.src) / CONFIG).is_file():
        return
    check_checkpoint_target(Path(os.path.realpath(args.dst)))     # a training checkpoint is refused as such
    lost = []
    if args.average:
        lost.append("its weights, averaged with --average")
    if args.image_size is not None and args.image_size != read_config(args.src).image_size:
        lost.append("its position embedding, resampled to --image-size")
    stored = stored_dtype(args.src)
    if args.fp16 and stored != torch.float16:
        lost.append(f"its {str(stored).replace('torch.', '')} weights, narrowed to fp16")
    if lost:
        raise CheckpointError(f"DST is SRC ({args.src}), and this export would replace {' and '.join(lost)}, with no "
                              "way back: write it to a new folder (DST may be SRC for a change that loses nothing, "
                              "such as --fp32)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.export",
        description="Re-export a SkyPrompt checkpoint at another serving resolution (--image-size: the size the "
                    "backend tiles at and evaluation uses) and/or with other weights (--fp16: half the file; default: as SRC stores them).")
    parser.add_argument("src", help="checkpoint directory to read")
    parser.add_argument("dst", help="checkpoint directory to write (may be SRC, replaced atomically, for a change "
                                     "that loses nothing such as --fp32)")
    parser.add_argument("--image-size", type=int,
                        help=f"new input resolution in px, a multiple of the patch size, at most {MAX_IMAGE_SIZE}")
    parser.add_argument("--average", action="append", metavar="CKPT", default=[],
                        help="also average in this checkpoint's weights (same model and tokenizer; repeat the option "
                             "for more): DST gets the uniform mean of SRC and them")
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--fp16", action="store_true", help="store the weights in fp16")
    kind.add_argument("--fp32", action="store_true", help="store the weights in fp32 (default: as SRC stores them)")
    args = parser.parse_args(argv)
    if args.image_size is not None and not 0 < args.image_size <= MAX_IMAGE_SIZE:
        parser.error(f"--image-size {args.image_size}: give a size in px from the patch size to {MAX_IMAGE_SIZE}")
    given = [os.path.realpath(p) for p in (args.src, *args.average)]
    twice = sorted({p for p in given if given.count(p) > 1})
    if twice:
        parser.error(f"{twice[0]} is given twice among SRC and --average: each checkpoint counts once in the mean")
    try:
        _check_not_lossy_in_place(args)
        out, size, dtype = export_checkpoint(args.src, args.dst, args.image_size,
                                             torch.float16 if args.fp16 else torch.float32 if args.fp32 else None,
                                             average=args.average)
    except CheckpointError as e:
        print(f"training.export: {e}", file=sys.stderr)
        return 2
    except OSError as e:    # reading SRC is checked above: this is DST's folder (read-only, full, not yours)
        print(f"training.export: cannot write {args.dst}: {e.strerror or e}; {args.dst} is as it was",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"training.export: interrupted; {args.dst} is as it was", file=sys.stderr)
        return 130
    averaged = f", mean of {len(args.average) + 1} checkpoints" if args.average else ""
    print(f"wrote {out} ({size} px, {str(dtype).replace('torch.', '')}{averaged})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
