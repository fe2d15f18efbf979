"""MaMMUT's text decoder: ONE decoder used in two passes.

- Contrastive pass: bidirectional self-attention with padding masked, no cross-attention; token
  states are mean-pooled over real tokens and projected to the joint space.
- Generative pass: causal self-attention plus cross-attention to the image tokens in every k-th
  layer; next-token logits through the (tied) token embedding.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import MaMMUTConfig
from .layers import DecoderBlock


class TextDecoder(nn.Module):
    def __init__(self, cfg: MaMMUTConfig):
        super().__init__()
        self.pad_id = cfg.pad_id
        self.context_length = cfg.context_length
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.text_width)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.context_length, cfg.text_width))
        k = cfg.cross_attn_every
        self.blocks = nn.ModuleList(
            DecoderBlock(
                cfg.text_width, cfg.text_heads,
                context_dim=cfg.vision_width if (i + 1) % k == 0 else None,
                mlp_ratio=cfg.mlp_ratio, dropout=cfg.dropout,
            )
            for i in range(cfg.text_layers)
        )
        self.ln_final = nn.LayerNorm(cfg.text_width)
        self.text_proj = nn.Linear(cfg.text_width, cfg.embed_dim, bias=False)
        self.grad_checkpointing = False

    def _embed(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        t = start + tokens.shape[1]
        if t > self.context_length:
            raise ValueError(f"token sequence of length {t} is longer than the context length {self.context_length}")
        return self.token_embed(tokens) + self.pos_embed[:, start:t]

    def _run(self, x: torch.Tensor, caches: list[dict] | None = None, **kw) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            if caches is not None:
                x = block(x, cache=caches[i], **kw)
            elif self.grad_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False, **kw)
            else:
                x = block(x, **kw)
        return self.ln_final(x)

    def contrastive(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] -> text embedding [B, embed_dim] (not normalised)."""
        keep = tokens != self.pad_id                                   # [B, T]
        attn_mask = keep[:, None, None, :]                            # pads are never attended to
        x = self._run(self._embed(tokens), attn_mask=attn_mask)
        w = keep.unsqueeze(-1).to(x.dtype)
        pooled = (x * w).sum(1) / w.sum(1).clamp_min(1.0)
        return self.text_proj(pooled)

    def generative(self, tokens: torch.Tensor, image_tokens: torch.Tensor, caches: list[dict] | None = None,
                   start: int = 0) -> torch.Tensor:
        """tokens [B, T], image tokens [B, N, C] -> next-token logits [B, T, vocab].

        For step-by-step decoding pass `caches` (one dict per block, empty at first) and the position
        `start` of `tokens`: keys and values of earlier steps are reused instead of recomputed.
        """
        x = self._run(self._embed(tokens, start), caches=caches, is_causal=True, context=image_tokens)
        return x @ self.token_embed.weight.t()                        # tied output embedding

    def new_caches(self) -> list[dict]:
        return [{} for _ in self.blocks]
