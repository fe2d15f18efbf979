"""Edge refinement of relevance maps (backend.edges): the guided filter against brute force and its
behaviour at image edges; the default radius; Segment applying it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from backend.defaults import default_edge_radius
from backend.edges import box_mean, default_subsample, edge_refined, guide_from_rgb, guided_filter


def brute_box_mean(x: np.ndarray, r: int) -> np.ndarray:
    h, w = x.shape
    return np.array([[x[max(0, i - r):i + r + 1, max(0, j - r):j + r + 1].mean() for j in range(w)]
                     for i in range(h)])


@pytest.mark.parametrize("radius", [0, 1, 4, 40])
def test_box_mean_matches_brute_force_with_clipped_borders(radius):
    x = np.random.default_rng(radius).random((23, 31))
    np.testing.assert_allclose(box_mean(x, radius), brute_box_mean(x, radius), atol=1e-6)


def test_box_mean_keeps_precision_on_large_planes():
    # a float32 running sum over 4 million pixels would lose the constant's digits
    x = np.full((2048, 2048), 0.7, np.float32)
    np.testing.assert_allclose(box_mean(x, 64), 0.7, atol=1e-6)


def test_flat_guide_smooths_like_a_box_filter():
    # where the image has no edges the filter cannot step: it averages (twice, as the fits are averaged)
    rng = np.random.default_rng(0)
    rel = rng.random((40, 40)).astype(np.float32)
    out = guided_filter(rel, np.full((40, 40), 0.5, np.float32), 3)
    np.testing.assert_allclose(out, box_mean(box_mean(rel, 3), 3), atol=1e-5)
    assert out.std() < rel.std() / 3


def test_map_blurred_across_an_image_edge_is_sharpened_onto_it():
    # the image steps at column 32; the model's map ramps over 16 columns around it, as patches blur
    w = 64
    guide = np.zeros((48, w), np.float32)
    guide[:, 32:] = 0.8
    ramp = np.clip((np.arange(w) - 24) / 16, 0, 1).astype(np.float32)
    rel = np.tile(ramp, (48, 1))
    out = guided_filter(rel, guide, 12)
    row = out[24]
    # mostly one side or the other of the edge, not the blurred ramp
    assert row[28:32].max() < 0.4 and row[32:36].min() > 0.6
    assert abs(row[31] - row[32]) > 5 * abs(rel[24, 31] - rel[24, 32])
    # and a mask thresholded at 0.5 cuts exactly at the image's edge
    assert ((out >= 0.5) == (guide > 0.4)).all()


def test_radius_zero_is_the_identity_and_values_stay_in_range():
    rng = np.random.default_rng(1)
    rel = rng.random((2, 30, 30)).astype(np.float32)
    guide = rng.random((30, 30)).astype(np.float32)
    assert guided_filter(rel, guide, 0) is rel
    out = guided_filter(rel, guide, 5)
    assert out.shape == rel.shape and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    # the planes are filtered independently: filtering one alone gives the same plane
    np.testing.assert_allclose(guided_filter(rel[1], guide, 5), out[1], atol=1e-6)


@pytest.mark.parametrize("kwargs, words", [({"radius": -1}, "radius"), ({"radius": 3, "eps": 0.0}, "eps")])
def test_bad_arguments_say_what_is_wrong(kwargs, words):
    with pytest.raises(ValueError, match=words):
        guided_filter(np.zeros((8, 8), np.float32), np.zeros((8, 8), np.float32), **kwargs)


def test_guide_must_match_the_maps():
    with pytest.raises(ValueError, match=r"guide is \(8, 9\)"):
        guided_filter(np.zeros((2, 8, 8), np.float32), np.zeros((8, 9), np.float32), 2)


def test_nodata_stays_irrelevant_after_refinement():
    rgb = np.random.default_rng(2).integers(0, 256, (3, 32, 32), dtype=np.uint8)
    valid = np.ones((32, 32), bool)
    valid[:, :10] = False
    rel = np.where(valid, 0.9, 0.0)[None].astype(np.float32)
    out = edge_refined(rel, rgb, valid, 6)
    assert (out[:, ~valid] == 0).all()
    # the zeros under nodata do not pull the border of the valid area down
    np.testing.assert_allclose(out[:, valid], 0.9, atol=1e-4)
    np.testing.assert_allclose(guide_from_rgb(rgb), rgb.mean(0) / 255, atol=1e-6)


def test_refined_relevance_keeps_the_models_confidence_and_cuts_at_the_edge():
    # two prompts whose maps ramp across 16 columns around an image edge at column 32; the model is
    # sure of each side away from it
    w = 64
    rgb = np.zeros((3, 48, w), np.uint8)
    rgb[:, :, 32:] = 200
    ramp = np.clip((np.arange(w) - 24) / 16, 0, 1).astype(np.float32)
    rel = np.stack([np.tile(1 - ramp, (48, 1)), np.tile(ramp, (48, 1))]) * 0.98
    out = edge_refined(rel, rgb, np.ones((48, w), bool), 12)
    assert out.shape == rel.shape and 0.0 <= out.min() and out.max() <= 1.0
    assert (out.sum(0) <= 1.0 + 1e-5).all()
    # each side goes to its prompt, past the threshold, right up to the image's edge ...
    assert (out[0, :, :32] >= 0.5).all() and (out[1, :, 32:] >= 0.5).all()
    assert (out[0, :, 32:] < 0.5).all() and (out[1, :, :32] < 0.5).all()
    # ... and where the model was sure it stays as sure: averaging probabilities would flatten it
    assert out[0, :, :20].min() > 0.95 and out[1, :, 44:].min() > 0.95
    averaged = guided_filter(rel, guide_from_rgb(rgb), 12)
    assert out[0, :, 28:32].mean() > averaged[0, :, 28:32].mean()
    assert edge_refined(rel, rgb, np.ones((48, w), bool), 0) is rel


def test_fits_on_blocks_match_the_exact_filter_at_large_radii():
    # three flat regions with sensor noise, a nodata corner, maps blurred across the region edges
    rng = np.random.default_rng(3)
    lab = np.zeros((250, 230), int)
    lab[:, 100:] = 1
    lab[140:, :] = 2
    grey = (np.array([0.2, 0.6, 0.4])[lab] + rng.normal(0, 0.03, lab.shape)).astype(np.float32)
    maps = np.stack([box_mean((lab == k).astype(np.float32), 12) for k in range(3)])
    valid = np.ones(lab.shape, bool)
    valid[:30, :40] = False
    assert default_subsample(64) == 4 and default_subsample(31) == 1
    exact = guided_filter(maps, grey, 64, valid=valid, subsample=1)
    fast = guided_filter(maps, grey, 64, valid=valid)
    assert np.abs(exact - fast).max() < 0.05 and np.abs(exact - fast).mean() < 0.01
    assert (exact.argmax(0) == fast.argmax(0)).mean() > 0.999
    assert (fast[:, ~valid] == 0).all() and (fast.argmax(0) == lab)[valid].mean() > 0.99
    with pytest.raises(ValueError, match="subsample"):
        guided_filter(maps, grey, 64, subsample=0)


def test_filter_on_an_explicit_device_gives_the_same_maps():
    # Segment passes its engine's device; "cpu" named explicitly is the default path (the CUDA
    # comparison is in test_gpu.py)
    rng = np.random.default_rng(5)
    rel = (rng.random((2, 90, 70)) / 2).astype(np.float32)
    rgb = rng.integers(0, 256, (3, 90, 70), dtype=np.uint8)
    valid = rng.random((90, 70)) > 0.1
    np.testing.assert_array_equal(edge_refined(rel, rgb, valid, 40, device="cpu"), edge_refined(rel, rgb, valid, 40))
    before = rel.copy()
    out = guided_filter(rel, guide_from_rgb(rgb), 5, device=torch.device("cpu"))
    assert out.shape == rel.shape and out.dtype == np.float32 and not np.allclose(out, rel)
    np.testing.assert_array_equal(rel, before)    # the filter works on its own copy
    with pytest.raises(ValueError, match=r"valid mask \(3, 3\)"):
        edge_refined(rel, rgb, np.ones((3, 3), bool), 8)


def test_default_radius_is_half_the_tile():
    assert default_edge_radius(128) == 64 and default_edge_radius(224) == 112
