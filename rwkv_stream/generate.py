"""Sampling and text generation from a stream's state (always on a fork: the stream is never advanced)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .models import RecurrentModel as Model
from .state import State

__all__ = ["SamplingConfig", "decode_until_stop", "generate_ids", "generate_text", "sample_token"]


@dataclass
class SamplingConfig:
    max_tokens: int = 40
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        self.stop = tuple(self.stop)


def sample_token(logits: Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> int:
    """Temperature + nucleus (top-p) sampling; temperature 0 is greedy."""
    logits = logits.float().reshape(-1)
    if cfg.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / cfg.temperature, dim=-1)
    if cfg.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < cfg.top_p  # always keeps the top token
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def generate_ids(model: Model, state: State, last_logits: Tensor, cfg: SamplingConfig) -> Iterator[int]:
    """Sample up to ``cfg.max_tokens`` ids continuing ``state`` (which is not modified)."""
    generator = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
    logits = last_logits
    for _ in range(cfg.max_tokens):
        token = sample_token(logits, cfg, generator)
        yield token
        out, state = model.forward([token], state)
        logits = out[-1]


def generate_text(
    model: Model, tokenizer: Any, prompt: str, cfg: SamplingConfig, state: State | None = None
) -> Iterator[str]:
    """Feed ``prompt`` on a fork of ``state`` and yield decoded text pieces (valid UTF-8) until a stop string."""

    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError("generation needs a non-empty prompt (or a stream with some text)")
    logits, fork = model.forward(ids, state)
    yield from decode_until_stop(tokenizer, generate_ids(model, fork, logits[-1], cfg), cfg.stop)


def decode_until_stop(tokenizer: Any, ids: Iterator[int], stop: tuple[str, ...]) -> Iterator[str]:
    """Decode a stream of ids into text pieces, ending before the first stop string."""
    from .tokenizer import StreamingDecoder

    decoder = StreamingDecoder(tokenizer)
    text, emitted = "", 0
    hold = max((len(s) for s in stop), default=1) - 1  # a stop string may still be forming
    for token in ids:
        text += decoder.push([token])
        cut = _first_stop(text, stop)
        if cut is not None:
            if cut > emitted:
                yield text[emitted:cut]
            return
        safe = max(emitted, len(text) - hold)
        if safe > emitted:
            yield text[emitted:safe]
            emitted = safe
    text += decoder.flush()
    cut = _first_stop(text, stop)
    end = len(text) if cut is None else cut
    if end > emitted:
        yield text[emitted:end]


def _first_stop(text: str, stop: tuple[str, ...]) -> int | None:
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return min(hits) if hits else None
