"""Image-only classifiers on a checkpoint's embeddings: what its image tower allows.

Zero-shot classification scores images against class-name prompts, so a low number can come from
either side: text embeddings that point the wrong way, or image embeddings that do not separate
the classes. These classifiers use no text at all. They learn each class from the embeddings of
labelled training images (the images the checkpoint trained on, for its own recipe's split) and
classify held-out images:

- nearest class centroid: the mean of a class's normalised training embeddings, re-normalised,
  is what an ideal class prompt could at best be for a cosine classifier;
- k nearest neighbours: a cosine-weighted vote of the k most similar training images;
- linear probe: multinomial logistic regression on the embeddings (as CLIP reports it), its L2
  weight picked on a held-out fifth of the training embeddings.

When zero-shot is as good as all three, better prompts or a better text tower cannot lift it much:
the image embeddings are the bound (`python -m training.evaluate probe`).

`class_search_precision` is the same question for search: rank the held-out images by one
embedding per class and count the class's images in the top 10, as the search benchmark does on
its mosaics.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .metrics import zero_shot_metrics

L2_GRID: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2)


def _labels(y, n_classes: int) -> torch.Tensor:
    y = torch.as_tensor(np.asarray(y), dtype=torch.long)
    if y.ndim != 1 or (len(y) and (int(y.min()) < 0 or int(y.max()) >= n_classes)):
        raise ValueError(f"labels must be class numbers 0..{n_classes - 1}")
    return y


def class_centroids(train_emb: torch.Tensor, train_y, n_classes: int) -> torch.Tensor:
    """[C, E]: per class, the mean of its normalised embeddings, re-normalised. Every class needs one."""
    y = _labels(train_y, n_classes)
    counts = torch.bincount(y, minlength=n_classes)
    if bool((counts == 0).any()):
        missing = [int(c) for c in torch.nonzero(counts == 0).flatten()]
        raise ValueError(f"classes {missing} have no training images")
    sums = torch.zeros(n_classes, train_emb.shape[1], dtype=torch.float32)
    sums.index_add_(0, y, F.normalize(train_emb.float(), dim=-1))
    return F.normalize(sums, dim=-1)


def knn_scores(train_emb: torch.Tensor, train_y, test_emb: torch.Tensor, n_classes: int, k: int) -> torch.Tensor:
    """[N, C] votes: for each test embedding, the summed cosine similarity of its k most similar
    training embeddings, per class (the weights break ties that a plain count would leave)."""
    if k < 1:
        raise ValueError("k must be at least 1")
    y = _labels(train_y, n_classes)
    sims = F.normalize(test_emb.float(), dim=-1) @ F.normalize(train_emb.float(), dim=-1).T
    top = sims.topk(min(k, sims.shape[1]), dim=1)
    votes = torch.zeros(len(test_emb), n_classes)
    votes.scatter_add_(1, y[top.indices], top.values)
    return votes


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float, max_iter: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.zeros(x.shape[1], n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def _features(emb: torch.Tensor) -> torch.Tensor:
    # unit embeddings have tiny coordinates (about 1/sqrt(E)); scaling them up keeps the L2 grid's
    # meaning the same for any embedding width
    return F.normalize(emb.float(), dim=-1) * emb.shape[1] ** 0.5


def linear_probe(train_emb: torch.Tensor, train_y, test_emb: torch.Tensor, n_classes: int,
                 l2_grid: Sequence[float] = L2_GRID, seed: int = 0, max_iter: int = 300
                 ) -> tuple[torch.Tensor, float]:
    """Multinomial logistic regression: ([N, C] logits of test_emb, the L2 weight chosen).

    With more than one L2 weight, each is fitted on four fifths of the training embeddings (split
    per class, seeded) and scored on the rest; the best (ties: the larger weight) is refitted on all."""
    y = _labels(train_y, n_classes)
    x = _features(train_emb)
    grid = sorted(set(float(v) for v in l2_grid))
    if not grid or grid[0] < 0:
        raise ValueError("the L2 grid needs one or more weights >= 0")
    best = grid[0]
    if len(grid) > 1:
        gen = torch.Generator().manual_seed(seed)
        hold = torch.zeros(len(y), dtype=torch.bool)
        for c in range(n_classes):
            idx = torch.nonzero(y == c).flatten()
            idx = idx[torch.randperm(len(idx), generator=gen)]
            hold[idx[: len(idx) // 5]] = True
        if bool(hold.any()) and bool((~hold).any()):
            scores = []
            for l2 in grid:
                w, b = _fit_logistic(x[~hold], y[~hold], n_classes, l2, max_iter)
                scores.append(float(((x[hold] @ w + b).argmax(1) == y[hold]).float().mean()))
            best = max(zip(scores, grid))[1]
    w, b = _fit_logistic(x, y, n_classes, best, max_iter)
    return _features(test_emb) @ w + b, best


def top1(scores: torch.Tensor, labels) -> float:
    """Percent of rows whose true class scores highest; a tie with another class is a miss, the rule
    of every accuracy this package reports (`training.metrics.zero_shot_metrics`)."""
    return zero_shot_metrics(scores, labels)["top1"]


def class_search_precision(class_emb: torch.Tensor, test_emb: torch.Tensor, test_y, k: int = 10) -> dict:
    """Rank the test images by each class's embedding (one query per class); the precision of each
    class's top k, in [0, 1], and their mean over the classes that have test images. {"mean", "per_class"}"""
    test_y = np.asarray(test_y)
    sims = F.normalize(class_emb.float(), dim=-1) @ F.normalize(test_emb.float(), dim=-1).T
    kk = min(k, sims.shape[1])
    top = sims.topk(kk, dim=1).indices.numpy()
    per_class = [float((test_y[top[c]] == c).sum()) / kk if (test_y == c).any() else None
                 for c in range(len(class_emb))]
    present = [p for p in per_class if p is not None]
    return {"mean": float(np.mean(present)) if present else None, "per_class": per_class}
