"""Checkpoint jobs: what a checkpoint commits, running it (inline or on a background thread), applying its
outcome, and rolling back to the last checkpoint.

The order of things inside a checkpoint, per delivery mode, is in :mod:`.checkpoint`. Here, on the main thread,
a job is *begun* (the snapshots of the streams touched since the last checkpoint are staged and encoded, the
offsets to commit fixed), *run* (its I/O: inline for exactly-once, whose transaction the next records must not
join; on a background thread for at-least-once, which touches only the job and the thread-safe clients) and
*ended* (the outcome applied back on the main thread). Each job carries the group member id its work was
polled under: work of an earlier membership is never committed.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from kafka import KafkaConsumer
from kafka.structs import OffsetAndMetadata, TopicPartition

from .checkpoint import CheckpointPolicy, CommitFailed, Delivery, MembershipLost, Offsets, StaleWork
from .engine import StreamEngine
from .metrics import Metrics
from .partitions import PartitionBook
from .residency import Residency
from .state_store import StateStore, WriteBatch

log = logging.getLogger("rwkv_stream.kafka")


@dataclass
class CheckpointJob:
    """One checkpoint: the offsets it commits, the snapshot writes, and its outcome."""

    offsets: dict[int, int]  # input partition -> next offset
    known: Offsets  # offsets this member committed before (at-least-once membership probe)
    batch: WriteBatch
    state_end: dict[int, int]
    member: str | None  # group member id the work was polled under
    started: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class Checkpointer:
    def __init__(self, book: PartitionBook, engine: StreamEngine, store: StateStore, delivery: Delivery,
                 consumer: KafkaConsumer, residency: Residency, policy: CheckpointPolicy, metrics: Metrics,
                 input_topic: str) -> None:
        self.book = book
        self.engine = engine
        self.store = store
        self.delivery = delivery
        self.consumer = consumer
        self.residency = residency
        self.policy = policy
        self.metrics = metrics
        self.input_topic = input_topic
        self._job: CheckpointJob | None = None  # the background (at-least-once) checkpoint in flight
        self._work_member: str | None = None  # member id when the uncommitted work started

    # ----------------------------------------------------------------------------- entry points
    def note_work(self) -> None:
        """Work is being done: remember the group member id it is done under (first work since a checkpoint)."""
        if self._work_member is None:
            self._work_member = self._member_id()

    def maybe_checkpoint(self) -> None:
        """Main loop: finish a background checkpoint that is done; start the next one when due."""
        if self._job is not None:
            if not self._job.done.is_set():
                return
            self._finish_background_job()
        if not (self.policy.due() or (self.policy.pending == 0 and self.store.has_pending())):
            return
        job = self._begin()
        if job is None:
            return
        if self.delivery.exactly_once:
            self._run(job)
            self._end(job)
            return
        self._job = job
        threading.Thread(target=self._run, args=(job,), name="rwkv-checkpoint", daemon=True).start()

    def checkpoint(self) -> bool:
        """A synchronous checkpoint (rebalances, shutdown): waits for a background one first."""
        self.await_background_job()
        job = self._begin()
        if job is None:
            return True
        self._run(job)
        return self._end(job)

    def await_background_job(self) -> None:
        if self._job is not None:
            self._job.done.wait()
            self._finish_background_job()

    def abandon_work(self) -> None:
        """Throw away everything since the last checkpoint (a failed send, a processing error): wait for the
        checkpoint in flight, abort what was sent, roll back."""
        self.await_background_job()
        self.delivery.abort()
        self.rollback()

    def rollback(self) -> None:
        """Forget everything since the last committed offsets and states: drop the streams and the buffered
        records, seek back, and restore the partitions again (exactly-once abort, undeliverable records)."""
        book = self.book
        tps = set(book.assigned) | set(book.to_restore)
        seek = book.last_checkpoint_offsets(tps)
        self.residency.drop_partitions(tps)
        for tp, offset in seek.items():
            if offset is not None:
                self.consumer.seek(tp, offset)
        book.to_restore |= tps
        self._work_member = None
        log.warning("rolled back to the last checkpoint", extra={"partitions": sorted(tp.partition for tp in tps)})

    # ----------------------------------------------------------------------------- a job's life
    def _finish_background_job(self) -> None:
        job, self._job = self._job, None
        if job is not None:
            self._end(job)

    def _begin(self) -> CheckpointJob | None:
        """Main thread: snapshot the streams touched since the last checkpoint and fix the offsets to commit."""
        if not (self.book.processed or self.engine.sessions.has_changes() or self.store.has_pending()):
            self.policy.done()
            return None
        member, self._work_member = self._work_member, None
        if member is not None and member != self._member_id():
            self._discard_stale_work(member)
            return None
        for key, position, data in self.engine.sessions.dirty():
            self.store.stage_state(key[0], key[1], position, data)  # type: ignore[index]
            self.metrics.snapshots.inc()
        job = CheckpointJob(dict(self.book.processed), self._known_offsets(), self.store.take(),
                            dict(self.store.state_end), member)
        self.book.processed.clear()
        self.policy.done()
        return job

    def _run(self, job: CheckpointJob) -> None:
        """Any thread: the I/O of a checkpoint (see checkpoint.py for the order of things)."""
        try:
            self.delivery.checkpoint(lambda producer: self.store.send(producer, job.batch),
                                     lambda: self._offsets_to_commit(job), job.known,
                                     job.member if job.offsets else None)
        except BaseException as exc:
            job.error = exc
        finally:
            job.done.set()

    def _end(self, job: CheckpointJob) -> bool:
        """Main thread: apply a finished checkpoint's results, or handle its failure."""
        exc = job.error
        if exc is None or isinstance(exc, CommitFailed):  # the snapshots were written
            self.store.apply(job.batch)
        elif isinstance(exc, MembershipLost):  # nothing was written: keep the snapshots for the next try
            self.store.requeue(job.batch)
        if exc is not None:
            return self._failed(job, exc)
        self.book.committed.update(job.offsets)
        n = self.store.stage_tombstones(self.book.committed)
        seconds = time.monotonic() - job.started
        self.metrics.checkpoints.labels("ok").inc()
        self.metrics.checkpoint_seconds.observe(seconds)
        self.metrics.cached_state_bytes.set(self.store.stored_bytes())
        log.debug("checkpoint", extra={"offsets": job.offsets, "states": len(job.batch), "tombstones": n,
                                       "seconds": round(seconds, 4)})
        return True

    def _failed(self, job: CheckpointJob, exc: BaseException) -> bool:
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
            self._keep_for_next_checkpoint(job)
        return False

    def _keep_for_next_checkpoint(self, job: CheckpointJob) -> None:
        """The job's work stays uncommitted: its offsets go with the next checkpoint, and so does the member id
        it was polled under. Without that, a member fenced out of the group whose checkpoints failed meanwhile
        (e.g. frozen past its session timeout) rejoined under a new member id with its old work unmarked, and
        its final checkpoint on revocation wrote stale snapshots and offsets over its successor's (soak test)."""
        owned = {tp.partition for tp in self.book.assigned}
        for p, offset in job.offsets.items():
            if p in owned:
                self.book.processed.setdefault(p, offset)
        if job.member is not None:
            self._work_member = job.member  # the older membership is the one the work must still belong to

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

    # ----------------------------------------------------------------------------- offsets
    def _member_id(self) -> str:
        return self.consumer.group_metadata().member_id

    def _offsets_to_commit(self, job: CheckpointJob) -> Offsets:
        """Offsets to commit, each with the state-topic end offset a restore must reach (``s=``)."""
        ends = dict(job.state_end)
        for r, offset in zip(job.batch.records, job.batch.offsets, strict=False):
            ends[r.write.partition] = max(ends.get(r.write.partition, 0), offset + 1)
        return {self._tp(p): OffsetAndMetadata(off, f"s={ends.get(p, 0)}", -1) for p, off in job.offsets.items()}

    def _known_offsets(self) -> Offsets:
        """The offsets this member committed before, for the partitions it holds (the membership probe)."""
        return {self._tp(p): OffsetAndMetadata(off, f"s={self.store.state_end.get(p, 0)}", -1)
                for p, off in self.book.committed.items() if self._tp(p) in self.book.assigned}

    def _tp(self, partition: int) -> TopicPartition:
        return TopicPartition(self.input_topic, partition)
