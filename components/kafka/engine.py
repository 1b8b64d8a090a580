"""The engine side of the stream processor: Kafka-shaped fragments in, output fields out.

Nothing here knows Kafka. Streams live in the engine's session layer (:class:`rwkv_stream.sessions.SessionTable`,
keyed by ``(input partition, stream id)``); this module only turns a parsed input into a
:class:`~rwkv_stream.sessions.Fragment` (its input offset is the fragment's position, so replayed input the
stream already covers is skipped there) and a session result into the output schema's fields (tokens with
tag labels, classifier probabilities, generated text with a seed derived from the stream and offset when the
request has none, so a replay generates the same text, and the restored text when a tagger has transcript labels:
:class:`rwkv_stream.restore.TokenRestorer`, whose state travels in the session's metadata).

Interim hypotheses (``final=False``): live speech recognition sends hypotheses it revises later, then the final
text. Interims go through the session layer's ``feed_interim``: each runs on a private fork of its stream, with the
held-back tail run as if the stream ended there; its result is provisional and the stream is left exactly as it
was, so a final after any number of interims gives what it gives alone. Its cost is that of the fragment (a fork
copies the fixed-size state, never the stream's history).

Batch invariance: a stream's results must not depend on which other streams share its step, or a replay after
a crash (batched differently) would produce different bits. The session layer steps with
``batch_invariant=True`` and pads head products the same way; checked bitwise on CPU by the tests. On GPUs
cuBLAS gives no such promise and duplicates may differ in the last bits of ``cats``.
"""

from __future__ import annotations

import codecs
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from rwkv_stream.generate import SamplingConfig
from rwkv_stream.loading import LoadedModel
from rwkv_stream.restore import TokenRestorer, is_transcript_labels
from rwkv_stream.sessions import Fragment, FragmentResult, SessionStore, SessionTable

from .schema import GenerationRequest, TokenOut

StreamKey = tuple[int, str]  # (input partition, stream id)
RESTORE_META = "restore"  # the session metadata entry holding the stream's TokenRestorer state


@dataclass
class StepItem:
    key: StreamKey
    text: str
    end: bool = False
    offset: int | None = None  # input offset: at or below the stream's last applied one, it is skipped
    generate: GenerationRequest | None = None
    final: bool = True  # False: an interim hypothesis, run on a fork of the stream (see the module docstring)


@dataclass
class StepResult:
    tokens: list[TokenOut]
    cats: dict[str, dict[str, float]] | None
    held_back: int
    n_tokens: int
    skipped: bool = False
    generated: str | None = None
    restored: str | None = None  # the tokens' text with punctuation and case (a tagger with transcript labels)
    final: bool = True


class StreamEngine:
    """Keyed RWKV streams with tagger/classifier heads for the processor."""

    def __init__(self, bundle: LoadedModel, heads: Sequence[str] | None = None, max_streams: int = 4096,
                 store: SessionStore | None = None) -> None:
        if bundle.tokenizer is None:
            raise ValueError("the stream processor needs a bundle with a tokenizer")
        names = list(bundle.heads.heads) if heads is None else list(heads)
        unknown = [n for n in names if n not in bundle.heads]
        if unknown:
            raise ValueError(f"unknown heads {unknown}; the bundle has {sorted(bundle.heads.heads)}")
        self.heads = {name: bundle.heads[name] for name in names}
        self.sessions = SessionTable(bundle.model, bundle.tokenizer, heads=self.heads, max_streams=max_streams,
                                     store=store)
        restorers = [n for n, h in sorted(self.sessions.taggers.items()) if is_transcript_labels(h.labels)]
        self.restore_head = "tagger" if "tagger" in restorers else (restorers[0] if restorers else None)

    @property
    def fingerprint(self) -> str:
        return self.sessions.fingerprint

    def __contains__(self, key: object) -> bool:
        return key in self.sessions

    def __len__(self) -> int:
        return len(self.sessions)

    def live_keys(self) -> list[StreamKey]:
        """Resident streams, least recently used first."""
        return self.sessions.keys()  # type: ignore[return-value]

    def state_bytes(self) -> int:
        return self.sessions.resident_bytes()

    def step(self, items: Sequence[StepItem]) -> list[StepResult]:
        """Apply fragments (several per stream allowed, each stream's in order) in batched steps. An interim
        runs after the finals before it in its stream and before those after it."""
        results: list[StepResult | None] = [None] * len(items)
        finals: list[int] = []
        interims: list[int] = []
        for i, item in enumerate(items):
            mine, other = (finals, interims) if item.final else (interims, finals)
            if any(items[j].key == item.key for j in other):  # its stream's earlier items of the other kind first
                self._flush(items, other, results)
            mine.append(i)
        self._flush(items, finals, results)
        self._flush(items, interims, results)
        return [r for r in results if r is not None]

    def _flush(self, items: Sequence[StepItem], pending: list[int], results: list[StepResult | None]) -> None:
        if pending:
            (self._step_finals if items[pending[0]].final else self._step_interims)(items, pending, results)
            pending.clear()

    def _step_finals(self, items: Sequence[StepItem], indices: list[int], results: list[StepResult | None]) -> None:
        fragments = [Fragment(items[i].key, items[i].text, items[i].end, items[i].offset, self._sampling(items[i]))
                     for i in indices]
        restorers = self._restorers({items[i].key for i in indices})
        for i, res in zip(indices, self.sessions.feed(fragments), strict=True):
            results[i] = self._result(res, items[i].end, restorers.get(items[i].key))
        self._keep_restorers(restorers)

    def _step_interims(self, items: Sequence[StepItem], indices: list[int], results: list[StepResult | None]) -> None:
        """Interim hypotheses (the session layer's ``feed_interim``: private forks, no stream changes). One
        replayed after its stream moved on (offset at or below the stream's last final) is skipped."""
        run = []
        for i in indices:
            item = items[i]
            if item.offset is not None and self.sessions.exists(item.key) and \
                    item.offset <= self.sessions.position(item.key):
                results[i] = StepResult([], None, 0, 0, skipped=True, final=False)
            else:
                run.append(i)
        fragments = [Fragment(items[i].key, items[i].text) for i in run]
        restorers = self._restorers({items[i].key for i in run}, changes=False)
        for i, res in zip(run, self.sessions.feed_interim(fragments), strict=True):
            # each interim starts from its stream's state: a copy, never advanced by another interim
            restorer = restorers.get(items[i].key)
            results[i] = self._result(res, False, restorer and TokenRestorer(**restorer.state()), final=False)

    def _sampling(self, item: StepItem) -> SamplingConfig | None:
        request = item.generate
        if request is None:
            return None
        seed = request.seed if request.seed is not None else derived_seed(item.key, item.offset or 0)
        return SamplingConfig(request.max_tokens, request.temperature, request.top_p, seed=seed, stop=request.stop)

    def _result(self, res: FragmentResult, end: bool, restorer: TokenRestorer | None,
                final: bool = True) -> StepResult:
        tokens = [TokenOut(t.id, t.text, t.start, t.end, self._tags(res, i)) for i, t in enumerate(res.tokens)]
        if not final:
            tokens += self._tail_tokens(res, tokens)
        restored = None
        if restorer is not None and not res.skipped:
            head = self.restore_head or ""
            restored = restorer.feed(((t.text, t.tags.get(head)) for t in tokens), end=end)
        return StepResult(tokens, res.cats or None, res.held_back, len(res.tokens), res.skipped, res.generated,
                          restored, final)

    def _tail_tokens(self, res: FragmentResult, tokens: list[TokenOut]) -> list[TokenOut]:
        """The held-back tail of an interim result as tokens (run as if the stream ended after it)."""
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        start = tokens[-1].end if tokens else res.text_start
        out = []
        n = len(res.tokens)
        for j, token_id in enumerate(res.tail_ids):
            last = j == len(res.tail_ids) - 1
            text = decoder.decode(self.sessions.tokenizer.id_to_token_bytes(token_id), final=last)
            out.append(TokenOut(token_id, text, start, start + len(text), self._tags(res, n + j)))
            start += len(text)
        return out

    def _tags(self, res: FragmentResult, i: int) -> dict[str, str]:
        """``{tagger: label}`` of the result's ``i``-th token (final tokens, then the tail's)."""
        return {name: head.labels[res.tags[name][i]] for name, head in self.sessions.taggers.items()
                if name in res.tags and i < len(res.tags[name])}

    # ----------------------------------------------------------------------------- restored text
    def _restorers(self, keys: set[StreamKey], changes: bool = True) -> dict[StreamKey, TokenRestorer]:
        """Each stream's restoration state, as its session metadata holds it (none without a transcript tagger).
        ``changes``: the streams are about to be fed (their metadata is read for update)."""
        if self.restore_head is None:
            return {}
        sessions = self.sessions

        def meta(key: StreamKey) -> dict:  # no session is created for a stream that is not there
            if not changes:
                return sessions.read_meta(key)
            return sessions.meta(key) if sessions.exists(key) else {}

        return {key: TokenRestorer.from_state(meta(key).get(RESTORE_META)) for key in keys}

    def _keep_restorers(self, restorers: dict[StreamKey, TokenRestorer]) -> None:
        for key, restorer in restorers.items():
            if self.sessions.exists(key):  # an ended stream keeps nothing
                self.sessions.meta(key)[RESTORE_META] = restorer.state()

    def snapshot(self, key: StreamKey) -> bytes:
        return self.sessions.export(key)

    def load(self, key: StreamKey, data: bytes) -> None:
        """Restore a stream from :meth:`snapshot` bytes (raises StateError for another model's state)."""
        self.sessions.restore(key, data)

    def drop(self, key: StreamKey) -> None:
        """Forget a resident stream without writing it anywhere."""
        self.sessions.forget(key)


def derived_seed(key: StreamKey, offset: int) -> int:
    digest = hashlib.blake2b(f"{key[0]}:{key[1]}:{offset}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF
