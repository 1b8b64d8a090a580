"""The processor reconciles what it holds with its consumer after every poll (no broker needed: this checks the
decision, the soak and ``test_stalled_consumer_is_fenced`` exercise it against the real broker).

kafka-python 3.0.12 does not always call the rebalance listener: a member frozen past its session timeout that
wakes up and rejoins may get other partitions without ``on_partitions_lost`` for its old ones, or the *same*
partitions back under a new member id without any callback, while another member processed and committed them
meanwhile. Both must be handled as lost (work thrown away, restored from what the group committed)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("kafka", reason="kafka-python not installed (pip install -e .[kafka])")

from kafka.structs import TopicPartition  # noqa: E402
from rwkv_stream.components.kafka.partitions import PartitionBook  # noqa: E402
from rwkv_stream.components.kafka.processor import Processor  # noqa: E402

TPS = [TopicPartition("in", p) for p in range(3)]


class _Consumer:
    def __init__(self, member: str, assignment: set[TopicPartition]) -> None:
        self.member, self.assigned = member, assignment

    def group_metadata(self) -> SimpleNamespace:
        return SimpleNamespace(member_id=self.member)

    def assignment(self) -> set[TopicPartition]:
        return self.assigned


class _Rebalance:
    def __init__(self) -> None:
        self.calls: list[tuple[str, set[TopicPartition]]] = []

    def on_gone(self, tps: set[TopicPartition]) -> None:
        self.calls.append(("gone", set(tps)))

    def on_rejoined(self, tps: set[TopicPartition]) -> None:
        self.calls.append(("rejoined", set(tps)))


def _processor(consumer: _Consumer) -> tuple[Processor, _Rebalance]:
    proc = Processor.__new__(Processor)  # only the reconciliation state: no model, no clients
    proc.book, proc.consumer, proc._member = PartitionBook(), consumer, None
    rebalance = _Rebalance()
    proc.parts = SimpleNamespace(rebalance=rebalance)  # type: ignore[assignment]
    return proc, rebalance


def test_same_member_same_partitions_is_left_alone():
    proc, rebalance = _processor(_Consumer("m-1", set(TPS)))
    proc.book.assigned |= set(TPS)
    for _ in range(3):
        proc._reconcile_with_consumer()
    assert rebalance.calls == []


def test_partitions_the_consumer_no_longer_has_are_lost():
    consumer = _Consumer("m-1", set(TPS))
    proc, rebalance = _processor(consumer)
    proc.book.assigned |= set(TPS)
    proc._reconcile_with_consumer()
    consumer.assigned = {TPS[0]}
    proc._reconcile_with_consumer()
    assert rebalance.calls == [("gone", {TPS[1], TPS[2]})]


def test_a_new_member_id_without_a_callback_restores_what_is_held():
    consumer = _Consumer("m-1", set(TPS))
    proc, rebalance = _processor(consumer)
    proc.book.assigned |= set(TPS)
    proc._reconcile_with_consumer()
    consumer.member = ""  # fenced out: not a member until it rejoins; nothing can be committed meanwhile
    proc._reconcile_with_consumer()
    assert rebalance.calls == []
    consumer.member, consumer.assigned = "m-2", {TPS[0], TPS[2]}  # rejoined, two of them handed back silently
    proc._reconcile_with_consumer()
    assert rebalance.calls == [("gone", {TPS[1]}), ("rejoined", {TPS[0], TPS[2]})]
    rebalance.calls.clear()
    proc._reconcile_with_consumer()  # once: the new member id is now the reference
    assert rebalance.calls == [("gone", {TPS[1]})]  # (the fake rebalance handler drops nothing)
