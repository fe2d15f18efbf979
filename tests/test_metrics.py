"""Evaluation metrics on hand-made cases with known answers."""
from __future__ import annotations

import itertools
from fractions import Fraction

import numpy as np
import pytest

from training.metrics import (
    bleu4,
    caption_tokenize,
    cider,
    class_oracle_mean_recall,
    retrieval_recall,
    retrieval_tie_counts,
    zero_shot_metrics,
)

KEYS = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mean_recall"]


def own_matrix(text_to_image, n_images):
    own = np.zeros((n_images, len(text_to_image)))
    own[text_to_image, np.arange(len(text_to_image))] = 1.0
    return own


# ---- retrieval -----------------------------------------------------------------------------------
def test_perfect_similarity_scores_100_everywhere():
    t2i = np.repeat(np.arange(12), 5)              # 12 images x 5 captions
    out = retrieval_recall(own_matrix(t2i, 12), t2i)
    assert list(out) == KEYS
    assert all(v == 100.0 for v in out.values())


@pytest.mark.parametrize("ties", ["expected", "pessimistic"])
def test_reversed_similarity_scores_0_below_the_number_of_wrong_items(ties):
    t2i = np.arange(12)                             # the correct item is always ranked last of 12
    out = retrieval_recall(-own_matrix(t2i, 12), t2i, ks=(1, 5, 10, 11, 12), ties=ties)
    for d in ("i2t", "t2i"):
        assert out[f"{d}_r1"] == out[f"{d}_r5"] == out[f"{d}_r10"] == out[f"{d}_r11"] == 0.0
        assert out[f"{d}_r12"] == 100.0


def test_known_ranks_without_ties():
    # 4 images, one caption each; the correct caption/image lands at ranks known by construction
    sim = np.array([
        [0.9, 0.1, 0.15, 0.3],  # image 0: its caption 0 is 1st         -> i2t rank 1
        [0.8, 0.7, 0.6, 0.5],   # image 1: caption 1 is 2nd (0.8 ahead)  -> i2t rank 2
        [0.4, 0.3, 0.2, 0.1],   # image 2: caption 2 is 3rd              -> i2t rank 3
        [0.5, 0.6, 0.7, 0.0],   # image 3: caption 3 is 4th              -> i2t rank 4
    ])
    # text -> image, per column: caption 0 -> image 0 is 1st (0.9); caption 1 -> image 1 is 1st (0.7);
    # caption 2 -> image 2 (0.2) behind 0.6 and 0.7 -> 3rd; caption 3 -> image 3 (0.0) is 4th
    out = retrieval_recall(sim, np.arange(4), ks=(1, 2, 3))
    assert out["i2t_r1"] == 25.0 and out["i2t_r2"] == 50.0 and out["i2t_r3"] == 75.0
    assert out["t2i_r1"] == 50.0 and out["t2i_r2"] == 50.0 and out["t2i_r3"] == 75.0
    assert out["mean_recall"] == pytest.approx(np.mean([25, 50, 75, 50, 50, 75]))


def test_image_to_text_is_a_hit_when_any_of_five_captions_is_in_the_top_k():
    n_images = 12
    t2i = np.repeat(np.arange(n_images), 5)
    rng = np.random.default_rng(0)
    sim = rng.uniform(0.0, 0.5, size=(n_images, len(t2i)))
    # every image's captions score low, except ONE of its five (a different one per image) on top
    sim[t2i, np.arange(len(t2i))] = -1.0
    sim[np.arange(n_images), np.arange(n_images) * 5 + np.arange(n_images) % 5] = 1.0
    out = retrieval_recall(sim, t2i)
    assert out["i2t_r1"] == 100.0
    # text->image: only the 12 top captions find their image; the other 48 rank it last (12th)
    assert out["t2i_r1"] == pytest.approx(100 * 12 / 60)
    assert out["t2i_r10"] == pytest.approx(100 * 12 / 60)


def test_constant_similarity_expected_and_pessimistic_tie_rules():
    t2i = np.arange(3)
    sim = np.zeros((3, 3))
    expected = retrieval_recall(sim, t2i, ks=(1, 2, 3))
    assert expected["i2t_r1"] == pytest.approx(100 / 3) and expected["t2i_r1"] == pytest.approx(100 / 3)
    assert expected["i2t_r2"] == pytest.approx(200 / 3) and expected["t2i_r3"] == 100.0
    pessimistic = retrieval_recall(sim, t2i, ks=(1, 2, 3), ties="pessimistic")
    assert pessimistic["i2t_r1"] == pessimistic["i2t_r2"] == pessimistic["t2i_r2"] == 0.0
    assert pessimistic["i2t_r3"] == pessimistic["t2i_r3"] == 100.0


def test_identical_captions_tie_and_the_expected_rule_counts_the_random_tie_break():
    # image 0 has captions 0, 1; image 1 has captions 2, 3. Caption 1 and caption 2 are the same
    # sentence (same embedding), which image 0 likes best; caption 0 and 3 score low for image 0.
    sim = np.array([[0.1, 0.9, 0.9, 0.0],
                    [0.2, 0.3, 0.3, 0.8]])
    counts = retrieval_tie_counts(sim, [0, 0, 1, 1])
    assert counts["i2t_b"].tolist() == [0, 0] and counts["i2t_e"].tolist() == [1, 0]
    assert counts["i2t_g"].tolist() == [1, 1]
    out = retrieval_recall(sim, [0, 0, 1, 1], ks=(1, 2))
    assert out["i2t_r1"] == pytest.approx(100 * (0.5 + 1) / 2)   # image 0: a coin flip at K = 1
    assert out["i2t_r2"] == 100.0
    pess = retrieval_recall(sim, [0, 0, 1, 1], ks=(1, 2), ties="pessimistic")
    assert pess["i2t_r1"] == 50.0 and pess["i2t_r2"] == 100.0
    # two correct captions tied with two wrong ones at the top: 1 - C(2,1)/C(4,1) = 1/2 at K = 1
    sim2 = np.array([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    assert retrieval_recall(sim2, [0, 0, 1, 1], ks=(1,))["i2t_r1"] == pytest.approx(100 * (0.5 + 1) / 2)


def test_expected_tie_rule_is_the_average_over_every_tie_break():
    rng = np.random.default_rng(3)
    sim = rng.integers(0, 3, size=(3, 5)).astype(float)      # many exact ties
    t2i = np.array([0, 0, 1, 2, 2])
    ks = (1, 2, 3, 4)
    got = retrieval_recall(sim, t2i, ks=ks)
    eps = 1e-3
    i2t = [retrieval_recall(sim + eps * np.array(p)[None, :], t2i, ks=ks, ties="pessimistic")
           for p in itertools.permutations(range(5))]           # every order of the texts
    t2i_runs = [retrieval_recall(sim + eps * np.array(p)[:, None], t2i, ks=ks, ties="pessimistic")
                for p in itertools.permutations(range(3))]      # every order of the images
    for k in ks:
        assert got[f"i2t_r{k}"] == pytest.approx(np.mean([r[f"i2t_r{k}"] for r in i2t]))
        assert got[f"t2i_r{k}"] == pytest.approx(np.mean([r[f"t2i_r{k}"] for r in t2i_runs]))


def test_retrieval_rejects_bad_input():
    with pytest.raises(ValueError, match="one entry per text"):
        retrieval_recall(np.zeros((2, 3)), [0, 1])
    with pytest.raises(ValueError, match="outside"):
        retrieval_recall(np.zeros((2, 2)), [0, 2])
    with pytest.raises(ValueError, match="NaN"):
        retrieval_recall(np.full((2, 2), np.nan), [0, 1])
    with pytest.raises(ValueError, match="ties"):
        retrieval_recall(np.eye(2), [0, 1], ties="optimistic")


# ---- class oracle --------------------------------------------------------------------------------
def brute_force_oracle(image_classes, text_classes, t2i, ks):
    """Average hit over every ordering that puts the query's class first (exact fractions)."""
    n_i, n_t = len(image_classes), len(text_classes)
    recalls = []

    def grouped_orders(n, item_class, query_class):
        for order in itertools.permutations(range(n)):
            same = [item_class[x] == query_class for x in order]
            if same == sorted(same, reverse=True):              # all same-class items come first
                yield order

    for k in ks:
        total = Fraction(0)
        for i in range(n_i):
            orders = list(grouped_orders(n_t, text_classes, image_classes[i]))
            total += Fraction(sum(any(t2i[t] == i for t in o[:k]) for o in orders), len(orders))
        recalls.append(total / n_i)
    for k in ks:
        total = Fraction(0)
        for t in range(n_t):
            orders = list(grouped_orders(n_i, image_classes, text_classes[t]))
            total += Fraction(sum(t2i[t] in o[:k] for o in orders), len(orders))
        recalls.append(total / n_t)
    return float(100 * sum(recalls) / len(recalls))


@pytest.mark.parametrize("ks", [(1, 2, 3), (1, 5, 10)])
def test_class_oracle_matches_exhaustive_enumeration(ks):
    image_classes = ["a", "a", "b"]
    t2i = np.array([0, 0, 1, 2, 2])                   # captions: 2, 1 and 2 per image
    text_classes = [image_classes[i] for i in t2i]
    got = class_oracle_mean_recall(image_classes, text_classes, t2i, ks)
    assert got == pytest.approx(brute_force_oracle(image_classes, text_classes, t2i, ks))
    # and it is what the expected tie rule gives a similarity matrix that only encodes classes
    sim = (np.array(image_classes)[:, None] == np.array(text_classes)[None, :]).astype(float)
    assert got == pytest.approx(retrieval_recall(sim, t2i, ks)["mean_recall"])


def test_class_oracle_hand_value_and_odd_text_classes():
    # (1, 2, 3): i2t: image 0 finds one of its 2 captions among 3 "a" captions at K=1 w.p. 2/3, image 1
    # (1 of 3) w.p. 1/3, image 2 surely; t2i: "a" captions pick 1 of 2 "a" images at K=1 w.p. 1/2.
    image_classes, t2i = ["a", "a", "b"], np.array([0, 0, 1, 2, 2])
    i2t = [(Fraction(2, 3) + Fraction(1, 3) + 1) / 3, (1 + Fraction(2, 3) + 1) / 3, Fraction(1)]
    t2i_r = [(Fraction(1, 2) * 3 + 2) / 5, Fraction(1), Fraction(1)]
    hand = float(100 * (sum(i2t) + sum(t2i_r)) / 6)
    assert class_oracle_mean_recall(image_classes, ["a", "a", "a", "b", "b"], t2i, (1, 2, 3)) == pytest.approx(hand)
    # a caption whose class differs from its image's class is ranked with that other class
    odd = ["a", "b", "a", "b", "a"]
    assert class_oracle_mean_recall(image_classes, odd, t2i, (1, 2, 3)) == pytest.approx(
        brute_force_oracle(image_classes, odd, t2i, (1, 2, 3)))


def test_class_oracle_of_one_class_is_chance():
    # 20 images of one class, one caption each: a random order, so R@K = K / 20
    t2i = np.arange(20)
    got = class_oracle_mean_recall(["x"] * 20, ["x"] * 20, t2i)
    assert got == pytest.approx(100 * np.mean([1 / 20, 5 / 20, 10 / 20]))


# ---- classification ------------------------------------------------------------------------------
def test_zero_shot_confusion_on_known_logits():
    logits = np.array([
        [3.0, 1.0, 0.0],   # class 0 -> 0
        [2.0, 1.0, 0.0],   # class 1 -> 0
        [0.0, 5.0, 1.0],   # class 1 -> 1
        [0.0, 1.0, 2.0],   # class 2 -> 2
        [1.0, 0.0, 0.5],   # class 2 -> 0
    ])
    out = zero_shot_metrics(logits, [0, 1, 1, 2, 2], ["grass", "field", "river"])
    assert out["top1"] == pytest.approx(60.0)
    assert "top5" not in out                      # fewer than 5 classes
    assert out["confusion"] == [[1, 0, 0], [1, 1, 0], [1, 0, 1]]
    assert out["per_class"] == {"grass": 100.0, "field": 50.0, "river": 50.0}
    assert out["mean_per_class"] == pytest.approx(200 / 3)


def test_zero_shot_top5_empty_class_and_ties():
    logits = np.tile(np.arange(6, dtype=float), (3, 1))   # every row prefers 5, 4, 3, 2, 1, 0
    out = zero_shot_metrics(logits, [5, 1, 0])
    assert out["top1"] == pytest.approx(100 / 3)
    assert out["top5"] == pytest.approx(200 / 3)             # class 0 ranks 6th
    assert out["per_class"]["2"] is None and out["per_class"]["5"] == 100.0
    assert out["mean_per_class"] == pytest.approx(100 / 3)
    tied = zero_shot_metrics(np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]]), [0, 1])
    assert tied["top1"] == 0.0                                # a tie for the top is not a hit
    assert tied["confusion"] == [[0, 1, 0], [1, 0, 0], [0, 0, 0]]


# ---- captioning ----------------------------------------------------------------------------------
REFS = {
    "a": ["There is a piece of farmland .", "It is a piece of cropland ."],
    "b": ["Many cars are parked in the parking lot .", "Lots of cars in a parking lot ."],
    "c": ["A river runs through the green forest .", "The river is next to some trees ."],
    "d": ["Two tennis courts are next to a road .", "There are two tennis courts ."],
}


def test_caption_tokenizer_lowercases_and_strips_punctuation():
    assert caption_tokenize("There's  a Parking-lot, with CARS.") == "theres a parking lot with cars"
    assert caption_tokenize("  ") == ""


def test_candidates_equal_to_their_references_score_bleu_1_and_positive_cider():
    cands = {k: v[0] for k, v in REFS.items()}
    refs = {k: [v[0]] * 3 for k, v in REFS.items()}
    assert bleu4(cands, refs) == pytest.approx(1.0, abs=1e-6)
    assert cider(cands, refs) > 1.0
    # CIDEr's idf comes from the whole set: one image alone scores 0
    assert cider({"a": cands["a"]}, {"a": refs["a"]}) == 0.0


def test_candidates_sharing_no_ngram_score_zero():
    cands = {k: "zebra giraffe elephant" for k in REFS}
    assert bleu4(cands, REFS) < 1e-6
    assert cider(cands, REFS) == 0.0
    empty = {k: "" for k in REFS}
    assert bleu4(empty, REFS) < 1e-6 and cider(empty, REFS) == 0.0


def test_scores_are_pycocoevalcap_on_our_tokens():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    cands = {"a": "a piece of farmland", "b": "cars in the parking lot", "c": "a river and trees",
             "d": "two tennis courts"}
    gts = {k: [caption_tokenize(r) for r in v] for k, v in REFS.items()}
    res = {k: [caption_tokenize(v)] for k, v in cands.items()}
    assert bleu4(cands, REFS) == pytest.approx(Bleu(4).compute_score(gts, res, verbose=0)[0][3])
    assert cider(cands, REFS) == pytest.approx(Cider().compute_score(gts, res)[0])
    assert 0 < bleu4(cands, REFS) < 1 and 0 < cider(cands, REFS) < 10


def test_caption_scores_need_matching_ids_and_references():
    with pytest.raises(ValueError, match="same ids"):
        bleu4({"a": "x"}, {"b": ["x"]})
    with pytest.raises(ValueError, match="no reference"):
        cider({"a": "x"}, {"a": []})


def test_references_without_a_word_are_not_scored():
    """A reference of punctuation alone has no n-gram. With none with a word anywhere, pycocoevalcap's
    CIDEr failed on max() of an empty sequence; beside real references it counted as one nothing can
    match, dividing an image's CIDEr-D by one more reference."""
    cands = {"a": "a piece of farmland", "b": "cars in the parking lot", "c": "a river and trees",
             "d": "two tennis courts"}
    dotted = {k: v + ["...", " !!! "] if k in "ab" else v for k, v in REFS.items()}
    assert cider(cands, dotted) == pytest.approx(cider(cands, REFS))
    assert bleu4(cands, dotted) == pytest.approx(bleu4(cands, REFS))
    for refs in ({k: ["...", "!!!"] for k in REFS}, {**REFS, "c": ["--"]}):
        for score in (cider, bleu4):
            with pytest.raises(ValueError, match="has no reference caption with a word"):
                score(cands, refs)


# ---- segmentation ----------------------------------------------------------------------------------
def _dilate_by_shifts(mask, radius):
    """Square dilation the slow, obvious way: OR of every shift within `radius`."""
    h, w = mask.shape
    padded = np.pad(mask, radius)
    out = np.zeros_like(mask)
    for dy, dx in itertools.product(range(2 * radius + 1), repeat=2):
        out |= padded[dy:dy + h, dx:dx + w]
    return out


def test_dilation_is_the_square_neighbourhood_and_costs_the_same_at_any_radius():
    from training.metrics import _dilate

    rng = np.random.default_rng(0)
    for _ in range(100):
        h, w = rng.integers(1, 25, 2)
        mask = rng.random((h, w)) < rng.uniform(0, 0.2)
        radius = int(rng.integers(0, 30))
        assert np.array_equal(_dilate(mask, radius), _dilate_by_shifts(mask, radius)), (h, w, radius)
    # a match distance far past the side: every pixel, without a (2r+1)^2 loop or an r-wide padding
    # (--tolerance 100000 asked for 37 GiB)
    mask = np.zeros((300, 200), bool)
    mask[150, 20] = True
    assert _dilate(mask, 100_000).all() and not _dilate(np.zeros_like(mask), 100_000).any()


def test_class_boundaries_leave_the_ignored_truth_out():
    from training.metrics import class_boundary_counts

    # classes 0 | 1 side by side under an ignored (-1) strip; the prediction there is noise, and
    # class 2 is predicted only inside the strip
    truth = np.zeros((20, 20), np.int64)
    truth[:, 10:] = 1
    truth[:5] = -1
    pred = np.where(truth < 0, 0, truth)
    pred[:5] = np.random.default_rng(0).integers(0, 3, (5, 20))
    counts = class_boundary_counts(pred, truth, 3, 1)
    # the strip scores as if the image ended there: no class is charged for the strip's edge or for
    # what is predicted inside it, and -1 is no class (it was added to the last one)
    assert counts.tolist() == class_boundary_counts(pred[5:], truth[5:], 3, 1).tolist()
    assert counts[2].tolist() == [0, 0, 0, 0]
    assert counts[0].tolist() == counts[1].tolist() == [15, 15, 15, 15]     # the 0|1 edge, both sides
