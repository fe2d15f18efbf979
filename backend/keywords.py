"""Keyword matching: a search's words against the caption the model wrote for each tile when it was
indexed (the tile's `caption`), added to the embedding similarity.

The text tower carries a class name to the right tiles far better than a paraphrase of it ("round
oil tanks" misses the storage tanks that "storage tanks" finds), while the captioning decoder writes
the words of its training captions ("there are many white storage tanks"). Where a query shares a
word with a tile's caption, BM25 over the candidates' captions says how much that word sets the tile
apart, and the tile moves up. The README's model card measures it on the search benchmark.

The combined order is that of z(cosine) + weight x z(BM25) over the candidates (each standardised
over them): the bonus added to a tile's cosine is weight x std(cosine) / std(BM25) x its BM25, so
the score stays a cosine where no word matches.
"""
from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from typing import Sequence

import numpy as np

# BM25's usual constants: term-frequency saturation and length normalisation
BM25_K1 = 1.2
BM25_B = 0.75

# words that say nothing about what is on the ground (the captions' and a query's glue)
STOP_WORDS = frozenset(
    "a an the of in on at with and or is are was were be been there here some many several lots lot to by for "
    "from its it this that these those as into near next one two three few very which where who what how "
    "photo image picture aerial satellite view scene place remote sensing".split())


def words(text: str) -> list[str]:
    """The content words of `text`: NFKC-normalised as the tokenizer reads it (full-width "ｔｅｎｎｉｓ", as
    CJK input methods type it, is "tennis"), lower case, letters only, stop words dropped, a plural's
    final "s" cut ("tanks" matches "tank")."""
    out = []
    for w in re.findall(r"[a-z]+", unicodedata.normalize("NFKC", text).lower()):
        if w in STOP_WORDS:
            continue
        out.append(w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w)
    return out


def bm25_scores(query_words: Sequence[str], documents: Sequence[Sequence[str]], k1: float = BM25_K1,
                b: float = BM25_B) -> np.ndarray:
    """BM25 of each document (a list of words) for the query's words, with document frequencies
    and the mean length taken over `documents` (Robertson's idf, log(1 + (N - n + 0.5) / (n + 0.5)),
    which stays positive)."""
    n = len(documents)
    scores = np.zeros(n, dtype=np.float64)
    terms = set(query_words)
    if n == 0 or not terms:
        return scores
    lengths = np.array([len(d) for d in documents], dtype=np.float64)
    mean_length = lengths.mean() or 1.0
    frequency = Counter(t for d in documents for t in set(d) if t in terms)
    for i, document in enumerate(documents):
        counts = Counter(t for t in document if t in terms)
        for term, tf in counts.items():
            idf = math.log(1.0 + (n - frequency[term] + 0.5) / (frequency[term] + 0.5))
            scores[i] += idf * tf * (k1 + 1.0) / (tf + k1 * (1.0 - b + b * lengths[i] / mean_length))
    return scores


def keyword_bonus(cosines: Sequence[float], query: str, captions: Sequence[str | None], weight: float) -> np.ndarray:
    """What keyword matching adds to each candidate's cosine: weight x std(cosine) / std(BM25) x BM25
    of the query's words in the candidate's caption (None or "": no caption, nothing added). Zero
    everywhere when the weight is 0, no query word is in any caption, or the cosines do not vary."""
    cos = np.asarray(cosines, dtype=np.float64)
    bonus = np.zeros(len(cos))
    if weight <= 0 or len(cos) < 2:
        return bonus
    scores = bm25_scores(words(query), [words(c) if c else [] for c in captions])
    spread, cos_spread = scores.std(), cos.std()
    if spread == 0 or cos_spread == 0:
        return bonus
    return weight * cos_spread / spread * scores


__all__ = ["words", "bm25_scores", "keyword_bonus", "STOP_WORDS", "BM25_K1", "BM25_B"]
