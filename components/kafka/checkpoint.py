"""When to checkpoint, and how: the two delivery modes.

A checkpoint makes everything processed since the last one durable, in this order:

* at-least-once: flush the output producer (outputs and dead letters are acknowledged) -> check that this
  consumer still belongs to the group (a synchronous commit of the offsets already committed: a consumer that
  was fenced out fails here and writes nothing) -> write the state snapshots of the streams touched since the
  last checkpoint and flush -> commit the consumed offsets. A crash anywhere in between is safe: outputs are
  durable before the state that covers them, and the state before the offsets that skip their input.
  Snapshots go through a producer of their own: through the output producer, the outputs sent meanwhile
  queued behind a megabyte of snapshots, and every checkpoint showed as a burst of 60 ms late outputs.
* exactly-once: all of it inside one Kafka transaction of the transactional producer: the outputs (sent as
  records are processed), the state snapshots, and the consumed offsets (``send_offsets_to_transaction``
  with the consumer's group metadata, so a consumer fenced out of the group cannot commit), then
  ``commit_transaction``. Anything failing aborts the transaction, and the processor rolls back to the last
  committed offsets and the committed states.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from kafka import KafkaProducer
from kafka.structs import OffsetAndMetadata, TopicPartition

from . import client_compat
from .faults import Faults

log = logging.getLogger("rwkv_stream.kafka.checkpoint")


class CheckpointPolicy:
    """Checkpoint every ``interval_ms`` (when there is something to commit) or every ``records`` records."""

    def __init__(self, interval_ms: int, records: int) -> None:
        self.interval_s = interval_ms / 1000
        self.records = records
        self.pending = 0
        self.last = time.monotonic()

    def note(self, n: int) -> None:
        self.pending += n

    def due(self) -> bool:
        if self.pending >= self.records:
            return True
        return self.pending > 0 and time.monotonic() - self.last >= self.interval_s

    def done(self) -> None:
        self.pending = 0
        self.last = time.monotonic()


class SendFailed(RuntimeError):
    """An output, dead letter or state record was not acknowledged: nothing since the last checkpoint is
    durable for sure."""


class CommitFailed(RuntimeError):
    """The offset commit failed after outputs and states were made durable (at-least-once: harmless, the
    next checkpoint commits further; replayed input is skipped by the states' offsets)."""


class StaleWork(RuntimeError):
    """The work to checkpoint was polled under an earlier group membership (this consumer was fenced out and
    has rejoined since): it must be thrown away, never committed."""


class MembershipLost(RuntimeError):
    """This consumer no longer owns its partitions (its commit was refused by the group coordinator)."""


Offsets = dict[TopicPartition, OffsetAndMetadata]
Headers = list[tuple[str, bytes]]
Transform = Callable[[str, bytes, "Headers | None"], tuple[bytes, "Headers | None"]]


class Delivery:
    """The producer side of a processor, in one delivery mode."""

    exactly_once = False

    def __init__(self, make_producer: Callable[[str], KafkaProducer], consumer: Any, faults: Faults,
                 flush_timeout_s: float = 60.0, transform: Transform | None = None) -> None:
        self._make_producer = make_producer  # role ("out", "state") -> a producer
        self.transform = transform  # (topic, value, headers) -> (value, headers): output encoding, kept headers
        self.producer = make_producer("out")
        self.state_producer = self.producer
        self.consumer = consumer
        self.faults = faults
        self.flush_timeout_s = flush_timeout_s
        self._send_error: BaseException | None = None
        self._epoch = 0  # bumped by abort(): failures of records sent before it are expected, not errors

    def send(self, topic: str, key: bytes | None, value: bytes, partition: int | None = None,
             headers: Headers | None = None) -> None:
        if self.transform is not None:
            value, headers = self.transform(topic, value, headers)
        future = self.producer.send(topic, key=key, value=value, partition=partition, headers=headers)
        future.add_errback(self._on_error, self._epoch)

    def _on_error(self, epoch: int, exc: BaseException) -> None:
        if epoch == self._epoch and self._send_error is None:
            self._send_error = exc

    def flush(self) -> None:
        try:
            self.producer.flush(timeout=self.flush_timeout_s)
        except Exception as exc:
            raise SendFailed(f"flush failed: {exc!r}") from exc
        if self._send_error is not None:
            exc, self._send_error = self._send_error, None
            raise SendFailed(f"a record was not delivered: {exc!r}") from exc

    def checkpoint(self, write_state: Callable[[KafkaProducer], None], offsets: Callable[[], Offsets],
                   known: Offsets, member: str | None) -> None:
        """``write_state(producer)`` sends (and flushes) the snapshots; ``offsets()`` then gives the offsets to
        commit; ``known`` are offsets this member committed before (at-least-once membership probe);
        ``member`` is the group member id the work was polled under (None: no offsets to commit)."""
        raise NotImplementedError

    def _group_metadata(self, member: str | None) -> Any:
        """The consumer's group metadata, refused (:class:`StaleWork`) if its member id is no longer ``member``
        or if the consumer is not a group member right now (see :func:`check_membership`)."""
        metadata = self.consumer.group_metadata()
        if member is not None and metadata.member_id != member:
            raise StaleWork(f"group member changed from {member!r} since this work was polled")
        if member is not None:
            check_membership(metadata)
        return metadata

    def abort(self) -> None:
        """Forget what was sent since the last checkpoint (exactly-once: abort the transaction)."""
        self._epoch += 1
        self._send_error = None

    def close(self, timeout_s: float = 10.0) -> None:
        self.producer.close(timeout=timeout_s)
        if self.state_producer is not self.producer:
            self.state_producer.close(timeout=timeout_s)


def check_membership(metadata: Any) -> None:
    """Refuse to commit for a consumer that is not a group member right now (generation -1 or no member id:
    kafka-python resets both when the coordinator fences it out, e.g. after a freeze past the session timeout,
    until it has rejoined). Its transactional offset commit would carry generation -1 and an empty member id,
    which the group coordinator accepts without any membership check (only non-transactional commits are
    refused then): the zombie's transaction would commit. See docs/kafka.md, "Zombie fencing"."""
    if metadata.generation_id < 0 or not metadata.member_id:
        raise StaleWork(f"not a group member now (generation {metadata.generation_id}, member "
                        f"{metadata.member_id!r}): the group may have given the partitions to another member")


class AtLeastOnce(Delivery):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.state_producer = self._make_producer("state")

    def checkpoint(self, write_state: Callable[[KafkaProducer], None], offsets: Callable[[], Offsets],
                   known: Offsets, member: str | None) -> None:
        self.flush()
        self.faults.point("after_outputs_flush")
        self._group_metadata(member)
        self._probe(known)
        try:
            write_state(self.state_producer)  # sends, flushes and checks every record
        except Exception as exc:
            raise SendFailed(f"writing state snapshots failed: {exc!r}") from exc
        self.faults.point("after_state_write")
        commit = offsets()
        if commit:
            self.faults.point("before_commit")
            self._group_metadata(member)
            try:
                self.faults.commit()
                self.consumer.commit(commit)
            except Exception as exc:
                raise CommitFailed(f"offset commit failed: {exc!r}") from exc
            self.faults.point("after_commit")

    def _probe(self, known: Offsets) -> None:
        if not known:
            return
        from kafka import errors

        try:
            self.consumer.commit(known)
        except (errors.CommitFailedError, errors.IllegalGenerationError, errors.UnknownMemberIdError,
                errors.RebalanceInProgressError, errors.FencedInstanceIdError) as exc:
            raise MembershipLost(f"group membership check failed: {exc!r}") from exc


class ExactlyOnce(Delivery):
    exactly_once = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.needs_init = False
        self.producer.init_transactions()
        self.in_transaction = False

    def send(self, topic: str, key: bytes | None, value: bytes, partition: int | None = None,
             headers: Headers | None = None) -> None:
        self.begin()
        super().send(topic, key, value, partition, headers)

    def begin(self) -> None:
        if self.needs_init:  # re-creating the producer failed earlier (broker unreachable): try again
            self.producer.init_transactions()
            self.needs_init = False
        if not self.in_transaction:
            self.producer.begin_transaction()
            self.in_transaction = True

    def checkpoint(self, write_state: Callable[[KafkaProducer], None], offsets: Callable[[], Offsets],
                   known: Offsets, member: str | None) -> None:
        self.begin()
        write_state(self.producer)
        self.flush()
        self.faults.point("after_state_write")
        commit = offsets()
        if commit:
            client_compat.send_offsets_to_transaction(self.producer, commit, self._group_metadata(member))
        self.faults.point("before_commit")
        self.faults.commit()
        self.producer.commit_transaction()
        self.in_transaction = False
        self.faults.point("after_commit")

    def abort(self) -> None:
        super().abort()
        if not self.in_transaction:
            return
        self.in_transaction = False
        try:
            self.producer.abort_transaction()
        except Exception as exc:  # fenced or fatal: a new producer re-initializes (and aborts) the transaction
            log.warning("abort_transaction failed; recreating the transactional producer", extra={"error": repr(exc)})
            self._recreate()

    def _recreate(self) -> None:
        with contextlib.suppress(Exception):  # the old producer is discarded anyway
            self.producer.close(timeout=5)
        self.producer = self.state_producer = self._make_producer("out")
        self.needs_init = True
        self.producer.init_transactions()
        self.needs_init = False
