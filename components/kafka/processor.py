"""The stream processor's app loop: poll, restore, process in batches, checkpoint, rebalance, stop.

One thread owns the processor (the "main" thread): poll, restore, run the engine, start checkpoints.
At-least-once checkpoints do their I/O on a background thread that only touches its own job (snapshot bytes
and offsets fixed by the main thread) and the thread-safe Kafka clients; the main thread applies the outcome.
kafka-python runs the group protocol (heartbeats, joins) on its own I/O thread, and calls the rebalance
listener there, from inside the main thread's ``poll()``; the listener hands its slow part (waiting for a
background checkpoint, the final checkpoint before giving up partitions) to a short-lived worker thread and
awaits it without blocking the I/O loop, so heartbeats go on. The main thread is blocked in ``poll()``
meanwhile, so the worker has the processor to itself.

Per input partition: records are processed in offset order; per stream (key) one fragment at a time; a poll's
fragments of different streams are stepped through the engine together (one fragment per stream per step).
Each stream's state carries the input offset it reflects (``applied``): replayed input at or below it is
skipped, so a replay neither applies a fragment twice nor re-emits its output.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener
from kafka.errors import KafkaError
from kafka.structs import MemberState, OffsetAndMetadata, TopicPartition

from rwkv_stream.loading import LoadedModel, load_source

from . import client_compat
from .checkpoint import (
    AtLeastOnce,
    CheckpointPolicy,
    CommitFailed,
    Delivery,
    ExactlyOnce,
    MembershipLost,
    Offsets,
    StaleWork,
)
from .config import ConfigError, ConsumerConfig
from .engine import StepItem, StreamEngine
from .faults import Faults
from .metrics import Metrics
from .readiness import Backoff, Readiness
from .records import OutputCodec, header_items
from .schema import BadInput, Fragment, encode_dead_letter, encode_output, parse_input
from .session_store import StateTopicSessions
from .state_store import SnapshotCodec, StateStore, StateStoreError, WriteBatch
from .topics import ensure_topics

log = logging.getLogger("rwkv_stream.kafka")
IDLE_SCAN_S = 1.0
LAG_SCAN_S = 1.0
# Broker trouble the processor waits out (retrying with backoff) instead of exiting.
BROKER_ERRORS = (KafkaError, StateStoreError, OSError)


@dataclass
class _Work:
    partition: int
    rec: Any  # ConsumerRecord
    frag: Fragment
    received: float  # time.time() when polled


@dataclass
class _Job:
    """One checkpoint: the offsets it commits, the snapshot writes, and its outcome."""

    offsets: dict[int, int]  # input partition -> next offset
    known: Offsets  # offsets this member committed before (at-least-once membership probe)
    batch: WriteBatch
    state_end: dict[int, int]
    member: str | None  # group member id the work was polled under
    started: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class _Listener(AsyncConsumerRebalanceListener):
    """Runs on kafka-python's I/O thread; slow work goes to a worker thread that it awaits."""

    def __init__(self, processor: Processor) -> None:
        self.p = processor

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._offload(self.p.on_revoked, revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.p.on_assigned(assigned)

    async def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
        await self._offload(self.p.on_lost, lost)

    async def _offload(self, fn: Any, arg: Any) -> None:
        error: list[BaseException] = []

        def target() -> None:
            try:
                fn(arg)
            except BaseException as exc:  # reported below, never lost in the thread
                error.append(exc)

        worker = threading.Thread(target=target, name="rwkv-rebalance", daemon=True)
        worker.start()
        sleep = client_compat.event_loop_sleep(self.p.consumer)
        while worker.is_alive():
            await sleep(0.005)
        if error:
            log.error("rebalance handling failed", exc_info=error[0])


class Processor:
    """``rwkv-stream consume``: see docs/kafka.md."""

    def __init__(self, cfg: ConsumerConfig, *, bundle: LoadedModel | None = None, metrics: Metrics | None = None,
                 faults: Faults | None = None) -> None:
        self.cfg = cfg
        self.metrics = metrics or Metrics()
        self.faults = faults or Faults()
        if cfg.torch_threads:
            import torch

            torch.set_num_threads(cfg.torch_threads)
        bundle = bundle or load_source(cfg.bundle, device=cfg.device, dtype=cfg.dtype)
        self.engine = StreamEngine(bundle, cfg.heads or None, cfg.max_streams)
        self.policy = CheckpointPolicy(cfg.resolved_checkpoint_interval_ms, cfg.checkpoint_records)
        self._stop = threading.Event()
        self._closing = False
        self.assigned: set[TopicPartition] = set()
        self.to_restore: set[TopicPartition] = set()
        self.queues: dict[TopicPartition, deque[tuple[Any, float]]] = {}
        self.paused: set[TopicPartition] = set()
        self.processed: dict[int, int] = {}  # partition -> next offset to commit
        self.committed: dict[int, int] = {}  # partition -> offset committed by the group
        self.first_seen: dict[int, int] = {}  # partition without a committed offset -> first offset polled
        self._last_idle_scan = time.monotonic()
        self.consumer: KafkaConsumer | None = None
        self.delivery: Delivery | None = None
        self.store: StateStore | None = None
        self.started = threading.Event()
        self._job: _Job | None = None
        self._work_member: str | None = None  # member id when the uncommitted work started
        self._co_partitioned = False  # output topic has the input's partitions: output partition = input's
        self._dlq_co_partitioned = False  # the same for the dead-letter topic
        self.readiness = Readiness(self.metrics.readiness, cfg.readiness_file or None)
        self.backoff = Backoff(0.5, cfg.broker_retry_max_s)
        self._restore_retry_at = 0.0
        self._last_lag_scan = 0.0
        self.codec = OutputCodec(cfg.output_format, cfg.output_topic, cfg.dead_letter_topic)

    # ================================================================================ lifecycle
    def stop(self) -> None:
        """Finish the batch in hand, checkpoint, commit and leave the group (safe from signal handlers)."""
        self._stop.set()

    def run(self) -> int:
        """Until stop(): broker outages are waited out (backoff, readiness ``waiting_for_broker``); only an
        invalid configuration (:class:`ConfigError`) or a bug ends it otherwise."""
        try:
            if self.cfg.metrics_port:
                self.metrics.serve(self.cfg.metrics_port, self.cfg.metrics_addr)
            if not self.connect():
                return 0
            _calm_garbage_collector()
            while not self._stop.is_set():
                try:
                    self.iteration()
                except BROKER_ERRORS as exc:
                    self._recover(exc)
            self.shutdown()
        except BaseException:
            log.exception("processor failed")
            self._close_clients()
            raise
        finally:
            self.readiness.close()
        return 0

    def connect(self) -> bool:
        """setup(), retried with capped exponential backoff while the broker cannot be reached. False: stopped
        while waiting."""
        while not self._stop.is_set():
            try:
                self.setup()
                self.backoff.reset()
                return True
            except ConfigError:
                raise
            except BROKER_ERRORS as exc:
                self._close_clients()
                self._closing = False
                if self._wait_for_broker("start-up", exc):
                    return False
        return False

    def _wait_for_broker(self, during: str, exc: BaseException) -> bool:
        """Log, set the readiness state, sleep the next backoff delay (cut short by stop()). True: stopped."""
        delay = self.backoff.next_delay()
        self.metrics.broker_errors.labels(during).inc()
        self.readiness.set("waiting_for_broker", during=during)
        log.warning("broker unavailable: retrying", extra={"during": during, "error": repr(exc),
                                                           "retry_in_s": round(delay, 2),
                                                           "attempt": self.backoff.attempt})
        return self._stop.wait(delay)

    def _recover(self, exc: BaseException) -> None:
        """Broker trouble outside a checkpoint (a send, a lazy state fetch, re-creating the transactional
        producer): throw away the uncommitted work like a failed checkpoint does, wait, go on."""
        try:
            self._await_job()
            self.delivery.abort()
        except BROKER_ERRORS as again:
            log.warning("abort failed during recovery", extra={"error": repr(again)})
        self.rollback()
        self._wait_for_broker("processing", exc)

    def setup(self) -> None:
        cfg = self.cfg
        self.readiness.set("starting")
        self._ensure_topics()
        self.consumer = KafkaConsumer(**self._consumer_config())
        client_compat.check(self.consumer)
        mode = ExactlyOnce if cfg.exactly_once else AtLeastOnce
        self.delivery = mode(self._make_producer, self.consumer, self.faults, transform=self.codec.transform)
        reader = KafkaConsumer(**self._reader_config())
        codec = SnapshotCodec(cfg.state_chunk_bytes, cfg.state_compress_over)
        self.store = StateStore(cfg.state_topic, reader, self.engine.fingerprint, codec=codec,
                                cache_bytes=cfg.state_cache_bytes, restore_timeout_s=cfg.restore_timeout_s)
        self.engine.sessions.store = StateTopicSessions(self.store, self.engine.fingerprint)
        self.consumer.subscribe([cfg.input_topic], listener=_Listener(self))
        _prime_metadata(self.consumer, cfg.input_topic)
        log.info("consumer started", extra={"group": cfg.group_id, "input": cfg.input_topic, "delivery": cfg.delivery,
                                            "instance": cfg.resolved_instance_id,
                                            "fingerprint": self.engine.fingerprint})
        self.started.set()

    def shutdown(self) -> None:
        self.readiness.set("stopping")
        log.info("stopping: final checkpoint", extra={"buffered": self._buffered()})
        self.checkpoint()
        self._closing = True
        self._close_clients()
        log.info("stopped")

    def _close_clients(self) -> None:
        self._closing = True
        for client, close in ((self.consumer, lambda: self.consumer.close(autocommit=False)),
                              (self.delivery, lambda: self.delivery.close()),
                              (self.store, lambda: self.store.reader.close(autocommit=False))):
            if client is None:
                continue
            try:
                close()
            except Exception as exc:  # closing after a failure: report, go on
                log.warning("close failed", extra={"error": repr(exc)})
        self.consumer = self.delivery = self.store = None

    # ================================================================================ the loop
    def iteration(self) -> None:
        timeout = 0 if self._ready_records() else self.cfg.poll_timeout_ms
        client_compat.unpark_fetched_records(self.consumer)
        polled = self.consumer.poll(timeout_ms=timeout, max_records=self.cfg.max_poll_records)
        if self.to_restore and time.monotonic() >= self._restore_retry_at:
            repositioned = self._try_restore()
            polled = {tp: records for tp, records in polled.items() if tp not in repositioned}  # re-fetched
        self._update_readiness()
        self._enqueue(polled)
        self._update_lag()
        self._backpressure()
        batch = self._take_batch()
        if batch:
            self.process(batch)
        self._evict_idle()
        self.maybe_checkpoint()

    def _update_readiness(self) -> None:
        if self.to_restore:
            return  # restoring, or waiting for the broker to restore
        stable = self.consumer.group_metadata().state == MemberState.STABLE
        self.readiness.set("ready" if stable else "starting")

    def _update_lag(self) -> None:
        """Per assigned partition: the partition's high watermark minus the next offset to process."""
        now = time.monotonic()
        if now - self._last_lag_scan < LAG_SCAN_S:
            return
        self._last_lag_scan = now
        for tp in self.assigned:
            high = self.consumer.highwater(tp)
            nxt = self._next_offset(tp)
            if high is not None and nxt is not None:
                self.metrics.consumer_lag.labels(str(tp.partition)).set(max(0, high - nxt))

    def _next_offset(self, tp: TopicPartition) -> int | None:
        queue = self.queues.get(tp)
        if queue:
            return queue[0][0].offset
        return self.processed.get(tp.partition, self.committed.get(tp.partition))

    def _enqueue(self, polled: dict[TopicPartition, list[Any]]) -> None:
        now = time.time()
        for tp, records in polled.items():
            if tp in self.assigned or tp in self.to_restore:
                self.queues.setdefault(tp, deque()).extend((r, now) for r in records)
                if records and tp.partition not in self.committed:
                    self.first_seen.setdefault(tp.partition, records[0].offset)
        self.metrics.buffered.set(self._buffered())

    def _buffered(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def _ready_records(self) -> bool:
        return any(q for tp, q in self.queues.items() if tp in self.assigned)

    def _backpressure(self) -> None:
        """Pause fetching while too many records wait; resume below half. Polling goes on regardless, so
        the group membership and rebalances never wait for the backlog."""
        total = self._buffered()
        high = self.cfg.max_buffered_records
        if total >= high:
            more = {tp for tp, q in self.queues.items() if q and tp in self.assigned} - self.paused
            if more:
                self.consumer.pause(*more)
                self.paused |= more
                log.info("backpressure: paused", extra={"partitions": sorted(tp.partition for tp in more),
                                                        "buffered": total})
        elif self.paused and total <= high // 2:
            resume = {tp for tp in self.paused if tp in self.assigned}
            self.consumer.resume(*resume)
            self.paused.clear()
            log.info("backpressure: resumed", extra={"partitions": sorted(tp.partition for tp in resume),
                                                     "buffered": total})
        self.metrics.paused.set(len(self.paused))

    def _take_batch(self) -> list[tuple[TopicPartition, Any, float]]:
        """Up to ``max_batch_records`` records (and ``max_batch_chars`` value bytes), round-robin over the
        restored partitions, each partition's records in offset order."""
        batch: list[tuple[TopicPartition, Any, float]] = []
        size = 0
        queues = [(tp, q) for tp, q in self.queues.items() if q and tp in self.assigned]
        while queues and len(batch) < self.cfg.max_batch_records and size < self.cfg.max_batch_chars:
            for tp, q in list(queues):
                if not q:
                    queues.remove((tp, q))
                    continue
                rec, received = q.popleft()
                batch.append((tp, rec, received))
                size += len(rec.value or b"")
                if len(batch) >= self.cfg.max_batch_records:
                    break
        return batch

    # ================================================================================ processing
    def process(self, batch: list[tuple[TopicPartition, Any, float]]) -> None:
        if self._work_member is None:
            self._work_member = self._member_id()
        work: list[_Work] = []
        for tp, rec, received in batch:
            self.processed[tp.partition] = rec.offset + 1
            try:
                frag = parse_input(rec.key, rec.value, max_fragment_chars=self.cfg.max_fragment_chars,
                                   max_generate_tokens=self.cfg.max_generate_tokens)
            except BadInput as exc:
                self._dead_letter(tp, rec, exc)
                continue
            work.append(_Work(tp.partition, rec, frag, received))
        self.policy.note(len(batch))
        if work:
            self._apply(work)
        self.metrics.live_streams.set(len(self.engine))
        self.metrics.state_bytes.set(self.engine.state_bytes())

    def _apply(self, work: list[_Work]) -> None:
        """All fragments of a batch through the session layer (each stream's in offset order; input its
        state already covers is skipped there), then their outputs."""
        sessions = self.engine.sessions
        evicted = sessions.evictions
        items = [StepItem((w.partition, w.frag.stream), w.frag.text, w.frag.end, w.rec.offset, w.frag.generate)
                 for w in work]
        results = self.engine.step(items)
        self.metrics.evictions.labels("lru").inc(sessions.evictions - evicted)
        now, sent = time.time(), 0
        for w, res in zip(work, results, strict=True):
            if res.skipped:
                self.metrics.records.labels("skipped").inc()
                continue
            value = encode_output(stream=w.frag.stream, partition=w.partition, offset=w.rec.offset,
                                  tokens=res.tokens, cats=res.cats, generated=res.generated, end=w.frag.end,
                                  held_back=res.held_back, fingerprint=self.engine.fingerprint,
                                  latency_ms=(now - w.received) * 1000)
            self.delivery.send(self.cfg.output_topic, w.rec.key, value,
                               partition=w.partition if self._co_partitioned else None, headers=header_items(w.rec))
            self._observe(w, res.n_tokens, now)
            sent += 1
            if sent == max(1, len(work) // 2):
                self.faults.point("batch_mid")

    def _observe(self, w: _Work, n_tokens: int, now: float) -> None:
        self.metrics.records.labels("processed").inc()
        self.metrics.tokens.inc(n_tokens)
        produced_ms = w.frag.ts_ms if w.frag.ts_ms is not None else w.rec.timestamp
        if produced_ms:
            self.metrics.fragment_latency.observe(max(0.0, now - produced_ms / 1000))
        self.metrics.processing_latency.observe(max(0.0, now - w.received))

    def _dead_letter(self, tp: TopicPartition, rec: Any, exc: BadInput) -> None:
        value = encode_dead_letter(reason=exc.reason, detail=exc.detail, topic=tp.topic, partition=tp.partition,
                                   offset=rec.offset, key=rec.key, value=rec.value, timestamp_ms=rec.timestamp)
        self.delivery.send(self.cfg.dead_letter_topic, rec.key, value,
                           partition=tp.partition if self._dlq_co_partitioned else None,
                           headers=header_items(rec))
        self.metrics.dead_letters.labels(exc.reason).inc()
        self.metrics.records.labels("dead_letter").inc()
        log.warning("dead letter", extra={"reason": exc.reason, "detail": exc.detail, "partition": tp.partition,
                                          "offset": rec.offset})

    # ================================================================================ live streams
    def _evict_idle(self) -> None:
        now = time.monotonic()
        if now - self._last_idle_scan < IDLE_SCAN_S:
            return
        self._last_idle_scan = now
        idle = self.engine.sessions.expire_idle(ttl_s=self.cfg.idle_ttl_s)
        self.metrics.evictions.labels("idle").inc(len(idle))
        if idle:
            log.info("evicted idle streams", extra={"streams": len(idle)})
            self.metrics.live_streams.set(len(self.engine))

    # ================================================================================ checkpoints
    def maybe_checkpoint(self) -> None:
        """Main loop: finish a background checkpoint that is done; start the next one when due.

        At-least-once checkpoints run on a background thread (the main thread only serializes the snapshots),
        so processing goes on while the broker acknowledges; exactly-once ones commit a transaction, which
        the next records must not join, so they run inline.
        """
        if self._job is not None:
            if not self._job.done.is_set():
                return
            self._finish_job()
        if not (self.policy.due() or (self.policy.pending == 0 and self.store.has_pending())):
            return
        job = self._begin_checkpoint()
        if job is None:
            return
        if self.delivery.exactly_once:
            self._run_job(job)
            self._end_checkpoint(job)
            return
        self._job = job
        threading.Thread(target=self._run_job, args=(job,), name="rwkv-checkpoint", daemon=True).start()

    def checkpoint(self) -> bool:
        """A synchronous checkpoint (rebalances, shutdown): waits for a background one first."""
        self._await_job()
        job = self._begin_checkpoint()
        if job is None:
            return True
        self._run_job(job)
        return self._end_checkpoint(job)

    def _await_job(self) -> None:
        if self._job is not None:
            self._job.done.wait()
            self._finish_job()

    def _finish_job(self) -> None:
        job, self._job = self._job, None
        if job is not None:
            self._end_checkpoint(job)

    def _begin_checkpoint(self) -> _Job | None:
        """Main thread: snapshot the streams touched since the last checkpoint and fix the offsets to commit."""
        if not (self.processed or self.engine.sessions.has_changes() or self.store.has_pending()):
            self.policy.done()
            return None
        member, self._work_member = self._work_member, None
        if member is not None and member != self._member_id():
            self._discard_stale_work(member)
            return None
        for key, position, data in self.engine.sessions.dirty():
            self.store.stage_state(key[0], key[1], position, data)  # type: ignore[index]
            self.metrics.snapshots.inc()
        job = _Job(dict(self.processed), self._known_offsets(), self.store.take(), dict(self.store.state_end),
                   member)
        self.processed.clear()
        self.policy.done()
        return job

    def _run_job(self, job: _Job) -> None:
        """Any thread: the I/O of a checkpoint (see checkpoint.py for the order of things)."""
        try:
            self.delivery.checkpoint(lambda producer: self.store.send(producer, job.batch),
                                     lambda: self._offsets(job), job.known, job.member if job.offsets else None)
        except BaseException as exc:
            job.error = exc
        finally:
            job.done.set()

    def _end_checkpoint(self, job: _Job) -> bool:
        """Main thread: apply a finished checkpoint's results, or handle its failure."""
        exc = job.error
        if exc is None or isinstance(exc, CommitFailed):  # the snapshots were written
            self.store.apply(job.batch)
        elif isinstance(exc, MembershipLost):  # nothing was written: keep the snapshots for the next try
            self.store.requeue(job.batch)
        if exc is not None:
            return self._checkpoint_failed(job, exc)
        for p, offset in job.offsets.items():
            self.committed[p] = offset
        n = self.store.stage_tombstones(self.committed)
        self.metrics.checkpoints.labels("ok").inc()
        self.metrics.checkpoint_seconds.observe(time.monotonic() - job.started)
        self.metrics.cached_state_bytes.set(self.store.stored_bytes())
        log.debug("checkpoint", extra={"offsets": job.offsets, "states": len(job.batch), "tombstones": n,
                                       "seconds": round(time.monotonic() - job.started, 4)})
        return True

    def _member_id(self) -> str:
        return self.consumer.group_metadata().member_id

    def _discard_stale_work(self, member: str) -> None:
        """This consumer was fenced out of the group and rejoined since the uncommitted work was polled (e.g.
        it froze past its session timeout): another member may have processed the same input meanwhile, so
        the work is thrown away and the partitions restored from what the group committed."""
        log.warning("group membership changed since the uncommitted work was polled: discarding it",
                    extra={"member": member, "now": self._member_id()})
        self.metrics.checkpoints.labels("stale").inc()
        self.policy.done()
        self.delivery.abort()
        self.rollback()

    def _offsets(self, job: _Job) -> Offsets:
        """Offsets to commit, each with the state-topic end offset a restore must reach ("s=")."""
        ends = dict(job.state_end)
        for r, offset in zip(job.batch.records, job.batch.offsets, strict=False):
            ends[r.write.partition] = max(ends.get(r.write.partition, 0), offset + 1)
        topic = self.cfg.input_topic
        return {TopicPartition(topic, p): OffsetAndMetadata(off, f"s={ends.get(p, 0)}", -1)
                for p, off in job.offsets.items()}

    def _known_offsets(self) -> Offsets:
        topic = self.cfg.input_topic
        return {TopicPartition(topic, p): OffsetAndMetadata(off, f"s={self.store.state_end.get(p, 0)}", -1)
                for p, off in self.committed.items() if TopicPartition(topic, p) in self.assigned}

    def _checkpoint_failed(self, job: _Job, exc: BaseException) -> bool:
        """At-least-once: a refused commit (or a failed membership check) needs nothing undone: outputs and
        states are durable, the offsets go with the next checkpoint. Anything else (undelivered records, an
        aborted transaction) rolls back to the last committed offsets and states."""
        rollback = self.delivery.exactly_once or isinstance(exc, StaleWork) or not isinstance(
            exc, MembershipLost | CommitFailed)
        self.metrics.checkpoints.labels("failed").inc()
        self.metrics.commit_failures.inc()
        log.warning("checkpoint failed", extra={"error": repr(exc), "rollback": rollback})
        if rollback:
            self.delivery.abort()
            self.rollback()
        else:
            owned = {tp.partition for tp in self.assigned}
            for p, offset in job.offsets.items():
                if p in owned:
                    self.processed.setdefault(p, offset)
        return False

    def rollback(self) -> None:
        """Forget everything since the last committed offsets and states: drop the streams and the buffered
        records, seek back, and restore the partitions again (exactly-once abort, undeliverable records)."""
        tps = set(self.assigned) | set(self.to_restore)
        seek = {tp: self.committed.get(tp.partition, self.first_seen.get(tp.partition)) for tp in tps}
        self._drop_partitions(tps)
        for tp, offset in seek.items():
            if offset is not None:
                self.consumer.seek(tp, offset)
        self.to_restore |= tps
        self._work_member = None
        log.warning("rolled back to the last checkpoint", extra={"partitions": sorted(tp.partition for tp in tps)})

    # ================================================================================ rebalances
    def on_assigned(self, assigned: set[TopicPartition]) -> None:
        """I/O thread, inside poll(): just remember; the main thread restores after poll() returns."""
        self.to_restore |= set(assigned)
        self.metrics.rebalances.labels("assigned").inc()
        log.info("partitions assigned", extra={"partitions": sorted(tp.partition for tp in assigned)})

    def on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Worker thread, while poll() is blocked: final checkpoint, then drop the partitions' streams."""
        self.metrics.rebalances.labels("revoked").inc()
        log.info("partitions revoked", extra={"partitions": sorted(tp.partition for tp in revoked)})
        if not self._closing:
            self.checkpoint()
        self._drop_partitions(set(revoked))

    def on_lost(self, lost: set[TopicPartition]) -> None:
        """Worker thread: the group moved on without us; nothing may be written for these partitions."""
        self.metrics.rebalances.labels("lost").inc()
        log.warning("partitions lost", extra={"partitions": sorted(tp.partition for tp in lost)})
        self._await_job()
        self.delivery.abort()
        if self.delivery.exactly_once:  # the aborted transaction covered every partition
            self.rollback()
        self._drop_partitions(set(lost))
        self.to_restore -= set(lost)

    def _drop_partitions(self, tps: set[TopicPartition]) -> None:
        parts = {tp.partition for tp in tps}
        for key in [k for k in self.engine.live_keys() if k[0] in parts]:
            self.engine.drop(key)
        for tp in tps:
            self.queues.pop(tp, None)
            self.metrics.forget_partition(tp.partition)
            self.processed.pop(tp.partition, None)
            self.first_seen.pop(tp.partition, None)
            self.paused.discard(tp)
        self.assigned -= tps
        self.to_restore -= tps
        self.store.forget(sorted(parts))
        if self.paused:
            self.consumer.resume(*(tps & self.paused))
        self.metrics.live_streams.set(len(self.engine))

    def _try_restore(self) -> set[TopicPartition]:
        """restore(), or (broker unreachable) a retry after the next backoff delay while polling goes on."""
        self.readiness.set("restoring", partitions=sorted(tp.partition for tp in self.to_restore))
        try:
            repositioned = self.restore()
        except BROKER_ERRORS as exc:
            self._restore_retry_at = time.monotonic() + self.backoff.next_delay()
            self.metrics.broker_errors.labels("restore").inc()
            self.readiness.set("waiting_for_broker", during="restore")
            log.warning("broker unavailable: retrying", extra={
                "during": "restore", "error": repr(exc), "attempt": self.backoff.attempt,
                "retry_in_s": round(self._restore_retry_at - time.monotonic(), 2)})
            return set()
        self.backoff.reset()
        return repositioned

    def restore(self) -> set[TopicPartition]:
        """Main thread: rebuild the state index of newly assigned partitions before processing them, and
        position them at the group's committed offsets. Returns the partitions repositioned (what this poll
        returned for them is fetched again)."""
        tps = sorted(self.to_restore)
        targets: dict[int, int] = {}
        repositioned: set[TopicPartition] = set()
        for tp in tps:
            committed = self.consumer.committed(tp, metadata=True)
            targets[tp.partition] = _state_target(committed)
            if committed is not None:
                # The group's offset, not ours: after a rollback another member may have committed further.
                self.committed[tp.partition] = committed.offset
                self.queues.pop(tp, None)
                self.consumer.seek(tp, committed.offset)
                repositioned.add(tp)
            else:
                self.committed.pop(tp.partition, None)
        self.faults.point("before_restore_scan")
        stats = self.store.restore(targets)
        self.to_restore -= set(tps)
        self.assigned |= set(tps)
        self.metrics.restores.inc(stats["streams"])
        self.metrics.known_streams.set(sum(len(self.store.index.get(p, {})) for p in targets))
        self.faults.point("after_restore")
        log.info("state restored", extra={"partitions": [tp.partition for tp in tps], **stats,
                                          "from_offsets": {tp.partition: self.committed.get(tp.partition)
                                                           for tp in tps}})
        return repositioned

    # ================================================================================ Kafka clients
    def _client_options(self, allowed: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in self.cfg.client.items() if k in allowed}

    def _consumer_config(self) -> dict[str, Any]:
        from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor
        from kafka.coordinator.assignors.range import RangePartitionAssignor
        from kafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor

        assignor = {"cooperative-sticky": CooperativeStickyAssignor, "range": RangePartitionAssignor,
                    "roundrobin": RoundRobinPartitionAssignor}[self.cfg.assignor]
        cfg = self.cfg
        return {
            "bootstrap_servers": cfg.bootstrap_servers,
            "group_id": cfg.group_id,
            "client_id": f"rwkv-stream-{cfg.resolved_instance_id}",
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest",
            "isolation_level": cfg.isolation_level,
            "max_poll_records": cfg.max_poll_records,
            "session_timeout_ms": cfg.session_timeout_ms,
            "heartbeat_interval_ms": cfg.heartbeat_interval_ms,
            "max_poll_interval_ms": cfg.max_poll_interval_ms,
            "partition_assignment_strategy": (assignor,),
            "group_instance_id": cfg.resolved_instance_id if cfg.static_membership else None,
            "metrics_enabled": False,  # kafka-python's own sensors (see _producer_config)
            **self._client_options(KafkaConsumer.DEFAULT_CONFIG),
        }

    def _reader_config(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "bootstrap_servers": cfg.bootstrap_servers,
            "group_id": None,
            "client_id": f"rwkv-stream-{cfg.resolved_instance_id}-state",
            "enable_auto_commit": False,
            "isolation_level": "read_committed" if cfg.exactly_once else "read_uncommitted",
            "max_partition_fetch_bytes": max(4 << 20, 2 * cfg.state_chunk_bytes),
            "fetch_max_wait_ms": 20,
            # kafka-python checks CRC32C in pure Python unless the crc32c package is installed; snapshots carry
            # their own checksums (State bytes, chunk digests), so the restore scan skips it.
            "check_crcs": False,
            "metrics_enabled": False,
            **{k: v for k, v in self._client_options(KafkaConsumer.DEFAULT_CONFIG).items()
               if k not in ("group_id", "isolation_level", "auto_offset_reset")},
        }

    def _make_producer(self, role: str) -> KafkaProducer:
        """The output producer ("out": outputs, dead letters; in exactly-once also the snapshots) or the
        at-least-once snapshot producer ("state", batching snapshots up to 1 MiB per partition)."""
        return KafkaProducer(**self._producer_config(role))

    def _producer_config(self, role: str) -> dict[str, Any]:
        cfg = self.cfg
        options: dict[str, Any] = {
            "bootstrap_servers": cfg.bootstrap_servers,
            "client_id": f"rwkv-stream-{cfg.resolved_instance_id}-{role}",
            "acks": "all",
            # kafka-python's own sensors cost CPU per request and per record and nobody reads them (the
            # processor's metrics are its own); a client option can turn them back on
            "metrics_enabled": False,
            "linger_ms": 2,
            "enable_idempotence": True,
            "max_request_size": max(1 << 20, cfg.state_chunk_bytes + (64 << 10)),
            **({"batch_size": 1 << 20} if role == "state" else {}),
            **self._client_options(KafkaProducer.DEFAULT_CONFIG),
        }
        if cfg.exactly_once:
            options["transactional_id"] = cfg.resolved_transactional_id
            options["transaction_timeout_ms"] = cfg.transaction_timeout_ms
        return options

    def _ensure_topics(self) -> None:
        cfg = self.cfg
        admin = KafkaAdminClient(bootstrap_servers=cfg.bootstrap_servers,
                                 client_id=f"rwkv-stream-{cfg.resolved_instance_id}-admin",
                                 **self._client_options(KafkaAdminClient.DEFAULT_CONFIG))
        try:
            co_partitioned = ensure_topics(admin, cfg)
        finally:
            admin.close()
        self._co_partitioned = "output" in co_partitioned
        self._dlq_co_partitioned = "dead_letter" in co_partitioned


def _state_target(committed: OffsetAndMetadata | None) -> int:
    """The state-topic end offset recorded with the last offset commit ("s=<offset>")."""
    if committed is None or not committed.metadata:
        return 0
    for part in committed.metadata.split(";"):
        if part.startswith("s="):
            return int(part[2:])
    return 0


def _prime_metadata(consumer: KafkaConsumer, topic: str, timeout_s: float = 10.0) -> None:
    """Load the input topic's metadata before the first poll (a kafka-python 3.0.12 race otherwise can leave
    the first group leader with an empty assignment; see tests/kafka_broker.py)."""
    deadline = time.monotonic() + timeout_s
    while not consumer.partitions_for_topic(topic) and time.monotonic() < deadline:
        time.sleep(0.05)


def _calm_garbage_collector() -> None:
    """Fewer, shorter GC pauses in the loop: everything loaded so far (model, clients) is moved out of the
    collector's sight, and young collections run per 50,000 allocations instead of 700. Measured with
    bench/kafka_bench.py (100 streams, 200 fragments/s, 2 busy cores): p50 43 -> 36 ms, p99 114-139 -> 98-104 ms."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 100, 1000)
