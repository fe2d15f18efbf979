"""The words a checkpoint saw in training, so a search can say which of a user's words it barely knows.

A text tower learns a word only from the captions it trained on: a query word that never appeared
there ("shrubland", "trailers") still gets an embedding, from its sub-word pieces, but one that
means little, and the search then quietly follows the other words. `TrainingWords` keeps how often
each word appeared in the training captions, counted as the training data holds them: a caption once
per image that carries it, and each class template and class caption pool caption (drawn at random
for the images of a class) once (`words.json` beside the weights, written by training and by
`python -m training.vocabulary`); `unfamiliar(text)` lists the words of a text seen fewer
than `RARE_COUNT` times, counting a word's plural and singular together ("tank" / "tanks"), and
`close_spellings(word)` the familiar words spelled nearly like it, which catches typing errors
("parkng" -> "parking", "resedential" -> "residential").

The file is optional: a checkpoint without it works as before and reports no words.
"""
from __future__ import annotations

import json
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

from ..files import write_text_atomically

WORDS_FILE = "words.json"
FORMAT = "skyprompt-words"
FORMAT_VERSION = 1
# a word seen once or twice in ten thousand captions has not been learned
RARE_COUNT = 3
# letters of any script (not digits or "_"), with an inner apostrophe: "bird's", "são", "großstadt"
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")


class VocabularyError(ValueError):
    """A words file that cannot be read; the message names the file and what to do."""


def words_of(text: str) -> list[str]:
    """The lower-case words of a text, in order (letters of any script, with an inner apostrophe:
    "bird's"); NFKC-normalised and lower-cased as the tokenizer reads text, a typographic apostrophe
    read as "'"."""
    text = unicodedata.normalize("NFKC", text).lower().replace("\u2019", "'")
    return _WORD.findall(text)


def count_words(texts: Iterable[str]) -> Counter:
    counts: Counter = Counter()
    for text in texts:
        counts.update(words_of(text))
    return counts


# "-es" makes a plural only after these endings (boxes, churches, buses); after others ("trees") it
# is "-s" after an "e", so "treees" is a typo of "trees", not a plural of "tree"
_ES_PLURAL_AFTER = ("s", "x", "z", "ch", "sh")


def _forms(word: str) -> set[str]:
    """The word and its likely singular / plural ("tanks" -> tank; "churches" -> church; "y" <-> "ies")."""
    forms = {word, word + "s"}
    if word.endswith(_ES_PLURAL_AFTER):
        forms.add(word + "es")
    if word.endswith("ies"):
        forms.add(word[:-3] + "y")
    if word.endswith("y"):
        forms.add(word[:-1] + "ies")
    if word.endswith("es") and word[:-2].endswith(_ES_PLURAL_AFTER):
        forms.add(word[:-2])
    if word.endswith("s"):
        forms.add(word[:-1])
    return forms


def spelling_distance(a: str, b: str, most: int) -> int:
    """Edits between two words, a swap of two neighbouring letters being one edit (the optimal string
    alignment distance), or most + 1 when it is more than `most`."""
    if abs(len(a) - len(b)) > most:
        return most + 1
    before = row = list(range(len(b) + 1))     # `before`: the row above `row`, read from the second row on
    for i, ca in enumerate(a, 1):
        current = [i] + [0] * len(b)
        for j, cb in enumerate(b, 1):
            current[j] = min(row[j] + 1, current[j - 1] + 1, row[j - 1] + (ca != cb))
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                current[j] = min(current[j], before[j - 2] + 1)
        if min(current) > most:
            return most + 1
        before, row = row, current
    return min(row[-1], most + 1)


def _edits_allowed(word: str) -> int:
    """How many typing errors a word of this length may hold and still be recognised: none in a word
    of three letters or fewer (one edit reaches too many words), one from four letters, two from ten."""
    return 0 if len(word) < 4 else 1 if len(word) < 10 else 2


class TrainingWords:
    """How often each word appeared in a checkpoint's training captions (see the module's doc)."""

    def __init__(self, counts: Mapping[str, int], source: str = ""):
        self.counts = {str(w): int(n) for w, n in counts.items()}
        self.source = source
        self._familiar: list[str] | None = None

    def __len__(self) -> int:
        return len(self.counts)

    def count(self, word: str) -> int:
        """Times the word or its singular / plural appeared."""
        return sum(self.counts.get(f, 0) for f in _forms(word.lower()))

    def unfamiliar(self, text: str) -> list[str]:
        """Words of `text` seen fewer than RARE_COUNT times, in the order they come, each once (a
        plural after its singular, or the other way round, is the same word)."""
        out: list[str] = []
        listed: set[str] = set()
        for word in words_of(text):
            if word not in listed and self.count(word) < RARE_COUNT:
                out.append(word)
                listed |= _forms(word)
        return out

    def close_spellings(self, word: str, n: int = 2) -> list[str]:
        """Up to n familiar words (seen at least RARE_COUNT times) within _edits_allowed(word) typing
        errors of `word` (a letter missing, extra, wrong, or two swapped: "hosues" -> houses), fewest
        edits first, then the most often seen; none that is only a form of the word itself or of a
        word already offered."""
        if self._familiar is None:
            self._familiar = sorted(w for w in self.counts if len(w) > 2 and self.count(w) >= RARE_COUNT)
        word = word.lower()
        most = _edits_allowed(word)
        if not most:
            return []
        near = sorted((d, -self.count(w), w) for w in self._familiar
                      if (d := spelling_distance(word, w, most)) <= most)
        out: list[str] = []
        taken = set(_forms(word))
        for _, _, close in near:
            if not _forms(close) & taken:   # neither the word's own forms nor another form of one offered
                out.append(close)
                taken |= _forms(close)
        return out[:n]

    def save(self, directory: str | os.PathLike) -> Path:
        """Write DIRECTORY/words.json atomically (a temporary file renamed into place)."""
        path = Path(directory) / WORDS_FILE
        data = {"format": FORMAT, "format_version": FORMAT_VERSION, "source": self.source,
                "words": dict(sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0])))}
        return write_text_atomically(path, json.dumps(data, indent=0, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "TrainingWords | None":
        """The checkpoint's words, or None when it has no words.json; VocabularyError when unreadable."""
        path = Path(directory) / WORDS_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise VocabularyError(f"{path} cannot be read ({e}); write it again with python -m training.vocabulary "
                                  "or delete it") from None
        words = data.get("words") if isinstance(data, dict) else None
        if (not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(words, dict)
                or not all(isinstance(n, int) and n >= 0 for n in words.values())):
            raise VocabularyError(f"{path} is not a {FORMAT} file (a 'words' object of word -> count); write it "
                                  "again with python -m training.vocabulary or delete it")
        return cls(words, str(data.get("source", "")))
