"""Keyword matching of a search's words against tile captions (backend/keywords.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from backend.keywords import bm25_scores, keyword_bonus, words


def test_words_keep_what_is_on_the_ground():
    assert words("There are many white storage tanks.") == ["white", "storage", "tank"]
    assert words("An aerial photo of the GRASS, next to 2 roads") == ["grass", "road"]
    assert words("a satellite image of a place with airport.") == ["airport"]
    # full-width letters, as CJK input methods type them, read as the tokenizer reads them (NFKC)
    assert words("ｔｅｎｎｉｓ　ｃｏｕｒｔｓ") == words("tennis courts") == ["tenni", "court"]   # cut as plurals are


def test_bm25_by_hand():
    docs = [["storage", "tank", "tank"], ["tank"], ["road", "house", "tree", "field"], []]
    scores = bm25_scores(["tank"], docs, k1=1.2, b=0.75)
    n, df, mean_length = 4, 2, 2.0
    idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
    expected = [idf * tf * 2.2 / (tf + 1.2 * (0.25 + 0.75 * length / mean_length))
                for tf, length in ((2, 3), (1, 1))]
    assert scores[:2] == pytest.approx(expected)
    assert scores[2] == 0 and scores[3] == 0
    # a word every document has tells nothing apart: it weighs less than a rare one
    common = bm25_scores(["a"], [["a", "b"], ["a", "c"], ["a", "d"]])
    rare = bm25_scores(["b"], [["a", "b"], ["a", "c"], ["a", "d"]])
    assert rare[0] > common[0] > 0
    assert not bm25_scores([], docs).any() and bm25_scores(["tank"], []).size == 0


def test_the_bonus_orders_as_the_sum_of_standardised_scores():
    rng = np.random.default_rng(0)
    cos = rng.uniform(0.1, 0.4, 40)
    captions = [("white storage tanks" if i % 5 == 0 else "a green field") + f" {i}" for i in range(40)]
    for weight in (0.25, 0.5, 2.0):
        bonus = keyword_bonus(cos, "round oil tanks", captions, weight)
        bm25 = bm25_scores(words("round oil tanks"), [words(c) for c in captions])
        z = (cos - cos.mean()) / cos.std() + weight * (bm25 - bm25.mean()) / bm25.std()
        assert np.array_equal(np.argsort(-(cos + bonus), kind="stable"), np.argsort(-z, kind="stable"))
        assert (bonus[::5] > 0).all() and not np.delete(bonus, np.arange(0, 40, 5)).any()
    # the bonus is in cosine units: it grows with the weight and with the spread of the cosines
    assert keyword_bonus(cos, "tanks", captions, 1.0)[0] == pytest.approx(2 * keyword_bonus(cos, "tanks", captions, 0.5)[0])
    assert keyword_bonus(cos * 2, "tanks", captions, 1.0)[0] == pytest.approx(2 * keyword_bonus(cos, "tanks", captions, 1.0)[0])


@pytest.mark.parametrize("query, captions, weight", [
    ("tanks", ["tanks here", "a field"], 0.0),                 # keyword matching off
    ("tanks", [None, ""], 1.0),                                # tiles indexed without captions
    ("harbour", ["tanks here", "a field"], 1.0),               # no query word in any caption
    ("tanks", ["tanks here", "tanks there"], 1.0),             # every caption matches alike
])
def test_no_bonus_where_words_tell_nothing_apart(query, captions, weight):
    assert not keyword_bonus([0.3, 0.2], query, captions, weight).any()
