"""Transformer building blocks shared by the image encoder and the text decoder.

Pre-norm residual blocks; attention runs through `F.scaled_dot_product_attention`, which picks a
fused kernel (flash / memory-efficient on GPU, a fused CPU kernel otherwise).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(F.gelu(self.fc1(x), approximate="tanh")))


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, heads*D] -> [B, heads, N, D]"""
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, heads, N, D] -> [B, N, heads*D]"""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)   # one matmul for q, k and v
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                cache: dict | None = None) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if cache is not None:
            # incremental decoding: new queries attend to every cached key plus their own
            if "k" in cache:
                k = torch.cat([cache["k"], k], 2)
                v = torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
            is_causal = is_causal and n > 1 and k.shape[2] == n
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.proj(merge_heads(y))


class CrossAttention(nn.Module):
    """Text queries attend to image tokens (which may have another width)."""

    def __init__(self, dim: int, context_dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, context: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        b, m, _ = context.shape
        c = x.shape[-1]
        q = split_heads(self.q(x), self.heads)
        if cache is not None and "ck" in cache:
            k, v = cache["ck"], cache["cv"]          # the image tokens' keys/values do not change
        else:
            kv = self.kv(context).view(b, m, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
            k, v = kv.unbind(0)
            if cache is not None:
                cache["ck"], cache["cv"] = k, v
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(merge_heads(y))


class EncoderBlock(nn.Module):
    """Pre-norm ViT block: x + attn(ln(x)); x + mlp(ln(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, dropout)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio), dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class DecoderBlock(nn.Module):
    """Decoder block shared by MaMMUT's two passes.

    The self-attention mask decides the pass (bidirectional + padding mask for the contrastive
    pass, causal for the generative pass); cross-attention exists only in every k-th layer and runs
    only when image tokens are given, i.e. in the generative pass.
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, dropout)
        if context_dim is not None:
            self.ln_cross = nn.LayerNorm(dim)
            self.cross_attn = CrossAttention(dim, context_dim, heads, dropout)
        else:
            self.cross_attn = None
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio), dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                context: torch.Tensor | None = None, cache: dict | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask=attn_mask, is_causal=is_causal, cache=cache)
        if self.cross_attn is not None and context is not None:
            x = x + self.cross_attn(self.ln_cross(x), context, cache=cache)
        return x + self.mlp(self.ln_2(x))
