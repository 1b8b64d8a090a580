"""Task heads that read the engine's final hidden vectors: per-token tagging and per-stream classification.

Heads are causal: a token's tag is read off the hidden vector at that token, and a stream's classes off the
hidden vector of its latest token (the RNN state already summarizes everything before it). So feeding a text
in fragments gives the same outputs as feeding it whole. For tasks that need to look ahead (punctuation
after a word), label the *boundary before* each token instead: by the time the next word arrives, it knows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

HEADS_FORMAT_VERSION = 1
HeadKind = Literal["tagger", "classifier"]


class Head(nn.Module):
    """A linear (or one-hidden-layer) map from hidden vectors ``[N, C]`` to label scores ``[N, n_labels]``."""

    def __init__(
        self,
        kind: HeadKind,
        labels: list[str],
        n_embd: int,
        hidden_dim: int = 0,
        multi_label: bool = False,
    ) -> None:
        super().__init__()
        if kind not in ("tagger", "classifier"):
            raise ValueError(f"unknown head kind {kind!r}; use 'tagger' or 'classifier'")
        if len(labels) < 1 or len(set(labels)) != len(labels):
            raise ValueError(f"head labels must be non-empty and unique, got {labels}")
        self.kind: HeadKind = kind
        self.labels = list(labels)
        self.n_embd = n_embd
        self.hidden_dim = hidden_dim
        self.multi_label = multi_label
        if hidden_dim:
            self.net: nn.Module = nn.Sequential(
                nn.Linear(n_embd, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, len(labels))
            )
        else:
            self.net = nn.Linear(n_embd, len(labels))

    def forward(self, hidden: Tensor) -> Tensor:
        return self.net(hidden.to(next(self.net.parameters()).dtype))

    @torch.no_grad()
    def probabilities(self, hidden: Tensor) -> Tensor:
        scores = self.forward(hidden).float()
        return torch.sigmoid(scores) if self.multi_label else torch.softmax(scores, dim=-1)

    @torch.no_grad()
    def predict(self, hidden: Tensor) -> list[str]:
        """Most likely label per row."""
        return [self.labels[i] for i in self.forward(hidden).argmax(dim=-1).tolist()]

    def same_as(self, other: Head) -> bool:
        """Same spec and the same weights, bit for bit (the same head saved twice)."""
        if self.spec() != other.spec():
            return False
        mine, theirs = self.state_dict(), other.state_dict()
        return mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)

    def spec(self) -> dict:
        return {
            "kind": self.kind,
            "labels": self.labels,
            "n_embd": self.n_embd,
            "hidden_dim": self.hidden_dim,
            "multi_label": self.multi_label,
        }


@dataclass
class HeadSet:
    """Named heads that travel together with a model (saved as ``heads.json`` + ``heads.safetensors``)."""

    heads: dict[str, Head]
    model_fingerprint: str | None = None

    def __getitem__(self, name: str) -> Head:
        try:
            return self.heads[name]
        except KeyError:
            raise KeyError(f"unknown head {name!r}; available: {sorted(self.heads)}") from None

    def __contains__(self, name: str) -> bool:
        return name in self.heads

    def merged(self, extra: HeadSet, *, replace: bool = False, where: str = "extra heads") -> HeadSet:
        """These heads plus ``extra``'s (this set's model fingerprint). A name both have is an error unless the
        two heads are the same (spec and weights: e.g. a training run's ``OUT/heads`` beside its bundle), or
        ``replace`` says that ``extra``'s head replaces this set's."""
        clash = sorted(n for n in set(extra.heads) & set(self.heads) if not self.heads[n].same_as(extra.heads[n]))
        if clash and not replace:
            raise ValueError(f"{where} has heads named {clash} that the model already has with other weights; "
                             "rename them (rwkv-stream train --tag-head/--cats-head) or replace the model's "
                             "explicitly (replace_heads=True)")
        return HeadSet({**self.heads, **extra.heads}, self.model_fingerprint)

    def save(self, directory: str | Path) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {
            "version": HEADS_FORMAT_VERSION,
            "model_fingerprint": self.model_fingerprint,
            "heads": {name: head.spec() for name, head in self.heads.items()},
        }
        (directory / "heads.json").write_text(json.dumps(meta, indent=2))
        tensors = {
            f"{name}.{key}": value.detach().contiguous()
            for name, head in self.heads.items()
            for key, value in head.state_dict().items()
        }
        save_file(tensors, str(directory / "heads.safetensors"))

    @classmethod
    def load(cls, directory: str | Path) -> HeadSet:
        from safetensors.torch import load_file

        directory = Path(directory)
        meta_file = directory / "heads.json"
        if not meta_file.exists():
            raise FileNotFoundError(f"no heads.json in {directory}")
        meta = json.loads(meta_file.read_text())
        if meta.get("version") != HEADS_FORMAT_VERSION:
            raise ValueError(f"heads format version {meta.get('version')} not supported in {directory}")
        tensors = load_file(str(directory / "heads.safetensors"))
        heads = {}
        for name, spec in meta["heads"].items():
            head = Head(**spec)
            prefix = name + "."
            head.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
            heads[name] = head.eval()
        return cls(heads, meta.get("model_fingerprint"))
