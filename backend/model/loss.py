"""MaMMUT's training losses: symmetric contrastive (InfoNCE) + captioning cross-entropy.

Under DDP the contrastive loss sees every rank's embeddings: features are all-gathered *with*
gradients (a functional all-gather, whose backward sums every rank's gradient into the rows it
gathered), so each rank's loss covers the global batch and the gradient reaches the features
computed on every rank.

With class labels (UniCL, Yang et al. 2022) every in-batch pair of the same class is a positive:
captions made from class templates say the same thing for every image of a class, so plain InfoNCE
would push apart images and texts that match. Items without a class (label < 0) match only their
own pair.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank_sizes(n: int, device: torch.device) -> list[int]:
    """Every rank's row count: a rank whose batch lost unreadable streamed samples has fewer."""
    mine = torch.tensor([n], device=device)
    sizes = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, mine)
    return [int(s) for s in sizes]


def _all_gather_with_grad(x: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's x (one shape on all ranks), with gradients flowing back to each rank's rows (the
    functional collective: torch.distributed.nn.all_gather warns of its deprecation on every call)."""
    import torch.distributed._functional_collectives as fc

    return list(fc.all_gather_single_autograd(x, 0, dist.group.WORLD).chunk(dist.get_world_size(), 0))


def _gather_rows(x: torch.Tensor, sizes: list[int], pad: float = 0) -> torch.Tensor:
    """x of every rank, concatenated (differentiably); all_gather needs one shape on every rank,
    so rows are padded to the largest count and stripped after gathering."""
    rows = max(sizes)
    if x.shape[0] < rows:
        x = torch.cat([x, x.new_full((rows - x.shape[0], *x.shape[1:]), pad)])
    parts = _all_gather_with_grad(x.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes)], 0)


def gather_with_grad(x: torch.Tensor, sizes: list[int] | None = None) -> tuple[torch.Tensor, int]:
    """Concatenate x from all ranks (differentiably); returns (gathered, offset of this rank's rows).
    Ranks may hold different numbers of rows (`sizes`, from _rank_sizes, when already known)."""
    if not _distributed():
        return x, 0
    sizes = sizes or _rank_sizes(x.shape[0], x.device)
    return _gather_rows(x, sizes), sum(sizes[:dist.get_rank()])


def gather_labels(labels: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Class labels of the global batch (no gradient); label < 0 (no class) becomes unique."""
    if _distributed():
        labels = _gather_rows(labels, sizes or _rank_sizes(labels.shape[0], labels.device), pad=-1)
    unique = -2 - torch.arange(labels.shape[0], device=labels.device)
    return torch.where(labels < 0, unique, labels)


def class_aware_targets(labels: torch.Tensor, offset: int, n: int, sizes: list[int] | None = None) -> torch.Tensor:
    """Target distribution [n, N] of this rank's rows over the global batch: uniform over the
    items that share the row's class (always including its own pair)."""
    all_labels = gather_labels(labels, sizes)
    mine = all_labels[offset:offset + n]
    same = (mine[:, None] == all_labels[None, :]).float()
    return same / same.sum(1, keepdim=True)


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                     logit_scale: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE over the (global) batch; the i-th image matches the i-th text, and with
    `labels` (int class ids, -1 for none) also every text/image of the same class."""
    n = image_features.shape[0]
    sizes = _rank_sizes(n, image_features.device) if _distributed() else None   # one exchange for all gathers
    all_images, offset = gather_with_grad(image_features, sizes)
    all_texts, _ = gather_with_grad(text_features, sizes)
    if labels is None:
        targets = torch.arange(offset, offset + n, device=image_features.device)
    else:
        # the same-class relation is symmetric, so one target matrix serves both directions
        targets = class_aware_targets(labels.to(image_features.device), offset, n, sizes)
    logits_per_image = logit_scale * image_features @ all_texts.t()
    logits_per_text = logit_scale * text_features @ all_images.t()
    return 0.5 * (F.cross_entropy(logits_per_image.float(), targets) + F.cross_entropy(logits_per_text.float(), targets))


def caption_loss(logits: torch.Tensor, tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Next-token cross-entropy: logits [B, T-1, V] predict tokens[:, 1:]; padding is ignored.

    Under DDP the loss is normalised by the token count of the *global* batch (times the world size,
    since DDP averages gradients), so every rank-split of a batch gives the loss of the whole batch.
    """
    targets = tokens[:, 1:].reshape(-1)
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets, ignore_index=pad_id, reduction="sum")
    n_tokens = (targets != pad_id).sum().to(total.dtype)
    if _distributed():
        n_global = n_tokens.detach().clone()
        dist.all_reduce(n_global)
        return total * dist.get_world_size() / n_global.clamp_min(1.0)
    return total / n_tokens.clamp_min(1.0)


class MaMMUTLoss(nn.Module):
    def __init__(self, contrastive_weight: float = 1.0, caption_weight: float = 2.0, pad_id: int = 0):
        super().__init__()
        self.contrastive_weight = contrastive_weight
        self.caption_weight = caption_weight
        self.pad_id = pad_id

    def forward(self, outputs: dict[str, torch.Tensor], tokens: torch.Tensor,
                labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        con = contrastive_loss(outputs["image_features"], outputs["text_features"], outputs["logit_scale"], labels)
        cap = caption_loss(outputs["logits"], tokens, self.pad_id)
        total = self.contrastive_weight * con + self.caption_weight * cap
        return {"loss": total, "contrastive_loss": con.detach(), "caption_loss": cap.detach()}
