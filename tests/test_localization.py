"""The localization benchmark: mosaics with exact ground truth (training.mosaic), segmentation metrics
on hand-made cases (training.metrics), and `python -m training.evaluate segmentation` on a tiny
checkpoint (random weights: these tests check the plumbing and the numbers' meaning, not quality)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import shapely
from osgeo import gdal, ogr, osr
from PIL import Image

from test_evaluate import run_cli, setup  # noqa: F401 - fixture

from training import metrics as M
from training.mosaic import MosaicError, build_mosaic, write_mosaic

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (20, 40, 210), "grey": (128, 128, 128)}


@pytest.fixture(scope="module")
def flat_classes(tmp_path_factory):
    """Four classes whose images are flat colours, two images each (so each pixel names its class)."""
    root = tmp_path_factory.mktemp("flat")
    out = {}
    for name, colour in COLOURS.items():
        paths = []
        for j in range(2):
            p = root / name / f"{name}_{j}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((30, 40, 3), colour, np.uint8)).save(p)
            paths.append(str(p))
        out[name] = paths
    return out


@pytest.mark.parametrize("layout", ["voronoi", "rectangles"])
def test_mosaic_regions_are_filled_from_their_own_class(flat_classes, layout):
    m = build_mosaic(flat_classes, seed=3, index=1, size=96, regions=4, scene_px=32, layout=layout)
    classes = list(flat_classes)
    assert m.image.shape == (3, 96, 96) and m.mask.shape == (96, 96) and (m.mask >= 0).all()
    assert len(m.present) == 4 and [r["class"] for r in m.regions] and m.classes == classes
    for c in m.present:
        pixels = m.image[:, m.mask == c].T
        assert (np.abs(pixels - np.array(COLOURS[classes[c]])) <= 1).all()   # exactly its class, everywhere
    again = build_mosaic(flat_classes, seed=3, index=1, size=96, regions=4, scene_px=32, layout=layout)
    other = build_mosaic(flat_classes, seed=4, index=1, size=96, regions=4, scene_px=32, layout=layout)
    assert np.array_equal(again.mask, m.mask) and np.array_equal(again.image, m.image)
    assert not np.array_equal(other.mask, m.mask)
    if layout == "voronoi":   # irregular: not a grid of rectangles
        assert any(len(np.unique(row)) > 1 for row in m.mask) and any(len(np.unique(col)) > 1 for col in m.mask.T)


def test_mosaic_errors(flat_classes):
    with pytest.raises(MosaicError, match="at least two classes"):
        build_mosaic({"red": flat_classes["red"]}, seed=0, index=0)
    with pytest.raises(MosaicError, match="layout"):
        build_mosaic(flat_classes, seed=0, index=0, layout="hexagons")


def test_written_mosaic_round_trips_georeferencing_mask_and_polygons(flat_classes, tmp_path):
    m = build_mosaic(flat_classes, seed=0, index=2, size=80, regions=3, scene_px=32, pixel_size=0.5)
    paths = write_mosaic(m, tmp_path, "m")
    ds = gdal.Open(str(paths["image"]))
    assert ds.GetGeoTransform() == m.geotransform and ds.RasterCount == 3
    srs = ds.GetSpatialRef()
    assert srs.GetAuthorityCode(None) == "32633"
    assert np.array_equal(np.stack([ds.GetRasterBand(b + 1).ReadAsArray() for b in range(3)]), m.image)
    mask = gdal.Open(str(paths["mask"]))
    assert np.array_equal(mask.GetRasterBand(1).ReadAsArray(), m.mask) and mask.GetGeoTransform() == m.geotransform
    source = ogr.Open(str(paths["polygons"]))       # kept: a layer outlives its data source only in C
    layer = source.GetLayer(0)
    area = {}
    for f in layer:
        area[f.GetField("class_index")] = area.get(f.GetField("class_index"), 0.0) + f.GetGeometryRef().GetArea()
        assert f.GetField("class") == m.classes[f.GetField("class_index")]
    pixel_area = 0.5 * 0.5
    assert area == {c: pytest.approx(float((m.mask == c).sum()) * pixel_area) for c in m.present}
    # every polygon lies on the raster's ground
    xmin, ymax = m.geotransform[0], m.geotransform[3]
    ext = layer.GetExtent()
    assert ext[0] >= xmin and ext[1] <= xmin + 80 * 0.5 and ext[2] >= ymax - 80 * 0.5 and ext[3] <= ymax


def test_segmentation_metrics_on_hand_made_cases():
    truth = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 2], [-1, -1, 2, 2]])
    pred = np.array([[0, 0, 0, 1], [0, 0, 1, 1], [2, 2, 1, 2], [0, 1, 2, 2]])
    cm = M.segmentation_confusion(pred, truth, 4)
    assert cm.sum() == 14                              # the two ignored pixels are not counted
    iou = M.iou_per_class(cm)
    # class 0: TP 4, FP 1, FN 0 -> 4/5; class 1: TP 3, FP 1, FN 1 -> 3/5; class 2: TP 5, FN 1 -> 5/6
    assert iou[:3] == pytest.approx([4 / 5, 3 / 5, 5 / 6]) and np.isnan(iou[3])
    assert M.mean_iou(cm) == pytest.approx((4 / 5 + 3 / 5 + 5 / 6) / 3)
    assert M.pixel_accuracy(cm) == pytest.approx(12 / 14)
    with pytest.raises(ValueError, match="labels"):
        M.segmentation_confusion(pred, truth, 2)
    square = np.zeros((20, 20), bool)
    square[5:15, 5:15] = True
    shifted = np.roll(square, 1, axis=1)
    assert M.boundary_f_score(M.boundary_counts(square, square, 0)) == 1.0
    assert M.boundary_f_score(M.boundary_counts(shifted, square, 0)) < 0.8
    assert M.boundary_f_score(M.boundary_counts(shifted, square, 1)) == 1.0
    assert M.boundary_f_score(M.boundary_counts(np.zeros_like(square), square, 2)) == 0.0
    # per class of a label map: a class predicted where it is absent is charged its false boundary
    truth = np.zeros((20, 20), np.int64)
    pred = truth.copy()
    pred[5:15, 5:15] = 1
    counts = M.class_boundary_counts(pred, truth, 2, 1)
    assert counts[1, 1] > 0 and counts[1, 0] == 0 and counts[1, 3] == 0   # class 1: only false boundary


def test_rectangle_layouts_that_cannot_fit_are_an_error_not_a_hang():
    from training.mosaic import MosaicError, rectangle_regions

    labels = rectangle_regions(64, 4, np.random.default_rng(0))
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    with pytest.raises(MosaicError, match="use fewer --regions or --layout voronoi"):
        rectangle_regions(64, 40, np.random.default_rng(0))


def test_summary_per_class_scores_on_a_known_confusion():
    from training.localization import _summary

    # rows: true class; a: 8 of 10 pixels right, b: 9 of 10, c: absent from the truth
    confusion = np.array([[8, 2, 0], [1, 9, 0], [0, 0, 0]])
    boundary = np.array([[3, 4, 3, 6], [0, 0, 0, 0], [0, 0, 0, 0]])   # a: P 3/4, R 3/6; b: no boundary
    r = _summary(confusion, boundary, ["a", "b", "c"])
    assert r["per_class_pixel_accuracy"] == pytest.approx({"a": 0.8, "b": 0.9})
    assert r["per_class_iou"] == pytest.approx({"a": 8 / 11, "b": 9 / 12})
    assert r["per_class_boundary_f"]["a"] == pytest.approx(2 * 0.75 * 0.5 / 1.25)
    assert r["per_class_boundary_f"]["b"] is None and r["boundary_f"] == pytest.approx(0.6)
    assert r["pixel_accuracy"] == pytest.approx(17 / 20) and r["miou"] == pytest.approx((8 / 11 + 9 / 12) / 2)


def test_a_class_predicted_where_the_truth_has_none_scores_zero(flat_classes, tmp_path, monkeypatch):
    """The standard mIoU: the mean over every class in truth or prediction, so a false detection of an
    absent class costs an IoU (and a boundary F) of 0 instead of going unseen."""
    from types import SimpleNamespace

    from training import localization as L

    # rows: true class; a: 8 of 10 right, b: 7 of 10 (2 of them called c), c: absent from the truth
    confusion = np.array([[8, 2, 0], [1, 7, 2], [0, 0, 0]])
    assert M.mean_iou(confusion) == pytest.approx((8 / 11 + 7 / 12 + 0) / 3)
    assert M.mean_iou(confusion, present_only=True) == pytest.approx((8 / 11 + 7 / 12) / 2)
    boundary = np.array([[3, 4, 3, 6], [2, 2, 2, 2], [0, 5, 0, 0]])    # c: 5 boundary pixels, all false
    r = L._summary(confusion, boundary, ["a", "b", "c"])
    assert r["miou"] == pytest.approx((8 / 11 + 7 / 12) / 3) and r["per_class_iou"]["c"] == 0.0
    assert r["per_class_boundary_f"]["c"] == 0.0 and r["per_class_pixel_accuracy"]["c"] is None
    assert r["boundary_f"] == pytest.approx((2 * 0.75 * 0.5 / 1.25 + 1.0 + 0.0) / 3)
    # end to end: a Segment that finds every class of the mosaic exactly, and one class it lacks
    m = build_mosaic(flat_classes, seed=0, index=0, size=64, regions=2, scene_px=32)
    truth = L._polygons_of(write_mosaic(m, tmp_path / "truth", "m")["polygons"], len(m.classes))
    absent = next(c for c in range(len(m.classes)) if c not in m.present)
    x0, y0 = m.geotransform[0], m.geotransform[3]
    found = {c: truth[c] for c in m.present}
    found[absent] = shapely.box(x0, y0 - 4, x0 + 4, y0)               # a small false detection
    fake = SimpleNamespace(results=[SimpleNamespace(polygons=[SimpleNamespace(geometry=found[c])] if c in found else [])
                                    for c in range(len(m.classes))])
    monkeypatch.setattr("backend.segment.segment", lambda *a, **kw: fake)
    e2e = L.evaluate_end_to_end(SimpleNamespace(image_size=64), [m], m.classes, progress=False, edge_radius=0)
    assert e2e["per_class_iou"][m.classes[absent]] == 0.0
    assert e2e["miou"] == pytest.approx(len(m.present) / (len(m.present) + 1))


def test_segmentation_cli_json_ablation_and_end_to_end(setup, tmp_path):  # noqa: F811
    p = run_cli("segmentation", "--checkpoint", setup["ckpt"], "--data", setup["root"] / "scenes",
                "--classnames", setup["names"], "--seed", "1", "--mosaics", "2", "--size", "96", "--regions", "3",
                "--methods", "global,maskclip,sao3,sao7-zoom2", "--end-to-end", "--keep", tmp_path / "mosaics",
                "--json", "--quiet")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert 0.0 <= r["miou"] <= 1.0 and r["method"] == "global"
    assert set(r["methods"]) == {"global", "maskclip", "sao3", "sao7-zoom2"}
    for name, m in r["methods"].items():
        assert 0 <= m["miou"] <= 1 and 0 <= m["pixel_accuracy"] <= 1
        assert m["zoom"] == (2 if name == "sao7-zoom2" else 1)
    assert r["methods"]["sao7-zoom2"]["window"] == 7
    assert set(r["per_class_iou"]) <= set(json.loads(setup["names"].read_text()))
    assert set(r["per_class_pixel_accuracy"]) == set(r["per_class_boundary_f"]) == set(r["per_class_iou"])
    assert r["settings"]["seed"] == 1 and r["settings"]["mosaics"] == 2 and r["settings"]["regions"] == 3
    assert 0.0 <= r["end_to_end"]["miou"] <= 1.0
    assert len(list((tmp_path / "mosaics").glob("mosaic_*_mask.tif"))) == 2
    again = run_cli("segmentation", "--checkpoint", setup["ckpt"], "--data", setup["root"] / "scenes",
                    "--classnames", setup["names"], "--seed", "1", "--mosaics", "2", "--size", "96", "--regions", "3",
                    "--methods", "global", "--json", "--quiet")
    assert json.loads(again.stdout)["miou"] == pytest.approx(r["methods"]["global"]["miou"])   # deterministic


def test_segmentation_default_is_the_backends_edge_refined_sao(setup, tiny_config):  # noqa: F811
    from backend.defaults import default_edge_radius

    common = ("segmentation", "--checkpoint", setup["ckpt"], "--data", setup["root"] / "scenes", "--classnames",
              setup["names"], "--seed", "1", "--mosaics", "2", "--size", "96", "--regions", "3", "--json", "--quiet")
    p = run_cli(*common, "--methods", "sao5,sao5-edges", "--end-to-end")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    radius = default_edge_radius(tiny_config.image_size)
    assert r["method"] == "sao5-edges" and r["methods"]["sao5-edges"]["edge_radius"] == radius
    assert r["methods"]["sao5"]["edge_radius"] == 0 and r["end_to_end"]["edge_radius"] == radius
    # with the filter turned off the two methods are the same map
    off = json.loads(run_cli(*common, "--methods", "sao5,sao5-edges", "--edge-radius", "0").stdout)
    assert off["methods"]["sao5-edges"]["miou"] == pytest.approx(off["methods"]["sao5"]["miou"])
    assert off["methods"]["sao5-edges"]["edge_radius"] == 0
    assert json.loads(run_cli(*common).stdout)["method"] == "sao5-edges"
    p = run_cli(*common, "--edge-radius", "-1")
    assert p.returncode == 2 and "--edge-radius" in p.stderr and "Traceback" not in p.stderr


def test_segmentation_cli_errors(setup):  # noqa: F811
    p = run_cli("segmentation", "--checkpoint", setup["ckpt"], "--data", setup["root"] / "scenes",
                "--classnames", setup["names"], "--methods", "sao4")
    assert p.returncode == 2 and "unknown --methods sao4" in p.stderr and "Traceback" not in p.stderr
    p = run_cli("segmentation", "--checkpoint", setup["ckpt"], "--data", setup["root"] / "nope",
                "--classnames", setup["names"])
    assert p.returncode == 2 and "does not exist" in p.stderr


def test_segmentation_unreadable_scene_and_keep_file_are_one_line(setup, tmp_path):  # noqa: F811
    # two classes of one image each, so every mosaic reads both; one is not an image
    names = json.loads(setup["names"].read_text())
    grass, field = list(names)[:2]
    (tmp_path / "scenes" / grass).mkdir(parents=True)
    (tmp_path / "scenes" / field).mkdir(parents=True)
    good = next((setup["root"] / "scenes" / grass).iterdir())
    (tmp_path / "scenes" / grass / good.name).write_bytes(good.read_bytes())
    (tmp_path / "scenes" / field / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "names.json").write_text(json.dumps({grass: names[grass], field: names[field]}))
    common = ("segmentation", "--checkpoint", setup["ckpt"], "--classnames", tmp_path / "names.json",
              "--mosaics", "1", "--size", "96", "--regions", "2", "--methods", "global", "--quiet")
    p = run_cli(*common, "--data", tmp_path / "scenes")
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "broken.jpg is not an image file that can be read" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    # --keep naming a file: refused before any work, the file left alone
    (tmp_path / "scenes" / field / "broken.jpg").unlink()
    (tmp_path / "scenes" / field / good.name).write_bytes(good.read_bytes())
    (tmp_path / "notes.txt").write_text("mine")
    p = run_cli(*common, "--data", tmp_path / "scenes", "--keep", tmp_path / "notes.txt")
    assert p.returncode == 2 and "--keep" in p.stderr and "is a file" in p.stderr and "Traceback" not in p.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine"



def test_segmentation_scores_the_classes_that_have_images(setup, tmp_path):  # noqa: F811
    """A class map naming more classes than the folder holds (a shared map, a subset of a set)."""
    names = json.loads(setup["names"].read_text())
    wider = tmp_path / "wider.json"
    wider.write_text(json.dumps({**names, "zz_airport": "airport", "zz_harbor": "harbor"}))
    p = run_cli("segmentation", "--checkpoint", setup["ckpt"], "--data", setup["root"] / "scenes",
                "--classnames", wider, "--seed", "1", "--mosaics", "2", "--size", "96", "--regions", "3",
                "--methods", "global", "--json", "--quiet")
    assert p.returncode == 0, p.stderr
    assert "no images of 2 class(es) of the map (zz_airport, zz_harbor)" in p.stderr
    r = json.loads(p.stdout)
    assert r["settings"]["classes"] == list(names) and set(r["per_class_iou"]) <= set(names.values()) | set(names)


# ---- pseudo-label refinement ---------------------------------------------------------------------
@pytest.mark.parametrize("zoom", [1, 2])
def test_pseudo_labels_use_only_present_classes_and_ignore_unsure_patches(tiny_model, tiny_config, tokenizer, zoom):
    import torch
    import torch.nn.functional as F

    from training.refine import IGNORE, pseudo_labels

    rng = np.random.default_rng(0)
    size = tiny_config.image_size
    mosaics = rng.integers(0, 256, (2, 3, size, size), dtype=np.uint8)
    tokens = tokenizer([f"an aerial photo of {c}." for c in ("a lake", "a forest", "fields", "roads")],
                       tiny_config.context_length)
    with torch.no_grad():
        text = F.normalize(tiny_model.encode_text(tokens), dim=-1)
    tiny_model.train()
    labels = pseudo_labels(tiny_model, mosaics, [[0, 2], [1, 3]], text, 3, margin=0.0, device="cpu", zoom=zoom)
    grid = size // tiny_config.patch_size
    assert labels.shape == (2, grid, grid) and tiny_model.training        # the caller's mode comes back
    assert (labels != IGNORE).all()                                       # no margin: every patch labelled
    assert set(labels[0].unique().tolist()) <= {0, 2} and set(labels[1].unique().tolist()) <= {1, 3}
    assert (pseudo_labels(tiny_model, mosaics, [[0, 2], [1, 3]], text, 3, margin=1.01, device="cpu",
                          zoom=zoom) == IGNORE).all()


@pytest.fixture(scope="module")
def refine_setup(tmp_path_factory, tokenizer, tiny_config):
    import torch
    from backend.model import MaMMUT
    from backend.model.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("refine")
    torch.manual_seed(0)
    ckpt = save_checkpoint(MaMMUT(tiny_config), tokenizer, root / "ckpt")
    rng = np.random.default_rng(0)
    names = {"lake": "a lake", "forest": "a forest", "fields": "farm fields"}
    for c, cls in enumerate(names):
        for j in range(4):
            p = root / "scenes" / cls / f"{cls}_{j}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            base = np.array([(40, 60, 200), (30, 140, 40), (200, 180, 90)][c])
            Image.fromarray(np.clip(base + rng.integers(-30, 30, (48, 48, 3)), 0, 255).astype(np.uint8)).save(p)
    recipe = root / "recipe.json"
    recipe.write_text(json.dumps({"sources": [{"name": "scenes", "kind": "folder", "root": "scenes",
                                               "classnames": names, "val_per_class": 1}]}))
    return {"root": root, "ckpt": ckpt, "recipe": recipe}


def test_patch_classes_take_the_majority_of_each_patch():
    from training.refine import patch_classes

    mask = np.zeros((4, 6), np.int16)          # 2 x 3 patches of 2 x 2 pixels
    mask[:, 4:] = 2                            # the right column of patches: class 2
    mask[0:2, 2] = 5                           # top-middle patch: 2 of 4 pixels class 5, a tie: the lower wins
    mask[2:, 0] = 5                            # bottom-left patch: 3 of 4 pixels class 5
    mask[3, 1] = 5
    assert patch_classes(mask, 2).tolist() == [[0, 0, 2], [5, 0, 2]]


def test_round_schedule_warms_up_then_decays_to_a_tenth_of_the_peak():
    from training.refine import round_lr

    lrs = [round_lr(step, 100, 1e-4) for step in range(100)]
    assert lrs[0] == pytest.approx(1e-5) and lrs[9] == pytest.approx(1e-4)      # 10 warm-up steps
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))                       # then never rises
    assert lrs[-1] == pytest.approx(1e-5, rel=0.01)                             # ends near a tenth


def test_per_patch_loss_trains_the_image_side_only(tiny_model, tokenizer):
    import torch

    from backend.model import MaMMUTLoss
    from training.refine import IGNORE, RefineStep

    cfg = tiny_model.config
    step = RefineStep(tiny_model.train(), MaMMUTLoss(pad_id=cfg.pad_id), window=3)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=g)
    tokens = tokenizer(["a lake", "a forest"], cfg.context_length)
    grid = cfg.image_size // cfg.patch_size
    labels = torch.randint(2, (2, grid, grid), generator=g)
    labels[0, 0, 0] = IGNORE
    losses = step(images, tokens, None, images, labels, tokens, torch.arange(2))
    losses["dense_loss"].backward()
    grads = {n: p.grad for n, p in tiny_model.named_parameters()}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("visual."))
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("attn_pool."))
    assert all(g is None for n, g in grads.items() if n.startswith("text.") or n == "logit_scale")


def test_refinement_class_text_pools_the_prompt_ensemble(tiny_model, tokenizer):
    import torch
    import torch.nn.functional as F

    from backend.model.prompts import ZERO_SHOT_TEMPLATES
    from training.refine import PROMPT, class_prompt_texts, class_text

    texts, owner = class_prompt_texts(["forest", "lake"], "ensemble")
    assert len(texts) == 2 * len(ZERO_SHOT_TEMPLATES) and owner == [0] * len(ZERO_SHOT_TEMPLATES) + [1] * len(ZERO_SHOT_TEMPLATES)
    assert "an aerial photo of lake." in texts and texts[owner.index(1)].count("lake") == 1
    with torch.no_grad():
        tokens = tokenizer(texts, tiny_model.config.context_length)
        pooled = class_text(tiny_model.eval(), tokens, torch.tensor(owner))
        each = F.normalize(tiny_model.encode_text(tokens), dim=-1)
    n = len(ZERO_SHOT_TEMPLATES)
    expected = F.normalize(torch.stack([each[:n].mean(0), each[n:].mean(0)]), dim=-1)
    assert torch.allclose(pooled, expected, atol=1e-6)
    # the ensemble is not one of its phrasings: pooling did something
    assert not torch.allclose(pooled[0], each[0], atol=1e-3)
    assert class_prompt_texts(["forest", "lake"], "single") == ([PROMPT.format("forest"), PROMPT.format("lake")], [0, 1])


def test_keep_loss_is_zero_at_the_teacher_and_pulls_back_towards_it(tiny_model, tokenizer):
    import copy

    import torch
    from backend.model import MaMMUTLoss
    from training.refine import RefineStep

    cfg = tiny_model.config
    teacher = copy.deepcopy(tiny_model).eval().requires_grad_(False)
    step = RefineStep(tiny_model.train(), MaMMUTLoss(pad_id=cfg.pad_id), window=3, teacher=teacher)
    assert not any(n.startswith("_teacher") for n, _ in step.named_parameters())   # not trained, not in DDP
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=g)
    tokens = tokenizer(["a lake", "a forest"], cfg.context_length)
    labels = torch.zeros(2, cfg.image_size // cfg.patch_size, cfg.image_size // cfg.patch_size, dtype=torch.long)
    assert float(step(images, tokens, None, images, labels, tokens, torch.arange(2))["keep_loss"].detach()) < 1e-5   # same weights
    with torch.no_grad():
        for p in tiny_model.attn_pool.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    moved = step(images, tokens, None, images, labels, tokens, torch.arange(2))["keep_loss"]
    assert float(moved.detach()) > 1e-3
    moved.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tiny_model.attn_pool.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def _refine(refine_setup, out, rounds, launcher=(), extra=(), capsys=None):
    """training.refine on the test setup; with `capsys`, its main in this process (conftest.run_main),
    for refusals that stop before any work."""
    import os
    import subprocess
    import sys

    from test_server import REPO

    args = ["--checkpoint", str(refine_setup["ckpt"]), "--recipe", str(refine_setup["recipe"]), "--out", str(out),
            "--rounds", str(rounds), "--steps-per-round", "2", "--batch-size", "4", "--dense-batch", "2",
            "--mosaics-per-round", "4", "--eval-mosaics", "1", "--window", "3", "--device", "cpu",
            "--workers", "0", "--export-fp16", str(out / "fp16"), *extra]
    if capsys is not None:
        from conftest import run_main
        from training.refine import main

        return run_main(main, args, capsys)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    return subprocess.run([sys.executable, *launcher, "-m", "training.refine", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_refinement_round_changes_weights_logs_metrics_and_resumes(refine_setup, tmp_path):
    import torch
    from backend.model.checkpoint import load_checkpoint

    out = tmp_path / "run"
    p = _refine(refine_setup, out, 1)
    assert p.returncode == 0, p.stderr
    # progress bars through the long parts of a round: labelling, and measuring (round 0's and round 1's)
    assert "round 1 pseudo-labels: 100%" in p.stderr and "4/4" in p.stderr
    assert p.stderr.count("relevance maps: 100%") >= 2 and "images" in p.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    for r in rows:
        assert 0 <= r["miou"] <= 1 and 0 <= r["miou_edges"] <= 1 and "scenes/top1" in r
    assert 0 <= rows[1]["labelled_patch_fraction"] <= 1 and rows[1]["train_dense_loss"] > 0
    assert "train_keep_loss" not in rows[1]                # --keep-global is off by default
    assert rows[1]["pseudo_label_accuracy"] is None or 0 <= rows[1]["pseudo_label_accuracy"] <= 1
    start, _ = load_checkpoint(refine_setup["ckpt"])
    refined, _ = load_checkpoint(out / "rounds" / "round_1")
    changed = [n for n, p in refined.state_dict().items() if not torch.equal(p, start.state_dict()[n])]
    assert any(n.startswith("visual.") for n in changed) and any(n.startswith("attn_pool.") for n in changed)
    fp16, _ = load_checkpoint(out / "fp16")
    assert next(iter(fp16.state_dict().values())).dtype in (torch.float16, torch.float32)
    # other settings over its rounds: refused, the first run's record kept (it was overwritten, and the
    # rounds and metrics mixed two runs)
    before = (out / "refine_config.json").read_text()
    p = _refine(refine_setup, out, 2, extra=("--lr", "1e-3"))
    assert p.returncode == 2 and "holds rounds of a run with other settings (--lr 5e-05 -> 0.001)" in p.stderr, p.stderr
    assert (out / "refine_config.json").read_text() == before and not (out / "rounds" / "round_2").exists()
    p = _refine(refine_setup, out, 2)                       # continues after round 1
    assert p.returncode == 0 and "resuming after round 1" in p.stderr
    assert [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]


def test_refinement_setup_errors_are_one_line(refine_setup, tmp_path, capsys):
    missing = {**refine_setup, "ckpt": tmp_path / "no-such-checkpoint"}
    p = _refine(missing, tmp_path / "typo", 1, capsys=capsys)
    assert p.returncode == 2 and "--checkpoint" in p.stderr and "is not a checkpoint folder" in p.stderr
    assert not (tmp_path / "typo").exists() and "Traceback" not in p.stderr
    p = _refine(refine_setup, tmp_path / "bench", 1, extra=("--benchmark", "nope"), capsys=capsys)
    assert p.returncode == 2 and "error: --benchmark 'nope' is not a validation set" in p.stderr
    assert "Traceback" not in p.stderr
    # a mosaic needs two regions: said at once, not after round 0's measurement
    p = _refine(refine_setup, tmp_path / "one", 1, extra=("--regions", "1"), capsys=capsys)
    assert p.returncode == 2 and "--regions must be at least 2" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "one").exists()
    # a file where a folder must be made: said before the rounds (--out), not after them (--export-fp16)
    (tmp_path / "a_file").write_text("notes")
    p = _refine(refine_setup, tmp_path / "a_file" / "run", 1, capsys=capsys)
    assert p.returncode == 2 and "a_file is a file; the run's folder must be a folder" in p.stderr, p.stderr
    p = _refine(refine_setup, tmp_path / "run", 1, extra=("--export-fp16", str(tmp_path / "a_file" / "fp16")),
                capsys=capsys)
    assert p.returncode == 2 and "a_file is a file, not a folder" in p.stderr and not (tmp_path / "run").exists()
    assert (tmp_path / "a_file").read_text() == "notes"


def test_refinement_unreadable_scene_image_is_one_line(refine_setup, tmp_path):
    import shutil

    shutil.copytree(refine_setup["root"] / "scenes", tmp_path / "scenes")
    for path in (tmp_path / "scenes" / "lake").iterdir():       # every lake scene: a mosaic meets one
        path.write_bytes(b"not a png")
    recipe = json.loads(refine_setup["recipe"].read_text())
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    p = _refine({**refine_setup, "recipe": tmp_path / "recipe.json"}, tmp_path / "run", 1)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "is not an image file that can be read" in p.stderr.strip().splitlines()[-1]


def test_refinement_runs_distributed_under_torchrun(refine_setup, tmp_path):
    """Two processes (gloo on CPU): each labels and trains on its own mosaics, rank 0 measures and saves."""
    import torch
    from backend.model.checkpoint import load_checkpoint

    out = tmp_path / "ddp"
    p = _refine(refine_setup, out, 1, launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"),
                extra=("--augment", "none", "--template-mix", "0.5", "--keep-global", "2"))
    assert p.returncode == 0, p.stderr[-3000:]
    config = json.loads((out / "refine_config.json").read_text())
    assert (config["augment"], config["template_mix"], config["keep_global"]) == ("none", 0.5, 2.0)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]          # one row per round: only rank 0 logs
    assert 0 <= rows[1]["train_keep_loss"] <= 2           # 1 - cosine to the starting model's embeddings
    start, _ = load_checkpoint(refine_setup["ckpt"])
    refined, _ = load_checkpoint(out / "rounds" / "round_1")
    assert any(not torch.equal(v, start.state_dict()[k]) for k, v in refined.state_dict().items()
               if k.startswith("visual."))


def test_labelled_raster_mode_reprojects_labels_and_scores(setup, tmp_path):  # noqa: F811
    from test_raster import make_tif

    pixels = np.full((3, 200, 200), 60, np.uint8)
    pixels[:, 50:150, 50:150] = 220                                  # the labelled object: a bright square
    raster = make_tif(tmp_path / "scene.tif", pixels, geotransform=(400000.0, 1.0, 0.0, 5000000.0, 0.0, -1.0),
                      crs="EPSG:32633")
    utm, wgs = osr.SpatialReference(), osr.SpatialReference()
    utm.ImportFromEPSG(32633)
    wgs.ImportFromEPSG(4326)
    for s in (utm, wgs):
        s.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    ring = ogr.Geometry(ogr.wkbLinearRing)
    for x, y in ((400050, 4999950), (400150, 4999950), (400150, 4999850), (400050, 4999850), (400050, 4999950)):
        ring.AddPoint_2D(x, y)
    square = ogr.Geometry(ogr.wkbPolygon)
    square.AddGeometry(ring)
    square.Transform(osr.CoordinateTransformation(utm, wgs))       # labels in another CRS than the raster
    labels = tmp_path / "labels.geojson"
    ds = ogr.GetDriverByName("GeoJSON").CreateDataSource(str(labels))
    layer = ds.CreateLayer("labels", wgs, ogr.wkbPolygon)
    layer.CreateField(ogr.FieldDefn("kind", ogr.OFTString))
    for kind in ("building", "tree"):
        f = ogr.Feature(layer.GetLayerDefn())
        f.SetField("kind", kind)
        f.SetGeometry(square if kind == "building" else square.Buffer(-10))
        layer.CreateFeature(f)
    ds = None
    p = run_cli("segmentation", "--checkpoint", setup["ckpt"], "--raster", raster, "--labels", labels,
                "--where", "kind = 'building'", "--prompt", "buildings", "--threshold", "0.0", "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["truth_fraction"] == pytest.approx(0.25, abs=0.01)       # the square, on the raster's grid
    assert r["predicted_fraction"] == 1.0 and r["iou"] == pytest.approx(0.25, abs=0.01)   # threshold 0: all
    assert r["end_to_end"]["polygon_iou"] == pytest.approx(0.25, abs=0.02)
    p = run_cli("segmentation", "--checkpoint", setup["ckpt"], "--raster", raster, "--labels", labels)
    assert p.returncode == 2 and "--prompt" in p.stderr
    # inputs that would score 0 for a reason that is not the model's: one clear line each
    for where, message in (("kind = 'road'", "no label features to score against where kind = 'road'"),
                           ("kind ==== 1", "is not a valid filter")):
        p = run_cli("segmentation", "--checkpoint", setup["ckpt"], "--raster", raster, "--labels", labels,
                    "--where", where, "--prompt", "buildings")
        assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, p.stderr
    elsewhere = make_tif(tmp_path / "elsewhere.tif", pixels, geotransform=(420000.0, 1.0, 0.0, 5000000.0, 0.0, -1.0),
                         crs="EPSG:32633")
    p = run_cli("segmentation", "--checkpoint", setup["ckpt"], "--raster", elsewhere, "--labels", labels,
                "--prompt", "buildings")
    assert p.returncode == 2 and "none of the label features" in p.stderr and "Traceback" not in p.stderr
    p = run_cli("segmentation", "--checkpoint", setup["ckpt"], "--raster", raster, "--labels", labels,
                "--prompt", "buildings", "--threshold", "50")
    assert p.returncode == 2 and "--threshold 50.0 must be between 0 and 1" in p.stderr
    # a boundary match distance past the raster's side (200 px) says nothing: refused before Segment runs
    p = run_cli("segmentation", "--checkpoint", setup["ckpt"], "--raster", raster, "--labels", labels,
                "--prompt", "buildings", "--tolerance", "100000")
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert "--tolerance 100000 must be 0 or more and at most the raster's side (200 px on its grid)" in p.stderr


def test_refinement_rejects_a_template_mix_outside_0_1(refine_setup, tmp_path):
    p = _refine(refine_setup, tmp_path / "bad", 1, extra=("--template-mix", "1.5"))
    assert p.returncode == 2 and "--template-mix is a probability" in p.stderr and "Traceback" not in p.stderr
    p = _refine(refine_setup, tmp_path / "bad", 1, extra=("--keep-global", "-1"))
    assert p.returncode == 2 and "--keep-global is a loss weight" in p.stderr and "Traceback" not in p.stderr


def test_refinement_resume_compares_settings_not_how_paths_were_written(tmp_path, monkeypatch):
    """The first run's paths are recorded absolute: a resume from another folder naming the same
    files goes on (a relative path read from elsewhere named other files), and a relative one recorded
    by an earlier version is not compared; a changed setting is named."""
    from training.refine import RefineConfig, _recorded, settings_changed

    out = tmp_path / "run"
    (out / "rounds" / "round_1").mkdir(parents=True)
    (tmp_path / "ckpt").mkdir()
    monkeypatch.chdir(tmp_path)
    first = RefineConfig(checkpoint="ckpt", recipe="recipe.json", out=str(out))
    (out / "refine_config.json").write_text(json.dumps(_recorded(first)))
    assert json.loads((out / "refine_config.json").read_text())["checkpoint"] == str(tmp_path / "ckpt")
    monkeypatch.chdir(out)
    again = RefineConfig(checkpoint=str(tmp_path / "ckpt"), recipe=str(tmp_path / "recipe.json"), out=str(out))
    assert settings_changed(out, again) == []
    assert settings_changed(out, RefineConfig(**{**vars(again), "lr": 1e-3})) == ["--lr 5e-05 -> 0.001"]
    older = {**json.loads((out / "refine_config.json").read_text()), "checkpoint": "ckpt"}   # relative: an earlier version
    (out / "refine_config.json").write_text(json.dumps(older))
    assert settings_changed(out, again) == []


def test_refinement_interrupted_while_a_round_is_measured_does_that_round_again(refine_setup, tmp_path, capsys,
                                                                                 monkeypatch):
    """Ctrl-C in round 1's measuring (here: raised by the measuring itself, at that line): one line
    saying how to go on, not a traceback; and the round is not saved, so the same command does it again
    with its metrics row (saved before its measuring, a resume went past it and the row was lost)."""
    import training.refine as refine_module

    real_measure, calls = refine_module.measure, []

    def measure_then_interrupt(*args, **kw):
        calls.append(1)
        if len(calls) == 2:         # round 0's measuring, then round 1's
            raise KeyboardInterrupt
        return real_measure(*args, **kw)

    monkeypatch.setattr(refine_module, "measure", measure_then_interrupt)
    out = tmp_path / "run"
    p = _refine(refine_setup, out, 1, capsys=capsys)
    assert p.returncode == 130 and "interrupted; the same command goes on from the start" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and not (out / "rounds" / "round_1").exists()
    monkeypatch.setattr(refine_module, "measure", real_measure)
    p = _refine(refine_setup, out, 1)
    assert p.returncode == 0, p.stderr
    assert [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0, 0, 1]


def test_refined_checkpoints_carry_the_words_they_know(refine_setup, tmp_path, capsys):
    """Every round and the fp16 export get words.json, as training's checkpoints do: the starting
    checkpoint's words and the recipe's training captions (served, it marks unfamiliar words)."""
    import shutil

    from backend.model.vocabulary import TrainingWords

    start = tmp_path / "start"
    shutil.copytree(refine_setup["ckpt"], start)
    TrainingWords({"quarry": 7}, "earlier run").save(start)
    out = tmp_path / "run"
    p = _refine({**refine_setup, "ckpt": start}, out, 1, capsys=capsys)
    assert p.returncode == 0, p.stderr
    for folder in (out / "rounds" / "round_1", out / "fp16"):
        words = TrainingWords.load(folder)
        assert words is not None, f"{folder} has no words.json"
        assert words.count("quarry") == 7 and words.count("forest") >= 1 and "earlier run" in words.source
        assert words.unfamiliar("a forest, a quarry, a volcano") == ["volcano"]


# ---- a labelled raster: labels of any CRS, filters, layers, bands ------------------------------------
def _scene(tmp_path, bands: int = 3):
    """A 200 x 200 px UTM 33N raster (1 m pixels) with a bright 100 x 100 px square in its middle."""
    from test_raster import make_tif

    pixels = np.full((bands, 200, 200), 60, np.uint8)
    pixels[:, 50:150, 50:150] = 220
    # four bands: none marked as a colour (GeoTIFF's default would mark red, green, blue and alpha)
    return make_tif(tmp_path / f"scene{bands}.tif", pixels, geotransform=(400000.0, 1.0, 0.0, 5000000.0, 0.0, -1.0),
                    crs="EPSG:32633", options=("PHOTOMETRIC=MINISBLACK",) if bands > 3 else ())


def _square(dx: float = 0.0, to_lonlat: bool = False):
    """The scene's bright square as an OGR polygon in UTM 33N numbers (moved `dx` metres east), or in
    longitude/latitude."""
    ring = ogr.Geometry(ogr.wkbLinearRing)
    for x, y in ((400050, 4999950), (400150, 4999950), (400150, 4999850), (400050, 4999850), (400050, 4999950)):
        ring.AddPoint_2D(x + dx, y)
    square = ogr.Geometry(ogr.wkbPolygon)
    square.AddGeometry(ring)
    if to_lonlat:
        utm, wgs = osr.SpatialReference(), osr.SpatialReference()
        utm.ImportFromEPSG(32633)
        wgs.ImportFromEPSG(4326)
        for s in (utm, wgs):
            s.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
        square.Transform(osr.CoordinateTransformation(utm, wgs))
    return square


def _write_labels(path, layers: dict, driver: str = "ESRI Shapefile", epsg: int | None = None):
    """A vector file of `layers` (name -> polygons, each with class 'building'); no CRS with epsg None."""
    srs = None
    if epsg is not None:
        srs = osr.SpatialReference()
        srs.ImportFromEPSG(epsg)
    for name, polygons in layers.items():
        # one layer a session: a GeoPackage lists the layers of one session in no fixed order
        ds = ogr.Open(str(path), 1) if path.exists() else ogr.GetDriverByName(driver).CreateDataSource(str(path))
        layer = ds.CreateLayer(name, srs, ogr.wkbPolygon)
        layer.CreateField(ogr.FieldDefn("class", ogr.OFTString))
        for g in polygons:
            f = ogr.Feature(layer.GetLayerDefn())
            f.SetField("class", "building")
            f.SetGeometry(g)
            layer.CreateFeature(f)
        ds = None
    return path


def _no_gdal_lines(stderr: str) -> bool:
    return not any(word in stderr for word in ("Warning 1", "ERROR 1", "Traceback"))


def test_assumed_label_crs_rule():
    from training.labels import assumed_label_crs

    utm = osr.SpatialReference()
    utm.ImportFromEPSG(32633)
    raster = (400000.0, 4999800.0, 400200.0, 5000000.0)
    srs, note = assumed_label_crs((400050, 4999850, 400150, 4999950), utm, raster, "a.shp")
    assert srs.IsSame(utm) and note.startswith("a.shp says no CRS") and "(EPSG:32633)" in note and "\n" not in note
    srs, note = assumed_label_crs((14.9, 45.1, 15.0, 45.2), utm, raster, "a.shp")
    assert srs.GetAuthorityCode(None) == "4326" and "longitude/latitude (EPSG:4326)" in note
    with pytest.raises(ValueError, match=r"a.shp says no CRS.*give the file a CRS \(a .prj .*ogr2ogr -a_srs"):
        assumed_label_crs((900000, 100, 900100, 200), utm, raster, "a.shp")


def test_labelled_raster_labels_without_a_crs(setup, tmp_path):  # noqa: F811
    """A layer with no CRS (a shapefile without its .prj): in the raster's CRS where it overlaps the
    raster there, else longitude/latitude where its numbers can be, else refused; a note says which."""
    raster = _scene(tmp_path)
    common = ("segmentation", "--checkpoint", setup["ckpt"], "--raster", raster, "--prompt", "buildings",
              "--threshold", "0.0")
    utm = _write_labels(tmp_path / "utm.shp", {"utm": [_square()]})
    p = run_cli(*common, "--labels", utm, "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["truth_fraction"] == pytest.approx(0.25, abs=0.01)
    assert p.stderr.count("note: ") == 1 and "says no CRS" in p.stderr and "taken in it (EPSG:32633)" in p.stderr
    assert _no_gdal_lines(p.stderr), p.stderr
    # in degrees: read as longitude/latitude (the same rule as build_dataset's), and the text summary
    deg = _write_labels(tmp_path / "deg.shp", {"deg": [_square(to_lonlat=True)]})
    p = run_cli(*common, "--labels", deg)
    assert p.returncode == 0, p.stderr
    assert "taken as longitude/latitude (EPSG:4326)" in p.stderr and _no_gdal_lines(p.stderr), p.stderr
    assert "labelled 25.0% of the raster's valid pixels" in p.stdout and "(1 polygon)" in p.stdout, p.stdout
    far = _write_labels(tmp_path / "far.shp", {"far": [_square(dx=500000)]})
    p = run_cli(*common, "--labels", far)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and _no_gdal_lines(p.stderr), p.stderr
    assert "says no CRS" in p.stderr and "give the file a CRS" in p.stderr


def test_labelled_raster_filters_layers_and_wrong_crs_are_one_line(setup, tmp_path):  # noqa: F811
    raster = _scene(tmp_path)
    gpkg = _write_labels(tmp_path / "labels.gpkg", {"empty": [], "landuse": [_square()]}, "GPKG", 32633)
    common = ("segmentation", "--checkpoint", setup["ckpt"], "--raster", raster, "--prompt", "buildings",
              "--labels", gpkg)
    for extra, message in (
            (("--label-layer", "landuse", "--where", "klass = 'farmland'"),
             "--where \"klass = 'farmland'\" is not a valid filter for"),
            (("--label-layer", "nope"), "has no layer 'nope' (it has: empty, landuse)"),
            ((), "(layer 'empty') has no label features to score against; the file has 2 layers (empty, landuse): "
                 "--label-layer picks one")):
        p = run_cli(*common, *extra)
        assert p.returncode == 2 and message in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and _no_gdal_lines(p.stderr), p.stderr
    assert "field names (class)" in run_cli(*common, "--label-layer", "landuse", "--where", "klass = 'x'").stderr
    # UTM numbers tagged longitude/latitude: no place on the raster, said once, without GDAL's lines
    wrong = _write_labels(tmp_path / "wrong.gpkg", {"landuse": [_square()]}, "GPKG", 4326)
    p = run_cli(*common[:-1], wrong)
    assert p.returncode == 2 and "none of the label features" in p.stderr and "EPSG:4326" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and _no_gdal_lines(p.stderr), p.stderr


def test_labelled_raster_names_guessed_bands_and_takes_bands(setup, tmp_path):  # noqa: F811
    raster = _scene(tmp_path, bands=4)
    labels = _write_labels(tmp_path / "labels.gpkg", {"landuse": [_square()]}, "GPKG", 32633)
    common = ("segmentation", "--checkpoint", setup["ckpt"], "--raster", raster, "--prompt", "buildings",
              "--labels", labels, "--json")
    p = run_cli(*common)
    assert p.returncode == 0, p.stderr
    assert p.stderr.count("note: ") == 1 and "has 4 bands and marks none as red, green or blue: bands 1, 2, 3" in p.stderr
    assert json.loads(p.stdout)["settings"]["bands"] == [1, 2, 3]
    p = run_cli(*common, "--bands", "3", "2", "1")
    assert p.returncode == 0 and "note: " not in p.stderr, p.stderr
    assert json.loads(p.stdout)["settings"]["bands"] == [3, 2, 1]
    p = run_cli(*common, "--bands", "0", "1", "2")
    assert p.returncode == 2 and "--bands 0 1 2: band numbers start at 1" in p.stderr


def test_segmentation_refuses_mosaic_and_raster_options_together(setup, tmp_path):  # noqa: F811
    raster = _scene(tmp_path)
    p = run_cli("segmentation", "--checkpoint", setup["ckpt"], "--raster", raster, "--labels", raster,
                "--prompt", "buildings", "--data", setup["root"] / "scenes")
    assert p.returncode == 2 and "--data is for mosaics, which --raster replaces" in p.stderr, p.stderr
    p = run_cli("segmentation", "--checkpoint", setup["ckpt"], "--data", setup["root"] / "scenes", "--classnames",
                setup["names"], "--labels", raster)
    assert p.returncode == 2 and "--labels: only with --raster" in p.stderr, p.stderr


def test_refine_help_says_what_regions_takes():
    from training.refine import build_parser

    text = build_parser().format_help()
    assert "2-3 regions" not in text and "--regions regions, 2 or more" in text
