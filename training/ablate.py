"""Recipe ablation: which training choices help on small data, measured from scratch.

    python -m training.ablate --out runs/ablation                  # every variant, 250 steps each
    python -m training.ablate --out runs/ablation --variants baseline,template-mix --steps 400

Every variant trains the same model from scratch on the same recipe, seed, batch, learning-rate
schedule and tokenizer, and differs from `baseline` in one choice (VARIANTS). Then each is scored on
the recipe's validation split with the same code as `python -m training.evaluate`: zero-shot top-1 of
every held-out folder and manifest with classes, and retrieval mean recall and CIDEr-D of every
held-out manifest. Results go to OUT/results.json and OUT/results.md (a markdown table) and are
printed. Finished variants are skipped on a rerun and an interrupted one resumes (`--resume`), so
the command can be run again after a stop.

Short runs vary a lot from seed to seed: at 250 steps the baseline scored RSSCN7 top-1 38.0 with
seed 0 and 44.3 with seed 1 (README model card). Compare variants across several `--seed`s before
trusting a difference; `--seed` also changes the validation split, as it does in training.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from backend.files import file_in_the_way
from backend.model.config import PRESETS

from . import evaluate as E
from . import recipe as recipes

# the options that change what a variant learns or how it is scored: a rerun into the same --out
# must use the same, or finished variants would be reported under settings they were not trained with
TRAINING_SETTINGS = ("recipe", "tokenizer", "preset", "steps", "image_size", "batch_size", "lr", "warmup_steps",
                     "caption_weight", "class_aware", "seed")


@dataclass(frozen=True)
class Variant:
    about: str                 # what changes against the baseline, for the table
    extra: tuple[str, ...]     # training flags on top of the common ones
    low_res: bool = False      # first 1.5x the steps at half resolution, then a quarter at full resolution


# The baseline is the default checkpoint's recipe (README model card): conv stem, overhead
# augmentation, class-aware contrastive + captioning losses.
VARIANTS: dict[str, Variant] = {
    "baseline": Variant("the default recipe: conv stem, overhead augmentation, no template mixing", ("--conv-stem",)),
    "no-conv-stem": Variant("one strided patch convolution instead of the conv stem", ()),
    "no-augmentation": Variant("resize + centre crop only (no crops, flips, rotations, jitter)",
                               ("--conv-stem", "--augment", "none")),
    "template-mix": Variant("caption dropout: 30% of captions replaced by a class template",
                            ("--conv-stem", "--template-mix", "0.3")),
    "low-then-full": Variant("1.5x the steps at half resolution, then a quarter of the steps at full resolution",
                             ("--conv-stem",), low_res=True),
    "image-bank": Variant("the baseline with its images decoded once and augmented in the training process "
                          "(--images-on-device), which GPU runs use", ("--conv-stem", "--images-on-device")),
}


def _train(args: argparse.Namespace, out: Path, steps: int, image_size: int, extra: list[str],
           init: Path | None = None, lr: float | None = None) -> None:
    if (out / "fp16" / "model.safetensors").is_file():
        return  # this phase finished before (e.g. the low-resolution phase of an interrupted variant)
    cmd = [sys.executable, "-m", "training.train", "--recipe", args.recipe,
           "--steps", str(steps), "--image-size", str(image_size), "--batch-size", str(args.batch_size),
           "--lr", str(lr or args.lr), "--warmup-steps",
           # None means "not given"; an explicit 0 (no warm-up) is a value, not a default
           str(max(1, steps // 10) if args.warmup_steps is None else args.warmup_steps),
           "--caption-weight", str(args.caption_weight), *(["--class-aware"] if args.class_aware else []),
           "--seed", str(args.seed), "--workers", str(args.workers),
           "--save-every", str(args.save_every), "--keep-last", "1", "--out", str(out),
           "--export-fp16", str(out / "fp16"), "--resume", *extra]
    # a phase from an earlier one's weights goes on with their tokenizer (the same one)
    cmd += ["--init-checkpoint", str(init)] if init else ["--preset", args.preset, "--tokenizer", args.tokenizer]
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)


def train_variant(name: str, args: argparse.Namespace) -> tuple[Path, float]:
    """Train one variant (or find it trained); its fp16 checkpoint and the training wall time."""
    variant, root = VARIANTS[name], Path(args.out) / name
    timing = root / "train_seconds.json"
    if timing.is_file() and (root / "fp16" / "model.safetensors").is_file():
        return root / "fp16", json.loads(timing.read_text())["seconds"]
    start = time.perf_counter()
    if variant.low_res:
        low = root / f"{args.image_size // 2}px"
        _train(args, low, args.steps * 3 // 2, args.image_size // 2, list(variant.extra))
        # the full-resolution phase continues the low-resolution weights (position embedding
        # resampled) at half the peak learning rate: a short fine-tune, not a restart
        _train(args, root, args.steps // 4, args.image_size, [x for x in variant.extra if x != "--conv-stem"],
               init=low / "fp16", lr=args.lr / 2)
    else:
        _train(args, root, args.steps, args.image_size, list(variant.extra))
    seconds = round(time.perf_counter() - start, 1)
    timing.write_text(json.dumps({"seconds": seconds}) + "\n")
    return root / "fp16", seconds


def training_settings(args: argparse.Namespace) -> dict:
    wanted = {k: getattr(args, k) for k in TRAINING_SETTINGS}
    for k in ("recipe", "tokenizer"):
        wanted[k] = str(Path(wanted[k]).resolve())
    return wanted


def _trained_any(out: Path) -> bool:
    """Whether any variant in OUT has trained (a checkpoint or an export): settings recorded by a
    command that then failed before training bind nothing."""
    return any(out.glob("*/checkpoints")) or any(out.glob("*/fp16")) or any(out.glob("*/*px/checkpoints"))


def check_settings(out: Path, args: argparse.Namespace) -> str | None:
    """None when OUT's variants (if any) were trained with these settings, which are then recorded
    in OUT/settings.json; else what differs, as an error. An OUT from before the record keeps its
    settings in results.json."""
    wanted = training_settings(args)
    recorded = None
    for name, key in (("settings.json", None), ("results.json", "settings")):
        try:
            data = json.loads((out / name).read_text())
        except (OSError, ValueError):
            continue
        recorded = (data.get(key) if key else data) if isinstance(data, dict) else None
        if isinstance(recorded, dict):
            recorded = {k: recorded.get(k) for k in TRAINING_SETTINGS}
            for k in ("recipe", "tokenizer"):     # results.json kept them as given; settings.json resolved
                if isinstance(recorded[k], str):
                    recorded[k] = str(Path(recorded[k]).resolve())
            break
        recorded = None
    if recorded is not None and recorded != wanted and _trained_any(out):
        changed = ", ".join(f"--{k.replace('_', '-')} {recorded[k]} (now {wanted[k]})"
                            for k in TRAINING_SETTINGS if recorded[k] != wanted[k])
        return (f"{out} holds variants trained with other settings: {changed}. Give another --out for these "
                "settings, or the same settings to finish that ablation")
    blocking = file_in_the_way(out)
    if blocking is not None:
        return f"--out {out}: {blocking} is a file; give a folder for the ablation"
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "settings.json").write_text(json.dumps(wanted, indent=2) + "\n")
    except OSError as e:
        return f"--out {out}: cannot write there ({e.strerror or e}); give a folder you can write in"
    return None


def evaluation_commands(val_dir: Path, sources: list[dict]) -> dict[str, list[str]]:
    """Metric name -> `training.evaluate` arguments (without --checkpoint), for every held-out set."""
    by_name = {recipes.source_name(s): s for s in sources}
    cmds: dict[str, list[str]] = {}
    for path in sorted(val_dir.iterdir()):
        name = recipes.validation_list_source(path)
        source = by_name.get(name, {})
        if path.suffix == ".txt" and source.get("kind") == "folder":
            cmds[f"{name} top-1"] = ["zero-shot", "--data", source["root"], "--classnames",
                                     str(source["classnames"]), "--files", str(path)]
        elif path.suffix == ".jsonl":
            if source.get("classnames"):
                cmds[f"{name} top-1"] = ["zero-shot", "--manifest", str(path), "--classnames",
                                         str(source["classnames"])]
            cmds[f"{name} mR"] = ["retrieval", "--manifest", str(path)]
            cmds[f"{name} CIDEr-D"] = ["caption", "--manifest", str(path)]
    return cmds


def _score(command: str, result: dict) -> float:
    key = {"zero-shot": "top1", "retrieval": "mean_recall", "caption": "cider"}[command]
    return float(result[key])


def evaluate_variant(checkpoint: Path, cmds: dict[str, list[str]], device: str) -> dict[str, float]:
    cache = checkpoint.parent / "eval.json"
    try:
        cached = json.loads(cache.read_text())
    except (OSError, ValueError):
        cached = None
    # scores of these very commands (the same metrics on the same validation lists), else measured again
    if isinstance(cached, dict) and cached.get("commands") == cmds:
        return cached["scores"]
    parser = E.build_parser()
    scores = {}
    for metric, cmd in cmds.items():
        result = E.run(parser.parse_args([*cmd, "--checkpoint", str(checkpoint), "--device", device, "--quiet"]))
        scores[metric] = round(_score(cmd[0], result), 2)
    cache.write_text(json.dumps({"commands": cmds, "scores": scores}, indent=2) + "\n")
    return scores


def markdown_table(rows: list[dict], metrics: list[str]) -> str:
    head = "| variant | what changes | train time | " + " | ".join(metrics) + " |"
    lines = [head, "|" + "---|" * (3 + len(metrics))]
    for r in rows:
        cells = [f"{r['scores'][m]:.2f}" if "CIDEr" in m else f"{r['scores'][m]:.1f}" for m in metrics]
        lines.append(f"| {r['variant']} | {r['about']} | {r['train_seconds'] / 60:.0f} min | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.ablate", description=__doc__.split("\n\n")[0],
                                epilog="Variants: " + "; ".join(f"{k}: {v.about}" for k, v in VARIANTS.items()),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/ablation", help="folder of the runs and results (default %(default)s)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset (default: all)")
    p.add_argument("--recipe", default="training/recipes/default.json",
                   help="the data every variant trains on, and its validation split (default %(default)s)")
    p.add_argument("--tokenizer", default="backend/checkpoints/default/tokenizer.json",
                   help="one tokenizer for every variant (default: the default checkpoint's)")
    p.add_argument("--preset", default="small", choices=list(PRESETS), help="model size (default %(default)s)")
    p.add_argument("--steps", type=int, default=250, help="optimizer steps per variant (default %(default)s)")
    p.add_argument("--image-size", type=int, default=128, help="full training resolution (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="images per step (default %(default)s)")
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (default %(default)s)")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="warm-up steps of each training phase (default: a tenth of the phase's steps)")
    p.add_argument("--caption-weight", type=float, default=1.0,
                   help="weight of the captioning loss in every variant (default %(default)s)")
    p.add_argument("--no-class-aware", dest="class_aware", action="store_false",
                   help="plain image-text contrastive loss instead of the class-aware one (same-class pairs positive)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the initialisation, data order and validation split (default %(default)s)")
    p.add_argument("--workers", type=int, default=1, help="data loader processes (default %(default)s)")
    p.add_argument("--save-every", type=int, default=50,
                   help="checkpoint every N steps, what an interrupted variant resumes from (default %(default)s)")
    p.add_argument("--device", default="auto", help="evaluation device: auto | cpu | cuda[:N] (default %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        parser.error(f"unknown variant(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(VARIANTS)}")
    if args.warmup_steps is not None and args.warmup_steps < 0:
        parser.error("--warmup-steps must be 0 or more")
    if args.caption_weight < 0:
        parser.error("--caption-weight must be 0 or more")
    low_res = [n for n in names if VARIANTS[n].low_res]
    if args.steps < (4 if low_res else 1):
        parser.error(f"--steps must be at least 4 with {low_res[0]} (it trains a quarter of them at full size)"
                     if low_res else "--steps must be at least 1")
    patch = PRESETS[args.preset].patch_size
    sizes = {args.image_size} | {args.image_size // 2 for n in names if VARIANTS[n].low_res}
    if any(size < patch or size % patch for size in sizes):
        # said now, not by the first training run after OUT and its settings are written
        low = " (and half of it, for the low-resolution variant)" if len(sizes) > 1 else ""
        step = 2 * patch if len(sizes) > 1 else patch
        parser.error(f"--image-size {args.image_size}: give a multiple of {step}{low}, the {args.preset} model's patch "
                     f"size being {patch} (for example {max(step, round(args.image_size / step) * step)})")
    for path, what in ((args.recipe, "recipe"), (args.tokenizer, "tokenizer")):
        if not Path(path).is_file():
            parser.error(f"{what} file {path} does not exist")
    out = Path(args.out)
    problem = check_settings(out, args)
    if problem:
        print(f"{parser.prog}: {problem}", file=sys.stderr)
        return 2
    try:
        sources = recipes.sources_from_args(args.recipe, [], [], [], [], 0)
        _, val = recipes.build_sources(sources, seed=args.seed)
        recipes.write_validation_lists(sources, val, out / "val")
    except (recipes.RecipeError, E.DataError) as e:
        print(f"{parser.prog}: {e}", file=sys.stderr)
        return 2
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cmds = evaluation_commands(out / "val", sources)
    if not cmds:
        print(f"{parser.prog}: the recipe holds out no validation images (set val_per_class)", file=sys.stderr)
        return 2
    rows = []
    try:
        for name in names:
            checkpoint, seconds = train_variant(name, args)
            scores = evaluate_variant(checkpoint, cmds, args.device)
            rows.append({"variant": name, "about": VARIANTS[name].about, "train_seconds": seconds, "scores": scores})
            print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in scores.items()), file=sys.stderr, flush=True)
    except subprocess.CalledProcessError as e:
        if e.returncode == 2:       # training.train refused its options or data: rerunning would too
            print(f"{parser.prog}: training refused the run (exit 2, its message is above): fix that and rerun",
                  file=sys.stderr)
            return 2
        print(f"{parser.prog}: training failed (exit {e.returncode}); rerun the command to resume", file=sys.stderr)
        return 1
    except (E.EvalError, E.CheckpointError) as e:
        print(f"{parser.prog}: {e}", file=sys.stderr)
        return 2
    settings = {k: v for k, v in vars(args).items() if k not in ("variants", "out")}
    (out / "results.json").write_text(json.dumps({"settings": settings, "variants": rows}, indent=2) + "\n")
    table = markdown_table(rows, list(cmds))
    (out / "results.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
