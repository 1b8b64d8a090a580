"""The built-in ``transcript`` task: ASR-like text (lowercase, no punctuation) from prose, with labels.

Normalization keeps only words: runs of letters (any script, with their combining marks) and digits, with
inner apostrophes (``don't``, ``sister's``), lowercased, joined by single spaces. Hyphenated words become
separate words. Numbers stay digits as ASR writes them: thousands separators go (``1,000`` -> ``1000``), a
decimal point stays inside the word (``2.5``).

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

def _word_pattern() -> str:
    """A word: a number (``1,000``, ``2.5``) or a run of letters, digits and combining marks (every script),
    with inner apostrophes. Python's ``\\w`` leaves out combining marks (Devanagari vowel signs, a
    decomposed accent), which would cut words; they are added by code point range."""
    marks = (r"\u0300-\u036f\u0483-\u0489\u0591-\u05bd\u0610-\u061a\u064b-\u065f\u0670\u06d6-\u06ed"
             r"\u0900-\u0903\u093a-\u094f\u0951-\u0957\u0962\u0963\u0981-\u0983\u09bc-\u09d7\u0a01-\u0a03"
             r"\u0a3c-\u0a51\u0a81-\u0a83\u0abc-\u0acd\u0b01-\u0b03\u0b3c-\u0b57\u0b82\u0bbe-\u0bcd\u0c00-\u0c04"
             r"\u0c3e-\u0c56\u0c81-\u0c83\u0cbc-\u0cd6\u0d00-\u0d03\u0d3b-\u0d4d\u0d57\u0d81-\u0d83\u0dca-\u0ddf"
             r"\u0e31\u0e34-\u0e3a\u0e47-\u0e4e\u0eb1\u0eb4-\u0ebc\u0ec8-\u0ecd\u0f18\u0f19\u0f71-\u0f84"
             r"\u102b-\u103e\u1712-\u1714\u17b4-\u17d3\u1ab0-\u1aff\u1dc0-\u1dff\u200c\u200d\u20d0-\u20ff"
             r"\u302a-\u302f\u3099\u309a\ufe00-\ufe0f\ufe20-\ufe2f")
    part = rf"(?:[^\W_]|[{marks}])+"
    number = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\d,]\d)|\d+\.\d+"
    return rf"(?:{number})|{part}(?:['\u2019]{part})*"


_WORD = re.compile(_word_pattern())
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
    word = word.replace("\u2019", "'").lower()
    return word.replace(",", "") if word[:1].isdigit() else word


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
