"""Evaluation metrics as pure functions on arrays: retrieval recall, the class-oracle reference,
zero-shot classification accuracy, caption BLEU-4 / CIDEr-D, and segmentation IoU, pixel accuracy
and boundary F-score.

No model here: `training.evaluate` computes embeddings, logits and captions and hands them over.

Ties in retrieval. Identical captions are common in remote-sensing caption sets (UCM repeats one
sentence across many images of a class), and identical texts get identical embeddings, so exact
ties are routine, not a corner case. Two deterministic rules, both free of item order:

- "expected" (the default): the recall a uniformly random tie-break would give on average,
  computed exactly. With b wrong items scoring strictly above the best correct item's score s,
  e wrong items and g correct items scoring exactly s, a query is a hit at K with probability
  1 - C(e, K - b) / C(e + g, K - b) (0 when K <= b; 1 when K - b > e). That is, each query adds
  this fraction of a hit. Published results break ties by whatever order a sort leaves, which this
  matches on average; and it is the rule the class-oracle reference is defined with, so a
  similarity matrix that only encodes classes scores exactly `class_oracle_mean_recall`.
- "pessimistic": ties count against the ground truth: rank = 1 + b + e, a hit when rank <= K.
  A lower bound: a constant similarity matrix scores 0 whenever K <= the number of wrong items.

Without ties both rules give the usual rank = 1 + b.

Ties in classification (`zero_shot_metrics`) are pessimistic: the true class ranks 1 + the number
of other classes scoring >= it (class prompts practically never tie).

BLEU and CIDEr are pycocoevalcap's scorers (the coco-caption reference code): `Bleu(4)` with the
"closest" reference length, and `Cider`, which is CIDEr-D (clipped n-gram counts, Gaussian length
penalty with sigma 6, x10 scale, document frequencies from the reference set being scored). Text
is tokenized here, not with its Java PTB tokenizer: lowercased, NFKC-normalised, apostrophes
dropped, then split into runs of letters and digits (all punctuation removed). A reference with no
word left ("...", "!!!") is not scored: kept, it would count as a reference nothing can match
(lowering CIDEr's mean over references and moving BLEU's closest length); an id with no reference
that has a word is a ValueError, as one with no reference at all is.
"""
from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Mapping, Sequence

import numpy as np

RECALL_KS = (1, 5, 10)


# ---- retrieval -----------------------------------------------------------------------------------
def _as_numpy(x, dtype=None) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor
        x = x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _check_retrieval_inputs(sim, text_to_image) -> tuple[np.ndarray, np.ndarray]:
    sim = _as_numpy(sim, np.float64)
    t2i = _as_numpy(text_to_image).astype(np.int64, copy=False)
    if sim.ndim != 2:
        raise ValueError(f"similarity matrix must be 2-D [n_images, n_texts], got shape {sim.shape}")
    n_images, n_texts = sim.shape
    if n_images == 0 or n_texts == 0:
        raise ValueError("empty similarity matrix: need at least one image and one text")
    if t2i.shape != (n_texts,):
        raise ValueError(f"text_to_image must have one entry per text ({n_texts}), got shape {t2i.shape}")
    if t2i.min() < 0 or t2i.max() >= n_images:
        raise ValueError(f"text_to_image holds image indices outside 0..{n_images - 1}")
    if not np.isfinite(sim).all():
        raise ValueError("similarity matrix holds NaN or infinite values")
    return sim, t2i


def retrieval_tie_counts(sim, text_to_image) -> dict[str, np.ndarray]:
    """Per query: wrong items scoring above the best correct one (b), wrong items tied with it (e),
    and correct items tied at that best score (g).

    Returns {"i2t_b", "i2t_e", "i2t_g"} over images and {"t2i_b", "t2i_e"} over texts (g is 1 for
    a text query). An image with no caption gets b = n_texts (never a hit).
    """
    sim, t2i = _check_retrieval_inputs(sim, text_to_image)
    n_images, n_texts = sim.shape
    own = np.zeros_like(sim, dtype=bool)
    own[t2i, np.arange(n_texts)] = True

    # text -> image: the caption's own image against every other image
    correct = sim[t2i, np.arange(n_texts)]                                   # [n_texts]
    t2i_b = ((sim > correct[None, :]) & ~own).sum(axis=0)
    t2i_e = ((sim == correct[None, :]) & ~own).sum(axis=0)

    # image -> text: the best of the image's captions against every caption of other images
    has_caption = own.any(axis=1)
    best = np.where(own, sim, -np.inf).max(axis=1)                          # [n_images]
    i2t_b = ((sim > best[:, None]) & ~own).sum(axis=1)
    i2t_e = ((sim == best[:, None]) & ~own).sum(axis=1)
    i2t_g = ((sim == best[:, None]) & own).sum(axis=1)
    i2t_b[~has_caption], i2t_e[~has_caption], i2t_g[~has_caption] = n_texts, 0, 0
    return {"i2t_b": i2t_b, "i2t_e": i2t_e, "i2t_g": i2t_g, "t2i_b": t2i_b, "t2i_e": t2i_e}


def _p_hit(b: np.ndarray, e: np.ndarray, g: np.ndarray, k: int) -> np.ndarray:
    """P(some of g correct items is in the top k) when b wrong items are surely ahead and the g
    correct items are shuffled uniformly with e tied wrong items: 1 - C(e, k-b) / C(e+g, k-b)."""
    slots = np.clip(k - b, 0, None).astype(np.float64)
    slots = np.minimum(slots, e + g)
    miss = np.ones(len(b), dtype=np.float64)
    for j in range(int(slots.max(initial=0))):      # C(e, s)/C(e+g, s) = prod_j (e-j)/(e+g-j)
        active = j < slots
        miss[active] *= np.clip(e[active] - j, 0, None) / (e[active] + g[active] - j)
    return np.where(g > 0, np.where(slots > 0, 1.0 - miss, 0.0), 0.0)


def retrieval_recall(sim, text_to_image, ks: Sequence[int] = RECALL_KS, ties: str = "expected") -> dict[str, float]:
    """Image-to-text and text-to-image recall@K in percent, and their mean (mR).

    sim: [n_images, n_texts] similarity (higher is better); text_to_image: [n_texts] index of each
    text's image. Standard protocol (several captions per image): an image-to-text query is a hit
    at K when ANY of the image's captions is in the top K; a text-to-image query is a hit when the
    caption's own image is in the top K. `ties`: "expected" or "pessimistic" (module docstring).

    Returns {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mean_recall"} for the
    default ks (keys follow `ks`); mean_recall is the mean of all the recalls.
    """
    if ties not in ("expected", "pessimistic"):
        raise ValueError(f"ties must be 'expected' or 'pessimistic', got {ties!r}")
    c = retrieval_tie_counts(sim, text_to_image)
    out: dict[str, float] = {}
    for direction, g in (("i2t", c["i2t_g"]), ("t2i", np.ones_like(c["t2i_b"]))):
        b, e = c[f"{direction}_b"], c[f"{direction}_e"]
        for k in ks:
            if ties == "pessimistic":
                hits = ((1 + b + e) <= k) & (g > 0)
            else:
                hits = _p_hit(b, e, g, k)
            out[f"{direction}_r{k}"] = 100.0 * float(np.mean(hits))
    out["mean_recall"] = float(np.mean(list(out.values())))
    return out


def _p_any_in_top(m: int, g: int, k: int) -> float:
    """Probability that at least one of g marked items among m, uniformly shuffled, is in the first k."""
    if g <= 0 or k <= 0:
        return 0.0
    k = min(k, m)
    return 1.0 - math.comb(m - g, k) / math.comb(m, k)


def _p_hit_grouped(n: int, m: int, g_in: int, g_out: int, k: int) -> float:
    """n items ranked as: the m same-class items in random order, then the other n - m in random
    order. g_in correct items are among the m, g_out among the rest. P(some correct item in top k)."""
    if g_in > 0:
        return _p_any_in_top(m, g_in, k)
    return _p_any_in_top(n - m, g_out, k - m)


def class_oracle_mean_recall(image_classes, text_classes, text_to_image,
                             ks: Sequence[int] = RECALL_KS) -> float:
    """Expected mean recall (percent) of a model that only knows classes.

    For every query it ranks the items of the query's class first, in uniformly random order among
    themselves, then all other items in random order. Computed in closed form: when g of the m
    same-class items are correct, P(hit at K) = 1 - C(m - g, K) / C(m, K) (no correct item among the
    first K of a random order), and by linearity the expected recall is the mean of these
    probabilities. Captions that share a class with many images cap what such a model reaches;
    a model above this value tells instances apart, not only classes.

    This equals `retrieval_recall(sim, text_to_image)["mean_recall"]` (expected tie rule) for the
    similarity matrix sim[i, t] = 1 if image i and text t share a class, else 0.
    text_classes[t] is normally the class of text t's image; any other class puts it with that class.
    """
    image_classes = list(image_classes)
    text_classes = list(text_classes)
    t2i = _as_numpy(text_to_image).astype(np.int64, copy=False)
    n_images, n_texts = len(image_classes), len(text_classes)
    if n_images == 0 or n_texts == 0:
        raise ValueError("need at least one image and one text")
    if t2i.shape != (n_texts,):
        raise ValueError(f"text_to_image must have one entry per text ({n_texts}), got shape {t2i.shape}")
    if t2i.min() < 0 or t2i.max() >= n_images:
        raise ValueError(f"text_to_image holds image indices outside 0..{n_images - 1}")

    img_count: dict = {}
    for c in image_classes:
        img_count[c] = img_count.get(c, 0) + 1
    txt_count: dict = {}
    for c in text_classes:
        txt_count[c] = txt_count.get(c, 0) + 1
    captions_of: list[list[int]] = [[] for _ in range(n_images)]
    for t, i in enumerate(t2i.tolist()):
        captions_of[i].append(t)

    recalls = []
    for k in ks:  # image -> text
        p = 0.0
        for i, c in enumerate(image_classes):
            g_in = sum(text_classes[t] == c for t in captions_of[i])
            g_out = len(captions_of[i]) - g_in
            p += _p_hit_grouped(n_texts, txt_count.get(c, 0), g_in, g_out, k)
        recalls.append(p / n_images)
    for k in ks:  # text -> image
        p = 0.0
        for t, c in enumerate(text_classes):
            same = image_classes[t2i[t]] == c
            p += _p_hit_grouped(n_images, img_count.get(c, 0), int(same), int(not same), k)
        recalls.append(p / n_texts)
    return 100.0 * float(np.mean(recalls))


# ---- classification ------------------------------------------------------------------------------
def zero_shot_metrics(logits, labels, class_names: Sequence[str] | None = None) -> dict:
    """Accuracy of class scores against labels, in percent.

    logits: [n, C] scores (higher is better); labels: [n] class indices.
    Returns {"top1", "top5" (only when C >= 5), "mean_per_class", "per_class", "confusion"}:
    per_class maps each class name (default: its index as a string) to its accuracy, or None for a
    class with no samples; mean_per_class averages the classes that have samples; confusion[i][j]
    counts samples of class i predicted as class j.

    Ties follow the module rule (against the truth): the true class ranks 1 + the number of other
    classes scoring >= it, top-K is a hit when that rank is <= K, and a sample whose true class ties
    for the best score is predicted as the lowest-index other class in the tie, so the confusion
    matrix's diagonal always equals the top-1 hits.
    """
    logits = _as_numpy(logits, np.float64)
    labels = _as_numpy(labels).astype(np.int64, copy=False)
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise ValueError(f"logits must be [n, C] with n >= 1, got shape {logits.shape}")
    n, c = logits.shape
    if labels.shape != (n,):
        raise ValueError(f"labels must have one entry per row of logits ({n}), got shape {labels.shape}")
    if labels.min() < 0 or labels.max() >= c:
        raise ValueError(f"labels hold class indices outside 0..{c - 1}")
    if not np.isfinite(logits).all():
        raise ValueError("logits hold NaN or infinite values")
    names = [str(i) for i in range(c)] if class_names is None else [str(x) for x in class_names]
    if len(names) != c:
        raise ValueError(f"{len(names)} class names for {c} classes")

    rows = np.arange(n)
    true_score = logits[rows, labels]
    others = np.ones_like(logits, dtype=bool)
    others[rows, labels] = False
    rank = 1 + ((logits >= true_score[:, None]) & others).sum(axis=1)
    pred = logits.argmax(axis=1)
    tied = (rank > 1) & (pred == labels)
    if tied.any():
        at_max = (logits == logits.max(axis=1, keepdims=True)) & others
        pred[tied] = at_max[tied].argmax(axis=1)

    out: dict = {"top1": 100.0 * float(np.mean(rank <= 1))}
    if c >= 5:
        out["top5"] = 100.0 * float(np.mean(rank <= 5))
    confusion = np.zeros((c, c), dtype=np.int64)
    np.add.at(confusion, (labels, pred), 1)
    support = confusion.sum(axis=1)
    per_class = {}
    for i, name in enumerate(names):
        per_class[name] = 100.0 * float(confusion[i, i] / support[i]) if support[i] else None
    out["mean_per_class"] = float(np.mean([v for v in per_class.values() if v is not None]))
    out["per_class"] = per_class
    out["confusion"] = confusion.tolist()
    return out


# ---- captioning ----------------------------------------------------------------------------------
_WORD = re.compile(r"[^\W_]+")


def caption_tokenize(text: str) -> str:
    """Lowercase, NFKC-normalise, drop apostrophes and punctuation; words joined by single spaces."""
    text = unicodedata.normalize("NFKC", text).lower().replace("'", "").replace("\u2019", "")
    return " ".join(_WORD.findall(text))


def scored_references(references: Sequence[str]) -> list[str]:
    """The references that BLEU and CIDEr score, as given: those with a word once tokenized (one of
    punctuation alone, "...", has no n-gram to match; module docstring)."""
    return [r for r in references if caption_tokenize(r)]


def _prepare(candidates: Mapping, references: Mapping) -> tuple[dict, dict]:
    if set(candidates) != set(references):
        missing = set(references) - set(candidates)
        extra = set(candidates) - set(references)
        raise ValueError(f"candidates and references must have the same ids "
                         f"({len(missing)} without a candidate, {len(extra)} without references)")
    if not candidates:
        raise ValueError("no captions to score")
    res, gts = {}, {}
    for key in candidates:
        refs = references[key]
        if isinstance(refs, str):
            refs = [refs]
        if not refs:
            raise ValueError(f"id {key!r} has no reference captions")
        scored = scored_references(refs)
        if not scored:
            raise ValueError(f"id {key!r} has no reference caption with a word (all punctuation or blank, "
                             f"e.g. {refs[0]!r})")
        res[key] = [caption_tokenize(candidates[key])]
        gts[key] = [caption_tokenize(r) for r in scored]
    return res, gts


def bleu4(candidates: Mapping, references: Mapping) -> float:
    """Corpus BLEU-4 (0..1) of one candidate caption per id against its references (pycocoevalcap)."""
    from pycocoevalcap.bleu.bleu import Bleu

    res, gts = _prepare(candidates, references)
    score, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return float(score[3])


def cider(candidates: Mapping, references: Mapping) -> float:
    """CIDEr-D (0..10 scale) of one candidate per id against its references (pycocoevalcap `Cider`).

    Document frequencies come from the references of all ids scored together, so a single id
    alone scores 0 (every n-gram appears in every document); score a whole set at once.
    """
    from pycocoevalcap.cider.cider import Cider

    res, gts = _prepare(candidates, references)
    score, _ = Cider().compute_score(gts, res)
    return float(score)


# ---- segmentation --------------------------------------------------------------------------------
# Label maps are integer arrays; pixels labelled < 0 in the ground truth are ignored. Confusion
# matrices are summed over a whole set before IoU is taken (the usual dataset-level IoU, not a mean
# of per-image IoUs), and a class absent from both prediction and truth has no IoU (NaN); one only
# predicted has IoU 0 and counts in the mean.

def segmentation_confusion(pred, truth, n_classes: int) -> np.ndarray:
    """[n_classes, n_classes] pixel counts, rows = true class, columns = predicted class."""
    pred, truth = np.asarray(pred).ravel(), np.asarray(truth).ravel()
    if pred.shape != truth.shape:
        raise ValueError(f"prediction has {pred.size} pixels, truth {truth.size}")
    keep = truth >= 0
    if (pred[keep] < 0).any() or (pred[keep] >= n_classes).any() or (truth[keep] >= n_classes).any():
        raise ValueError(f"labels must be in 0..{n_classes - 1}")
    return np.bincount(truth[keep] * n_classes + pred[keep], minlength=n_classes * n_classes).reshape(
        n_classes, n_classes).astype(np.int64)


def iou_per_class(confusion) -> np.ndarray:
    """IoU = TP / (TP + FP + FN) per class; NaN for a class absent from truth and prediction."""
    cm = np.asarray(confusion, np.float64)
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def mean_iou(confusion, present_only: bool = False) -> float:
    """Mean IoU over the classes that occur in truth or prediction (the standard definition: a class
    predicted where the truth never has it scores 0), or only over those in the truth (present_only,
    which lets false detections of absent classes go unpunished)."""
    cm = np.asarray(confusion)
    iou = iou_per_class(cm)
    if present_only:
        iou = iou[cm.sum(1) > 0]
    iou = iou[~np.isnan(iou)]
    return float(iou.mean()) if iou.size else float("nan")


def pixel_accuracy(confusion) -> float:
    cm = np.asarray(confusion)
    total = cm.sum()
    return float(np.trace(cm) / total) if total else float("nan")


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels of a boolean mask with a 4-neighbour outside it (image edges do not count)."""
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Square dilation by `radius` pixels (Chebyshev distance): a pixel is set when a set pixel lies
    within `radius` rows and `radius` columns of it. Separable, by running sums along each axis, so
    time and memory do not grow with `radius` (a radius past the mask's side sets every pixel of a
    mask with any set pixel)."""
    out = np.asarray(mask, bool)
    if radius <= 0:
        return out.copy()
    for axis in (0, 1):
        out = _dilate_axis(out, radius, axis)
    return out


def _dilate_axis(mask: np.ndarray, radius: int, axis: int) -> np.ndarray:
    """1-D dilation of each line of `mask` along `axis`: any set pixel within `radius` of it."""
    n = mask.shape[axis]
    counts = np.cumsum(mask, axis=axis, dtype=np.int64)
    counts = np.concatenate([np.zeros_like(np.take(counts, [0], axis=axis)), counts], axis=axis)
    i = np.arange(n)
    high = np.take(counts, np.minimum(i + radius + 1, n), axis=axis)
    low = np.take(counts, np.maximum(i - radius, 0), axis=axis)
    return high > low


def class_boundary_counts(pred: np.ndarray, truth: np.ndarray, n: int, tolerance: int) -> np.ndarray:
    """boundary_counts for every class of a label map, [n, 4]: of the classes in the truth and of those
    only predicted (their false boundaries count against their precision). Truth pixels < 0 are
    ignored, as in segmentation_confusion: what is predicted there is not scored, and the edge of an
    ignored region is no boundary (like the image's edge), for the truth and the prediction alike."""
    pred, truth = np.asarray(pred), np.asarray(truth)
    ignored = truth < 0
    out = np.zeros((n, 4), np.int64)
    classes = set(np.unique(truth[~ignored]).tolist()) | set(np.unique(pred[~ignored]).tolist())
    for c in sorted(c for c in classes if c >= 0):
        # ignored pixels join the class's mask, so only a scored neighbour of another class makes a boundary
        tb = _boundary((truth == c) | ignored) & (truth == c)
        pb = _boundary((pred == c) | ignored) & (pred == c) & ~ignored
        out[c] += _match_counts(pb, tb, tolerance)
    return out


def boundary_counts(pred_mask, truth_mask, tolerance: int) -> tuple[int, int, int, int]:
    """(matched predicted boundary px, predicted boundary px, matched true boundary px, true boundary
    px): a boundary pixel is matched when the other boundary lies within `tolerance` pixels."""
    return _match_counts(_boundary(np.asarray(pred_mask, bool)), _boundary(np.asarray(truth_mask, bool)), tolerance)


def _match_counts(pb: np.ndarray, tb: np.ndarray, tolerance: int) -> tuple[int, int, int, int]:
    """boundary_counts' four numbers from the predicted and true boundary pixels."""
    return (int((pb & _dilate(tb, tolerance)).sum()), int(pb.sum()),
            int((tb & _dilate(pb, tolerance)).sum()), int(tb.sum()))


def boundary_f_score(counts) -> float:
    """F1 of boundary precision and recall from summed boundary_counts; NaN without true boundary."""
    mp, p, mt, t = counts
    if t == 0:
        return float("nan")
    precision = mp / p if p else 0.0
    recall = mt / t
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0
