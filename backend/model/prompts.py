"""Prompt ensembles: one text embedding from several phrasings of the same words.

A contrastive model trained on captions like "an aerial photo of a parking lot." embeds a bare
"parking lot" less reliably than the same words in the sentences it trained on. Averaging the
normalised embeddings of the words under a few overhead-imagery templates (as CLIP does for class
names) is steadier than any single phrasing. Zero-shot classification ensembles class names this
way; the backend ensembles search queries and Segment prompts the same way, so a user's words get
the treatment the evaluation gives class names.

Every template has exactly one "{}" where the words go (see `fill`).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

ZERO_SHOT_TEMPLATES: tuple[str, ...] = (
    "an aerial photo of {}.",
    "a satellite image of {}.",
    "a remote sensing image of {}.",
    "an overhead view of {}.",
    "{} seen from above.",
    "a high resolution remote sensing image of {}.",
    "a bird's-eye view of {}.",
    "{}.",
)


def fill(templates: Sequence[str], name: str) -> list[str]:
    """Every template with `name` in its "{}" slot.

    str.replace rather than str.format, so a user's own template with other braces in it
    (a JSON-looking fragment, say) does not raise.
    """
    return [t.replace("{}", name) for t in templates]


def ensemble_prompts(texts: Sequence[str], templates: Sequence[str] = ZERO_SHOT_TEMPLATES
                     ) -> tuple[list[str], list[int]]:
    """The phrasings to embed for each text, and which text each belongs to.

    A user's sentence ("lots of cars parked in rows.") loses its final full stop and surrounding
    space first, so the templates do not end in "rows..".
    """
    if not templates:
        raise ValueError("no prompt templates")
    prompts, owner = [], []
    for i, text in enumerate(texts):
        words = text.strip().rstrip(".").strip() or text.strip()
        for phrasing in fill(templates, words):
            prompts.append(phrasing)
            owner.append(i)
    return prompts, owner


def pool_ensemble(embeddings: torch.Tensor, owner: Sequence[int], n: int) -> torch.Tensor:
    """[P, E] normalised embeddings of the phrasings -> [n, E]: per owner, the mean re-normalised."""
    sums = torch.zeros(n, embeddings.shape[1], dtype=embeddings.dtype, device=embeddings.device)
    sums.index_add_(0, torch.as_tensor(list(owner), dtype=torch.long, device=embeddings.device), embeddings)
    return F.normalize(sums, dim=-1)
