"""Training the ``rwkv`` spaCy component: RWKV-4 in parallel ("GPT") mode over a batch of Docs, its own heads,
gradients from listeners, and the optimizer step.

* **Forward**: each Doc's text is tokenized whole (what the streaming encoder gives for the Doc fed alone),
  the batch is right-padded and run through :class:`~rwkv_stream.train.model.RWKV4` window by window
  (``window`` model tokens) with the recurrent state carried from one window to the next, so a long Doc
  costs memory for one window only. The state is carried without gradient (truncated backpropagation
  through time): backward recomputes one window at a time from its saved start state.
* **Frozen weights**: the hidden vectors come from the streaming engine itself (no gradient), so training
  features are bit for bit those of prediction.
* **Gradients**: the component's own heads (tagger, classifier) and every listener add their gradient
  with respect to the hidden vectors to one :class:`PendingBackward` per batch, which runs the RWKV backward
  once, at ``finish_update`` (or at the next ``update``); a listener that reports later still has its
  gradient backpropagated, and applied at the next step.
* **Step**: spaCy's optimizer (``[training.optimizer]``) updates the torch parameters by name, with the RWKV
  weights' learning rate scaled by ``weights_learn_rate``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from spacy.tokens import Doc
from spacy.training import Example
from torch import Tensor, nn
from torch.nn import functional as F

from .spacy_align import align, region_token_ends

if TYPE_CHECKING:
    from thinc.api import Optimizer

    from rwkv_stream.heads import Head
    from rwkv_stream.tokenizer import Tokenizer
    from rwkv_stream.train.model import RWKV4, LayerState


# ------------------------------------------------------------------------------------------ encoding
@dataclass
class EncodedBatch:
    """Model tokens of a batch of Docs and, per Doc, the model token each spaCy token reads."""

    ids: list[list[int]]
    index: list[list[int | None]]

    @property
    def max_len(self) -> int:
        return max((len(i) for i in self.ids), default=0)

    def padded(self) -> Tensor:
        out = torch.zeros(len(self.ids), max(self.max_len, 1), dtype=torch.long)
        for b, ids in enumerate(self.ids):
            out[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


def encode_docs(tokenizer: Tokenizer, docs: Sequence[Doc], rule: str) -> EncodedBatch:
    ids, index = [], []
    for doc in docs:
        doc_ids = tokenizer.encode(doc.text) if doc.text else []
        ends = region_token_ends(tokenizer, doc_ids, len(doc.text.encode("utf-8")))
        spans = [(t.idx, t.idx + len(t.text)) for t in doc]
        ids.append(doc_ids)
        index.append(align(spans, doc.text, ends, 0, rule))  # type: ignore[arg-type]
    return EncodedBatch(ids, index)


def token_vectors(hidden: Tensor, batch: EncodedBatch) -> list[np.ndarray]:
    """Per Doc, ``[n_spacy_tokens, C]`` float32: the hidden vector each token reads (zeros where none)."""
    out = []
    for b, index in enumerate(batch.index):
        rows = np.zeros((len(index), hidden.shape[-1]), dtype="float32")
        picked = [(i, j) for i, j in enumerate(index) if j is not None]
        if picked:
            rows[[i for i, _ in picked]] = hidden[b, [j for _, j in picked]].detach().float().cpu().numpy()
        out.append(rows)
    return out


# ------------------------------------------------------------------------------------------ forward
class WindowedPass:
    """Hidden vectors ``[B, T, C]`` of a padded batch, computed window by window with the state carried.

    With one window the graph is kept for the first backward; otherwise (and for any later backward) each
    window is recomputed from its saved start state, so at most one window's graph is alive.
    """

    def __init__(self, rwkv: RWKV4, ids: Tensor, window: int) -> None:
        self.rwkv, self.ids, self.window = rwkv, ids, window
        self.starts: list[list[LayerState] | None] = []
        self._graph: Tensor | None = None
        if ids.shape[1] <= window:
            self.starts.append(None)
            self._graph, _ = rwkv.forward_hidden(ids)
            self.hidden = self._graph.detach()
            return
        parts, state = [], None
        with torch.no_grad():
            for lo in range(0, ids.shape[1], window):
                self.starts.append(state)
                h, state = rwkv.forward_hidden(ids[:, lo : lo + window], state)
                parts.append(h)
        self.hidden = torch.cat(parts, dim=1)

    def backward(self, d_hidden: Tensor) -> None:
        if self._graph is not None:
            graph, self._graph = self._graph, None
            graph.backward(d_hidden)
            return
        for w, start in enumerate(self.starts):
            lo = w * self.window
            d = d_hidden[:, lo : lo + self.window]
            if not bool(d.any()):
                continue
            h, _ = self.rwkv.forward_hidden(self.ids[:, lo : lo + self.window], start)
            h.backward(d)


class BatchPass:
    """The hidden vectors ``[B, T, C]`` of a batch of Docs, run in groups of similar length (less padding),
    each group a :class:`WindowedPass`."""

    def __init__(self, rwkv: RWKV4, batch: EncodedBatch, window: int, slack: float = 1.3) -> None:
        lengths = [max(len(ids), 1) for ids in batch.ids]
        self.hidden = torch.zeros(len(lengths), max(lengths, default=1), rwkv.cfg.n_embd)
        self.parts: list[tuple[list[int], WindowedPass]] = []
        for group in length_groups(lengths, slack):
            ids = EncodedBatch([batch.ids[b] for b in group], []).padded()
            run = WindowedPass(rwkv, ids, window)
            self.hidden[group, : ids.shape[1]] = run.hidden
            self.parts.append((group, run))

    def backward(self, d_hidden: Tensor) -> None:
        for group, run in self.parts:
            d = d_hidden[group, : run.ids.shape[1]]
            if bool(d.any()):
                run.backward(d)


def length_groups(lengths: Sequence[int], slack: float) -> list[list[int]]:
    """Indices grouped by length so that a group's padded size stays within ``slack`` times its tokens."""
    groups: list[list[int]] = []
    group: list[int] = []
    total = 0
    for b in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if group and (len(group) + 1) * lengths[b] > slack * (total + lengths[b]):
            groups.append(group)
            group, total = [], 0
        group.append(b)
        total += lengths[b]
    return [*groups, group] if group else groups


@dataclass
class PendingBackward:
    """The gradient with respect to one batch's hidden vectors, gathered from heads and listeners."""

    batch: EncodedBatch
    forward: BatchPass | None  # None: the RWKV weights are frozen
    d_hidden: Tensor
    done: bool = False
    listener_loss: float = 0.0
    _count: int = field(default=0)

    def add_rows(self, d_docs: Sequence[Any]) -> None:
        """Listener gradients, one ``[n_spacy_tokens, C]`` array per Doc, scattered onto model tokens."""
        for b, (index, d) in enumerate(zip(self.batch.index, d_docs, strict=True)):
            d = np.asarray(d, dtype="float32")
            self.listener_loss += float((d**2).sum())
            picked = [(i, j) for i, j in enumerate(index) if j is not None]
            if picked:  # tokens reading the same model token add up
                rows = torch.from_numpy(np.ascontiguousarray(d[[i for i, _ in picked]]))
                self.d_hidden[b].index_add_(0, torch.tensor([j for _, j in picked]), rows)
        if self.done:
            self.run()

    def run(self) -> None:
        """Backpropagate what has been gathered (again for gradients that arrive after a first run)."""
        self.done = True
        if self.forward is not None and bool(self.d_hidden.any()):
            self.forward.backward(self.d_hidden)
        self.d_hidden = torch.zeros_like(self.d_hidden)


# ------------------------------------------------------------------------------------------ the trainable net
class TrainNet(nn.Module):
    """What ``nlp.update`` trains: the RWKV-4 weights (absent when frozen) and the component's heads."""

    def __init__(self, rwkv: RWKV4 | None, heads: dict[str, Head]) -> None:
        super().__init__()
        self.rwkv = rwkv
        self.heads = nn.ModuleDict(heads)

    def head(self, name: str) -> Head:
        return self.heads[name]  # type: ignore[return-value]


def rwkv_from_tensors(tensors: dict[str, Tensor], chunk_len: int = 16) -> RWKV4:
    from rwkv_stream.train.model import RWKV4

    return RWKV4.from_state_dict(tensors, chunk_len)


def canonical_tensors(rwkv: RWKV4, like: dict[str, Tensor]) -> dict[str, Tensor]:
    """The trained weights under the engine's canonical names and shapes (fp32)."""
    own = rwkv.checkpoint_state_dict()
    return {k: own[k].reshape(v.shape).float().contiguous() for k, v in like.items()}


def apply_optimizer(net: TrainNet, sgd: Optimizer, key: int, weights_scale: float) -> bool:
    """One optimizer step over every parameter with a gradient; returns whether any changed."""
    changed = False
    for name, param in net.named_parameters():
        if param.grad is None:
            continue
        scale = weights_scale if name.startswith("rwkv.") else 1.0
        if scale > 0:
            weights = param.data.detach().cpu().float().contiguous().view(-1).numpy().copy()
            grad = param.grad.detach().cpu().float().contiguous().view(-1).numpy().copy()
            new, _ = sgd((key, name), weights, grad, lr_scale=scale)
            param.data.copy_(torch.from_numpy(np.asarray(new)).view_as(param))
            changed = True
        param.grad = None
    return changed


# ------------------------------------------------------------------------------------------ gold and losses
def gold_tags(eg: Example, attr: str) -> list[str | None]:
    """Gold values of a token attribute (``"tag_"``, ``"pos_"``... or ``"_.name"``) on the predicted tokens
    (``None`` where unaligned or missing)."""
    if not attr.startswith("_."):
        return [v or None for v in eg.get_aligned(attr.rstrip("_").upper(), as_string=True)]
    name, ref = attr[2:], eg.reference
    out: list[str | None] = []
    for i in range(len(eg.predicted)):
        aligned = [int(j) for j in eg.alignment.x2y[i]]
        out.append(ref[aligned[0]]._.get(name) if len(aligned) == 1 else None)
    return out


def tag_loss(head: Head, hidden: Tensor, batch: EncodedBatch, gold: list[list[str | None]]) -> Tensor | None:
    """Cross-entropy of the tag head at the model token each gold-tagged spaCy token reads."""
    labels = {label: i for i, label in enumerate(head.labels)}
    rows, targets = [], []
    for b, (index, tags) in enumerate(zip(batch.index, gold, strict=True)):
        for j, tag in zip(index, tags, strict=True):
            if j is not None and tag in labels:
                rows.append((b, j))
                targets.append(labels[tag])
    if not rows:
        return None
    picked = hidden[[b for b, _ in rows], [j for _, j in rows]]
    return F.cross_entropy(head(picked).float(), torch.tensor(targets))


def cats_loss(head: Head, hidden: Tensor, batch: EncodedBatch, gold: list[dict[str, float]]) -> Tensor | None:
    """The classifier head at each Doc's last model token (the stream's running classification)."""
    present = [b for b, (ids, cats) in enumerate(zip(batch.ids, gold, strict=True)) if ids and cats]
    if not present:
        return None
    rows = hidden[present, [len(batch.ids[b]) - 1 for b in present]]
    scores = head(rows).float()
    target = torch.tensor([[gold[b].get(label, 0.0) for label in head.labels] for b in present])
    if head.multi_label:
        return F.binary_cross_entropy_with_logits(scores, target)
    keep = target.sum(dim=1) > 0
    if not bool(keep.any()):
        return None
    return F.cross_entropy(scores[keep], target[keep].argmax(dim=1))


# ------------------------------------------------------------------------------------------ heads from data
def adapt_head(old: Head | None, kind: str, labels: list[str], n_embd: int, multi_label: bool) -> Head:
    """A head over ``labels``: ``old`` itself when it already has them, else a new head that keeps ``old``'s
    weights for the labels they share (and its hidden layer)."""
    from rwkv_stream.heads import Head

    if old is not None and sorted(old.labels) == sorted(labels) and old.multi_label == multi_label:
        return old
    hidden_dim = old.hidden_dim if old is not None else 0
    new = Head(kind, labels, n_embd, hidden_dim, multi_label)  # type: ignore[arg-type]
    if old is not None:
        _copy_rows(old, new)
    return new


@torch.no_grad()
def _copy_rows(old: Head, new: Head) -> None:
    old_out, new_out = _out_layer(old), _out_layer(new)
    if old.hidden_dim and old.hidden_dim == new.hidden_dim:
        new.net[0].load_state_dict(old.net[0].state_dict())  # type: ignore[index]
    for i, label in enumerate(new.labels):
        if label in old.labels:
            j = old.labels.index(label)
            new_out.weight[i] = old_out.weight[j].float()
            new_out.bias[i] = old_out.bias[j].float()


def _out_layer(head: Head) -> nn.Linear:
    net = head.net
    layer = net[-1] if isinstance(net, nn.Sequential) else net
    assert isinstance(layer, nn.Linear)
    return layer


def data_labels(examples: Sequence[Example], attr: str | None) -> tuple[list[str], list[str], bool]:
    """Tag labels (of ``attr``), cats labels and whether the cats are multi-label, from gold examples."""
    tags: set[str] = set()
    cats: set[str] = set()
    multi = False
    for eg in examples:
        if attr is not None:
            tags.update(t for t in gold_tags(eg, attr) if t)
        cats.update(eg.reference.cats)
        multi = multi or sum(1 for v in eg.reference.cats.values() if v >= 0.5) > 1
    return sorted(tags), sorted(cats), multi
