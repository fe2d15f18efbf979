"""Test-time views of overhead images: the same scene turned and mirrored.

An aerial or satellite image has no "up": a harbour seen rotated by 90 degrees is still a harbour,
and the model trained on all eight flips and rotations of its images. Averaging the embeddings of
several such views of a tile gives an embedding that no longer depends on which way the tile happens
to face. It scores a little better on most measures of the model card (README: the "Index views"
table there, and under "Run the backend"), at the cost of one encoder pass per view.
"""
from __future__ import annotations

import torch

from ..defaults import VIEW_COUNTS, VIEW_HELP, check_views


def dihedral_views(images: torch.Tensor, views: int) -> torch.Tensor:
    """[B, C, H, W] square images -> [views * B, C, H, W]: view v of image b at row v * B + b."""
    check_views(views)
    turns = range(4) if views >= 4 else range(1)
    mirrors = (False, True) if views in (2, 8) else (False,)
    out = []
    for k in turns:
        turned = torch.rot90(images, k, (-2, -1)) if k else images
        out += [turned.flip(-1) if mirror else turned for mirror in mirrors]
    return torch.cat(out)


__all__ = ["VIEW_COUNTS", "VIEW_HELP", "check_views", "dihedral_views"]
