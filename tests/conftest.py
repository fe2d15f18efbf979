"""Shared fixtures: a small trained tokenizer and `tiny` models built from it (random weights)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
# GDAL would write .aux.xml statistics beside the rasters QGIS opens, shared read-only data included
os.environ.setdefault("GDAL_PAM_ENABLED", "NO")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

CORPUS = [
    "an aerial photo of a parking lot with many cars",
    "a river runs through the green forest",
    "many buildings and roads in a dense residential area",
    "a farmland with square green fields",
    "an industrial area with large white factories",
    "a lake surrounded by grass and trees",
    "several planes are parked at the airport",
    "two tennis courts next to a road",
    "storage tanks near the harbor",
    "a baseball diamond in a park",
] * 5


@pytest.fixture(scope="session")
def tokenizer():
    from backend.model.tokenizer import train_tokenizer

    return train_tokenizer(CORPUS, vocab_size=300, min_frequency=1)


@pytest.fixture(scope="session")
def tiny_config(tokenizer):
    from backend.model import get_preset

    return get_preset("tiny", vocab_size=tokenizer.vocab_size)


@pytest.fixture
def tiny_model(tiny_config):
    from backend.model import MaMMUT

    torch.manual_seed(0)
    return MaMMUT(tiny_config).eval()


@pytest.fixture
def images(tiny_config):
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, tiny_config.image_size, tiny_config.image_size, generator=g)
