"""The engine side of the stream processor: Kafka-shaped fragments in, output fields out.

Nothing here knows Kafka. Streams live in the engine's session layer (:class:`rwkv_stream.sessions.SessionTable`,
keyed by ``(input partition, stream id)``); this module only turns a parsed input into a
:class:`~rwkv_stream.sessions.Fragment` (its input offset is the fragment's position, so replayed input the
stream already covers is skipped there) and a session result into the output schema's fields (tokens with
tag labels, classifier probabilities, generated text with a seed derived from the stream and offset when the
request has none, so a replay generates the same text).

Batch invariance: a stream's results must not depend on which other streams share its step, or a replay after
a crash (batched differently) would produce different bits. The session layer steps with
``batch_invariant=True`` and pads head products the same way; checked bitwise on CPU by the tests. On GPUs
cuBLAS gives no such promise and duplicates may differ in the last bits of ``cats``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from rwkv_stream.generate import SamplingConfig
from rwkv_stream.loading import LoadedModel
from rwkv_stream.sessions import Fragment, FragmentResult, SessionStore, SessionTable

from .schema import GenerationRequest, TokenOut

StreamKey = tuple[int, str]  # (input partition, stream id)


@dataclass
class StepItem:
    key: StreamKey
    text: str
    end: bool = False
    offset: int | None = None  # input offset: at or below the stream's last applied one, it is skipped
    generate: GenerationRequest | None = None


@dataclass
class StepResult:
    tokens: list[TokenOut]
    cats: dict[str, dict[str, float]] | None
    held_back: int
    n_tokens: int
    skipped: bool = False
    generated: str | None = None


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
        """Apply fragments (several per stream allowed, each stream's in order) in batched steps."""
        fragments = [Fragment(i.key, i.text, i.end, i.offset, self._sampling(i)) for i in items]
        return [self._result(r) for r in self.sessions.feed(fragments)]

    def _sampling(self, item: StepItem) -> SamplingConfig | None:
        request = item.generate
        if request is None:
            return None
        seed = request.seed if request.seed is not None else derived_seed(item.key, item.offset or 0)
        return SamplingConfig(request.max_tokens, request.temperature, request.top_p, seed=seed, stop=request.stop)

    def _result(self, res: FragmentResult) -> StepResult:
        tokens = []
        for i, t in enumerate(res.tokens):
            tags = {name: head.labels[res.tags[name][i]] for name, head in self.sessions.taggers.items()
                    if name in res.tags}
            tokens.append(TokenOut(t.id, t.text, t.start, t.end, tags))
        return StepResult(tokens, res.cats or None, res.held_back, len(res.tokens), res.skipped, res.generated)

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
