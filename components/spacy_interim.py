"""Interim ASR hypotheses in the spaCy component.

Live speech recognition sends *interim* results for the words being spoken, revises them, then sends the
*final* text. Mark an interim Doc with ``doc._.rwkv_interim = True``: the ``rwkv`` component runs it on a fork
of its stream (:meth:`rwkv_stream.sessions.SessionTable.feed_interim`) and annotates it exactly as it would a
final Doc with that text (tags, ``doc._.rwkv_restored``, cats, ``doc.tensor``), but the stream does not move:
the next Doc, a revision or the final, starts from where the stream really is. So interims, however many and
however wrong, never change what the final gives::

    for text, final in asr_results:                 # ("so the", False), ("so then we", False), ("so then we", True)
        doc = nlp.make_doc(text + " ")
        doc._.stream_id, doc._.rwkv_interim = "call-42", not final
        doc = nlp(doc)                              # interim: provisional tags for display; final: kept

Docs of a batch keep their order: each run of finals is one batched ``feed``, each run of interims one
``feed_interim``. An interim Doc without a stream id is a one-off, like any such Doc.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING

from spacy.tokens import Doc

if TYPE_CHECKING:
    from rwkv_stream.sessions import FragmentResult, SessionTable

INTERIM_ATTR = "rwkv_interim"


def register_extensions() -> None:
    if not Doc.has_extension(INTERIM_ATTR):
        Doc.set_extension(INTERIM_ATTR, default=False)


def feed_docs(sessions: SessionTable, keys: Sequence[Hashable | None], docs: Sequence[Doc]) -> list[FragmentResult]:
    """One session result per Doc, in order: finals fed (provisionally), interims run on forks."""
    from rwkv_stream.sessions import Fragment

    interim = [k is not None and bool(d._.get(INTERIM_ATTR)) for k, d in zip(keys, docs, strict=True)]
    out: list[FragmentResult] = []
    start = 0
    while start < len(docs):
        end = start
        while end < len(docs) and interim[end] == interim[start]:
            end += 1
        frags = [Fragment(keys[i], docs[i].text) for i in range(start, end)]
        out += sessions.feed_interim(frags) if interim[start] else sessions.feed(frags, provisional=True)
        start = end
    return out
