"""Word-level results of a punctuation-and-case tagger: the restored text on spaCy tokens, not sub-words.

A transcript label (the shipped ``transcript-tagger``, ``rwkv-stream train``'s transcript task, and
``configs/rwkv_train.cfg`` trained on :mod:`~rwkv_stream.components.spacy_corpus` data) is ``PUNCT-case``: the
punctuation that goes *before* a word (after the previous word: ``O`` none, ``COMMA``, ``PERIOD``,
``QUESTION``) and the word's case (``lower``, ``Cap``, ``UPPER``). A *word* is a run of spaCy tokens with no
whitespace between them ("don't" is spaCy's "do" + "n't"): its decision is read at its first token and applies
to all of its tokens. A whitespace token carries the punctuation before it too: that is how the end of a stream
is marked (feed ``"\\n"`` after the last word; the shipped tagger was trained with that end marker), so the
punctuation after the last word is known. Other whitespace tokens carry no decision.

Extensions set by the ``rwkv`` component when its tag head has transcript labels (else left ``None``):

* ``doc._.rwkv_restored``: the Doc's text with punctuation and case applied. It starts with the punctuation
  that goes after the *previous* fragment's last word when the Doc continues a stream, so joining the restored
  texts of a stream's fragments (split between words) gives the restored text of the whole stream.
* ``token._.rwkv_case``: the case decision of the token's word (``None`` for whitespace);
  ``token._.rwkv_punct``: the punctuation after the token (``""`` none; ``None`` when not known yet: the Doc's
  last word, until the next word or the end marker arrives); ``token._.rwkv_restored``: the token's text with
  its word's case applied and its punctuation appended.
* ``span._.rwkv_restored``: the restored text of a span's tokens (without the punctuation before its first word).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from spacy.attrs import IDX, IS_SPACE, ORTH, SPACY
from spacy.tokens import Doc, Span, Token

from rwkv_stream.restore import CASES, MARKS, apply_case, is_transcript_labels, parse_label

# The label rules live in rwkv_stream.restore (the Kafka processor uses them too); re-exported here.
__all__ = ["CASES", "MARKS", "apply_case", "is_transcript_labels", "parse_label"]


@dataclass
class Restored:
    lead: str  # punctuation owed to the previous fragment's last word
    texts: list[str]  # per token: cased text plus the punctuation after it
    cases: list[str | None]
    puncts: list[str | None]

    def text(self, whitespace: Sequence[str]) -> str:
        return self.lead + "".join(t + w for t, w in zip(self.texts, whitespace, strict=True))


def restore_tokens(words: Sequence[str], spaces: Sequence[bool], gaps: Sequence[bool],
                   labels: Sequence[str | None]) -> Restored:
    """Restoration over tokens: ``words`` their texts, ``spaces`` whether a token is whitespace, ``gaps``
    whether whitespace precedes it (a token without one continues the previous word), ``labels`` the tags."""
    n = len(words)
    if not (len(spaces) == len(gaps) == len(labels) == n):
        raise ValueError(f"restore_tokens: {n} words, {len(spaces)} spaces, {len(gaps)} gaps, {len(labels)} labels")
    texts: list[str] = list(words)
    cases: list[str | None] = [None] * n
    puncts: list[str | None] = [None] * n
    lead = ""
    last_word_end = -1  # index of the last token of the previous word (-1: none yet)
    case = "lower"
    prev_space = True  # the token before the first counts as whitespace: the first token starts a word
    for i in range(n):  # one pass, locals only: this runs for every token nlp.pipe annotates
        text, space = words[i], spaces[i]
        starts_word = not space and (prev_space or gaps[i])
        prev_space = space
        decision = parse_label(labels[i]) if (starts_word or (space and "\n" in text)) else None
        if decision is not None:  # the mark goes after the previous word (once), or is owed to the last fragment
            if last_word_end < 0:
                lead = lead or decision[0]
            elif puncts[last_word_end] is None:
                puncts[last_word_end] = decision[0]
                texts[last_word_end] += decision[0]
        if space:
            continue
        if starts_word:
            if last_word_end >= 0 and puncts[last_word_end] is None:
                puncts[last_word_end] = ""
            case = decision[1] if decision is not None else "lower"
            if case != "lower":
                texts[i] = apply_case(text, case)
        else:
            puncts[i - 1] = ""
            if case == "UPPER":
                texts[i] = text.upper()
        cases[i] = case
        last_word_end = i
    return Restored(lead, texts, cases, puncts)


# ------------------------------------------------------------------------------------------ spaCy
def register_extensions() -> None:
    for attr in ("rwkv_restored",):
        if not Doc.has_extension(attr):
            Doc.set_extension(attr, default=None)
    for attr in ("rwkv_case", "rwkv_punct", "rwkv_restored"):
        if not Token.has_extension(attr):
            Token.set_extension(attr, default=None)
    if not Span.has_extension("rwkv_restored"):
        Span.set_extension("rwkv_restored", getter=_span_restored)


def _span_restored(span: Span) -> str | None:
    if not len(span) or any(t._.rwkv_restored is None for t in span):
        return None
    return "".join(t._.rwkv_restored + t.whitespace_ for t in span[:-1]) + span[-1]._.rwkv_restored


def restore_doc(doc: Doc, labels: Sequence[str | None]) -> bool:
    """Set the restoration extensions of ``doc`` from one transcript label per token (e.g. the tags of the
    rwkv component, or of a spaCy ``tagger`` trained on transcript labels: ``[t.tag_ for t in doc]``).
    Returns False, setting nothing, when the labels are not transcript labels."""
    register_extensions()
    if not all(label is None or parse_label(label) is not None for label in labels):
        return False
    set_restored(doc, labels)
    return True


TOKEN_EXTENSIONS = ("rwkv_restored", "rwkv_case", "rwkv_punct")
LAYOUT_ATTRS = [ORTH, IDX, IS_SPACE, SPACY]


@dataclass
class DocLayout:
    """A Doc's tokens as plain lists, read at once with ``doc.to_array`` (creating a Token object per token,
    as iterating a Doc or reading ``doc.text`` does, costs more than everything the component does with it)."""

    text: str  # == doc.text
    words: list[str]  # token texts
    starts: list[int]  # character offset of each token (token.idx)
    is_space: list[int]  # token.is_space
    spacy: list[int]  # whether whitespace follows the token

    @classmethod
    def of(cls, doc: Doc) -> DocLayout:
        orth, starts, is_space, spacy_ = doc.to_array(LAYOUT_ATTRS).reshape(-1, len(LAYOUT_ATTRS)).T.tolist()
        strings = doc.vocab.strings
        words = [strings[o] for o in orth]
        text = "".join([w + " " if s else w for w, s in zip(words, spacy_, strict=True)])
        return cls(text, words, starts, is_space, spacy_)


def set_restored(doc: Doc, labels: Sequence[str | None], layout: DocLayout | None = None) -> None:
    """:func:`restore_doc` for labels known to be transcript labels (or ``None``), without Token objects:
    the token extensions are written where ``token._`` keeps them (``doc.user_data``), unless an extension
    was re-registered with a getter or setter."""
    lay = DocLayout.of(doc) if layout is None else layout
    spaces = [bool(x) for x in lay.is_space]
    gaps = [False, *(bool(x) for x in lay.spacy[:-1])][: len(lay.words)]
    result = restore_tokens(lay.words, spaces, gaps, labels)
    doc._.rwkv_restored = result.text([" " if x else "" for x in lay.spacy])
    values = dict(zip(TOKEN_EXTENSIONS, (result.texts, result.cases, result.puncts), strict=True))
    user_data = doc.user_data
    for name, column in values.items():
        if Token.get_extension(name)[1:] != (None, None, None):  # a method, getter or setter: spaCy's way
            for token, value in zip(doc, column, strict=True):
                token._.set(name, value)
            continue
        keys = [("._.", name, start, None) for start in lay.starts]  # what token._.set(name, value) writes
        user_data.update(zip(keys, column, strict=True))
