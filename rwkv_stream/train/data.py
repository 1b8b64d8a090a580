"""Training data: token ids with per-token targets for the LM, a tagging head and a classification head.

Sources:

* the built-in ``transcript`` task (:mod:`rwkv_stream.train.transcript`) from plain prose, one paragraph
  per line, with an optional line-aligned file of class labels (``<split>.books.txt`` for the corpus);
* JSONL, one object per line: ``{"text": str, "tags": [[start, end, label], ...]}`` (character spans;
  every token that overlaps a span gets its label, other tokens ``O``) and/or
  ``{"text": str, "cats": {label: score, ...}}`` (the label with the highest score is the class, read at
  the last token);
* spaCy ``DocBin`` files (``.spacy``): entity spans as tags and ``doc.cats`` as classes, read by
  :mod:`rwkv_stream.components.spacy_data` (spaCy is imported only then).
"""

from __future__ import annotations

import importlib
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from rwkv_stream.train import transcript

if TYPE_CHECKING:
    from rwkv_stream.tokenizer import Tokenizer

IGNORE = -100


@dataclass
class Document:
    """One token stream: ids, a tag id per token (IGNORE where untrained) and a class per token."""

    ids: list[int]
    tags: list[int]
    cats: list[int]
    text_bytes: int = 0
    ahead: list[list[int]] = field(default_factory=list)  # lookahead k = 1.. tag ids per token (see below)


@dataclass
class Dataset:
    docs: list[Document]
    tag_labels: list[str] = field(default_factory=list)
    cat_labels: list[str] = field(default_factory=list)
    lookahead: int = 0  # lookahead tag lists per document (transcript task)

    @property
    def n_tokens(self) -> int:
        return sum(len(d.ids) for d in self.docs)


@dataclass
class Batch:
    ids: Tensor  # [B, T]
    lm: Tensor  # next-token targets, IGNORE at padding
    tags: Tensor
    cats: Tensor
    ahead: Tensor | None = None  # [B, K, T]: lookahead k = 1..K targets

    def to(self, device: torch.device) -> Batch:
        ahead = None if self.ahead is None else self.ahead.to(device)
        return Batch(self.ids.to(device), self.lm.to(device), self.tags.to(device), self.cats.to(device), ahead)


# ------------------------------------------------------------------------------------------ tokenizer


def train_tokenizer(lines: Sequence[str], vocab_size: int, path: Path) -> Path:
    """Byte-level BPE (GPT-NeoX style, prefix space) trained on ``lines``; saved as ``tokenizer.json``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(lines, trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


class WordEncoder:
    """Encodes normalized words one at a time (cached): byte-level BPE encodes each word on its own."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tok = tokenizer
        self.cache: dict[str, list[int]] = {}
        # The end marker as it is tokenized after a word (without the prefix space of a stream start).
        self.end = tokenizer.encode("a" + transcript.END)[len(tokenizer.encode("a")) :]

    def word(self, word: str) -> list[int]:
        ids = self.cache.get(word)
        if ids is None:
            ids = self.cache[word] = self.tok.encode(" " + word)
        return ids


# ------------------------------------------------------------------------------------------ transcript


def transcript_document(
    paragraphs: Sequence[str], enc: WordEncoder, cat: int = IGNORE, end_marks: Sequence[bool] = (),
    lookahead: int = 0,
) -> Document:
    """One stream of normalized paragraphs; ``end_marks[i]`` puts the end marker after paragraph ``i``.

    The stream always ends with the end marker. Tags: each word's label at its first token, the end
    marker's ``<PUNCT>-lower`` at the marker, IGNORE elsewhere.

    Lookahead: the words and end markers of the stream are *items*, each with the label above. With
    ``lookahead`` K, ``ahead[k - 1]`` (k = 1..K) holds, at the first token of item ``p``, the label of item
    ``p - k``: a decision that waited for k more words. At the final end marker, the heads k = 0..K give the
    labels of the last K + 1 items, so a stream's tail is decided at flush.
    """
    index = {label: i for i, label in enumerate(transcript.LABELS)}
    ids: list[int] = []
    tags: list[int] = []
    items: list[tuple[int, int]] = []  # (first token position, label id)
    pending = "O"  # punctuation carried over a paragraph boundary without a marker
    for i, para in enumerate(paragraphs):
        words, end = transcript.parse(para)
        for j, w in enumerate(words):
            punct = pending if j == 0 and pending != "O" else w.punct
            toks = enc.word(w.text)
            items.append((len(ids), index[f"{punct}-{w.case}"]))
            ids += toks
            tags += [items[-1][1]] + [IGNORE] * (len(toks) - 1)
        pending = end if words else pending
        last = i == len(paragraphs) - 1
        if last or (i < len(end_marks) and end_marks[i]):
            items.append((len(ids), index[f"{pending}-lower"]))
            ids += enc.end
            tags += [items[-1][1]] + [IGNORE] * (len(enc.end) - 1)
            pending = "O"
    ahead = [[IGNORE] * len(ids) for _ in range(lookahead)]
    for k in range(1, lookahead + 1):
        for p in range(k, len(items)):
            ahead[k - 1][items[p][0]] = items[p - k][1]
    text_bytes = len(enc.tok.decode_bytes(ids))
    return Document(ids, tags, [cat] * len(ids), text_bytes, ahead)


def read_lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def transcript_dataset(
    text_file: Path, tokenizer: Tokenizer, group: int, cat_file: Path | None = None, cat_labels: Sequence[str] = (),
    marker_prob: float = 0.0, seed: int = 0, lookahead: int = 0,
) -> Dataset:
    """Streams of ``group`` consecutive paragraphs of one class (a class change starts a new stream).

    When ``<stem>.docs.txt`` sits beside ``text_file`` (a document id per line, as
    ``scripts/make_speech_corpus.py`` writes), a document change starts a new stream too.
    """
    paras = read_lines(text_file)
    cats = read_lines(cat_file) if cat_file and cat_file.exists() else [""] * len(paras)
    doc_file = text_file.with_name(text_file.stem + ".docs.txt")
    doc_ids = read_lines(doc_file) if doc_file.exists() else [""] * len(paras)
    labels = list(cat_labels) or sorted({c for c in cats if c})
    enc = WordEncoder(tokenizer)
    rng = random.Random(seed)
    docs = []
    for run, cat in _runs(paras, [f"{c}\t{d}" for c, d in zip(cats, doc_ids, strict=True)], group):
        cat = cat.split("\t")[0]
        marks = [rng.random() < marker_prob for _ in run]
        docs.append(transcript_document(run, enc, labels.index(cat) if cat in labels else IGNORE, marks, lookahead))
    return Dataset(docs, list(transcript.LABELS), labels if any(cats) else [], lookahead)


def _runs(paras: list[str], cats: list[str], group: int) -> Iterator[tuple[list[str], str]]:
    run: list[str] = []
    for i, (para, cat) in enumerate(zip(paras, cats, strict=True)):
        run.append(para)
        if len(run) == group or i + 1 == len(paras) or cats[i + 1] != cat:
            yield run, cat
            run = []


# ------------------------------------------------------------------------------------------ JSONL / DocBin


def read_records(path: Path) -> list[dict]:
    """Records ``{"text", "tags"?, "cats"?}`` from JSONL or (lazily, via spaCy) a ``.spacy`` DocBin."""
    if path.suffix == ".spacy":
        try:
            reader = importlib.import_module("rwkv_stream.components.spacy_data")
        except ImportError as exc:
            raise ImportError(f"reading {path} needs spaCy: pip install 'rwkv-stream[spacy]' ({exc})") from exc
        return reader.read_docbin(path)
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def records_dataset(
    records: Sequence[dict], tokenizer: Tokenizer, tag_labels: Sequence[str] = (), cat_labels: Sequence[str] = ()
) -> Dataset:
    """Documents from records; label lists are collected from the data unless given."""
    tags = list(tag_labels) or ["O", *sorted({t[2] for r in records for t in r.get("tags", [])} - {"O"})]
    cats = list(cat_labels) or sorted({c for r in records for c in r.get("cats", {})})
    has_tags = any("tags" in r for r in records)
    docs = [_record_document(r, tokenizer, tags if has_tags else [], cats) for r in records]
    return Dataset([d for d in docs if d.ids], tags if has_tags else [], cats)


def _record_document(record: dict, tokenizer: Any, tag_labels: list[str], cat_labels: list[str]) -> Document:
    text = record["text"]
    enc = tokenizer._tok.encode(text, add_special_tokens=False) if hasattr(tokenizer, "_tok") else None
    ids = enc.ids if enc is not None else tokenizer.encode(text)
    tags = [IGNORE] * len(ids)
    if tag_labels and "tags" in record and enc is not None:
        tags = [_span_tag(s, e, record["tags"], tag_labels) for s, e in enc.offsets]
    cats = [IGNORE] * len(ids)
    if record.get("cats") and cat_labels and ids:
        best = max(record["cats"].items(), key=lambda kv: kv[1])[0]
        cats[-1] = cat_labels.index(best)
    return Document(ids, tags, cats, len(text.encode("utf-8")))


def _span_tag(start: int, end: int, spans: list, labels: list[str]) -> int:
    for s, e, label in spans:
        if start < e and end > s:
            return labels.index(label)
    return labels.index("O")


# ------------------------------------------------------------------------------------------ batches


Row = tuple[list[int], ...]  # ids, lm targets, tags, cats, then the lookahead tag lists


def doc_windows(doc: Document, ctx: int, rng: random.Random | None) -> Row:
    """A window of ``ctx + 1`` tokens (random start with ``rng``, else the start)."""
    n = len(doc.ids)
    start = rng.randrange(0, max(n - ctx, 1)) if rng else 0
    end = min(start + ctx + 1, n)
    ids = doc.ids[start:end]
    lm = ids[1:] + [IGNORE]
    rest = [seq[start:end][:ctx] for seq in (doc.tags, doc.cats, *doc.ahead)]
    return (ids[:ctx], lm[:ctx], *rest)


def make_batch(rows: list[Row], ctx: int) -> Batch:
    length = min(ctx, max(len(r[0]) for r in rows))

    def pad(seq: list[int], value: int) -> list[int]:
        return seq[:length] + [value] * (length - len(seq[:length]))

    width = min(len(r) for r in rows)
    cols = [torch.tensor([pad(r[k], 0 if k == 0 else IGNORE) for r in rows], dtype=torch.long) for k in range(width)]
    ahead = torch.stack(cols[4:], dim=1) if width > 4 else None
    return Batch(cols[0], cols[1], cols[2], cols[3], ahead)


def sample_batches(data: Dataset, batch_size: int, ctx: int, seed: int) -> Iterator[Batch]:
    """Endless random windows, documents drawn in proportion to their length."""
    rng = random.Random(seed)
    weights = [max(len(d.ids) - ctx, 1) for d in data.docs]
    while True:
        docs = rng.choices(data.docs, weights=weights, k=batch_size)
        yield make_batch([doc_windows(d, ctx, rng) for d in docs], ctx)
