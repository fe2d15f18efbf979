"""Re-export a checkpoint: another serving resolution, fp16 weights, or both.

    python -m training.export runs/x/checkpoints/step_0002000 runs/x/served --image-size 128 --fp16

A checkpoint's `image_size` is the resolution the backend tiles at and evaluation resizes to. A
model fine-tuned at another resolution than its starting checkpoint's, or one that measures better
at another size, is re-exported here: the position embedding is resampled to the new patch grid
(`MaMMUT.set_image_size`) and the config says the new size. The training metadata is kept, with a
note of what the export changed. Writing is atomic, so DST may be SRC.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from backend.model.checkpoint import CONFIG, WEIGHTS, CheckpointError, load_checkpoint, save_checkpoint
from backend.model.config import ConfigError


def stored_dtype(directory: str | Path) -> torch.dtype:
    """The dtype a checkpoint stores its floating-point weights in."""
    with safe_open(str(Path(directory) / WEIGHTS), framework="pt") as f:
        for key in f.keys():
            t = f.get_slice(key)
            if t.get_dtype() in ("F16", "BF16", "F32", "F64"):
                return {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
                        "F64": torch.float64}[t.get_dtype()]
    return torch.float32


def export_checkpoint(src: str | Path, dst: str | Path, image_size: int | None = None,
                      dtype: torch.dtype | None = None) -> tuple[Path, int, torch.dtype]:
    """Write SRC to DST at `image_size` and in `dtype` (default: both as SRC has them); returns
    (DST, its image size, its weight dtype)."""
    model, tokenizer = load_checkpoint(src)
    dtype = dtype or stored_dtype(src)
    meta = json.loads((Path(src) / CONFIG).read_text())
    extra = dict(meta.get("training") or {})
    before = model.config.image_size
    if image_size is not None and image_size != before:
        try:
            model.set_image_size(image_size)
        except ConfigError as e:
            raise CheckpointError(f"--image-size {image_size}: {e}") from None
        extra.setdefault("exports", []).append({"image_size": [before, image_size]})
    return save_checkpoint(model, tokenizer, dst, dtype=dtype, extra=extra or None), model.config.image_size, dtype


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.export",
        description="Re-export a SkyPrompt checkpoint at another serving resolution (--image-size: the size the "
                    "backend tiles at and evaluation uses) and/or with other weights (--fp16: half the file; default: as SRC stores them).")
    parser.add_argument("src", help="checkpoint directory to read")
    parser.add_argument("dst", help="checkpoint directory to write (may be SRC: it is replaced atomically)")
    parser.add_argument("--image-size", type=int, help="new input resolution in px, a multiple of the patch size")
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--fp16", action="store_true", help="store the weights in fp16")
    kind.add_argument("--fp32", action="store_true", help="store the weights in fp32 (default: as SRC stores them)")
    args = parser.parse_args(argv)
    try:
        out, size, dtype = export_checkpoint(args.src, args.dst, args.image_size,
                                             torch.float16 if args.fp16 else torch.float32 if args.fp32 else None)
    except CheckpointError as e:
        print(f"training.export: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({size} px, {str(dtype).replace('torch.', '')})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
