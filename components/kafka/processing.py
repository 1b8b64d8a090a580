"""Processing: a batch of polled records through the engine to outputs and dead letters.

Per input partition, records are processed in offset order; per stream (key) one fragment at a time; a batch's
fragments of different streams are stepped through the engine together. Each stream's state carries the input
offset it reflects: replayed input at or below it is skipped there, so a replay neither applies a fragment
twice nor re-emits its output. Records that cannot be parsed go to the dead-letter topic.

A record must never be able to kill the processor. When applying a batch raises (anything but broker trouble),
the batch's records become *suspects* and :class:`ProcessingFailed` makes the processor roll back to the last
checkpoint (the streams may be half-updated). On the replay, a batch holding a suspect is applied one record at
a time; the record that raises on its own is *condemned* and the processor rolls back once more; on the next
replay a condemned record goes to the dead-letter topic (reason ``processing_error``, the exception in one line
as the detail) without reaching the engine, and everything else is processed as usual (results do not depend
on batching, so the outputs are those of an uninterrupted run). Suspects and condemned records are forgotten
once the group's committed offset has passed them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from kafka.structs import TopicPartition

from .checkpoint import CheckpointPolicy, Delivery
from .checkpointing import Checkpointer
from .clients import BROKER_ERRORS
from .config import ConsumerConfig
from .engine import StepItem, StepResult, StreamEngine
from .faults import Faults, InjectedProcessingError
from .metrics import Metrics
from .partitions import PartitionBook, Polled
from .records import header_items
from .schema import PROCESSING_ERROR, BadInput, Fragment, encode_dead_letter, encode_output, parse_input

log = logging.getLogger("rwkv_stream.kafka")
MAX_DETAIL_CHARS = 1000
RecordId = tuple[int, int]  # (input partition, offset)


class ProcessingFailed(RuntimeError):
    """Applying records raised: everything since the last checkpoint must be thrown away (rolled back)."""


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

    @property
    def record_id(self) -> RecordId:
        return self.tp.partition, self.rec.offset


class Suspects:
    """Records whose batch raised, and the ones found to raise on their own (with the error, in one line)."""

    def __init__(self) -> None:
        self.suspected: set[RecordId] = set()
        self.condemned: dict[RecordId, str] = {}

    def suspect(self, work: list[Work]) -> None:
        self.suspected.update(w.record_id for w in work)

    def condemn(self, record: RecordId, exc: BaseException) -> str:
        self.condemned[record] = detail = one_line(exc)
        return detail

    def any_suspected(self, work: list[Work]) -> bool:
        return bool(self.suspected) and any(w.record_id in self.suspected for w in work)

    def forget_committed(self, committed: dict[int, int]) -> None:
        """Records below the group's committed offset are never replayed again."""
        def live(record: RecordId) -> bool:
            return record[1] >= committed.get(record[0], 0)

        self.suspected = {r for r in self.suspected if live(r)}
        self.condemned = {r: d for r, d in self.condemned.items() if live(r)}


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
        self.suspects = Suspects()  # kept across rollbacks: that is how a poison record is found

    def process(self, batch: list[Polled]) -> None:
        """Dead letters for bad and condemned records, everything else through the engine to outputs.
        Raises :class:`ProcessingFailed` (roll back) when applying the records raised."""
        self.checkpointer.note_work()
        if self.suspects.suspected or self.suspects.condemned:
            self.suspects.forget_committed(self.book.committed)
        work = [w for w in (self._admit(tp, rec, received) for tp, rec, received in batch) if w is not None]
        self.policy.note(len(batch))
        if work and self.suspects.any_suspected(work):
            self._apply_one_by_one(work)
        elif work:
            self._apply_batch(work)
        self.metrics.live_streams.set(len(self.engine))
        self.metrics.state_bytes.set(self.engine.state_bytes())

    def _apply_batch(self, work: list[Work]) -> None:
        try:
            self._apply(work)
        except BROKER_ERRORS:
            raise
        except Exception as exc:
            self.suspects.suspect(work)
            self.metrics.processing_errors.labels("batch").inc()
            raise ProcessingFailed(f"applying a batch of {len(work)} records failed: {one_line(exc)}") from exc

    def _apply_one_by_one(self, work: list[Work]) -> None:
        """A batch with a suspect: each record alone, so the one that raises is known."""
        for w in work:
            try:
                self._apply([w])
            except BROKER_ERRORS:
                raise
            except Exception as exc:
                detail = self.suspects.condemn(w.record_id, exc)
                self.metrics.processing_errors.labels("record").inc()
                raise ProcessingFailed(f"record {w.tp.partition}@{w.rec.offset} fails on its own: {detail}") from exc

    def _admit(self, tp: TopicPartition, rec: Any, received: float) -> Work | None:
        """A record parsed into work, or (bad input, condemned) sent to the dead-letter topic."""
        self.book.mark_processed(tp, rec.offset)
        condemned = self.suspects.condemned.get((tp.partition, rec.offset))
        if condemned is not None:
            self._dead_letter(tp, rec, PROCESSING_ERROR, condemned)
            return None
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
        results = self._step([StepItem(w.key, w.frag.text, w.frag.end, w.rec.offset, w.frag.generate, w.frag.final)
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

    def _step(self, items: list[StepItem]) -> list[StepResult]:
        failing = self.faults.first_failing([item.text for item in items])
        if failing is not None:  # fault injection: what precedes the poison record is applied, then it raises
            self.engine.step(items[:failing])
            raise InjectedProcessingError(f"injected processing error\nfragment {items[failing].text!r}")
        return self.engine.step(items)

    def _send_output(self, w: Work, res: StepResult, now: float) -> None:
        value = encode_output(stream=w.frag.stream, partition=w.tp.partition, offset=w.rec.offset, tokens=res.tokens,
                              cats=res.cats, generated=res.generated, end=w.frag.end, held_back=res.held_back,
                              fingerprint=self.engine.fingerprint, latency_ms=(now - w.received) * 1000,
                              restored=res.restored, is_final=res.final)
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


def one_line(exc: BaseException) -> str:
    """``Type: message`` on one line, at most :data:`MAX_DETAIL_CHARS` characters."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= MAX_DETAIL_CHARS else text[: MAX_DETAIL_CHARS - 3] + "..."
