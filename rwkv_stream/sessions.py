"""Streaming sessions: the one place that keeps a live text stream's state, for every integration.

Design note
-----------
A *session* is everything needed to continue one stream of text (a call, a chat, a Kafka key) exactly where
it left off, as if it had never been interrupted:

* the model state (a slot of the table's :class:`~rwkv_stream.pool.StatePool` while resident) and its token
  count;
* the streaming tokenizer's carry (input pushed but not yet final ids) and the UTF-8 decoder's pending bytes
  of the token texts emitted so far;
* counters: characters of input received, characters of token text emitted, and the *position* of the last
  applied fragment (an opaque, increasing input position such as a Kafka offset: a fragment at or below it
  is a replay and is skipped);
* the last hidden vector (what classifier heads and generation read) and small caller metadata.

:meth:`SessionTable.feed` takes fragments (str or bytes, any split) for many keys at once. Each stream's
fragments are applied in input order; fragments of different streams at the same depth share one batched,
ragged, batch-invariant step, so every stream's results are bit-identical to feeding it alone, whatever the
interleaving, batch size or ``max_streams``.

Residency: at most ``max_streams`` sessions (and ``max_state_bytes`` of model state) are resident. A session
with work pending in the current call is never evicted: a call holding more streams than fit is processed in
waves of streams, each wave running all of its streams' fragments. The least recently used sessions are
evicted to the :class:`SessionStore` (written only when changed since the store last saw them) and come back
transparently when their key does; sessions idle for longer than ``ttl_s`` are evicted the same way. The
default store is a :class:`MemoryStore` (nothing is lost; memory grows with the streams not ended);
:class:`DirectoryStore` bounds memory; :class:`DiscardStore` forgets evicted sessions (their keys start
afresh), for callers that want that.

Export: :meth:`SessionTable.export` bytes are a :class:`~rwkv_stream.state.State` (versioned, checksummed,
tagged with the model fingerprint) whose ``meta`` carries the tokenizer carry, decoder bytes, counters, last
hidden vector and caller metadata. :meth:`SessionTable.restore` rejects another model's bytes with a
:class:`~rwkv_stream.state.StateError`. Exported and restored, a stream continues bit for bit.
"""

from __future__ import annotations

import codecs
import copy
import hashlib
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from .generate import SamplingConfig, decode_until_stop, generate_ids
from .heads import Head
from .linear import invariant_call
from .models import RecurrentModel as Model
from .state import State, StateError
from .tokenizer import StreamingEncoder, Tokenizer, encode_continuation

SESSION_FORMAT = "rwkv-stream/session"
SESSION_VERSION = 1


# ------------------------------------------------------------------------------------------ stores
@dataclass(frozen=True)
class Ended:
    """What a store returns for a stream that ended at input ``position``: start afresh, skip replays."""

    position: int


class SessionStore(Protocol):
    """Where evicted sessions wait. ``data`` is :meth:`SessionTable.export` bytes."""

    def load(self, key: Hashable) -> bytes | Ended | None: ...

    def save(self, key: Hashable, data: bytes, position: int) -> None: ...

    def remove(self, key: Hashable, position: int) -> None:
        """The stream ended (``position`` >= 0: after the fragment at that input position)."""


class MemoryStore:
    """Evicted sessions in a dict (memory grows with the number of streams not ended)."""

    def __init__(self) -> None:
        self.items: dict[Hashable, bytes | Ended] = {}

    def load(self, key: Hashable) -> bytes | Ended | None:
        return self.items.get(key)

    def save(self, key: Hashable, data: bytes, position: int) -> None:
        self.items[key] = data

    def remove(self, key: Hashable, position: int) -> None:
        if position >= 0:
            self.items[key] = Ended(position)
        else:
            self.items.pop(key, None)

    def __len__(self) -> int:
        return len(self.items)


class DiscardStore:
    """Forgets evicted sessions: a key that comes back starts afresh (memory bounded by ``max_streams``)."""

    def load(self, key: Hashable) -> bytes | Ended | None:
        return None

    def save(self, key: Hashable, data: bytes, position: int) -> None:
        pass

    def remove(self, key: Hashable, position: int) -> None:
        pass


class DirectoryStore:
    """Evicted sessions as files in a directory (one per key, written atomically): memory stays bounded.

    Keys must have a stable ``repr`` across processes (str, int, tuples of them).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self.path.mkdir(parents=True, exist_ok=True)

    def _file(self, key: Hashable) -> Path:
        digest = hashlib.blake2b(repr(key).encode("utf-8"), digest_size=16).hexdigest()
        return self.path / f"{digest}.session"

    def load(self, key: Hashable) -> bytes | Ended | None:
        try:
            data = self._file(key).read_bytes()
        except FileNotFoundError:
            return None
        if data.startswith(_ENDED_PREFIX):
            return Ended(int(data[len(_ENDED_PREFIX):]))
        return data

    def save(self, key: Hashable, data: bytes, position: int) -> None:
        target = self._file(key)
        tmp = target.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, target)

    def remove(self, key: Hashable, position: int) -> None:
        if position >= 0:
            self.save(key, _ENDED_PREFIX + str(position).encode(), position)
        else:
            self._file(key).unlink(missing_ok=True)


_ENDED_PREFIX = b"rwkv-stream/ended:"


# ------------------------------------------------------------------------------------------ inputs, outputs
@dataclass
class Fragment:
    """A piece of a stream's text. ``key=None``: a one-off text on a fresh state (nothing is kept).

    ``end`` flushes the tokenizer and ends the stream after this fragment (the key's next fragment starts a
    new stream). ``position``: the fragment's input position; one at or below the stream's last applied
    position is skipped. ``generate``: sample a continuation of the stream after this fragment (on a fork).
    """

    key: Hashable | None
    text: str | bytes = ""
    end: bool = False
    position: int | None = None
    generate: SamplingConfig | None = None


@dataclass
class Token:
    """A final model token: its id and its text, ``[start, end)`` in characters of the stream's token text
    (a character split across tokens is given to the token that completes it)."""

    id: int
    text: str
    start: int
    end: int


@dataclass
class FragmentResult:
    key: Hashable | None
    skipped: bool = False  # a replay at or below the stream's position: nothing was applied
    tokens: list[Token] = field(default_factory=list)  # tokens this fragment made final
    hidden: Tensor | None = None  # [len(tokens), C] fp32 hidden vectors of those tokens
    tail_ids: list[int] = field(default_factory=list)  # provisional: the held-back text as if it ended here
    tail_hidden: Tensor | None = None  # [len(tail_ids), C], computed on a fork
    tags: dict[str, list[int]] = field(default_factory=dict)  # tagger -> label index per token (+ tail)
    cats: dict[str, dict[str, float]] = field(default_factory=dict)  # classifier -> label -> probability
    probes: dict[str, float] = field(default_factory=dict)  # zero-shot label -> probability
    generated: str | None = None
    carry: bytes = b""  # UTF-8 of the held-back input before this fragment: tokens cover carry + text
    text_start: int = 0  # characters of input the stream had received before this fragment
    held_back: int = 0  # tokenizer units held back after it
    n_tokens: int = 0  # the stream's tokens after it
    ended: bool = False

    @property
    def token_ids(self) -> list[int]:
        return [t.id for t in self.tokens]


@dataclass
class _Session:
    encoder: StreamingEncoder
    utf8: codecs.IncrementalDecoder
    slot: int
    position: int = -1
    chars_in: int = 0
    chars_out: int = 0
    last_hidden: Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    dirty: bool = True  # changed since the store last saw it
    last_used: float = 0.0


@dataclass
class _Anonymous:
    """The key of a one-off fragment: unique, never stored."""

    index: int

    def __hash__(self) -> int:
        return hash(("anonymous", self.index))


@dataclass
class _Interim:
    """The key of an interim fork (:meth:`SessionTable.feed_interim`): private to one call, never stored."""

    index: int

    def __hash__(self) -> int:
        return hash(("interim", self.index))


# ------------------------------------------------------------------------------------------ the table
class SessionTable:
    """Live streams of one model and tokenizer, keyed by any hashable; see the module docstring."""

    def __init__(
        self,
        model: Model,
        tokenizer: Tokenizer,
        *,
        heads: Mapping[str, Head] | None = None,
        probes: Mapping[str, str] | None = None,
        max_streams: int = 1024,
        max_state_bytes: int | None = None,
        store: SessionStore | None = None,
        ttl_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_streams < 1:
            raise ValueError(f"max_streams must be at least 1, got {max_streams}")
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids, the model only {model.config.vocab_size}")
        if ttl_s is not None and ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        self.model = model
        self.tokenizer = tokenizer
        self.heads = {name: head.to(model.device) for name, head in (heads or {}).items()}
        self.taggers = {n: h for n, h in self.heads.items() if h.kind == "tagger"}
        self.classifiers = {n: h for n, h in self.heads.items() if h.kind == "classifier"}
        for name, head in self.heads.items():
            if head.n_embd != model.config.n_embd:
                raise ValueError(f"head {name!r} reads vectors of size {head.n_embd}, the model makes "
                                 f"{model.config.n_embd}")
        self.probes = {label: encode_continuation(tokenizer, text) for label, text in (probes or {}).items()}
        self.pool = model.new_pool(1)
        self.capacity = _capacity(max_streams, max_state_bytes, self.state_nbytes)
        self.store: SessionStore = MemoryStore() if store is None else store
        self.ttl_s = ttl_s
        self.clock = clock
        self._resident: OrderedDict[Hashable, _Session] = OrderedDict()
        self._token_texts: dict[int, str | None] = {}  # id -> its bytes decoded alone (None: not whole UTF-8)
        self.evictions = 0

    # ----------------------------------------------------------------------------- inspection
    @property
    def fingerprint(self) -> str:
        return self.model.fingerprint

    @property
    def state_nbytes(self) -> int:
        """Bytes of model state one resident stream holds."""
        return int(self.pool.data[0].numel() * self.pool.data.element_size())

    def __contains__(self, key: object) -> bool:
        return key in self._resident

    def __len__(self) -> int:
        return len(self._resident)

    def keys(self) -> list[Hashable]:
        """Resident streams, least recently used first."""
        return list(self._resident)

    def resident_bytes(self) -> int:
        return len(self._resident) * self.state_nbytes

    def exists(self, key: Hashable) -> bool:
        """Whether the stream is resident or waiting in the store (an ended stream does not exist)."""
        if key in self._resident:
            return True
        return isinstance(self.store.load(key), bytes)

    def position(self, key: Hashable) -> int:
        """The input position of the stream's last applied fragment (-1: none), loading it if evicted."""
        return self._session(key).position

    def n_tokens(self, key: Hashable) -> int:
        return self.pool.n_tokens[self._session(key).slot]

    def meta(self, key: Hashable) -> dict[str, Any]:
        """Caller metadata that travels with the stream (msgpack-able values); mutate it in place."""
        session = self._session(key)
        session.dirty = True
        return session.meta

    def read_meta(self, key: Hashable) -> dict[str, Any]:
        """A copy of the stream's caller metadata (empty when there is no stream; nothing is marked changed)."""
        return dict(self._session(key).meta) if self.exists(key) else {}

    def last_hidden(self, key: Hashable) -> Tensor | None:
        return self._session(key).last_hidden

    # ----------------------------------------------------------------------------- processing
    @torch.no_grad()
    def feed(self, fragments: Sequence[Fragment], *, provisional: bool = False) -> list[FragmentResult]:
        """Apply fragments; one result per fragment, in order. ``provisional``: also run each stream's
        held-back text as if the stream ended there (on a fork: the stream itself is not advanced), so
        the results cover all the text received (``tail_ids``, ``tail_hidden``, tags, cats, probes)."""
        for frag in fragments:
            if not isinstance(frag.text, str | bytes):
                raise TypeError(f"fragment text of stream {frag.key!r} must be str or bytes, not "
                                f"{type(frag.text).__name__}")
        self.expire_idle()
        per_key: dict[Hashable, list[int]] = {}
        for i, frag in enumerate(fragments):
            key = _Anonymous(i) if frag.key is None else frag.key
            per_key.setdefault(key, []).append(i)
        results: list[FragmentResult | None] = [None] * len(fragments)
        keys = list(per_key)
        for start in range(0, len(keys), self.capacity):
            wave = keys[start : start + self.capacity]
            depth = max(len(per_key[k]) for k in wave)
            for r in range(depth):
                batch = [(k, per_key[k][r]) for k in wave if r < len(per_key[k])]
                self._ensure_resident([k for k, _ in batch], protect=set(wave))
                self._round(batch, fragments, results, provisional)
        return [r for r in results if r is not None]

    @torch.no_grad()
    def feed_interim(self, fragments: Sequence[Fragment]) -> list[FragmentResult]:
        """Interim hypotheses (live ASR sends interim text that it later revises, then a final): each
        fragment's text is run on a private fork of its stream's session, exactly as ``feed(fragments,
        provisional=True)`` would run it, and its results are returned, but no stream changes: not its state,
        tokenizer carry, counters, position or store entry. A later ``feed`` of the final text therefore gives
        what it gives without the interims, whatever revisions came before. Each interim costs its own tokens
        (the fork copies one fixed-size state; history is never re-read). Fragments of one key in one call are
        independent revisions of the same point. A key without a stream forks an empty one (none is created);
        an evicted stream is loaded (a read). ``end``, ``position`` and ``generate`` are refused: an interim
        never ends, orders or samples a stream."""
        for frag in fragments:
            if frag.end or frag.position is not None or frag.generate is not None:
                raise ValueError(f"interim fragment of stream {frag.key!r}: end, position and generate are "
                                 "for final fragments (feed)")
        self.expire_idle()
        forks: dict[Hashable, _Session] = {}
        try:
            for i, frag in enumerate(fragments):
                forks[_Interim(i)] = self._interim_session(frag.key)
            self._resident.update(forks)  # only for this round: nothing evicts while it runs
            results: list[FragmentResult | None] = [None] * len(fragments)
            interim = [Fragment(k, frag.text) for k, frag in zip(forks, fragments, strict=True)]
            self._round([(k, i) for i, k in enumerate(forks)], interim, results, provisional=True)
        finally:
            for k, session in forks.items():
                self._resident.pop(k, None)
                self.pool.free(session.slot)
        out = [r for r in results if r is not None]
        for res, frag in zip(out, fragments, strict=True):
            res.key = frag.key
        return out

    def _interim_session(self, key: Hashable | None) -> _Session:
        """A private copy of stream ``key``'s session on a new slot (a fresh one when there is none)."""
        if key is None or not self.exists(key):
            return _Session(StreamingEncoder(self.tokenizer), _utf8_decoder(), self.pool.alloc(), dirty=False)
        src = self._session(key)
        return _Session(self._encoder_copy(src), _utf8_decoder(_utf8_state(src.utf8)), self.pool.fork(src.slot),
                        src.position, src.chars_in, src.chars_out,
                        None if src.last_hidden is None else src.last_hidden.clone(), dict(src.meta), dirty=False,
                        last_used=src.last_used)

    def _round(self, batch: list[tuple[Hashable, int]], fragments: Sequence[Fragment],
               results: list[FragmentResult | None], provisional: bool) -> None:
        """One step: the next fragment of each of several distinct streams."""
        todo: list[tuple[Hashable, Fragment, FragmentResult]] = []
        for key, i in batch:
            frag, session = fragments[i], self._resident[key]
            res = FragmentResult(frag.key, text_start=session.chars_in)
            results[i] = res
            if frag.position is not None and frag.position <= session.position:
                res.skipped, res.n_tokens = True, self.pool.n_tokens[session.slot]
                res.held_back = session.encoder.held_back
                continue
            todo.append((key, frag, res))
        if not todo:
            return
        ids = self._push_all(todo)
        out = self.model.step(self.pool, [self._resident[k].slot for k, _, _ in todo], ids, logits="none",
                              batch_invariant=True)
        now = self.clock()
        for (key, frag, res), rows, token_ids in zip(todo, out.hidden, ids, strict=True):
            session = self._resident[key]
            self._resident.move_to_end(key)
            session.dirty, session.last_used = True, now
            if frag.position is not None:
                session.position = frag.position
            if len(rows):
                session.last_hidden = rows[-1].clone()
            res.hidden = rows.float()
            res.tokens = self._tokens(session, token_ids, final=frag.end)
            res.held_back, res.n_tokens = session.encoder.held_back, self.pool.n_tokens[session.slot]
        self._outputs(todo, provisional)
        for key, frag, res in todo:
            if frag.generate is not None:
                res.generated = self._generate(self._resident[key], frag.generate) or ""
            if frag.end or isinstance(key, _Anonymous):
                self._finish(key)
                res.ended = frag.end

    def _push_all(self, todo: list[tuple[Hashable, Fragment, FragmentResult]]) -> list[list[int]]:
        """Every fragment of a round through its stream's tokenizer, all or none: if one raises, the
        tokenizers already advanced are put back, so the round leaves no stream half-applied."""
        sessions = [self._resident[k] for k, _, _ in todo]
        saved = [(s.encoder.export_state(), s.chars_in) for s in sessions]
        ids: list[list[int]] = []
        try:
            for session, (_, frag, res) in zip(sessions, todo, strict=True):
                ids.append(self._push(session, frag, res))
        except Exception:
            for session, (encoder_state, chars_in) in zip(sessions[: len(ids) + 1], saved, strict=False):
                session.encoder.import_state(encoder_state)
                session.chars_in = chars_in
            raise
        return ids

    def _push(self, session: _Session, frag: Fragment, res: FragmentResult) -> list[int]:
        res.carry = session.encoder.held_bytes
        ids = session.encoder.push(frag.text) if frag.text else []
        if frag.end or frag.key is None:
            ids += session.encoder.flush()
        session.chars_in += len(frag.text) if isinstance(frag.text, str) else _utf8_chars(frag.text)
        return ids

    def _tokens(self, session: _Session, ids: list[int], final: bool) -> list[Token]:
        tokens = []
        texts = self._token_texts
        pending = bool(session.utf8.getstate()[0])
        pos = session.chars_out
        for token_id in ids:  # the decoder only where bytes are pending or a token is not whole UTF-8 alone
            text = None if pending else texts.get(token_id)
            if text is None:
                data = self._token_bytes(token_id)
                if not pending:
                    try:
                        texts[token_id] = data.decode("utf-8")
                    except UnicodeDecodeError:
                        texts[token_id] = None
                text = session.utf8.decode(data)
                pending = bool(session.utf8.getstate()[0])
            tokens.append(Token(token_id, text, pos, pos + len(text)))
            pos += len(text)
        session.chars_out = pos
        if final:
            rest = session.utf8.decode(b"", final=True)
            if rest and tokens:
                tokens[-1].text += rest
                tokens[-1].end += len(rest)
                session.chars_out += len(rest)
        return tokens

    def _token_bytes(self, token_id: int) -> bytes:
        if self.tokenizer.is_byte_level:
            return self.tokenizer.id_to_token_bytes(token_id)
        return self.tokenizer.decode([token_id]).encode("utf-8")

    def _outputs(self, todo: list[tuple[Hashable, Fragment, FragmentResult]], provisional: bool) -> None:
        """Tails (on forks), head outputs and probes of one round's results."""
        forks: list[int] = []
        try:
            if provisional:
                forks = self._tails(todo)
            rows = [_cat(r.hidden, r.tail_hidden) for _, _, r in todo]
            lasts = [self._latest(k, rs) for (k, _, _), rs in zip(todo, rows, strict=True)]
            self._tag(rows, [r for _, _, r in todo])
            self._classify(lasts, [r for _, _, r in todo])
            if provisional and self.probes:
                self._probe(forks, lasts, [r for _, _, r in todo])
        finally:
            for slot in forks:
                self.pool.free(slot)

    def _tails(self, todo: list[tuple[Hashable, Fragment, FragmentResult]]) -> list[int]:
        forks = []
        for key, _, res in todo:
            session = self._resident[key]
            forks.append(self.pool.fork(session.slot))
            res.tail_ids = self._encoder_copy(session).flush()
        out = self.model.step(self.pool, forks, [r.tail_ids for _, _, r in todo], logits="none",
                              batch_invariant=True)
        for (_, _, res), rows in zip(todo, out.hidden, strict=True):
            res.tail_hidden = rows.float()
        return forks

    def _latest(self, key: Hashable, rows: Tensor | None) -> Tensor | None:
        if rows is not None and len(rows):
            return rows[-1]
        return self._resident[key].last_hidden

    def _tag(self, rows: list[Tensor | None], results: list[FragmentResult]) -> None:
        if not self.taggers:
            return
        counts = [0 if r is None else len(r) for r in rows]
        flat = torch.cat([r for r in rows if r is not None and len(r)]) if sum(counts) else None
        for name, head in self.taggers.items():
            best = [] if flat is None else self._head(head, flat).argmax(dim=-1).tolist()
            pos = 0
            for res, n in zip(results, counts, strict=True):
                res.tags[name] = best[pos : pos + n]
                pos += n

    def _classify(self, lasts: list[Tensor | None], results: list[FragmentResult]) -> None:
        present = [i for i, h in enumerate(lasts) if h is not None]
        if not self.classifiers or not present:
            return
        rows = torch.stack([lasts[i] for i in present])  # type: ignore[misc]
        for name, head in self.classifiers.items():
            scores = self._head(head, rows).float()
            probs = torch.sigmoid(scores) if head.multi_label else torch.softmax(scores, dim=-1)
            for i, row in zip(present, probs.tolist(), strict=True):
                results[i].cats[name] = dict(zip(head.labels, row, strict=True))

    def _head(self, head: Head, rows: Tensor) -> Tensor:
        key = ("head", head.n_embd, head.hidden_dim, len(head.labels), next(head.parameters()).dtype)
        return invariant_call(head, rows.to(self.model.device, torch.float32), key)

    def _probe(self, forks: list[int], lasts: list[Tensor | None], results: list[FragmentResult]) -> None:
        """Each probe's prompt scored on a fork of each stream after its tail (mean log-probability)."""
        labels = list(self.probes)
        slots: list[int] = []
        try:
            for fork in forks:
                slots += [self.pool.fork(fork) for _ in labels]
            tokens = [self.probes[label] for _ in forks for label in labels]
            logits = self.model.step(self.pool, slots, tokens, logits="all", batch_invariant=True).logits or []
        finally:
            for slot in slots:
                self.pool.free(slot)
        for j, (last, res) in enumerate(zip(lasts, results, strict=True)):
            first = None if last is None else self.model.head(last[None])
            rows = logits[j * len(labels) : (j + 1) * len(labels)]
            scores = [_prompt_score(self.probes[lab], first, r) for lab, r in zip(labels, rows, strict=True)]
            probs = torch.softmax(torch.tensor(scores, dtype=torch.float64), dim=0).tolist() if scores else []
            res.probes = dict(zip(labels, probs, strict=True))

    # ----------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, key: Hashable, cfg: SamplingConfig) -> str:
        """Continue the stream (all text received, the held-back part included) on a fork: the stream does
        not advance. Raises ValueError for a stream with no text."""
        text = self._generate(self._session(key), cfg)
        if text is None:
            raise ValueError(f"stream {key!r} has no text to continue")
        return text

    def _generate(self, session: _Session, cfg: SamplingConfig) -> str | None:
        """The continuation; None for a stream with no text (inside :meth:`feed` that gives "")."""
        state = self.pool.read(session.slot)
        tail = self._encoder_copy(session).flush()
        if tail:
            logits, state = self.model.forward(tail, state)
            last = logits[-1]
        elif session.last_hidden is not None:
            last = self.model.head(session.last_hidden[None])[0]
        else:
            return None
        return "".join(decode_until_stop(self.tokenizer, generate_ids(self.model, state, last, cfg), cfg.stop))

    @torch.no_grad()
    def generate_from(self, text: str, cfg: SamplingConfig) -> str:
        """Continue ``text`` alone, on a fresh state."""
        ids = self.tokenizer.encode(text)
        if not ids:
            raise ValueError("cannot generate from an empty text")
        logits, state = self.model.forward(ids)
        return "".join(decode_until_stop(self.tokenizer, generate_ids(self.model, state, logits[-1], cfg), cfg.stop))

    # ----------------------------------------------------------------------------- lifecycle
    def end(self, key: Hashable) -> bool:
        """Forget the stream (resident or stored). Returns whether it was resident."""
        was = key in self._resident
        position = self._resident[key].position if was else -1
        if was:
            self.pool.free(self._resident.pop(key).slot)
        self.store.remove(key, position)
        return was

    def reset(self, key: Hashable) -> None:
        """Start the stream over from an empty state (its input position is kept)."""
        position = self._session(key).position
        self.end(key)
        self._ensure_resident([key], protect={key})
        self._resident[key].position = position

    def fork(self, key: Hashable, new_key: Hashable) -> None:
        """A new stream ``new_key`` continuing from where ``key`` is; ``key`` is untouched."""
        if new_key == key:
            raise ValueError("a fork needs a new key")
        self.restore(new_key, self.export(key))

    def export(self, key: Hashable) -> bytes:
        """The stream's complete session as bytes (see the module docstring); it stays live."""
        session = self._session(key)
        state = self.pool.read(session.slot)
        state.meta = {
            "format": SESSION_FORMAT, "version": SESSION_VERSION, "encoder": session.encoder.export_state(),
            "utf8": list(_utf8_state(session.utf8)), "position": session.position, "chars_in": session.chars_in,
            "chars_out": session.chars_out, "last_hidden": _tensor_bytes(session.last_hidden),
            "meta": session.meta,
        }
        return state.to_bytes()

    def restore(self, key: Hashable, data: bytes) -> None:
        """Install exported bytes as stream ``key`` (replacing it if live). Raises StateError for bytes of
        another model, another format or a corrupt copy."""
        state = State.from_bytes(data, expected_fingerprint=self.fingerprint)
        self.model.check_state(state)
        meta = check_session_meta(state.meta)
        encoder = StreamingEncoder(self.tokenizer)
        try:
            encoder.import_state(meta["encoder"])
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"session's tokenizer state does not fit this tokenizer: {exc}") from exc
        if key in self._resident:
            self.pool.free(self._resident.pop(key).slot)
        self._make_room(1, protect={key})
        session = _Session(encoder, _utf8_decoder(meta["utf8"]), self.pool.alloc(state),
                           int(meta["position"]), int(meta["chars_in"]), int(meta["chars_out"]),
                           _bytes_tensor(meta["last_hidden"], self.model.device), dict(meta["meta"]),
                           dirty=True, last_used=self.clock())
        self._resident[key] = session

    def evict(self, key: Hashable) -> bool:
        """Move a resident stream to the store."""
        session = self._resident.get(key)
        if session is None:
            return False
        if session.dirty:
            self.store.save(key, self.export(key), session.position)
        self.pool.free(self._resident.pop(key).slot)
        self.evictions += 1
        return True

    def forget(self, key: Hashable) -> bool:
        """Drop a resident stream without writing it anywhere (the store keeps what it had)."""
        session = self._resident.pop(key, None)
        if session is not None:
            self.pool.free(session.slot)
        return session is not None

    def expire_idle(self, now: float | None = None, ttl_s: float | None = None) -> list[Hashable]:
        """Evict the streams idle for longer than ``ttl_s`` (default: the table's); returns their keys."""
        ttl_s = self.ttl_s if ttl_s is None else ttl_s
        if ttl_s is None:
            return []
        now = self.clock() if now is None else now
        idle = []
        for key, session in self._resident.items():  # least recently used first
            if now - session.last_used <= ttl_s:
                break
            idle.append(key)
        for key in idle:
            self.evict(key)
        return idle

    def has_changes(self) -> bool:
        """Whether a resident stream changed since the store last saw it."""
        return any(s.dirty for s in self._resident.values())

    def dirty(self) -> Iterator[tuple[Hashable, int, bytes]]:
        """``(key, position, export bytes)`` of every resident stream changed since the store last saw
        it, each marked clean as it is yielded (for checkpoints that save live streams)."""
        for key, session in list(self._resident.items()):
            if session.dirty:
                data = self.export(key)
                session.dirty = False
                yield key, session.position, data

    # ----------------------------------------------------------------------------- residency
    def _session(self, key: Hashable) -> _Session:
        if key not in self._resident:
            self._ensure_resident([key], protect={key})
        return self._resident[key]

    def _ensure_resident(self, keys: list[Hashable], protect: set[Hashable]) -> None:
        missing = [k for k in keys if k not in self._resident]
        self._make_room(len(missing), protect)
        for key in missing:
            self._load(key)

    def _make_room(self, n_new: int, protect: set[Hashable]) -> None:
        excess = len(self._resident) + n_new - self.capacity
        victims = [k for k in self._resident if k not in protect][: max(0, excess)]
        if len(victims) < excess:
            raise RuntimeError(f"{len(protect)} streams with pending work exceed the resident limit of "
                               f"{self.capacity} streams")
        for key in victims:
            self.evict(key)

    def _load(self, key: Hashable) -> None:
        stored = None if isinstance(key, _Anonymous) else self.store.load(key)
        if isinstance(stored, bytes):
            self.restore(key, stored)
            self._resident[key].dirty = False
            return
        session = _Session(StreamingEncoder(self.tokenizer), _utf8_decoder(), self.pool.alloc(),
                           dirty=False, last_used=self.clock())  # nothing to save until it is fed
        if isinstance(stored, Ended):
            session.position = stored.position
        self._resident[key] = session

    def _finish(self, key: Hashable) -> None:
        session = self._resident.pop(key)
        self.pool.free(session.slot)
        if not isinstance(key, _Anonymous):
            self.store.remove(key, session.position)

    def _encoder_copy(self, session: _Session) -> StreamingEncoder:
        return copy.deepcopy(session.encoder, {id(self.tokenizer): self.tokenizer})


# ------------------------------------------------------------------------------------------ helpers
def _capacity(max_streams: int, max_state_bytes: int | None, per_stream: int) -> int:
    if max_state_bytes is None:
        return max_streams
    fit = max_state_bytes // per_stream
    if fit < 1:
        raise ValueError(f"max_state_bytes={max_state_bytes} holds no stream (one needs {per_stream} bytes)")
    return min(max_streams, fit)


def _cat(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    parts = [t for t in (a, b) if t is not None and len(t)]
    if not parts:
        return a
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _utf8_chars(data: bytes) -> int:
    """Characters a UTF-8 fragment adds (continuation bytes do not start one)."""
    return sum(1 for b in data if b & 0xC0 != 0x80)


def _utf8_decoder(state: Sequence[Any] | None = None) -> codecs.IncrementalDecoder:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    if state is not None:
        decoder.setstate((bytes(state[0]), int(state[1])))
    return decoder


def _utf8_state(decoder: codecs.IncrementalDecoder) -> tuple[bytes, int]:
    pending, flag = decoder.getstate()
    return bytes(pending), int(flag)


def _tensor_bytes(t: Tensor | None) -> bytes | None:
    return None if t is None else t.detach().to("cpu", torch.float32).numpy().astype("<f4").tobytes()


def _bytes_tensor(data: bytes | None, device: torch.device) -> Tensor | None:
    if data is None:
        return None
    return torch.from_numpy(np.frombuffer(data, dtype="<f4").copy()).to(device)


def check_session_bytes(data: bytes, fingerprint: str) -> None:
    """Raise :class:`StateError` unless ``data`` is a session exported by a model with ``fingerprint``."""
    check_session_meta(State.from_bytes(data, expected_fingerprint=fingerprint).meta)


def check_session_meta(meta: dict[str, Any]) -> dict[str, Any]:
    if meta.get("format") != SESSION_FORMAT:
        raise StateError(f"bytes are not an rwkv-stream session (format {meta.get('format')!r})")
    if meta.get("version") != SESSION_VERSION:
        raise StateError(f"session format version {meta.get('version')} not supported "
                         f"(this build reads {SESSION_VERSION})")
    missing = {"encoder", "utf8", "position", "chars_in", "chars_out", "last_hidden", "meta"} - set(meta)
    if missing:
        raise StateError(f"session bytes lack fields {sorted(missing)}")
    return meta


def _prompt_score(prompt: list[int], first: Tensor | None, logits: Tensor) -> float:
    """Mean log-probability of the prompt's tokens; ``first`` holds the logits before its first token."""
    if not prompt:
        return 0.0
    rows = logits[:-1] if first is None else torch.cat([first.to(logits.device), logits[:-1]])
    targets = torch.tensor(prompt[1:] if first is None else prompt, device=logits.device)
    if len(targets) == 0:
        return 0.0
    logp = torch.log_softmax(rows.float(), dim=-1).gather(1, targets[:, None])
    return float(logp.mean())

