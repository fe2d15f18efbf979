"""Pack a recipe's training split into a small, self-contained copy to train on another machine.

    python -m training.pack --recipe training/recipes/default.json --out runs/pack --size 128
    # copy runs/pack to the GPU machine, then there:
    python -m training.train --recipe runs/pack/recipe.json --device cuda ...

The recipe is read as training reads it (same --seed, same held-out split) and each source's
training images are written resized (shorter side --size pixels, never enlarged) as WebP or JPEG,
next to OUT/recipe.json, a recipe of the same sources with the same weights, class maps and
captions (class caption pools inline) and no validation split. Held-out images stay behind, so a
run on the copy trains on exactly the original run's training images and can never see a
validation image; evaluate its checkpoint here, on the original split. At the training resolution
the copy is about 5 kB an image (the default recipe's 11,180 training images: 56 MB; tar it to
move it, as one file rather than thousands).
"""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image

from . import data as D
from . import recipe as R
from .signals import STOP_SIGNALS, stop_signals_interrupt
from .templates import TEMPLATES, fill

# name: (PIL format, file suffix, the longest side the format holds)
FORMATS = {"webp": ("WEBP", ".webp", 16383), "jpeg": ("JPEG", ".jpg", 65500)}


class PackError(ValueError):
    """A pack that cannot be written; the message says what to fix."""


def _shrink(job: tuple[str, str, int, str, int]) -> int | str:
    """Write one image resized; returns the bytes written, or what went wrong reading it."""
    src, dst, size, fmt, quality = job
    try:
        im = D.load_image(src)
    except D.UNREADABLE_IMAGE as e:   # PIL: unreadable, truncated, not an image, or past its size limit
        return f"{src}: {e}"
    # the shorter side to `size`, and the longer one within what the format holds (a strip image)
    scale = min(size / min(im.size), FORMATS[fmt][2] / max(im.size))
    if scale < 1:
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BICUBIC)
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    try:
        im.save(dst, FORMATS[fmt][0], quality=quality)
    except (OSError, ValueError) as e:
        Path(dst).unlink(missing_ok=True)
        return f"{src}: cannot be written as {fmt} ({e})"
    return Path(dst).stat().st_size


def _ignore_interrupt() -> None:
    """Pool workers leave Ctrl-C (and a scheduler's or `timeout`'s SIGTERM, a closed terminal's SIGHUP)
    to the main process, which stops them and removes the partial copy (a signal to the process group
    reaches every process; each would print a traceback)."""
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)


def _remove_partial(out: Path, created: bool) -> None:
    """What this run wrote into --out (new or empty when it started, so everything in it is ours)."""
    if created:
        shutil.rmtree(out, ignore_errors=True)
        return
    for child in out.iterdir():
        shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)


def _class_pool(source: dict) -> dict[str, list[str]]:
    """A folder source's captions per class beyond its templates (its pool after held-out captions
    were dropped): every record of a class carries the same captions, templates first."""
    by_class: dict[str, tuple[str, ...]] = {}
    for r in source["records"]:
        if by_class.setdefault(r.class_name, r.captions) != r.captions:
            raise PackError(f"source {source['name']}: images of class {r.class_name} carry different captions")
    pool = {}
    for key, captions in sorted(by_class.items()):
        templates = {c.lower() for c in fill(TEMPLATES, source["class_map"][key])}
        extra = [c for c in captions if c.lower() not in templates]
        if extra:
            pool[key] = extra
    return pool


def pack_sources(train_sources: list[dict], out: Path, size: int, fmt: str, quality: int) -> tuple[list[dict], list]:
    """The packed recipe's sources and the image jobs that fill them (paths under `out`)."""
    sources, jobs = [], []
    ext = FORMATS[fmt][1]
    for s in train_sources:
        if s["kind"] == "shards":
            raise PackError(f"source {s['name']}: shards are packed already; copy the .tar files and list "
                            "them in a recipe of their own")
        name = s["name"]
        packed = {"name": name, "weight": float(s.get("weight", 1.0))}
        if s.get("class_map"):
            packed["classnames"] = dict(s["class_map"])
        used: set[str] = set()

        def target(record, sub: str) -> str:
            stem = Path(record.image).stem
            rel = f"{sub}/{record.class_name or 'unlabelled'}/{stem}{ext}"
            n = 1
            while rel in used:   # two source images of one stem in one class
                n += 1
                rel = f"{sub}/{record.class_name or 'unlabelled'}/{stem}-{n}{ext}"
            used.add(rel)
            return rel

        if s["kind"] == "folder":
            for r in s["records"]:
                jobs.append((r.image, str(out / target(r, name)), size, fmt, quality))
            packed.update(kind="folder", root=name)
            pool = _class_pool(s)
            if pool:
                packed["caption_pool"] = {"captions": pool}
        else:   # manifest, precomp, karpathy: one manifest of the training images and their captions
            lines = []
            for r in s["records"]:
                rel = target(r, f"{name}/images")
                jobs.append((r.image, str(out / rel), size, fmt, quality))
                line = {"image": Path(rel).relative_to(name).as_posix(), "captions": list(r.captions)}
                if r.class_name is not None:
                    line["class"] = r.class_name
                lines.append(json.dumps(line))
            (out / name).mkdir(parents=True, exist_ok=True)
            (out / name / "manifest.jsonl").write_text("\n".join(lines) + "\n")
            packed.update(kind="manifest", path=f"{name}/manifest.jsonl")
        sources.append(packed)
    return sources, jobs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.pack", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", required=True, help="the data recipe (JSON) to pack")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (must be new or empty)")
    p.add_argument("--seed", type=int, default=0, help="the training run's --seed: it picks the held-out split "
                                                        "(default: %(default)s, training's default)")
    p.add_argument("--size", type=int, default=128, metavar="PX",
                   help="shorter image side in pixels; the training --image-size or a little more (default: %(default)s)")
    p.add_argument("--format", default="webp", choices=sorted(FORMATS), help="image format (default: %(default)s)")
    p.add_argument("--quality", type=int, default=85, help="1..100 (default: %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="processes resizing images (default: %(default)s)")
    args = p.parse_args(argv)
    # SIGTERM and SIGHUP too remove the partial copy, so the same command can run again (a half copy
    # has no recipe.json, and a non-empty --out is refused)
    stop_signals_interrupt()
    out = Path(args.out)
    created, ours = not out.exists(), False     # ours: --out checked new or empty, so what is in it is ours
    try:
        if args.size < 8:
            raise PackError(f"--size {args.size} is too small; give the training image size, e.g. 128")
        if not 1 <= args.quality <= 100:
            raise PackError(f"--quality {args.quality} is outside 1..100")
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            left = (" It holds no recipe.json: a pack stopped before its end (killed) left it; remove it and pack "
                    "again" if out.is_dir() and not (out / "recipe.json").exists() else "")
            raise PackError(f"{out} exists and is not an empty folder; give a new --out (nothing was written).{left}")
        ours = True
        sources = R.sources_from_args(args.recipe, [], [], [], [], 0)
        train, _ = R.build_sources(sources, seed=args.seed)
        out.mkdir(parents=True, exist_ok=True)
        packed, jobs = pack_sources(train, out, args.size, args.format, args.quality)
    except (R.RecipeError, D.DataError, PackError) as e:
        if ours and out.is_dir():     # found after --out was made (a shards source, a class of mixed captions)
            _remove_partial(out, created)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:        # --out where no folder can be made (a file in its path, /proc, read-only)
        if ours and out.is_dir():
            _remove_partial(out, created)
        print(f"error: cannot write the copy in {out} ({e.strerror or e}); give an --out in a folder you can "
              "write in", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if ours and out.is_dir():     # never a folder of the user's, interrupted while being checked
            _remove_partial(out, created)
        print("interrupted: nothing was written; pack again", file=sys.stderr)
        return 130
    from tqdm import tqdm
    total, bad = 0, []
    with ProcessPoolExecutor(max(1, args.workers), initializer=_ignore_interrupt) as pool:
        try:
            for n in tqdm(pool.map(_shrink, jobs, chunksize=64), total=len(jobs), desc="images", unit="img",
                          file=sys.stderr):
                if isinstance(n, str):
                    bad.append(n)
                else:
                    total += n
        except KeyboardInterrupt:
            # the queued images are dropped and the running ones finish before the copy is removed:
            # a half-written --out would have no recipe.json and refuse the next pack into it
            pool.shutdown(wait=True, cancel_futures=True)
            _remove_partial(out, created)
            print(f"\ninterrupted: removed the partial copy in {out}; pack again", file=sys.stderr)
            return 130
        except Exception as e:  # noqa: BLE001 - a worker's failure (a full disk, a crash): no half copy left
            pool.shutdown(wait=True, cancel_futures=True)
            _remove_partial(out, created)
            print(f"\nerror: {type(e).__name__}: {e}; removed the partial copy in {out}", file=sys.stderr)
            return 1
    if bad:
        # no recipe.json: a copy missing images must not be trained on by mistake
        print(f"error: {len(bad)} training image(s) could not be read, so {out} has no recipe.json; fix or "
              f"remove them and pack again into a new folder:\n  " + "\n  ".join(bad[:5]), file=sys.stderr)
        return 2
    about = (f"Training split of {Path(args.recipe).name} (seed {args.seed}): images resized to a "
             f"{args.size}-pixel shorter side; held-out images are not in this copy.")
    (out / "recipe.json").write_text(json.dumps({"about": about, "sources": packed}, indent=1) + "\n")
    per_source = Counter(Path(j[1]).relative_to(out).parts[0] for j in jobs)
    counts = ", ".join(f"{s['name']} {per_source[s['name']]}" for s in packed)
    print(f"packed {len(jobs)} images ({counts}), {total / 1e6:.1f} MB, into {out}; "
          f"train with --recipe {out / 'recipe.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
