"""The engine side of the stream processor: keyed streams, fragments in, tokens/tags/cats out.

Nothing here knows Kafka. A :class:`StreamEngine` owns a :class:`~rwkv_stream.streams.StreamTable` (one pool
slot per live stream) and, per stream, the streaming tokenizer's held-back tail, an incremental UTF-8 decoder
for token texts, the character offset and the last hidden vector. :meth:`StreamEngine.snapshot` packs all of
it into one :class:`~rwkv_stream.state.State` (the extras in ``State.meta``) so a stream restored from a
snapshot continues exactly as if it had never left memory.

Batch invariance: a stream's results must not depend on which other streams share its step, or a replay after
a crash (batched differently) would produce different bits. Steps run with ``batch_invariant=True`` (see
:meth:`rwkv_stream.model.Model.step`: small steps padded to the row count from which the CPU's products give each
row the same bits) and head products are padded the same way. Checked bitwise on CPU by the tests; on GPUs
cuBLAS gives no such promise and duplicates may differ in the last bits of ``cats``.
"""

from __future__ import annotations

import codecs
import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rwkv_stream.bundle import Bundle
from rwkv_stream.generate import SamplingConfig, decode_until_stop, generate_ids
from rwkv_stream.heads import Head
from rwkv_stream.linear import invariant_call
from rwkv_stream.state import State
from rwkv_stream.streams import StreamTable
from rwkv_stream.tokenizer import StreamingEncoder

from .schema import GenerationRequest, TokenOut

StreamKey = tuple[int, str]  # (input partition, stream id)
META_FORMAT = "rwkv-stream/kafka-stream"
META_VERSION = 1


# ------------------------------------------------------------------------------------------ tokenizer state
def restore_encoder(tokenizer: Any, state: dict[str, Any] | None) -> StreamingEncoder:
    encoder = StreamingEncoder(tokenizer)
    if state:
        encoder.import_state(state)
    return encoder


def _new_utf8_decoder() -> codecs.IncrementalDecoder:
    return codecs.getincrementaldecoder("utf-8")(errors="replace")


# ------------------------------------------------------------------------------------------ per stream
@dataclass
class StreamCtx:
    encoder: StreamingEncoder
    utf8: codecs.IncrementalDecoder
    applied: int = -1  # input offset of the last fragment applied to the state
    chars: int = 0  # characters of token text emitted so far
    hidden: Tensor | None = None  # last token's hidden vector [C], what cats and generation read
    fragments: int = 0
    dirty: bool = False  # changed since its last snapshot


@dataclass
class StepItem:
    key: StreamKey
    text: str
    end: bool = False


@dataclass
class StepResult:
    tokens: list[TokenOut]
    cats: dict[str, dict[str, float]] | None
    held_back: int
    n_tokens: int


class StreamEngine:
    """Keyed RWKV streams with tokenizer state, tagger/classifier heads and batch-invariant steps."""

    def __init__(self, bundle: Bundle, heads: Sequence[str] | None = None, max_streams: int = 4096) -> None:
        self.model = bundle.model
        self.tokenizer = bundle.tokenizer
        if self.tokenizer is None:
            raise ValueError("the stream processor needs a bundle with a tokenizer")
        if self.tokenizer.vocab_size > self.model.config.vocab_size:
            raise ValueError(
                f"tokenizer has {self.tokenizer.vocab_size} ids, model only {self.model.config.vocab_size}"
            )
        names = list(bundle.heads.heads) if heads is None else list(heads)
        self.heads: dict[str, Head] = {name: bundle.heads[name] for name in names}
        self.taggers = {n: h for n, h in self.heads.items() if h.kind == "tagger"}
        self.classifiers = {n: h for n, h in self.heads.items() if h.kind == "classifier"}
        self.max_streams = max_streams
        self.table: StreamTable[StreamKey] = StreamTable(self.model, max_streams=max_streams)
        self._ctx: OrderedDict[StreamKey, StreamCtx] = OrderedDict()

    @property
    def fingerprint(self) -> str:
        return self.model.fingerprint

    # ----------------------------------------------------------------------------- stream lifecycle
    def __contains__(self, key: object) -> bool:
        return key in self._ctx

    def __len__(self) -> int:
        return len(self._ctx)

    def live_keys(self) -> list[StreamKey]:
        """Live streams, least recently used first."""
        return list(self._ctx)

    def ctx(self, key: StreamKey) -> StreamCtx:
        return self._ctx[key]

    def open(self, key: StreamKey, applied: int = -1) -> None:
        """Start a fresh stream (the caller makes room first: see :meth:`lru_victims`)."""
        self._check_room(key)
        self.table.end(key)
        self.table.slot(key)
        self._ctx[key] = StreamCtx(StreamingEncoder(self.tokenizer), _new_utf8_decoder(), applied=applied)

    def load(self, key: StreamKey, data: bytes) -> None:
        """Restore a stream from :meth:`snapshot` bytes (raises StateError for another model's state)."""
        state = State.from_bytes(data, expected_fingerprint=self.fingerprint)
        meta = state.meta
        if meta.get("format") != META_FORMAT or meta.get("version") != META_VERSION:
            raise ValueError(f"state meta format {meta.get('format')!r} v{meta.get('version')} not supported")
        self._check_room(key)
        self.table.put(key, state)
        utf8 = _new_utf8_decoder()
        utf8.setstate((bytes(meta["utf8"][0]), int(meta["utf8"][1])))
        hidden = None
        if meta.get("hidden") is not None:
            hidden = torch.from_numpy(np.frombuffer(meta["hidden"], dtype="<f4").copy())
        self._ctx[key] = StreamCtx(
            restore_encoder(self.tokenizer, meta["encoder"]), utf8, int(meta["applied"]), int(meta["chars"]),
            hidden, int(meta["fragments"]),
        )

    def snapshot(self, key: StreamKey) -> bytes:
        ctx = self._ctx[key]
        state = self.table.state(key)
        pending, flag = ctx.utf8.getstate()
        hidden = None if ctx.hidden is None else ctx.hidden.detach().cpu().numpy().astype("<f4").tobytes()
        state.meta = {
            "format": META_FORMAT, "version": META_VERSION, "applied": ctx.applied, "chars": ctx.chars,
            "fragments": ctx.fragments, "encoder": ctx.encoder.export_state(), "utf8": [bytes(pending), int(flag)],
            "hidden": hidden,
        }
        return state.to_bytes()

    def drop(self, key: StreamKey) -> None:
        self._ctx.pop(key, None)
        self.table.end(key)

    def lru_victims(self, n_new: int, protect: set[StreamKey]) -> list[StreamKey]:
        """Least recently used live streams (not in ``protect``) to evict so ``n_new`` more fit."""
        excess = len(self._ctx) + n_new - self.max_streams
        if excess <= 0:
            return []
        victims = [k for k in self._ctx if k not in protect][:excess]
        if len(victims) < excess:
            raise ValueError(f"{len(protect)} streams in one batch exceed max_streams={self.max_streams}")
        return victims

    def _check_room(self, key: StreamKey) -> None:
        if key not in self._ctx and len(self._ctx) >= self.max_streams:
            raise RuntimeError(f"no room for stream {key}: {len(self._ctx)} live (max_streams={self.max_streams})")

    def state_bytes(self) -> int:
        return len(self._ctx) * self.model.config.state_floats * 4

    # ----------------------------------------------------------------------------- processing
    @torch.no_grad()
    def step(self, items: Sequence[StepItem]) -> list[StepResult]:
        """Apply one fragment to each of several distinct live streams, all in one batched step."""
        keys = [item.key for item in items]
        if len(set(keys)) != len(keys):
            raise ValueError("a stream appears twice in one step")
        ids = [self._encode(item) for item in items]
        hidden = self._run(keys, ids)
        tags = self._tags(hidden)
        for key, rows in zip(keys, hidden, strict=True):
            ctx = self._ctx[key]
            self._ctx.move_to_end(key)
            ctx.fragments += 1
            ctx.dirty = True
            if len(rows):
                ctx.hidden = rows[-1].clone()
        cats = self._cats([self._ctx[k].hidden for k in keys])
        results = []
        for i, item in enumerate(items):
            ctx = self._ctx[item.key]
            tokens = self._token_outs(ctx, ids[i], tags[i], final=item.end)
            results.append(StepResult(tokens, cats[i], ctx.encoder.held_back, len(ids[i])))
        return results

    def _encode(self, item: StepItem) -> list[int]:
        encoder = self._ctx[item.key].encoder
        ids = encoder.push(item.text) if item.text else []
        if item.end:
            ids += encoder.flush()
        return ids

    def _run(self, keys: list[StreamKey], ids: list[list[int]]) -> list[Tensor]:
        """Hidden vectors per stream, bit-identical whatever else shares the step (see the module doc)."""
        if not any(ids):
            return [torch.empty(0, self.model.config.n_embd) for _ in keys]
        out = self.table.step(keys, ids, logits="none", batch_invariant=True)
        return [h.float().cpu() for h in out.hidden]

    def _head(self, head: Head, rows: Tensor) -> Tensor:
        key = ("head", head.n_embd, head.hidden_dim, len(head.labels), next(head.parameters()).dtype)
        return invariant_call(head, rows, key)

    def _tags(self, hidden: list[Tensor]) -> list[list[dict[str, str]]]:
        counts = [len(h) for h in hidden]
        per_row: list[dict[str, str]] = [{} for _ in range(sum(counts))]
        if per_row and self.taggers:
            rows = torch.cat(hidden)
            for name, head in self.taggers.items():
                best = self._head(head, rows).argmax(dim=-1).tolist()
                for row, label in zip(per_row, best, strict=True):
                    row[name] = head.labels[label]
        out, pos = [], 0
        for n in counts:
            out.append(per_row[pos : pos + n])
            pos += n
        return out

    def _cats(self, last: list[Tensor | None]) -> list[dict[str, dict[str, float]] | None]:
        present = [i for i, h in enumerate(last) if h is not None]
        out: list[dict[str, dict[str, float]] | None] = [None] * len(last)
        if not present or not self.classifiers:
            return out
        rows = torch.stack([last[i] for i in present])
        for i in present:
            out[i] = {}
        for name, head in self.classifiers.items():
            scores = self._head(head, rows).float()
            probs = torch.sigmoid(scores) if head.multi_label else torch.softmax(scores, dim=-1)
            for row, i in zip(probs.tolist(), present, strict=True):
                out[i][name] = dict(zip(head.labels, row, strict=True))  # type: ignore[index]
        return out

    def _token_outs(self, ctx: StreamCtx, ids: list[int], tags: list[dict[str, str]], final: bool) -> list[TokenOut]:
        tokens = []
        for token_id, tag in zip(ids, tags, strict=True):
            text = ctx.utf8.decode(self._token_bytes(token_id))
            tokens.append(TokenOut(token_id, text, ctx.chars, ctx.chars + len(text), tag))
            ctx.chars += len(text)
        if final:
            rest = ctx.utf8.decode(b"", final=True)
            if rest and tokens:
                tokens[-1].text += rest
                tokens[-1].end += len(rest)
                ctx.chars += len(rest)
        return tokens

    def _token_bytes(self, token_id: int) -> bytes:
        if self.tokenizer.is_byte_level:
            return self.tokenizer.id_to_token_bytes(token_id)
        return self.tokenizer.decode([token_id]).encode("utf-8")

    def cats(self, key: StreamKey) -> dict[str, dict[str, float]] | None:
        return self._cats([self._ctx[key].hidden])[0]

    @torch.no_grad()
    def generate(self, key: StreamKey, request: GenerationRequest, offset: int) -> str:
        """Sample a continuation on a fork of the stream (the stream itself does not advance).

        Without a seed in the request, the seed is derived from the stream id and the input offset, so a
        replayed fragment generates the same text.
        """
        ctx = self._ctx[key]
        if ctx.hidden is None:
            return ""
        seed = request.seed if request.seed is not None else _derived_seed(key, offset)
        cfg = SamplingConfig(request.max_tokens, request.temperature, request.top_p, seed=seed, stop=request.stop)
        logits = self.model.head(ctx.hidden[None])[0]
        ids = generate_ids(self.model, self.table.state(key), logits, cfg)
        return "".join(decode_until_stop(self.tokenizer, ids, cfg.stop))


def _derived_seed(key: StreamKey, offset: int) -> int:
    digest = hashlib.blake2b(f"{key[0]}:{key[1]}:{offset}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF
