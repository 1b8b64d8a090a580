"""Held-out evaluation: tagger per-class precision/recall/F1 (punctuation and case apart) against trivial
baselines, classifier accuracy against the majority class, and the LM's bits per byte."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.nn import functional as F

from rwkv_stream.heads import Head
from rwkv_stream.train import transcript
from rwkv_stream.train.data import IGNORE, Dataset, Document

if TYPE_CHECKING:
    from rwkv_stream.models import RecurrentModel as Model
    from rwkv_stream.tokenizer import Tokenizer
    from rwkv_stream.train.model import RWKV4

HiddenFn = Callable[[list[int]], Tensor]  # token ids of one stream -> hidden vectors [T, C] (fp32)


def training_hidden_fn(model: RWKV4, chunk: int = 512) -> HiddenFn:
    """Streams through the training model ``chunk`` tokens at a time, carrying the RNN state."""

    @torch.no_grad()
    def run(ids: list[int]) -> Tensor:
        device = next(model.parameters()).device
        state, out = None, []
        for start in range(0, len(ids), chunk):
            x = torch.tensor([ids[start : start + chunk]], dtype=torch.long, device=device)
            hidden, state = model.forward_hidden(x, state)
            out.append(hidden[0].float().cpu())
        return torch.cat(out)

    return run


def engine_hidden_fn(model: Model) -> HiddenFn:
    """The engine (:class:`rwkv_stream.model.Model`) on a whole stream."""

    @torch.no_grad()
    def run(ids: list[int]) -> Tensor:
        return model.forward_hidden(ids)[0].float().cpu()

    return run


def prf(gold: Sequence[str], pred: Sequence[str], labels: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per-label precision/recall/F1/support."""
    out = {}
    for label in labels:
        tp = sum(g == label and p == label for g, p in zip(gold, pred, strict=True))
        n_pred, n_gold = sum(p == label for p in pred), sum(g == label for g in gold)
        prec, rec = tp / n_pred if n_pred else 0.0, tp / n_gold if n_gold else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        out[label] = {"precision": round(prec, 4), "recall": round(rec, 4), "f1": round(f1, 4), "support": n_gold}
    return out


def micro_f1(gold: Sequence[str], pred: Sequence[str], labels: Sequence[str]) -> float:
    tp = sum(g == p and g in labels for g, p in zip(gold, pred, strict=True))
    n_pred, n_gold = sum(p in labels for p in pred), sum(g in labels for g in gold)
    return round(2 * tp / (n_pred + n_gold), 4) if n_pred + n_gold else 0.0


def tag_report(gold: list[str], pred: list[str], is_end: list[bool]) -> dict:
    """Punctuation scored at every labelled position (words and end markers), case at words only."""
    gp, pp = [g.split("-")[0] for g in gold], [p.split("-")[0] for p in pred]
    words = [i for i, end in enumerate(is_end) if not end]
    gc, pc = [gold[i].split("-")[1] for i in words], [pred[i].split("-")[1] for i in words]
    return {
        "punct": prf(gp, pp, transcript.PUNCTS),
        "punct_micro_f1": micro_f1(gp, pp, ("COMMA", "PERIOD", "QUESTION")),
        "case": prf(gc, pc, transcript.CASES),
        "case_accuracy": round(sum(g == p for g, p in zip(gc, pc, strict=True)) / max(len(gc), 1), 4),
        "label_accuracy": round(sum(g == p for g, p in zip(gold, pred, strict=True)) / max(len(gold), 1), 4),
        "n_positions": len(gold),
    }


def rule_baseline(doc: Document, positions: list[int], end_id: int, tokenizer: Tokenizer) -> list[str]:
    """No punctuation inside the stream, PERIOD at the end marker; Cap for the first word and for 'i'."""
    out = []
    for n, i in enumerate(positions):
        if doc.ids[i] == end_id:
            out.append("PERIOD-lower")
            continue
        word = tokenizer.decode([doc.ids[i]]).strip()
        out.append("O-Cap" if n == 0 or word == "i" else "O-lower")
    return out


@dataclass
class _Tally:
    """What :func:`evaluate` collects over the documents."""

    gold: list[str] = field(default_factory=list)
    pred: list[str] = field(default_factory=list)
    base: list[str] = field(default_factory=list)
    is_end: list[bool] = field(default_factory=list)
    cat_gold: list[str] = field(default_factory=list)
    cat_pred: list[str] = field(default_factory=list)
    nll: float = 0.0
    n_bytes: int = 0


def evaluate(
    data: Dataset, hidden_fn: HiddenFn, lm_head: Callable[[Tensor], Tensor] | None, heads: dict[str, Head],
    tokenizer: Tokenizer, end_id: int, majority_cat: str | None = None,
) -> dict:
    """All metrics on ``data`` (transcript-style tag labels get the punctuation/case breakdown)."""
    t = _Tally()
    for doc in data.docs:
        hidden = hidden_fn(doc.ids)
        if lm_head is not None and len(doc.ids) > 1:
            t.nll += _nll(lm_head(hidden[:-1]), doc.ids[1:])
            t.n_bytes += len(tokenizer.decode_bytes(doc.ids[1:]))
        if "tagger" in heads:
            pos = [i for i, tag in enumerate(doc.tags) if tag != IGNORE]
            labels = heads["tagger"].labels
            t.gold += [labels[doc.tags[i]] for i in pos]
            t.pred += heads["tagger"].predict(hidden[pos])
            t.is_end += [doc.ids[i] == end_id for i in pos]
            t.base += rule_baseline(doc, pos, end_id, tokenizer)
        if "classifier" in heads and doc.cats and doc.cats[-1] != IGNORE:
            t.cat_gold.append(heads["classifier"].labels[doc.cats[-1]])
            t.cat_pred.append(heads["classifier"].predict(hidden[-1:])[0])
    return _summary(t, majority_cat, len(data.docs))


def _nll(logits: Tensor, targets: list[int]) -> float:
    return float(F.cross_entropy(logits.float(), torch.tensor(targets), reduction="sum"))


def _summary(t: _Tally, majority_cat: str | None, n_docs: int) -> dict:
    out: dict = {"n_streams": n_docs}
    gold, pred, is_end, cat_gold = t.gold, t.pred, t.is_end, t.cat_gold
    if gold and all("-" in g for g in gold):
        out["tagger"] = tag_report(gold, pred, is_end)
        out["baseline_majority"] = tag_report(gold, ["O-lower"] * len(gold), is_end)
        out["baseline_rule"] = tag_report(gold, t.base, is_end)
    elif gold:
        out["tagger"] = {"accuracy": round(sum(g == p for g, p in zip(gold, pred, strict=True)) / len(gold), 4)}
    if cat_gold:
        majority = majority_cat or Counter(cat_gold).most_common(1)[0][0]
        out["classifier"] = {
            "accuracy": round(sum(g == p for g, p in zip(cat_gold, t.cat_pred, strict=True)) / len(cat_gold), 4),
            "majority_class": majority,
            "majority_accuracy": round(sum(g == majority for g in cat_gold) / len(cat_gold), 4),
            "n_streams": len(cat_gold),
        }
    if t.n_bytes:
        out["lm"] = {"bits_per_byte": round(t.nll / math.log(2) / t.n_bytes, 4), "bytes": t.n_bytes}
    return out
