"""Smooth-Attention-Operation (SAO): the sliding-window form of the attention-pooled image embedding.

The global image embedding pools the values v_j of all patches with weights softmax_j(q . k_j / sqrt(d)).
SAO computes, for every patch position p, the same pool restricted to a w x w window N(p) around p
(weights renormalised over N(p), optionally multiplied by a Gaussian of the distance to p). Each
pooled vector then goes through the same output projection as the global pool, so every position
gets an embedding in the joint image-text space. With a window that covers the whole grid (w >= grid)
and no Gaussian, every position's pool is exactly the global pool.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F


def _window_radius(window: int, grid: int) -> int:
    if window < 1:
        raise ValueError(f"SAO window must be a positive odd number of patches, got {window}")
    if window >= grid:
        return grid - 1          # every position sees the whole grid
    if window % 2 == 0:
        raise ValueError(f"SAO window must be odd (3, 5, 7, ...) so it is centred on a patch, got {window}")
    return window // 2


def _gaussian_log(d2: torch.Tensor, sigma: float) -> torch.Tensor:
    """log of a Gaussian of squared distances `d2`, in float64: 2 sigma^2 of a tiny sigma underflows to
    0 in float32, and the centre's 0 / 0 made every weight NaN."""
    return (-d2.double() / (2.0 * sigma * sigma)).float()


def gaussian_log_weights(radius: int, sigma: float, device=None) -> torch.Tensor:
    """log of a 2-D Gaussian over the (2r+1)^2 window offsets, flattened in unfold order."""
    offsets = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    d2 = offsets[:, None] ** 2 + offsets[None, :] ** 2
    return _gaussian_log(d2, sigma).flatten()


def _sao_pool_dense(scores: torch.Tensor, values: torch.Tensor, grid: int, radius: int,
                    sigma: float | None) -> torch.Tensor:
    """sao_pool as one [N, N] weighting per head: for a window as wide as the grid, unfolding
    (2r+1)^2 > N offsets per position costs N (2r+1)^2 values (gigabytes at 14 x 14 patches)."""
    b, h, n = scores.shape
    d = values.shape[-1]
    rows, cols = torch.meshgrid(torch.arange(grid, device=scores.device), torch.arange(grid, device=scores.device),
                                indexing="ij")
    dy = rows.flatten()[:, None] - rows.flatten()[None, :]             # [N position, N patch]
    dx = cols.flatten()[:, None] - cols.flatten()[None, :]
    inside = (dy.abs() <= radius) & (dx.abs() <= radius)
    logits = scores.reshape(b * h, 1, n).expand(b * h, n, n).masked_fill(~inside, float("-inf"))
    if sigma is not None:
        logits = logits + _gaussian_log((dy ** 2 + dx ** 2).float(), sigma)
    pooled = logits.softmax(-1) @ values.reshape(b * h, n, d)          # [B*h, N, d]
    return pooled.view(b, h, grid, grid, d).permute(0, 2, 3, 1, 4)


def sao_pool(scores: torch.Tensor, values: torch.Tensor, grid: int, window: int,
             gaussian: bool = False, sigma: float | None = None) -> torch.Tensor:
    """Window-restricted attention pooling.

    scores [B, heads, N] (q . k_j / sqrt(d) per patch), values [B, heads, N, d], N = grid*grid.
    Returns pooled values [B, grid, grid, heads, d].
    """
    b, h, n = scores.shape
    d = values.shape[-1]
    if n != grid * grid:
        raise ValueError(f"{n} patch tokens do not form a {grid}x{grid} grid")
    radius = _window_radius(window, grid)
    scores = scores.float()
    values = values.float()
    if window >= grid and not gaussian:
        # the window covers the whole grid from every position: one global softmax
        pooled = (scores.softmax(-1).unsqueeze(-1) * values).sum(2)        # [B, h, d]
        return pooled[:, None, None].expand(b, grid, grid, h, d)

    k = 2 * radius + 1
    if k * k >= n:
        sig = (sigma if sigma is not None else max(window if window < grid else grid, 1) / 2.0) if gaussian else None
        return _sao_pool_dense(scores, values, grid, radius, sig)
    # Gather each position's window explicitly so the softmax is exact (and stable) per window.
    s = F.unfold(scores.reshape(b * h, 1, grid, grid), k, padding=radius)          # [B*h, k*k, N]
    inside = F.unfold(torch.ones(1, 1, grid, grid, device=scores.device), k, padding=radius) > 0.5
    logits = s.masked_fill(~inside, float("-inf"))
    if gaussian:
        sig = sigma if sigma is not None else max(window if window < grid else grid, 1) / 2.0
        logits = logits + gaussian_log_weights(radius, sig, scores.device)[None, :, None]
    weights = logits.softmax(1)                                                      # [B*h, k*k, N]
    v = values.permute(0, 1, 3, 2).reshape(b * h, d, grid, grid)
    v = F.unfold(v, k, padding=radius).view(b * h, d, k * k, n)
    pooled = torch.einsum("xdkn,xkn->xdn", v, weights)                              # [B*h, d, N]
    return pooled.view(b, h, d, grid, grid).permute(0, 3, 4, 1, 2)



def cosine_map(dense: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """dense [B, G, G, E] and text [T, E] or [B, T, E] (all L2-normalised) -> [B, T, G, G], float32.

    Outside autocast: in bf16 the cosines (0.05 to 0.3 for this model) keep about two digits, and
    a map of 64 positions lost distinct values to rounding."""
    dense, text = dense.float(), text_embeddings.float()
    with torch.autocast(dense.device.type, enabled=False):
        if text.dim() == 2:
            return torch.einsum("bxye,te->btxy", dense, text)
        return torch.einsum("bxye,bte->btxy", dense, text)


__all__ = ["sao_pool", "cosine_map", "gaussian_log_weights"]
