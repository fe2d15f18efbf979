"""Shared fixtures: a small trained tokenizer and `tiny` models built from it (random weights)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
# GDAL would write .aux.xml statistics beside the rasters QGIS opens, shared read-only data included
os.environ.setdefault("GDAL_PAM_ENABLED", "NO")

# `make test` runs several test processes (pytest-xdist): each takes its share of the cores, for
# torch here and for the commands the tests start, rather than all of them each
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
if _WORKERS > 1:
    _THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))
    torch.set_num_threads(_THREADS)

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


def run_main(main, args, capsys) -> subprocess.CompletedProcess:
    """A command's `main(argv)` run in this process, as its console sees it: the exit status (an
    argparse refusal's SystemExit included), stdout and stderr (`capsys`, or `capfd` to see what C
    libraries such as GDAL write too). For refusals, which stop before any work: a new Python, torch
    imported again, costs seconds each. An exception out of `main` fails the test by itself, where a
    subprocess's traceback had to be looked for in its stderr."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    if isinstance(code, str):       # sys.exit("message") prints it and exits 1
        code, err = 1, err + code + "\n"
    return subprocess.CompletedProcess(list(args), code or 0, out, err)
