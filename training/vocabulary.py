"""Write a checkpoint's word list (words.json): how often each word appeared in the captions it trained on.

The backend reads it to tell a user which words of a search it barely knows
(`backend.model.vocabulary`). Training writes it into every checkpoint it saves; this command writes
it for a checkpoint trained before that, or on other data, from the same recipe and seed:

  python -m training.vocabulary --recipe training/recipes/default.json --checkpoint backend/checkpoints/default

Counted as the recipe's training split holds them: the captions of a caption file (manifest,
precomp, Karpathy) once per image that carries them, so a caption repeated on twelve images counts
twelve times (an image listing one caption twice counts it once); and once each, the captions every
image of a folder's class shares and training draws from at random (the class templates filled with
the class's human name, and the class's caption pool), and the class templates that template mixing
draws. Shard sources are streamed at training time and not counted here. The validation split is
left out, as training leaves it out.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from backend.model.vocabulary import TrainingWords, count_words

from . import data as D
from . import recipe as recipes


def training_texts(train_sources: list[dict]) -> Iterable[str]:
    """The captions a run on these sources trains on, each as often as the training data holds it:
    a caption file's captions once per image that carries them (each distinct caption of an image
    once); the captions of a folder source (its classes' filled templates and caption pools, which
    every image of a class shares and training draws from at random) and the class templates that
    template mixing draws, each distinct one once. Shard sources give none."""
    drawn: dict[str, None] = {}     # the captions counted once, in first-seen order
    for source in train_sources:
        if source["kind"] == "shards":
            continue
        for record in source.get("records", []):
            captions = dict.fromkeys(record.captions)
            if source["kind"] == "folder":
                drawn.update(captions)
            else:
                yield from captions
        for templates in recipes.class_templates(source).values():
            drawn.update(dict.fromkeys(templates))
    yield from drawn


def training_words(train_sources: list[dict], source: str = "") -> TrainingWords:
    return TrainingWords(count_words(training_texts(train_sources)), source)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.vocabulary", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", required=True, help="recipe JSON the checkpoint trained on")
    p.add_argument("--seed", type=int, default=0, help="the training run's --seed, which drew its validation split "
                                                       "(default 0)")
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="checkpoint directory to write words.json into (its weights are not touched)")
    return p


def _check_recorded_run(ckpt: Path, seed: int, sources: list[dict], recipe: str) -> None:
    """RecipeError when the checkpoint records a training run of another seed or other sources (by
    name: a packed copy of a recipe keeps its sources' names) than these: its word list would then
    count words it never trained on, and leave out some it did."""
    try:
        run = json.loads((ckpt / "config.json").read_text()).get("training", {}).get("train_config", {})
    except (OSError, ValueError, AttributeError):
        return
    if not isinstance(run, dict):
        return
    recorded_seed = run.get("seed")
    if isinstance(recorded_seed, int) and recorded_seed != seed:
        raise recipes.RecipeError(f"{ckpt} was trained with --seed {recorded_seed}, which drew its held-out split: "
                                  f"give --seed {recorded_seed} (now {seed}); {ckpt}'s word list is left as it is")
    recorded = run.get("sources")
    if isinstance(recorded, list) and all(isinstance(r, dict) and r.get("name") for r in recorded):
        theirs, ours = sorted(r["name"] for r in recorded), sorted(str(s.get("name")) for s in sources)
        if theirs != ours:
            raise recipes.RecipeError(f"{ckpt} was trained on the sources {', '.join(theirs)}, and {recipe} has "
                                      f"{', '.join(ours)}: give the recipe it trained on; {ckpt}'s word list is "
                                      "left as it is")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ckpt = Path(args.checkpoint)
    if not (ckpt / "config.json").is_file():
        print(f"training.vocabulary: {ckpt} is not a checkpoint directory (no config.json)", file=sys.stderr)
        return 2
    try:
        sources = recipes.sources_from_args(args.recipe, [], [], [], [], 0)
        if any(s["kind"] == "shards" for s in sources):
            # their captions are not read ahead of training: a list without them would call every word of
            # the shards unfamiliar, and no list beats that (a run on shards writes none either)
            raise recipes.RecipeError(f"recipe {args.recipe} has shard sources, whose captions are not listed ahead "
                                      f"of training: no word list is written, and {ckpt}'s is left as it is")
        _check_recorded_run(ckpt, args.seed, sources, args.recipe)
        train, _ = recipes.build_sources(sources, seed=args.seed)
    except (recipes.RecipeError, D.DataError) as e:
        print(f"training.vocabulary: {e}", file=sys.stderr)
        return 2
    words = training_words(train, f"{Path(args.recipe).name}, seed {args.seed}")
    path = words.save(ckpt)
    print(f"{path}: {len(words)} distinct words from the training captions of {args.recipe}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
