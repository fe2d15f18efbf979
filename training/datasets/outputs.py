"""What each kind of build writes into its --out, so that a build can tell another kind's files from
its own: a `landmarks` build and a `filter` run write shards of their own names into OUT/shards/, and
training reads every OUT/shards/*.tar, so two kinds in one folder would be read as one dataset."""
from __future__ import annotations

import re
from pathlib import Path

# the writers' shard names (finished, or cut short), and nothing else
FILTER_SHARD = re.compile(r"filtered-\d{6}\.tar(\.part)?")
LANDMARKS_SHARD = re.compile(r"\d{3,}-[A-Za-z0-9_-]+-\d{5,}\.tar(\.part)?")     # raster 1000 on: 4 digits
TRAINING_RUN = ("train_config.json", "metrics.jsonl", "checkpoints")    # what training writes into its --out


def foreign_files(out: str | Path, own_shards: re.Pattern, training_run: bool = False) -> list[str]:
    """The files in `out` (relative names, sorted) that a build writing shards named `own_shards` did
    not write: other .tar files in shards/, and with `training_run` a training run's files."""
    out = Path(out)
    found = [f"shards/{p.name}" for p in (out / "shards").glob("*.tar*")
             if p.name.endswith((".tar", ".tar.part")) and not own_shards.fullmatch(p.name)]
    if training_run:
        found += [name for name in TRAINING_RUN if (out / name).exists()]
    return sorted(found)


def listed(names: list[str], most: int = 3) -> str:
    """'a, b, c, ... (7 in all)': a few names of a long list."""
    return ", ".join(names[:most]) + (f", ... ({len(names)} in all)" if len(names) > most else "")
