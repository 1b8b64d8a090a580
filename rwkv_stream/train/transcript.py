"""The built-in ``transcript`` task: ASR-like text (lowercase, no punctuation) from prose, with labels.

Normalization keeps only words: runs of letters and digits, with inner apostrophes (``don't``,
``sister's``), lowercased, joined by single spaces. Hyphenated words become separate words.

Labels (one per word, read at the word's *first* model token, because heads are causal): the punctuation
that goes *before* the word (after the previous word) and the word's case, joined by ``-``:

* punctuation ``O`` (none), ``COMMA`` (``, ; :`` and dashes), ``PERIOD`` (``. !``), ``QUESTION`` (``?``);
  the period of the abbreviations in :data:`ABBREVIATIONS` (``Mr.``, ``Mrs.``...) is not a sentence end;
* case ``lower``, ``Cap`` (first letter upper), ``UPPER`` (two or more letters, all upper).

The punctuation after the last word is read at the end marker :data:`END` (a newline) appended at the end
of a stream; its label is ``<PUNCT>-lower`` (the case part means nothing there).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PUNCTS = ("O", "COMMA", "PERIOD", "QUESTION")
CASES = ("lower", "Cap", "UPPER")
LABELS = [f"{p}-{c}" for p in PUNCTS for c in CASES]
END = "\n"
ABBREVIATIONS = frozenset({"mr", "mrs", "dr", "st", "messrs", "esq", "col", "capt", "rev", "sir"})

_WORD = re.compile(r"[A-Za-z0-9]+(?:['\u2019][A-Za-z0-9]+)*")
_COMMA = re.compile(r"[,;:]|--|\u2014|\u2013| - ")


@dataclass(frozen=True)
class Word:
    text: str  # normalized (lowercase, straight apostrophe)
    punct: str  # punctuation before the word
    case: str

    @property
    def label(self) -> str:
        return f"{self.punct}-{self.case}"


def punct_class(gap: str, previous: str | None) -> str:
    """Class of the text between two words (``previous`` is the normalized word before the gap)."""
    if "?" in gap:
        return "QUESTION"
    if "!" in gap:
        return "PERIOD"
    if "." in gap:
        abbrev = previous in ABBREVIATIONS and gap.strip().startswith(".") and gap.count(".") == 1
        return "O" if abbrev else "PERIOD"
    return "COMMA" if _COMMA.search(gap) else "O"


def case_class(word: str) -> str:
    letters = [c for c in word if c.isalpha()]
    if len(letters) > 1 and all(c.isupper() for c in letters):
        return "UPPER"
    return "Cap" if letters and word[0].isupper() else "lower"


def normalize_word(word: str) -> str:
    return word.replace("\u2019", "'").lower()


def parse(text: str) -> tuple[list[Word], str]:
    """Words of ``text`` with their labels, and the punctuation class after the last word."""
    words: list[Word] = []
    pos, previous = 0, None
    for m in _WORD.finditer(text):
        norm = normalize_word(m.group())
        punct = punct_class(text[pos : m.start()], previous) if words else "O"
        words.append(Word(norm, punct, case_class(m.group())))
        pos, previous = m.end(), norm
    return words, punct_class(text[pos:], previous) if words else "O"


def normalize(text: str) -> str:
    """ASR-like form of ``text``: lowercase words separated by single spaces."""
    return " ".join(w.text for w in parse(text)[0])


def restore(words: list[str], labels: list[str], end_label: str | None = None) -> str:
    """Text with punctuation and case put back from per-word labels (and the end marker's label)."""
    marks = {"O": "", "COMMA": ",", "PERIOD": ".", "QUESTION": "?"}
    out: list[str] = []
    for word, label in zip(words, labels, strict=True):
        punct, case = label.split("-")
        if out:
            out[-1] += marks[punct]
        out.append(word.upper() if case == "UPPER" else word[:1].upper() + word[1:] if case == "Cap" else word)
    text = " ".join(out)
    return text + marks[end_label.split("-")[0]] if end_label and out else text
