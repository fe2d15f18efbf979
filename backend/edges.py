"""Edge-aware refinement of relevance maps: a guided filter with the image as the guide.

The model sees the ground in 16-pixel patches, so its relevance maps are blurred over several
pixels at every boundary, and a mask thresholded from them cuts across fields and roofs. The guided
filter (He, Sun and Tang, "Guided Image Filtering", 2010) fits, in every window of (2r+1)^2 pixels,
the map as a linear function of the image's grey level, and averages those fits: where the image
is flat the map is smoothed, and where the image has an edge the map may step there too. It is
linear in the map, so the maps of several prompts are refined independently and cost one pass of
box filters each, whatever the radius. Segment filters the maps' log-probabilities (`edge_refined`).
"""
from __future__ import annotations

import numpy as np

DEFAULT_EDGE_EPS = 1e-3   # regularisation: the grey-level variance (0..1 scale) below which a window counts as flat
LOG_FLOOR = 1e-4          # probabilities below this count as this before the log, so no plane is -inf


def _window_sum(x: np.ndarray, radius: int, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Sums of x over [i - r, i + r] along one axis (clipped at the ends) and the window lengths,
    from a running sum: the cost does not depend on the radius."""
    n = x.shape[axis]
    c = np.concatenate([np.zeros_like(np.take(x, [0], axis)), np.cumsum(x, axis)], axis)
    lo = np.clip(np.arange(n) - radius, 0, n)
    hi = np.clip(np.arange(n) + radius + 1, 0, n)
    return np.take(c, hi, axis) - np.take(c, lo, axis), hi - lo


def box_mean(x: np.ndarray, radius: int) -> np.ndarray:
    """Mean of x [..., H, W] over the (2r+1)^2 window around each pixel, the window clipped at the
    borders; separable, summed in float64 so large rasters keep their precision."""
    rows, nh = _window_sum(x.astype(np.float64), radius, -2)
    total, nw = _window_sum(rows, radius, -1)
    return (total / (nh[:, None] * nw[None, :])).astype(np.float32)


def guide_from_rgb(rgb: np.ndarray) -> np.ndarray:
    """A uint8 [3, H, W] image -> its grey level [H, W] in 0..1 (the filter's guide)."""
    return (rgb.astype(np.float32).mean(0) / 255.0).astype(np.float32)


def guided_filter(maps: np.ndarray, guide: np.ndarray, radius: int, eps: float = DEFAULT_EDGE_EPS,
                  valid: np.ndarray | None = None, clip: bool = True) -> np.ndarray:
    """Refine maps [P, H, W] (or [H, W]) with a grey guide [H, W]; values are clipped to 0..1, as
    relevance is. radius 0 returns the maps unchanged. With `valid` [H, W], every window mean counts
    only valid pixels (nodata neither pulls relevance down near its border nor is filled in) and
    invalid pixels come out 0. The guide's statistics are computed once and the maps are filtered
    one at a time, so memory stays a few planes whatever the prompt count."""
    if radius < 0 or eps <= 0:
        raise ValueError(f"the guided filter needs a radius >= 0 and eps > 0, got radius {radius} and eps {eps}")
    if guide.shape != maps.shape[-2:] or (valid is not None and valid.shape != guide.shape):
        raise ValueError(f"the guide is {guide.shape} but the maps are {maps.shape[-2:]}"
                         + ("" if valid is None else f" and the valid mask {valid.shape}"))
    if radius == 0:
        return maps
    weight = np.ones(guide.shape, np.float32) if valid is None else valid.astype(np.float32)
    covered = box_mean(weight, radius)
    inside = covered > 0
    share = np.where(inside, covered, 1.0)

    def mean(x: np.ndarray) -> np.ndarray:
        return box_mean(weight * x, radius) / share

    g = guide.astype(np.float32)
    mean_g = mean(g)
    var_g = np.maximum(mean(g * g) - mean_g * mean_g, 0.0)
    planes = maps.reshape((-1,) + maps.shape[-2:])
    out = np.empty(planes.shape, np.float32)
    for i, plane in enumerate(planes):
        p = plane.astype(np.float32)
        mean_p = mean(p)
        a = (mean(p * g) - mean_g * mean_p) / (var_g + eps)
        b = mean_p - a * mean_g
        q = mean(a) * g + mean(b)
        out[i] = np.where(weight > 0, np.clip(q, 0.0, 1.0) if clip else q, 0.0)
    return out.reshape(maps.shape)


def softmax_planes(scores: np.ndarray) -> np.ndarray:
    """Softmax over the first axis of [K, H, W] scores (shifted by the per-pixel maximum: no overflow)."""
    e = np.exp(scores - scores.max(0, keepdims=True))
    return e / e.sum(0, keepdims=True)


def edge_refined(relevance: np.ndarray, rgb: np.ndarray, valid: np.ndarray, radius: int) -> np.ndarray:
    """Relevance [P, H, W] of the uint8 image rgb [3, H, W] refined along the image's edges, over
    the valid pixels only (outside them relevance stays 0).

    The filter runs on log-probabilities, with "none of the prompts" (1 - the sum) as one more plane,
    and a softmax turns them back into probabilities. log p is the model's score less a normaliser
    common to all planes, which the softmax cancels: this smooths what the model said, then lets it
    decide again, so a region the model is sure of stays sure. Averaging the probabilities
    themselves flattens every peak, and far fewer pixels pass Segment's threshold (README)."""
    if radius == 0:
        return relevance
    rest = np.clip(1.0 - relevance.sum(0, keepdims=True), 0.0, 1.0)
    scores = np.log(np.maximum(np.concatenate([relevance, rest]), LOG_FLOOR))
    scores = guided_filter(scores, guide_from_rgb(rgb), radius, valid=valid, clip=False)
    refined = softmax_planes(scores)[:-1].astype(np.float32)
    refined[:, ~valid] = 0.0
    return refined


__all__ = ["guided_filter", "edge_refined", "softmax_planes", "guide_from_rgb", "box_mean", "DEFAULT_EDGE_EPS", "LOG_FLOOR"]
