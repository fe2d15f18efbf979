"""Prompt ensembles (backend.model.prompts): the phrasings made of a user's words and their pooling."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from backend.model.prompts import ZERO_SHOT_TEMPLATES, ensemble_prompts, fill, pool_ensemble


def test_each_text_gets_every_template_once_without_its_full_stop():
    prompts, owner = ensemble_prompts(["parking lots.", "  a river  "])
    n = len(ZERO_SHOT_TEMPLATES)
    assert owner == [0] * n + [1] * n
    assert prompts[:n] == fill(ZERO_SHOT_TEMPLATES, "parking lots")
    assert "an aerial photo of a river." in prompts and "a river." in prompts
    assert not any(".." in p for p in prompts)
    # a text that is only full stops is kept as it is rather than emptied
    assert ensemble_prompts(["..."], ("{}",))[0] == ["..."]
    with pytest.raises(ValueError, match="templates"):
        ensemble_prompts(["x"], ())


def test_pool_is_the_renormalised_mean_per_owner():
    g = torch.Generator().manual_seed(0)
    e = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    owner = [0, 1, 0, 1, 1]
    pooled = pool_ensemble(e, owner, 2)
    assert torch.allclose(pooled[0], F.normalize(e[[0, 2]].mean(0), dim=0), atol=1e-6)
    assert torch.allclose(pooled[1], F.normalize(e[[1, 3, 4]].mean(0), dim=0), atol=1e-6)
    assert torch.allclose(pooled.norm(dim=-1), torch.ones(2))


def test_fill_keeps_other_braces():
    assert fill(("{} near {x}",), "roads") == ["roads near {x}"]
