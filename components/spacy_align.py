"""Alignment between model tokens (byte spans) and spaCy tokens (character spans), and BIO tags to spans.

No spaCy: the spaCy component feeds it plain offsets, and :func:`doc_result` turns a session result (see
:mod:`rwkv_stream.sessions`) into the per-model-token outputs of a Doc's region.

Model tokens of a byte-level tokenizer (RWKV World, GPT-NeoX BPE) concatenate to the UTF-8 bytes of the text,
so a run of model tokens is described by the byte offset where each one ends. A run covers a *region* of
the stream: the text its tokenizer still held back from earlier Docs, then the current Doc's text, which
starts ``doc_start`` bytes into the region.

Alignment rule: a spaCy token's tag is read off the model token that contains the token's **first** byte
(``"first"``, the default) or its **last** byte (``"last"``). Byte-level BPE attaches the space before a word
to the word, so "first" is the word's first model token: the convention of the shipped transcript tagger and
of ``rwkv-stream train``, whose labels describe what precedes a word (punctuation, case) and so are known as
soon as the word starts. "last" suits heads trained on a word's final piece, the first hidden vector (heads
are causal) that has read the whole word. A model token that spans several spaCy tokens gives its tag to each
of them; a spaCy token that spans several model tokens takes the tag of just one.
"""

from __future__ import annotations

import weakref
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor

    from rwkv_stream.sessions import FragmentResult
    from rwkv_stream.tokenizer import Tokenizer

Alignment = Literal["first", "last"]
ALIGNMENTS: tuple[str, ...] = ("first", "last")


def byte_offsets(text: str) -> list[int]:
    """``offsets[i]`` is the UTF-8 byte offset of character ``i``; ``offsets[len(text)]`` the total size."""
    if text.isascii():
        return list(range(len(text) + 1))
    return [0, *accumulate(len(ch.encode("utf-8", "surrogatepass")) for ch in text)]


def token_ends(lengths: Sequence[int]) -> list[int]:
    """Byte end of each model token from the byte lengths of consecutive tokens."""
    return list(accumulate(lengths))


def align(
    spans: Sequence[tuple[int, int]],
    text: str,
    ends: Sequence[int],
    doc_start: int,
    rule: Alignment = "first",
) -> list[int | None]:
    """For each character span of ``text`` (a spaCy token), the index of the model token it reads.

    ``ends`` are the byte ends of the region's model tokens and ``doc_start`` the byte offset of ``text`` in
    the region. ``None`` for an empty span or when no token covers the byte (no model tokens at all).
    """
    starts = np.array([a for a, _ in spans], dtype=np.int64)
    stops = np.array([b for _, b in spans], dtype=np.int64)
    return [None if i < 0 else i for i in align_indices(starts, stops, text, ends, doc_start, rule).tolist()]


def align_indices(
    starts: np.ndarray,
    stops: np.ndarray,
    text: str,
    ends: Sequence[int] | np.ndarray,
    doc_start: int,
    rule: Alignment = "first",
) -> np.ndarray:
    """:func:`align` over arrays of span starts and stops (characters): an int64 array, -1 where
    :func:`align` gives ``None``. The spaCy component reads the spans straight from ``doc.to_array``."""
    out = np.full(len(starts), -1, dtype=np.int64)
    if not len(ends) or not len(starts):
        return out
    chars = starts if rule == "first" else stops
    if text.isascii():
        byte = chars if rule == "first" else chars - 1
    else:
        offsets = np.array(byte_offsets(text), dtype=np.int64)
        byte = offsets[chars] if rule == "first" else offsets[chars] - 1
    found = np.searchsorted(np.asarray(ends, dtype=np.int64), doc_start + byte, side="right")
    np.minimum(found, len(ends) - 1, out=found)
    valid = stops > starts
    out[valid] = found[valid]
    return out


def overlapping(ends: Sequence[int], lo: int, hi: int) -> list[int]:
    """Indices of model tokens whose bytes overlap ``[lo, hi)``."""
    first = bisect_right(ends, lo)
    out = []
    for i in range(first, len(ends)):
        start = ends[i - 1] if i else 0
        if start >= hi:
            break
        out.append(i)
    return out


def bio_spans(tags: Sequence[str | None]) -> list[tuple[int, int, str]]:
    """Entity spans ``(start, end, label)`` in token indices from BIO, BILUO or plain IO tags.

    ``B-X``/``U-X`` open an entity; ``I-X``/``L-X`` continue one of the same label and open one otherwise
    (a lenient reading of ill-formed model output). Any other tag but ``O`` (or ``None``) is an IO label, as
    ``rwkv-stream train`` labels every token of a span: a run of equal labels is one entity.
    """
    spans: list[tuple[int, int, str]] = []
    start, label = -1, ""
    for i, tag in enumerate(tags):
        prefix, name = _split_tag(tag)
        inside = prefix in ("I", "L") and name == label and start >= 0
        if start >= 0 and not inside:
            spans.append((start, i, label))
            start = -1
        if prefix != "O" and not inside:
            start, label = i, name
        if prefix in ("U", "L") and start >= 0:
            spans.append((start, i + 1, label))
            start = -1
    if start >= 0:
        spans.append((start, len(tags), label))
    return spans


def _split_tag(tag: str | None) -> tuple[str, str]:
    """``("B"|"I"|"L"|"U", label)``, ``("O", "")`` outside; an IO label reads as ``("I", label)``."""
    if tag is None or tag == "O" or tag == "":
        return "O", ""
    prefix, dash, name = tag.partition("-")
    if dash and name and prefix in ("B", "I", "L", "U"):
        return prefix, name
    return "I", tag


# ------------------------------------------------------------------------------------------ doc results
TAGGER, CLASSIFIER = "tagger", "classifier"  # the component's head roles in its session table


@dataclass
class DocResult:
    """A Doc's share of a session result, in the terms the component annotates with."""

    ends: list[int]  # byte end of each model token of the region (held-back text + this text)
    doc_start: int  # byte offset of this text in the region
    offset: int  # character offset of this text in its stream
    tag_ids: list[int] | None  # per model token
    cats: dict[str, float]
    vector: list[float] | None
    hidden: Tensor | None = None  # [len(ends), C] fp32 hidden vector of each model token of the region


def doc_result(tokenizer: Tokenizer, res: FragmentResult, text: str, want_vector: bool) -> DocResult:
    """Turn a provisional :class:`~rwkv_stream.sessions.FragmentResult` into per-model-token outputs of the
    Doc's region (the final tokens, then the held-back tail run on a fork)."""
    ids = res.token_ids + res.tail_ids
    doc_start, n_text = len(res.carry), len(text.encode("utf-8"))
    ends = region_token_ends(tokenizer, ids, doc_start + n_text)
    parts = [h for h in (res.hidden, res.tail_hidden) if h is not None and len(h)]
    import torch

    hidden = torch.cat(parts) if parts else None
    vector = None
    if want_vector and hidden is not None:
        rows = overlapping(ends, doc_start, doc_start + n_text)
        if rows:
            vector = hidden[rows].float().mean(dim=0).tolist()
    cats = {**res.cats.get(CLASSIFIER, {}), **res.probes}
    return DocResult(ends, doc_start, res.text_start, res.tags.get(TAGGER), cats, vector, hidden)


def region_token_ends(tokenizer: Tokenizer, ids: Sequence[int], region_bytes: int) -> list[int]:
    """Byte ends of a region's model tokens in text coordinates. Token bytes are the text's bytes, except
    that a tokenizer may add a prefix space at the start of a stream (ByteLevel ``add_prefix_space``):
    whatever the tokens hold beyond the text sits at the start of the region."""
    ends = np.cumsum(token_byte_lengths(tokenizer)[np.asarray(ids, dtype=np.int64)])
    extra = (int(ends[-1]) if len(ends) else 0) - region_bytes
    if extra > 0:
        ends = np.maximum(ends - extra, 0)
    return ends.tolist()


_BYTE_LENGTHS: weakref.WeakKeyDictionary[Tokenizer, np.ndarray] = weakref.WeakKeyDictionary()


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """``lengths[id]``: the byte length of each token id's text (built once per tokenizer)."""
    table = _BYTE_LENGTHS.get(tokenizer)
    if table is None:
        table = np.array([len(tokenizer.id_to_token_bytes(i)) for i in range(tokenizer.vocab_size)], dtype=np.int64)
        _BYTE_LENGTHS[tokenizer] = table
    return table
