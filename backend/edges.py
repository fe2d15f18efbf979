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


def _window_sum(x: torch.Tensor, radius: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums of x over [i - r, i + r] along one dim (clipped at the ends) and the window lengths,
    from a running sum: the cost does not depend on the radius."""
    n = x.shape[dim]
    zero = torch.zeros_like(x.narrow(dim, 0, 1))
    c = torch.cat([zero, torch.cumsum(x, dim)], dim)
    i = torch.arange(n, device=x.device)
    lo, hi = (i - radius).clamp(0, n), (i + radius + 1).clamp(0, n)
    return c.index_select(dim, hi) - c.index_select(dim, lo), (hi - lo).to(x.dtype)


def _box_mean(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean of x [..., H, W] over the (2r+1)^2 window around each pixel, the window clipped at the
    borders; separable, summed in float64 so large rasters keep their precision."""
    rows, nh = _window_sum(x.double(), radius, -2)
    total, nw = _window_sum(rows, radius, -1)
    return (total / (nh[:, None] * nw[None, :])).float()


def box_mean(x: np.ndarray, radius: int) -> np.ndarray:
    """`_box_mean` of a numpy array, on the CPU."""
    return _box_mean(torch.from_numpy(np.ascontiguousarray(x)), radius).numpy()


def _guide(rgb: np.ndarray, device: torch.device) -> torch.Tensor:
    """A uint8 [3, H, W] image -> its grey level [H, W] in 0..1 (the filter's guide), on `device`."""
    return torch.as_tensor(np.ascontiguousarray(rgb), device=device).float().mean(0) / 255.0


def guide_from_rgb(rgb: np.ndarray) -> np.ndarray:
    """`_guide` as a numpy array."""
    return _guide(rgb, torch.device("cpu")).numpy()


def _block_sums(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Sums of x [H, W] over factor x factor blocks, the last row and column of blocks zero-padded."""
    if factor == 1:
        return x
    h, w = x.shape
    padded = F.pad(x[None, None], (0, -w % factor, 0, -h % factor))
    return (F.avg_pool2d(padded, factor) * factor ** 2)[0, 0]


def _upsample_bilinear(x: torch.Tensor, factor: int, shape: tuple[int, int]) -> torch.Tensor:
    """[K, h, w] block values -> [K, H, W] pixels: bilinear between block centres, clamped at the borders."""
    up = F.interpolate(x[None], size=(x.shape[-2] * factor, x.shape[-1] * factor), mode="bilinear",
                       align_corners=False)
    return up[0, :, :shape[0], :shape[1]]


def default_subsample(radius: int) -> int:
    """Block size the filter's statistics are computed at: windows keep at least 16 blocks of radius,
    so a 64-pixel radius works on 4 x 4 blocks, 16 times fewer values (He and Sun's "fast guided
    filter", 2015); radii under 32 are exact."""
    return max(1, radius // 16)


def _check(maps_shape: tuple, guide_shape: tuple, valid_shape: tuple | None, radius: int, eps: float,
           subsample: int | None) -> int:
    """The block size to use; ValueError naming the bad argument."""
    if radius < 0 or eps <= 0:
        raise ValueError(f"the guided filter needs a radius >= 0 and eps > 0, got radius {radius} and eps {eps}")
    if tuple(guide_shape) != tuple(maps_shape[-2:]) or (valid_shape is not None and tuple(valid_shape) != tuple(guide_shape)):
        raise ValueError(f"the guide is {tuple(guide_shape)} but the maps are {tuple(maps_shape[-2:])}"
                         + ("" if valid_shape is None else f" and the valid mask {tuple(valid_shape)}"))
    factor = default_subsample(radius) if subsample is None else subsample
    if factor < 1:
        raise ValueError(f"subsample must be 1 (exact) or more, got {factor}")
    return factor


def _guided_filter(planes: torch.Tensor, g_full: torch.Tensor, valid: torch.Tensor | None, radius: int,
                   eps: float, clip: bool, factor: int) -> torch.Tensor:
    """`guided_filter` on tensors [P, H, W], [H, W] and an optional bool [H, W], all on one device;
    the planes are refined in place, one at a time."""
    full = tuple(g_full.shape)
    all_valid = valid is None or bool(valid.all())
    weight_full = torch.ones_like(g_full) if valid is None else valid.float()
    # block statistics: each block's valid share and the valid-weighted means in it
    block_valid = _block_sums(weight_full, factor)
    valid_count = block_valid.clamp(min=1e-12)

    def block_mean(x: torch.Tensor) -> torch.Tensor:
        # the common case (every pixel valid) skips the weighting pass over every pixel
        return _block_sums(x if all_valid else weight_full * x, factor) / valid_count

    weight = block_valid / factor ** 2
    r = max(1, radius // factor)
    covered = _box_mean(weight, r)
    share = torch.where(covered > 0, covered, torch.ones_like(covered))

    def mean(x: torch.Tensor) -> torch.Tensor:
        return _box_mean(weight * x, r) / share

    g = block_mean(g_full)
    mean_g = mean(g)
    # the blocks' own grey-level variance counts too: block averaging must not hide texture
    var_g = (mean(block_mean(g_full * g_full)) - mean_g * mean_g).clamp(min=0.0)
    for plane in planes:
        mean_p = mean(block_mean(plane))
        a = (mean(block_mean(plane * g_full)) - mean_g * mean_p) / (var_g + eps)
        b = mean_p - a * mean_g
        if factor == 1:
            q = mean(a) * g_full + mean(b)
        else:
            up_a, up_b = _upsample_bilinear(torch.stack([mean(a), mean(b)]), factor, full)
            q = up_a * g_full + up_b
        if clip:
            q = q.clamp(0.0, 1.0)
        plane.copy_(q if all_valid else q * weight_full)
    return planes


def guided_filter(maps: np.ndarray, guide: np.ndarray, radius: int, eps: float = DEFAULT_EDGE_EPS,
                  valid: np.ndarray | None = None, clip: bool = True, subsample: int | None = None,
                  device=None) -> np.ndarray:
    """Refine maps [P, H, W] (or [H, W]) with a grey guide [H, W]; values are clipped to 0..1, as
    relevance is (`clip=False` for scores). radius 0 returns the maps unchanged. With `valid` [H, W],
    every window mean counts only valid pixels (nodata neither pulls relevance down near its border
    nor is filled in) and invalid pixels come out 0. The linear fits are computed on blocks of
    `subsample` pixels (None = `default_subsample`; 1 = exact) and applied to the full-resolution
    guide, so edges stay pixel-sharp. The guide's statistics are computed once and the maps are
    filtered one at a time, so memory stays a few planes whatever the prompt count. `device`: where
    the arithmetic runs (None = the CPU; the backend passes its model's device)."""
    factor = _check(maps.shape, guide.shape, None if valid is None else valid.shape, radius, eps, subsample)
    if radius == 0:
        return maps
    dev = torch.device(device or "cpu")
    planes = torch.tensor(np.asarray(maps, np.float32), device=dev).reshape((-1,) + guide.shape)
    g = torch.as_tensor(np.asarray(guide, np.float32), device=dev)
    v = None if valid is None else torch.as_tensor(np.asarray(valid, bool), device=dev)
    return _guided_filter(planes, g, v, radius, eps, clip, factor).reshape(maps.shape).cpu().numpy()


def edge_refined(relevance: np.ndarray, rgb: np.ndarray, valid: np.ndarray, radius: int, device=None) -> np.ndarray:
    """Relevance [P, H, W] of the uint8 image rgb [3, H, W] refined along the image's edges, over
    the valid pixels only (outside them relevance stays 0). `device`: as for `guided_filter`.

    The filter runs on log-probabilities, with "none of the prompts" (1 - the sum) as one more plane,
    and a softmax turns them back into probabilities. log p is the model's score less a normaliser
    common to all planes, which the softmax cancels: this smooths what the model said, then lets it
    decide again, so a region the model is sure of stays sure. Averaging the probabilities
    themselves flattens every peak, and far fewer pixels pass Segment's threshold (README)."""
    factor = _check(relevance.shape, rgb.shape[-2:], valid.shape, radius, DEFAULT_EDGE_EPS, None)
    if radius == 0:
        return relevance
    dev = torch.device(device or "cpu")
    rel = torch.as_tensor(np.ascontiguousarray(relevance, np.float32), device=dev)
    rest = (1.0 - rel.sum(0, keepdim=True)).clamp_(0.0, 1.0)
    scores = torch.cat([rel, rest]).clamp_(min=LOG_FLOOR).log_()
    v = torch.as_tensor(np.asarray(valid, bool), device=dev)
    scores = _guided_filter(scores, _guide(rgb, dev), v, radius, DEFAULT_EDGE_EPS, False, factor)
    refined = scores.softmax(0)[:-1] * v
    return refined.cpu().numpy()


__all__ = ["guided_filter", "default_subsample", "edge_refined", "guide_from_rgb", "box_mean", "DEFAULT_EDGE_EPS", "LOG_FLOOR"]
