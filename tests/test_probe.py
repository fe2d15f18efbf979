"""Image-only classifiers (`training.probe`) on hand-made embeddings with known answers, and
`python -m training.evaluate probe` on a tiny checkpoint and a folder of coloured scenes."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from training import evaluate as ev
from training import probe as P

# four training embeddings on the unit circle and one test point (angles chosen by hand)
TRAIN = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.6, -0.8]])
TRAIN_Y = [0, 1, 1, 0]
TEST = torch.tensor([[0.96, 0.28]])   # cosines: 0.96, 0.936, 0.80, 0.352


def test_centroids_are_the_renormalised_class_means():
    c = P.class_centroids(TRAIN * 3.0, TRAIN_Y, 2)   # any length: embeddings are normalised first
    assert torch.allclose(c[0], F.normalize(torch.tensor([1.6, -0.8]), dim=0))
    assert torch.allclose(c[1], F.normalize(torch.tensor([1.4, 1.4]), dim=0))
    # the test point is nearest to class 0's single best image, but to class 1's centroid
    assert P.top1(TEST @ c.T, [1]) == 100.0


def test_top1_counts_a_tie_with_another_class_as_a_miss():
    # the package's one accuracy rule (training.metrics.zero_shot_metrics), not argmax's first index
    assert P.top1(torch.tensor([[0.5, 0.5], [0.2, 0.9]]), [0, 1]) == 50.0


def test_a_class_with_no_training_image_is_named():
    with pytest.raises(ValueError, match=r"classes \[2\] have no training images"):
        P.class_centroids(TRAIN, TRAIN_Y, 3)
    with pytest.raises(ValueError, match="class numbers 0..1"):
        P.class_centroids(TRAIN, [0, 1, 2, 0], 2)


def test_knn_votes_are_summed_cosines_of_the_k_nearest():
    v1 = P.knn_scores(TRAIN, TRAIN_Y, TEST, 2, k=1)
    assert torch.allclose(v1, torch.tensor([[0.96, 0.0]]))
    v3 = P.knn_scores(TRAIN, TRAIN_Y, TEST, 2, k=3)
    assert torch.allclose(v3, torch.tensor([[0.96, 0.936 + 0.80]]))
    assert P.top1(v1, [0]) == 100.0 and P.top1(v3, [1]) == 100.0
    # k beyond the training set: every image votes
    assert torch.allclose(P.knn_scores(TRAIN, TRAIN_Y, TEST, 2, k=50), torch.tensor([[0.96 + 0.352, 1.736]]))
    with pytest.raises(ValueError, match="k must be"):
        P.knn_scores(TRAIN, TRAIN_Y, TEST, 2, k=0)


def _blobs(n_per_class, centres, spread, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([c + spread * torch.randn(n_per_class, len(c), generator=g) for c in centres])
    y = np.repeat(np.arange(len(centres)), n_per_class)
    return x, y


def test_linear_probe_separates_what_centroids_cannot():
    # class 0: a wide band along the first axis; class 1: a tight cluster that sits at the band's end,
    # just off it along the second axis. The centroid of class 0 points to the band's middle, so
    # class 0's far end is nearer class 1's centroid; a linear boundary along the second axis is exact.
    g = torch.Generator().manual_seed(0)
    band = torch.stack([torch.rand(200, generator=g) * 2 - 0.2, 0.02 * torch.randn(200, generator=g)], 1)
    tight = torch.stack([1.6 + 0.05 * torch.randn(200, generator=g), 0.4 + 0.02 * torch.randn(200, generator=g)], 1)
    x = torch.cat([band, tight]) + torch.tensor([0.0, 0.0])
    x = torch.cat([x, torch.ones(len(x), 1)], 1)          # a constant third axis keeps the points off the origin
    y = np.repeat([0, 1], 200)
    train, test = np.arange(400) % 2 == 0, np.arange(400) % 2 == 1
    logits, l2 = P.linear_probe(x[train], y[train], x[test], 2)
    assert l2 in P.L2_GRID
    linear = P.top1(logits, y[test])
    centroid = P.top1(x[test] @ P.class_centroids(x[train], y[train], 2).T, y[test])
    assert linear >= 99.0 and centroid < 90.0


def test_linear_probe_with_one_weight_uses_it_and_learns_nothing_from_random_labels():
    x, _ = _blobs(100, [torch.zeros(8)], 1.0, seed=1)
    y = np.random.default_rng(0).integers(0, 4, size=len(x))
    logits, l2 = P.linear_probe(x[:50], y[:50], x[50:], 4, l2_grid=[0.01])
    assert l2 == 0.01
    assert P.top1(logits, y[50:]) < 50.0          # chance is 25%: nothing to learn
    with pytest.raises(ValueError, match="L2 grid"):
        P.linear_probe(x, y, x, 4, l2_grid=[])


def test_class_search_precision_counts_each_class_top_k():
    emb = torch.eye(3)
    test = torch.tensor([[1.0, 0.1, 0], [1.0, 0.2, 0], [0.1, 1.0, 0], [0.9, 1.0, 0]])
    y = [0, 0, 1, 1]
    r = P.class_search_precision(emb, test, y, k=2)
    # class 0's top 2: images 0 and 1 (both class 0); class 1's: images 2 and 3; class 2 has no image
    assert r["per_class"] == [1.0, 1.0, None] and r["mean"] == 1.0
    # a class 1 query that points at class 0's images finds none of its own
    r = P.class_search_precision(torch.tensor([[1.0, 0, 0], [1.0, 0, 0]]), test, y, k=2)
    assert r["per_class"] == [1.0, 0.0] and r["mean"] == 0.5


# ---- the command ---------------------------------------------------------------------------------
COLOURS = {"water": (20, 60, 200), "grass": (40, 180, 40), "sand": (230, 210, 150), "roof": (200, 40, 30)}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory, tokenizer, tiny_config):
    from backend.model import MaMMUT
    from backend.model.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("probe")
    torch.manual_seed(0)
    ckpt = save_checkpoint(MaMMUT(tiny_config), tokenizer, root / "ckpt")
    rng = np.random.default_rng(0)
    for cls, colour in COLOURS.items():
        for j in range(6):
            pixels = np.clip(np.array(colour) + rng.integers(-10, 10, size=(48, 48, 3)), 0, 255).astype(np.uint8)
            (root / "scenes" / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(root / "scenes" / cls / f"{cls}_{j}.png")
    held = root / "val.txt"
    held.write_text("".join(f"{cls}/{cls}_{j}.png\n" for cls in COLOURS for j in (0, 1)))
    names = root / "names.json"
    names.write_text(json.dumps({c: c for c in COLOURS}))
    return {"root": root, "ckpt": ckpt, "held": held, "names": names}


def test_probe_command_learns_from_the_other_images(scenes, capsys):
    args = ["probe", "--checkpoint", scenes["ckpt"], "--data", scenes["root"] / "scenes", "--classnames",
            scenes["names"], "--files", scenes["held"], "--k", "3", "--quiet", "--json"]
    rc = ev.main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert rc == 0, err
    r = json.loads(out)
    assert r["n_images"] == 8 and r["n_train"] == 16      # the held-out 2 of each class never train
    assert r["classes"] == list(COLOURS) and r["k"] == 3
    # an untrained model cannot read class names, but its embeddings still tell the colours apart
    assert r["centroid_top1"] == 100.0 and r["knn_top1"] == 100.0 and r["linear_probe_top1"] == 100.0
    assert r["centroid_search_p10"] == pytest.approx(2 / 8)    # top 10 of 8 images: all 8, 2 of each class
    assert 0.0 <= r["zero_shot_top1"] <= 100.0 and 0.0 <= r["zero_shot_train_top1"] <= 100.0
    assert set(r["per_class_search_p10"]) == set(COLOURS)
    # a smaller sample per class, and the table
    rc = ev.main([str(a) for a in args[:-1] + ["--train-per-class", "1"]])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "image-only classifiers learnt from 4 other images" in out
    assert "nearest class centroid" in out and "linear probe" in out


@pytest.mark.parametrize("extra, message", [
    ([], "give the held-out images as --files"),
    (["--k", "0"], "--k at least 1"),
    (["--train-per-class", "-1"], "--train-per-class must be 0 or more"),
])
def test_probe_refusals(scenes, capsys, extra, message):
    args = ["probe", "--checkpoint", scenes["ckpt"], "--data", scenes["root"] / "scenes",
            "--classnames", scenes["names"]]
    if extra:
        args += ["--files", scenes["held"]]
    rc = ev.main([str(a) for a in args + extra])
    _, err = capsys.readouterr()
    assert rc == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_probe_refuses_a_class_with_nothing_to_learn_from(scenes, tmp_path, capsys):
    every_water = tmp_path / "val.txt"
    every_water.write_text("".join(f"water/water_{j}.png\n" for j in range(6)))
    rc = ev.main([str(a) for a in ["probe", "--checkpoint", scenes["ckpt"], "--data", scenes["root"] / "scenes",
                                   "--classnames", scenes["names"], "--files", every_water, "--quiet"]])
    _, err = capsys.readouterr()
    assert rc == 2 and "class 'water' has held-out images but no other image" in err
