"""The input partitions as this member sees them: which it owns, the polled records waiting, the offsets.

:class:`PartitionBook` is plain bookkeeping (no Kafka calls); :class:`Backpressure` and :class:`ConsumerLag`
act on the consumer and the metrics from it. Everything here runs on the main thread, or on the rebalance
worker while the main thread is blocked in ``poll()``.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

from kafka import KafkaConsumer
from kafka.structs import TopicPartition

from .metrics import Metrics

log = logging.getLogger("rwkv_stream.kafka")
LAG_SCAN_S = 1.0

Polled = tuple[TopicPartition, Any, float]  # (partition, ConsumerRecord, time.time() when it was polled)


class PartitionBook:
    """Assigned partitions (restored ones and ones waiting for their restore), their buffered records, and
    per partition the next offset to commit, the offset the group committed, and the first offset polled
    where the group has none."""

    def __init__(self) -> None:
        self.assigned: set[TopicPartition] = set()  # restored: their records may be processed
        self.to_restore: set[TopicPartition] = set()
        self.queues: dict[TopicPartition, deque[tuple[Any, float]]] = {}
        self.paused: set[TopicPartition] = set()  # paused for backpressure
        self.processed: dict[int, int] = {}  # partition -> next offset to commit
        self.committed: dict[int, int] = {}  # partition -> offset committed by the group
        self.first_seen: dict[int, int] = {}  # partition without a committed offset -> first offset polled

    def enqueue(self, polled: dict[TopicPartition, list[Any]], now: float) -> None:
        for tp, records in polled.items():
            if tp in self.assigned or tp in self.to_restore:
                self.queues.setdefault(tp, deque()).extend((r, now) for r in records)
                if records and tp.partition not in self.committed:
                    self.first_seen.setdefault(tp.partition, records[0].offset)

    def buffered(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def has_ready_records(self) -> bool:
        return any(q for tp, q in self.queues.items() if tp in self.assigned)

    def take_batch(self, max_records: int, max_bytes: int) -> list[Polled]:
        """Up to ``max_records`` records (and ``max_bytes`` value bytes), round-robin over the restored
        partitions, each partition's records in offset order."""
        batch: list[Polled] = []
        size = 0
        queues = [(tp, q) for tp, q in self.queues.items() if q and tp in self.assigned]
        while queues and len(batch) < max_records and size < max_bytes:
            for tp, q in list(queues):
                if not q:
                    queues.remove((tp, q))
                    continue
                rec, received = q.popleft()
                batch.append((tp, rec, received))
                size += len(rec.value or b"")
                if len(batch) >= max_records:
                    break
        return batch

    def mark_processed(self, tp: TopicPartition, offset: int) -> None:
        self.processed[tp.partition] = offset + 1

    def next_offset(self, tp: TopicPartition) -> int | None:
        """The next offset this member will process in ``tp`` (None: unknown yet)."""
        queue = self.queues.get(tp)
        if queue:
            return queue[0][0].offset
        return self.processed.get(tp.partition, self.committed.get(tp.partition))

    def last_checkpoint_offsets(self, tps: set[TopicPartition]) -> dict[TopicPartition, int | None]:
        """Where a rollback seeks: the group's committed offset, else the first offset polled."""
        return {tp: self.committed.get(tp.partition, self.first_seen.get(tp.partition)) for tp in tps}

    def forget(self, tps: set[TopicPartition]) -> set[TopicPartition]:
        """Forget these partitions' records and offsets; returns those of them that were paused."""
        paused = tps & self.paused
        for tp in tps:
            self.queues.pop(tp, None)
            self.processed.pop(tp.partition, None)
            self.first_seen.pop(tp.partition, None)
        self.paused -= tps
        self.assigned -= tps
        self.to_restore -= tps
        return paused


class Backpressure:
    """Pause fetching while too many records wait; resume below half. Polling goes on regardless, so the
    group membership and rebalances never wait for the backlog."""

    def __init__(self, book: PartitionBook, consumer: KafkaConsumer, max_buffered: int, metrics: Metrics) -> None:
        self.book = book
        self.consumer = consumer
        self.high = max_buffered
        self.metrics = metrics

    def update(self) -> None:
        total = self.book.buffered()
        if total >= self.high:
            self._pause_busy_partitions(total)
        elif self.book.paused and total <= self.high // 2:
            self._resume_all(total)
        self.metrics.paused.set(len(self.book.paused))

    def _pause_busy_partitions(self, total: int) -> None:
        book = self.book
        more = {tp for tp, q in book.queues.items() if q and tp in book.assigned} - book.paused
        if more:
            self.consumer.pause(*more)
            book.paused |= more
            log.info("backpressure: paused", extra={"partitions": _numbers(more), "buffered": total})

    def _resume_all(self, total: int) -> None:
        resume = {tp for tp in self.book.paused if tp in self.book.assigned}
        self.consumer.resume(*resume)
        self.book.paused.clear()
        log.info("backpressure: resumed", extra={"partitions": _numbers(resume), "buffered": total})


class ConsumerLag:
    """The lag metric, per assigned partition: its high watermark minus the next offset to process (at most
    once per :data:`LAG_SCAN_S`)."""

    def __init__(self, book: PartitionBook, consumer: KafkaConsumer, metrics: Metrics) -> None:
        self.book = book
        self.consumer = consumer
        self.metrics = metrics
        self._last_scan = 0.0

    def update(self) -> None:
        now = time.monotonic()
        if now - self._last_scan < LAG_SCAN_S:
            return
        self._last_scan = now
        for tp in self.book.assigned:
            high = self.consumer.highwater(tp)
            nxt = self.book.next_offset(tp)
            if high is not None and nxt is not None:
                self.metrics.consumer_lag.labels(str(tp.partition)).set(max(0, high - nxt))


def _numbers(tps: set[TopicPartition]) -> list[int]:
    return sorted(tp.partition for tp in tps)
