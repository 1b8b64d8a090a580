"""Restored text from a punctuation-and-case tagger's labels on model tokens, fragment by fragment.

A transcript label (the shipped ``transcript-tagger``, ``rwkv-stream train``'s transcript task) is ``PUNCT-case``,
read at the model token holding a word's first character: the punctuation that goes *before* the word (after the
previous word: ``O`` none, ``COMMA``, ``PERIOD``, ``QUESTION``) and the word's case (``lower``, ``Cap``,
``UPPER``). A token of whitespace holding a newline (the end-of-stream marker ``"\\n"``) carries the punctuation
before it too; that is how the punctuation after a stream's last word is known.

:class:`TokenRestorer` turns a stream's final tokens into restored text as they come: each call gives the text of
the tokens it was handed, with the case applied and each punctuation mark right after the word it follows. The
whitespace at the end of a call is held back (the next word's label may put a mark before it) and starts the next
call's text, so the texts of a stream's calls joined give the restored text of the whole stream, however the
stream was split (between words, inside a word, inside a token's text). Its state is a small dict
(:meth:`TokenRestorer.state`) that travels with the stream's session.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MARKS = {"O": "", "COMMA": ",", "PERIOD": ".", "QUESTION": "?"}
CASES = ("lower", "Cap", "UPPER")


@functools.lru_cache(maxsize=4096)
def parse_label(label: str | None) -> tuple[str, str] | None:
    """``(",", "Cap")`` for ``"COMMA-Cap"``; ``None`` when ``label`` is not a transcript label."""
    if not label:
        return None
    punct, _, case = label.partition("-")
    if punct not in MARKS or case not in CASES:
        return None
    return MARKS[punct], case


def is_transcript_labels(labels: Sequence[str]) -> bool:
    return bool(labels) and all(parse_label(label) is not None for label in labels)


def apply_case(text: str, case: str) -> str:
    if case == "UPPER":
        return text.upper()
    if case == "Cap":
        return text[:1].upper() + text[1:]
    return text


@dataclass
class TokenRestorer:
    """Restoration state of one stream: see the module docstring."""

    pending: str = ""  # whitespace after the last word, not written yet
    case: str = "lower"  # case of the word in progress
    in_word: bool = False  # the last character seen was part of a word
    words: bool = False  # a word was seen: a mark has a word to follow

    @classmethod
    def from_state(cls, state: Mapping[str, Any] | None) -> TokenRestorer:
        if not state:
            return cls()
        return cls(str(state.get("pending", "")), str(state.get("case", "lower")), bool(state.get("in_word")),
                   bool(state.get("words")))

    def state(self) -> dict[str, Any]:
        return {"pending": self.pending, "case": self.case, "in_word": self.in_word, "words": self.words}

    def feed(self, tokens: Iterable[tuple[str, str | None]], end: bool = False) -> str:
        """Restored text of ``(token text, label)`` pairs; ``end``: the stream ends here (write what is held)."""
        out: list[str] = []
        for text, label in tokens:
            decision = parse_label(label)
            if text.isspace() and "\n" in text and decision is not None:
                if self.words:  # the end marker: the punctuation after the last word
                    out.append(decision[0])
                decision = None
            for ch in text:
                if ch.isspace():
                    self.pending += ch
                    self.in_word = False
                    continue
                if not self.in_word:  # the first character of a word: its token's label decides
                    mark, self.case = decision if decision is not None else ("", "lower")
                    out.append((mark if self.words else "") + self.pending + apply_case(ch, self.case))
                    self.pending, self.in_word, self.words, decision = "", True, True, None
                    continue
                out.append(ch.upper() if self.case == "UPPER" else ch)
        if end:
            out.append(self.pending)
            self.pending, self.in_word, self.case, self.words = "", False, "lower", False
        return "".join(out)
