"""Processing: a batch of polled records through the engine to outputs and dead letters.

Per input partition, records are processed in offset order; per stream (key) one fragment at a time; a batch's
fragments of different streams are stepped through the engine together. Each stream's state carries the input
offset it reflects: replayed input at or below it is skipped there, so a replay neither applies a fragment
twice nor re-emits its output. Records that cannot be parsed go to the dead-letter topic.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from kafka.structs import TopicPartition

from .checkpoint import CheckpointPolicy, Delivery
from .checkpointing import Checkpointer
from .config import ConsumerConfig
from .engine import StepItem, StepResult, StreamEngine
from .faults import Faults
from .metrics import Metrics
from .partitions import PartitionBook, Polled
from .records import header_items
from .schema import BadInput, Fragment, encode_dead_letter, encode_output, parse_input

log = logging.getLogger("rwkv_stream.kafka")


@dataclass
class Work:
    """A parsed input record on its way through the engine."""

    tp: TopicPartition
    rec: Any  # ConsumerRecord
    frag: Fragment
    received: float  # time.time() when polled

    @property
    def key(self) -> tuple[int, str]:
        return self.tp.partition, self.frag.stream


class BatchProcessor:
    def __init__(self, cfg: ConsumerConfig, engine: StreamEngine, delivery: Delivery, book: PartitionBook,
                 checkpointer: Checkpointer, policy: CheckpointPolicy, metrics: Metrics, faults: Faults,
                 co_partitioned: set[str]) -> None:
        self.cfg = cfg
        self.engine = engine
        self.delivery = delivery
        self.book = book
        self.checkpointer = checkpointer
        self.policy = policy
        self.metrics = metrics
        self.faults = faults
        # Topics with the input's partition count: their records go to the input record's partition number.
        self.output_partitioned = "output" in co_partitioned
        self.dead_letter_partitioned = "dead_letter" in co_partitioned

    def process(self, batch: list[Polled]) -> None:
        self.checkpointer.note_work()
        work = [w for w in (self._admit(tp, rec, received) for tp, rec, received in batch) if w is not None]
        self.policy.note(len(batch))
        if work:
            self._apply(work)
        self.metrics.live_streams.set(len(self.engine))
        self.metrics.state_bytes.set(self.engine.state_bytes())

    def _admit(self, tp: TopicPartition, rec: Any, received: float) -> Work | None:
        """A record parsed into work, or (bad input) sent to the dead-letter topic."""
        self.book.mark_processed(tp, rec.offset)
        try:
            frag = parse_input(rec.key, rec.value, max_fragment_chars=self.cfg.max_fragment_chars,
                               max_generate_tokens=self.cfg.max_generate_tokens)
        except BadInput as exc:
            self._dead_letter(tp, rec, exc.reason, exc.detail)
            return None
        return Work(tp, rec, frag, received)

    def _apply(self, work: list[Work]) -> None:
        """All fragments through the session layer (each stream's in offset order; input its state already
        covers is skipped there), then their outputs."""
        evictions = self.engine.sessions.evictions
        results = self.engine.step([StepItem(w.key, w.frag.text, w.frag.end, w.rec.offset, w.frag.generate)
                                    for w in work])
        self.metrics.evictions.labels("lru").inc(self.engine.sessions.evictions - evictions)
        now, sent = time.time(), 0
        for w, res in zip(work, results, strict=True):
            if res.skipped:
                self.metrics.records.labels("skipped").inc()
                continue
            self._send_output(w, res, now)
            sent += 1
            if sent == max(1, len(work) // 2):
                self.faults.point("batch_mid")

    def _send_output(self, w: Work, res: StepResult, now: float) -> None:
        value = encode_output(stream=w.frag.stream, partition=w.tp.partition, offset=w.rec.offset, tokens=res.tokens,
                              cats=res.cats, generated=res.generated, end=w.frag.end, held_back=res.held_back,
                              fingerprint=self.engine.fingerprint, latency_ms=(now - w.received) * 1000)
        self.delivery.send(self.cfg.output_topic, w.rec.key, value,
                           partition=w.tp.partition if self.output_partitioned else None, headers=header_items(w.rec))
        self._observe(w, res.n_tokens, now)

    def _observe(self, w: Work, n_tokens: int, now: float) -> None:
        self.metrics.records.labels("processed").inc()
        self.metrics.tokens.inc(n_tokens)
        produced_ms = w.frag.ts_ms if w.frag.ts_ms is not None else w.rec.timestamp
        if produced_ms:
            self.metrics.fragment_latency.observe(max(0.0, now - produced_ms / 1000))
        self.metrics.processing_latency.observe(max(0.0, now - w.received))

    def _dead_letter(self, tp: TopicPartition, rec: Any, reason: str, detail: str) -> None:
        value = encode_dead_letter(reason=reason, detail=detail, topic=tp.topic, partition=tp.partition,
                                   offset=rec.offset, key=rec.key, value=rec.value, timestamp_ms=rec.timestamp)
        self.delivery.send(self.cfg.dead_letter_topic, rec.key, value,
                           partition=tp.partition if self.dead_letter_partitioned else None,
                           headers=header_items(rec))
        self.metrics.dead_letters.labels(reason).inc()
        self.metrics.records.labels("dead_letter").inc()
        log.warning("dead letter", extra={"reason": reason, "detail": detail, "partition": tp.partition,
                                          "offset": rec.offset})
