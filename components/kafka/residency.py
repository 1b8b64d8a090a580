"""Which streams this member holds: restoring newly assigned partitions, dropping partitions that leave (or
are rolled back), and evicting idle streams.

The streams themselves live in the engine's session layer (keyed by ``(input partition, stream id)``); their
snapshots in the :class:`~components.kafka.state_store.StateStore` (the state topic and its index). A restore
rebuilds the index of newly assigned partitions before any of their input is processed; states come back
into memory lazily, when a stream's next fragment arrives.
"""

from __future__ import annotations

import logging
import time

from kafka import KafkaConsumer
from kafka.structs import OffsetAndMetadata, TopicPartition

from .clients import BROKER_ERRORS
from .engine import StreamEngine
from .faults import Faults
from .metrics import Metrics
from .partitions import PartitionBook
from .readiness import Backoff, Readiness
from .state_store import StateStore

log = logging.getLogger("rwkv_stream.kafka")
IDLE_SCAN_S = 1.0


class Residency:
    def __init__(self, book: PartitionBook, engine: StreamEngine, store: StateStore, consumer: KafkaConsumer, *,
                 metrics: Metrics, faults: Faults, readiness: Readiness, backoff: Backoff, idle_ttl_s: float) -> None:
        self.book = book
        self.engine = engine
        self.store = store
        self.consumer = consumer
        self.metrics = metrics
        self.faults = faults
        self.readiness = readiness
        self.backoff = backoff
        self.idle_ttl_s = idle_ttl_s
        self._retry_at = 0.0
        self._last_idle_scan = time.monotonic()

    # ----------------------------------------------------------------------------- restore
    def restore_due(self) -> bool:
        return bool(self.book.to_restore) and time.monotonic() >= self._retry_at

    def try_restore(self) -> set[TopicPartition]:
        """:meth:`restore`, or (broker unreachable) a retry after the next backoff delay while polling goes on."""
        self.readiness.set("restoring", partitions=_numbers(self.book.to_restore))
        try:
            repositioned = self.restore()
        except BROKER_ERRORS as exc:
            self._schedule_retry(exc)
            return set()
        self.backoff.reset()
        return repositioned

    def _schedule_retry(self, exc: BaseException) -> None:
        self._retry_at = time.monotonic() + self.backoff.next_delay()
        self.metrics.broker_errors.labels("restore").inc()
        self.readiness.set("waiting_for_broker", during="restore")
        log.warning("broker unavailable: retrying", extra={
            "during": "restore", "error": repr(exc), "attempt": self.backoff.attempt,
            "retry_in_s": round(self._retry_at - time.monotonic(), 2)})

    def restore(self) -> set[TopicPartition]:
        """Main thread: rebuild the state index of newly assigned partitions before processing them, and
        position them at the group's committed offsets. Returns the partitions repositioned (what this poll
        returned for them is fetched again)."""
        tps = sorted(self.book.to_restore)
        targets: dict[int, int] = {}
        repositioned: set[TopicPartition] = set()
        for tp in tps:
            committed = self.consumer.committed(tp, metadata=True)
            targets[tp.partition] = state_target(committed)
            if self._seek_to_committed(tp, committed):
                repositioned.add(tp)
        self.faults.point("before_restore_scan")
        stats = self.store.restore(targets)
        self.book.to_restore -= set(tps)
        self.book.assigned |= set(tps)
        self.metrics.restores.inc(stats["streams"])
        self.metrics.known_streams.set(sum(len(self.store.index.get(p, {})) for p in targets))
        self.faults.point("after_restore")
        log.info("state restored", extra={"partitions": [tp.partition for tp in tps], **stats,
                                          "from_offsets": {tp.partition: self.book.committed.get(tp.partition)
                                                           for tp in tps}})
        return repositioned

    def _seek_to_committed(self, tp: TopicPartition, committed: OffsetAndMetadata | None) -> bool:
        """The group's offset, not ours: after a rollback another member may have committed further."""
        if committed is None:
            self.book.committed.pop(tp.partition, None)
            return False
        self.book.committed[tp.partition] = committed.offset
        self.book.queues.pop(tp, None)
        self.consumer.seek(tp, committed.offset)
        return True

    # ----------------------------------------------------------------------------- leaving
    def drop_partitions(self, tps: set[TopicPartition]) -> None:
        """Forget these partitions' live streams, buffered records, offsets and state index (nothing is
        written). Partitions paused for backpressure that the consumer still holds are resumed."""
        parts = {tp.partition for tp in tps}
        for key in [k for k in self.engine.live_keys() if k[0] in parts]:
            self.engine.drop(key)
        for tp in tps:
            self.metrics.forget_partition(tp.partition)
        paused = self.book.forget(tps)
        self.store.forget(sorted(parts))
        still_held = paused & self.consumer.assignment()
        if still_held:  # a rollback keeps them: fetching must go on
            self.consumer.resume(*still_held)
        self.metrics.live_streams.set(len(self.engine))

    # ----------------------------------------------------------------------------- idle streams
    def evict_idle(self) -> None:
        """Streams idle beyond ``idle_ttl_s`` leave memory (at most once per :data:`IDLE_SCAN_S`)."""
        now = time.monotonic()
        if now - self._last_idle_scan < IDLE_SCAN_S:
            return
        self._last_idle_scan = now
        idle = self.engine.sessions.expire_idle(ttl_s=self.idle_ttl_s)
        self.metrics.evictions.labels("idle").inc(len(idle))
        if idle:
            log.info("evicted idle streams", extra={"streams": len(idle)})
            self.metrics.live_streams.set(len(self.engine))


def state_target(committed: OffsetAndMetadata | None) -> int:
    """The state-topic end offset recorded with the last offset commit (``s=<offset>``)."""
    if committed is None or not committed.metadata:
        return 0
    for part in committed.metadata.split(";"):
        if part.startswith("s="):
            return int(part[2:])
    return 0


def _numbers(tps: set[TopicPartition]) -> list[int]:
    return sorted(tp.partition for tp in tps)
