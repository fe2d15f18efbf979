"""Edge-aware refinement of relevance maps: a guided filter with the image as the guide.

The model sees the ground in 16-pixel patches, so its relevance maps are blurred over several
pixels at every boundary, and a mask thresholded from them cuts across fields and roofs. The guided
filter (He, Sun and Tang, "Guided Image Filtering", 2010) fits, in every window of (2r+1)^2 pixels,
the map as a linear function of the image's grey level, and averages those fits: where the image
is flat the map is smoothed, and where the image has an edge the map may step there too. It is
linear in the map, so the maps of several prompts are refined independently and cost one pass of
box filters each, whatever the radius. At large radii the fits are computed on small blocks and
applied to the full-resolution image (`default_subsample`). Segment filters the maps'
log-probabilities (`edge_refined`).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

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
    return rgb.astype(np.float32).mean(0) / np.float32(255.0)


def block_sums(x: np.ndarray, factor: int) -> np.ndarray:
    """Sums of x [H, W] over factor x factor blocks, the last row and column of blocks zero-padded."""
    if factor == 1:
        return np.asarray(x, np.float32)
    h, w = x.shape
    t = torch.from_numpy(np.ascontiguousarray(x, np.float32))[None, None]
    t = F.pad(t, (0, -w % factor, 0, -h % factor))
    return (F.avg_pool2d(t, factor) * factor ** 2)[0, 0].numpy()


def upsample_bilinear(x: np.ndarray, factor: int, shape: tuple[int, int]) -> np.ndarray:
    """[K, h, w] block values -> [K, H, W] pixels: bilinear between block centres, clamped at the
    borders (torch: threaded, and several times faster than numpy gathers on large extents)."""
    t = torch.from_numpy(np.ascontiguousarray(x, np.float32))[None]
    up = F.interpolate(t, size=(x.shape[-2] * factor, x.shape[-1] * factor), mode="bilinear", align_corners=False)
    return up[0, :, :shape[0], :shape[1]].numpy()


def default_subsample(radius: int) -> int:
    """Block size the filter's statistics are computed at: windows keep at least 16 blocks of radius,
    so a 64-pixel radius works on 4 x 4 blocks, 16 times fewer values (He and Sun's "fast guided
    filter", 2015); radii under 32 are exact."""
    return max(1, radius // 16)


def guided_filter(maps: np.ndarray, guide: np.ndarray, radius: int, eps: float = DEFAULT_EDGE_EPS,
                  valid: np.ndarray | None = None, clip: bool = True, subsample: int | None = None) -> np.ndarray:
    """Refine maps [P, H, W] (or [H, W]) with a grey guide [H, W]; values are clipped to 0..1, as
    relevance is (`clip=False` for scores). radius 0 returns the maps unchanged. With `valid` [H, W],
    every window mean counts only valid pixels (nodata neither pulls relevance down near its border
    nor is filled in) and invalid pixels come out 0. The linear fits are computed on blocks of
    `subsample` pixels (None = `default_subsample`; 1 = exact) and applied to the full-resolution
    guide, so edges stay pixel-sharp. The guide's statistics are computed once and the maps are
    filtered one at a time, so memory stays a few planes whatever the prompt count."""
    if radius < 0 or eps <= 0:
        raise ValueError(f"the guided filter needs a radius >= 0 and eps > 0, got radius {radius} and eps {eps}")
    if guide.shape != maps.shape[-2:] or (valid is not None and valid.shape != guide.shape):
        raise ValueError(f"the guide is {guide.shape} but the maps are {maps.shape[-2:]}"
                         + ("" if valid is None else f" and the valid mask {valid.shape}"))
    if radius == 0:
        return maps
    factor = default_subsample(radius) if subsample is None else subsample
    if factor < 1:
        raise ValueError(f"subsample must be 1 (exact) or more, got {factor}")
    full = guide.shape
    all_valid = valid is None or bool(valid.all())
    weight_full = np.ones(full, np.float32) if valid is None else valid.astype(np.float32)
    g_full = guide.astype(np.float32)
    # block statistics: each block's valid share and the valid-weighted means in it
    valid_count = block_sums(weight_full, factor)

    def block_mean(x: np.ndarray) -> np.ndarray:
        if all_valid:     # the common case, without the weighting passes over every pixel
            return block_sums(x, factor) / np.maximum(valid_count, 1e-12)
        return (block_sums(weight_full * x, factor) / np.maximum(valid_count, 1e-12)).astype(np.float32)

    weight = (valid_count / factor ** 2).astype(np.float32)
    r = max(1, radius // factor)
    covered = box_mean(weight, r)
    share = np.where(covered > 0, covered, 1.0)

    def mean(x: np.ndarray) -> np.ndarray:
        return box_mean(weight * x, r) / share

    g = block_mean(g_full)
    mean_g = mean(g)
    # the blocks' own grey-level variance counts too: block averaging must not hide texture
    var_g = np.maximum(mean(block_mean(g_full * g_full)) - mean_g * mean_g, 0.0)
    planes = maps.reshape((-1,) + full)
    out = np.empty(planes.shape, np.float32)
    for i, plane in enumerate(planes):
        p_full = plane.astype(np.float32)
        p = block_mean(p_full)
        mean_p = mean(p)
        a = (mean(block_mean(p_full * g_full)) - mean_g * mean_p) / (var_g + eps)
        b = mean_p - a * mean_g
        if factor == 1:
            q = mean(a) * g_full + mean(b)
        else:
            up_a, up_b = upsample_bilinear(np.stack([mean(a), mean(b)]), factor, full)
            q = up_a * g_full + up_b
        q = np.clip(q, 0.0, 1.0) if clip else q
        out[i] = q if all_valid else np.where(weight_full > 0, q, 0.0)
    return out.reshape(maps.shape)


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
    # element-wise work in torch: threaded, where numpy runs on one core
    rel = torch.from_numpy(np.ascontiguousarray(relevance, np.float32))
    rest = (1.0 - rel.sum(0, keepdim=True)).clamp_(0.0, 1.0)
    scores = torch.cat([rel, rest]).clamp_(min=LOG_FLOOR).log_().numpy()
    scores = guided_filter(scores, guide_from_rgb(rgb), radius, valid=valid, clip=False)
    refined = torch.from_numpy(scores).softmax(0)[:-1].numpy()
    refined[:, ~valid] = 0.0
    return refined


__all__ = ["guided_filter", "default_subsample", "edge_refined", "guide_from_rgb", "box_mean", "DEFAULT_EDGE_EPS", "LOG_FLOOR"]
