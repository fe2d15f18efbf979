"""MaMMUT: a ViT image encoder and ONE text decoder used in a contrastive and a generative pass.

Public surface (open_clip naming): `encode_image`, `encode_text`, `logit_scale`, plus `caption` for
the generative pass and `sao_relevance_map` for dense text-image relevance (see `sao.py`).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from .config import MaMMUTConfig
from .sao import cosine_map, sao_pool
from .text import TextDecoder
from .views import dihedral_views
from .vision import AttentionPool, VisionTransformer, resize_pos_embed


class MaMMUT(nn.Module):
    def __init__(self, cfg: MaMMUTConfig):
        super().__init__()
        self.config = cfg
        self.visual = VisionTransformer(cfg)
        self.attn_pool = AttentionPool(cfg.vision_width, cfg.vision_heads, cfg.embed_dim)
        self.text = TextDecoder(cfg)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        self.register_buffer("image_mean", torch.tensor(cfg.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(cfg.image_std).view(1, 3, 1, 1), persistent=False)
        self.apply(self._init_weights)
        nn.init.normal_(self.visual.pos_embed, std=0.02)
        nn.init.normal_(self.text.pos_embed, std=0.01)
        nn.init.normal_(self.attn_pool.query, std=0.02)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def set_image_size(self, image_size: int) -> None:
        """Make `image_size` the resolution this model records, serves and evaluates at.

        The position embedding is resampled to the new patch grid once, here, so the model computes
        exactly what it computed at that size before (the forward pass resamples the same way when
        an input does not match the stored grid); the config, and with it the checkpoint, then says
        which resolution the backend tiles at.
        """
        cfg = dataclasses.replace(self.config, image_size=int(image_size))   # validates the size
        grid = cfg.grid_size
        with torch.no_grad():
            resized = resize_pos_embed(self.visual.pos_embed.data, grid)
        self.visual.pos_embed = nn.Parameter(resized.contiguous(), requires_grad=self.visual.pos_embed.requires_grad)
        self.config = cfg

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.visual.grad_checkpointing = enabled
        self.text.grad_checkpointing = enabled

    # ---- inputs -------------------------------------------------------------------------------
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] (0..255) or float (0..1) -> normalised float input for `encode_image`."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        # in the model's own dtype: a checkpoint loaded in fp16 or bf16 takes its input as it is
        return ((x.to(self.image_mean.device) - self.image_mean) / self.image_std).to(self.image_mean.dtype)

    # ---- contrastive pass -----------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor, normalize: bool = True, views: int = 1) -> torch.Tensor:
        """Normalised images [B, 3, H, W] -> image embeddings [B, embed_dim]. views > 1: the mean of
        the normalised embeddings of that many flips / rotations of each image (`views.py`), normalised."""
        if views != 1 and not normalize:
            raise ValueError("embeddings of several views are averaged after normalising; use normalize=True")
        return self._pool_views(self._view_tokens(images, views), images.shape[0], views, normalize)

    def _view_tokens(self, images: torch.Tensor, views: int) -> torch.Tensor:
        """The image tower's tokens of each view (`dihedral_views` order: view 0, the image as it is, first)."""
        return self.visual(dihedral_views(images, views) if views != 1 else images)

    def _pool_views(self, image_tokens: torch.Tensor, b: int, views: int, normalize: bool = True) -> torch.Tensor:
        """Embeddings of `b` images from their views' tokens: the mean of the views' normalised
        embeddings, normalised again (views > 1 are always normalised)."""
        x = self.attn_pool(image_tokens)
        if views == 1 and not normalize:
            return x
        # normalised in fp32: under bf16 autocast a bf16 norm is off by up to ~0.5%
        per_view = F.normalize(x.float(), dim=-1)
        return per_view if views == 1 else F.normalize(per_view.view(views, b, -1).mean(0), dim=-1)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Token ids [B, T] (<bos> ... <eos> <pad>...) -> text embeddings [B, embed_dim]."""
        x = self.text.contrastive(tokens)
        return F.normalize(x.float(), dim=-1) if normalize else x

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Both passes for training: embeddings for the contrastive loss, logits for captioning."""
        image_tokens = self.visual(images)
        return {
            "image_features": F.normalize(self.attn_pool(image_tokens), dim=-1),
            "text_features": F.normalize(self.text.contrastive(tokens), dim=-1),
            "logits": self.text.generative(tokens[:, :-1], image_tokens),
            "logit_scale": self.logit_scale.clamp(max=self.config.max_logit_scale).exp(),
        }

    # ---- dense path (SAO) -------------------------------------------------------------------
    def sao_embeddings(self, images: torch.Tensor, window: int, gaussian: bool = False,
                       sigma: float | None = None) -> torch.Tensor:
        """Normalised images [B, 3, H, W] -> L2-normalised joint-space embeddings [B, G, G, embed_dim]."""
        tokens = self.visual(images)
        grid = images.shape[-1] // self.config.patch_size
        scores, values = self.attn_pool.scores_and_values(tokens)
        pooled = sao_pool(scores, values, grid, window, gaussian=gaussian, sigma=sigma)
        return F.normalize(self.attn_pool.project(pooled.to(values.dtype)).float(), dim=-1)

    def sao_relevance_map(self, images: torch.Tensor, text_embeddings: torch.Tensor, window: int,
                          gaussian: bool = False, sigma: float | None = None) -> torch.Tensor:
        """Cosine similarity of every position's SAO embedding to each text embedding.

        images [B, 3, H, W]; text_embeddings [T, E] or [B, T, E], L2-normalised.
        Returns [B, T, G, G] with G = H / patch_size.
        """
        dense = self.sao_embeddings(images, window, gaussian=gaussian, sigma=sigma)
        return cosine_map(dense, text_embeddings.float())

    # ---- generative pass --------------------------------------------------------------------
    def caption_log_likelihood(self, image_tokens: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Mean log-probability per token of each caption given its image: image_tokens [B, P, D]
        (`self.visual(images)`), tokens [B, T] (<bos> ... <eos> <pad>...). Returns [B]; it is minus the
        captioning loss of each pair, so it scores how well a caption describes an image."""
        logits = self.text.generative(tokens[:, :-1], image_tokens)
        targets = tokens[:, 1:]
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None])[..., 0]
        mask = (targets != self.config.pad_id).float()
        return (logp * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    @torch.no_grad()
    def caption(self, images: torch.Tensor, max_len: int = 30, beam_size: int = 1,
                with_ended: bool = False) -> list[list[int]] | list[tuple[list[int], bool]]:
        """Token ids of a caption for each normalised image (without <bos>/<eos>/<pad>).

        Greedy for beam_size 1, else beam search with length-normalised log-probabilities.
        `with_ended` gives (ids, ended) pairs instead: `ended` says the model generated an <eos>
        after the ids (False for a caption cut at the step limit).
        """
        captions = self._generate(self.visual(images), max_len, beam_size)
        return captions if with_ended else [ids for ids, _ in captions]

    def encode_image_and_caption(self, images: torch.Tensor, max_len: int = 30,
                                 views: int = 1) -> tuple[torch.Tensor, list[list[int]]]:
        """encode_image(images, views=views) and a greedy caption of each image (as `caption` gives),
        from one pass of the image tower: indexing needs both, and the tower is most of the work.
        The caption reads the image as it is (view 0 of `dihedral_views`)."""
        b = images.shape[0]
        image_tokens = self._view_tokens(images, views)
        return self._pool_views(image_tokens, b, views), [ids for ids, _ in self._generate(image_tokens[:b], max_len, 1)]

    def _generate(self, image_tokens: torch.Tensor, max_len: int, beam_size: int) -> list[tuple[list[int], bool]]:
        """(ids, ended) of a caption for each image's tokens: greedy, or beam search."""
        cfg = self.config
        max_len = max(1, min(max_len, cfg.context_length - 1))
        b = image_tokens.shape[0]
        if beam_size <= 1:
            seqs = torch.full((b, 1), cfg.bos_id, dtype=torch.long, device=image_tokens.device)
            done = torch.zeros(b, dtype=torch.bool, device=image_tokens.device)
            caches = self.text.new_caches()
            for _ in range(max_len):
                nxt = self._next_token_logits(seqs, image_tokens, caches).argmax(-1)
                nxt = torch.where(done, torch.full_like(nxt, cfg.pad_id), nxt)
                seqs = torch.cat([seqs, nxt[:, None]], 1)
                done |= nxt == cfg.eos_id
                if bool(done.all()):
                    break
            return [self._strip(s) for s in seqs.tolist()]
        return self._beam_search(image_tokens, max_len, beam_size)

    def _next_token_logits(self, seqs: torch.Tensor, image_tokens: torch.Tensor, caches: list[dict]) -> torch.Tensor:
        """Logits for the token after `seqs`; `caches` already hold every position but the last."""
        start = seqs.shape[1] - 1
        logits = self.text.generative(seqs[:, start:], image_tokens, caches=caches, start=start)[:, -1].float()
        # <bos> and <pad> are never generated (a finished caption is padded explicitly)
        logits[:, [self.config.bos_id, self.config.pad_id]] = float("-inf")
        return logits

    def _strip(self, ids: list[int]) -> tuple[list[int], bool]:
        """(the generated ids after <bos> up to <eos> or <pad>, whether an <eos> ended them)."""
        cfg = self.config
        out = []
        for t in ids[1:]:
            if t in (cfg.eos_id, cfg.pad_id):
                return out, t == cfg.eos_id
            out.append(t)
        return out, False

    def _beam_search(self, image_tokens: torch.Tensor, max_len: int, beam: int) -> list[tuple[list[int], bool]]:
        cfg = self.config
        b, dev = image_tokens.shape[0], image_tokens.device
        ctx = image_tokens.repeat_interleave(beam, 0)
        seqs = torch.full((b * beam, 1), cfg.bos_id, dtype=torch.long, device=dev)
        scores = torch.full((b, beam), float("-inf"), device=dev)
        scores[:, 0] = 0.0                                     # start from one live beam per image
        lengths = torch.zeros(b * beam, device=dev)
        done = torch.zeros(b * beam, dtype=torch.bool, device=dev)
        caches = self.text.new_caches()
        for _ in range(max_len):
            logp = self._next_token_logits(seqs, ctx, caches).log_softmax(-1)     # [b*beam, V]
            v = logp.shape[-1]
            # a finished beam continues only with <pad>, at no cost, so it keeps its score
            frozen = torch.full_like(logp, float("-inf"))
            frozen[:, cfg.pad_id] = 0.0
            logp = torch.where(done[:, None], frozen, logp)
            cand = (scores.view(-1, 1) + logp).view(b, beam * v)
            top, idx = cand.topk(beam, dim=-1)
            src = (idx // v) + torch.arange(b, device=dev)[:, None] * beam        # [b, beam] flat beam ids
            tok = (idx % v).view(-1)
            src = src.view(-1)
            seqs = torch.cat([seqs[src], tok[:, None]], 1)
            for cache in caches:                                # beams were reordered: so are their keys
                cache["k"], cache["v"] = cache["k"][src], cache["v"][src]
            was_done = done[src]
            done = was_done | (tok == cfg.eos_id)
            lengths = lengths[src] + (~was_done).float()     # counts real tokens and the <eos>
            scores = top
            if bool(done.all()):
                break
        norm = scores / lengths.view(b, beam).clamp_min(1.0)
        best = norm.argmax(-1) + torch.arange(b, device=dev) * beam
        return [self._strip(seqs[i].tolist()) for i in best.tolist()]
