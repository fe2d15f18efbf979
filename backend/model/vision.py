"""ViT image encoder and the attention-pooled image embedding."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import MaMMUTConfig
from .layers import EncoderBlock, split_heads

CPU_CHUNK_TOKENS = 1536   # patch tokens per group in CPU inference (see VisionTransformer.forward)


def resize_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """Bicubically resample a [1, g*g, C] position embedding to a [1, grid*grid, C] one."""
    n, c = pos_embed.shape[1], pos_embed.shape[2]
    old = int(math.isqrt(n))
    if old == grid:
        return pos_embed
    pe = pos_embed.reshape(1, old, old, c).permute(0, 3, 1, 2)
    pe = F.interpolate(pe.float(), size=(grid, grid), mode="bicubic", align_corners=False)
    return pe.permute(0, 2, 3, 1).reshape(1, grid * grid, c).to(pos_embed.dtype)


class ConvStem(nn.Module):
    """Convolutional patch embedding (Xiao et al. 2021, "Early convolutions help transformers see
    better"): log2(patch) 3x3 stride-2 convs, then a 1x1 conv to the model width. It trains more
    stably than one large-stride patch conv, which matters most on small data. GroupNorm rather than
    BatchNorm keeps every image's output independent of the rest of the batch."""

    def __init__(self, width: int, patch_size: int):
        super().__init__()
        layers, c_in = [], 3
        n = patch_size.bit_length() - 1
        for i in range(n):
            c_out = max(width // 2 ** (n - i), 16)
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.GroupNorm(1, c_out), nn.ReLU()]
            c_in = c_out
        layers.append(nn.Conv2d(c_in, width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class VisionTransformer(nn.Module):
    """Patch embedding + learned position embedding + pre-norm blocks; returns all patch tokens.

    No class token: MaMMUT pools the image with a learned query instead (`AttentionPool`), and the
    dense SAO path needs every patch token anyway. Inputs of another size than the configured one
    work: the position embedding is resampled to the new patch grid.
    """

    def __init__(self, cfg: MaMMUTConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        if cfg.patch_stem == "conv":
            self.patch_embed = ConvStem(cfg.vision_width, cfg.patch_size)
        else:
            self.patch_embed = nn.Conv2d(3, cfg.vision_width, cfg.patch_size, stride=cfg.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid_size ** 2, cfg.vision_width))
        self.blocks = nn.ModuleList(
            EncoderBlock(cfg.vision_width, cfg.vision_heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.vision_layers)
        )
        self.ln_post = nn.LayerNorm(cfg.vision_width)
        self.grad_checkpointing = False

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] (normalised) -> tokens [B, (H/p)*(W/p), width]."""
        b, _, h, w = images.shape
        if h % self.patch_size or w % self.patch_size or h != w:
            raise ValueError(f"images must be square with sides a multiple of {self.patch_size} px, got {h}x{w}")
        step = max(1, CPU_CHUNK_TOKENS // (h // self.patch_size) ** 2)
        if images.device.type == "cpu" and not torch.is_grad_enabled() and b > step:
            # CPU inference in groups of images: the same numbers, but activations small enough to
            # stay in cache and be reused by the allocator instead of faulting in fresh pages per op
            return torch.cat([self._forward(images[i:i + step]) for i in range(0, b, step)])
        return self._forward(images)

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        h = images.shape[-1]
        # a channels-last convolution output flattens straight into contiguous [B, N, C] tokens
        x = self.patch_embed(images.contiguous(memory_format=torch.channels_last)).flatten(2).transpose(1, 2)
        x = x + resize_pos_embed(self.pos_embed, h // self.patch_size)
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.ln_post(x)


class AttentionPool(nn.Module):
    """One learned query attends over all patch tokens (multi-head), then projects to the joint space.

    `keys_values` exposes the per-head scores and values so the Smooth-Attention-Operation can pool
    the same quantities over local windows instead of the whole grid.
    """

    def __init__(self, width: int, heads: int, embed_dim: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Parameter(torch.zeros(1, 1, width))
        self.ln_q = nn.LayerNorm(width)
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)
        self.ln_out = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim, bias=False)

    def scores_and_values(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, N, C] -> scores [B, heads, N] (q.k/sqrt(d)) and values [B, heads, N, d]."""
        b, n, c = tokens.shape
        q = split_heads(self.q(self.ln_q(self.query)), self.heads)            # [1, h, 1, d]
        kv = self.kv(tokens).view(b, n, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)                                                   # [B, h, N, d]
        scores = (q * k).sum(-1) / math.sqrt(c // self.heads)                 # [B, h, N]
        return scores, v

    def project(self, pooled_heads: torch.Tensor) -> torch.Tensor:
        """Per-head pooled values [..., heads, d] -> joint-space embedding [..., embed_dim] (not normalised)."""
        x = pooled_heads.flatten(-2)
        return self.proj(self.ln_out(self.out(x)))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """The same pool as `scores_and_values` + softmax, without a key and value for every token:
        q.k_j = (Wk^T q).t_j + q.bk, and the q.bk shared by all j cancels in the softmax; and since
        the weights a_j sum to one, sum_j a_j v_j = Wv (sum_j a_j t_j) + bv."""
        c = tokens.shape[-1]
        h, d = self.heads, c // self.heads
        q = self.q(self.ln_q(self.query)).view(h, d)
        wk, wv = self.kv.weight.view(2, h, d, c).unbind(0)
        bv = self.kv.bias.view(2, h, d)[1]
        scores = tokens @ torch.einsum("hd,hdc->ch", q, wk) / math.sqrt(d)        # [B, N, h]
        mixed = scores.softmax(1).transpose(1, 2) @ tokens                         # [B, h, C]
        return self.project(torch.einsum("bhc,hdc->bhd", mixed, wv) + bv)
