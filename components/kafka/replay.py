"""``rwkv-stream kafka dlq-replay``: put dead letters back into the input topic (after a fix: a raised limit, a
corrected producer), optionally only those of some reasons.

Each dead letter's original key and value bytes are produced, unchanged, to the input topic (``input_topic``
of the configuration), with the dead letter's headers and a ``rwkv-replayed-from`` header
(``<dead-letter topic>/<partition>/<offset>``). The dead-letter topic is read from its beginning to its
current end (``read_committed``); ``--after-offset`` skips what an earlier replay already handled.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .schema import decode_dead_letter

REPLAYED_FROM = "rwkv-replayed-from"


@dataclass
class ReplayReport:
    read: int = 0
    replayed: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> dead letters not replayed
    last_offsets: dict[int, int] = field(default_factory=dict)  # dead-letter partition -> last offset read

    def to_dict(self) -> dict[str, Any]:
        return {"read": self.read, "replayed": self.replayed, "skipped": self.skipped,
                "last_offsets": {str(p): o for p, o in sorted(self.last_offsets.items())}}


def read_dead_letters(consumer: Any, topic: str, after_offset: int = -1, timeout_s: float = 60.0
                      ) -> Iterator[tuple[Any, dict[str, Any]]]:
    """(record, decoded dead letter) for every record of ``topic`` up to its current end."""
    from kafka import TopicPartition

    tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
    if not tps:
        raise ValueError(f"dead-letter topic {topic!r} does not exist")
    consumer.assign(tps)
    ends = consumer.end_offsets(tps)
    for tp in tps:
        consumer.seek(tp, after_offset + 1) if after_offset >= 0 else consumer.seek_to_beginning(tp)
    deadline = time.monotonic() + timeout_s
    while any(consumer.position(tp) < ends[tp] for tp in tps):
        if time.monotonic() > deadline:
            raise TimeoutError(f"reading {topic} did not reach its end offsets {ends}")
        for _tp, records in consumer.poll(timeout_ms=200).items():
            for rec in records:
                if rec.value is not None and rec.offset < ends[_tp]:
                    yield rec, decode_dead_letter(rec.value)


def replay(consumer: Any, producer: Any, dead_letter_topic: str, input_topic: str, *,
           reasons: set[str] | None = None, after_offset: int = -1, dry_run: bool = False) -> ReplayReport:
    report = ReplayReport()
    futures = []
    for rec, letter in read_dead_letters(consumer, dead_letter_topic, after_offset):
        report.read += 1
        report.last_offsets[rec.partition] = rec.offset
        reason = str(letter.get("reason"))
        if reasons and reason not in reasons:
            report.skipped[reason] = report.skipped.get(reason, 0) + 1
            continue
        report.replayed += 1
        if dry_run:
            continue
        headers = [*(rec.headers or []), (REPLAYED_FROM, f"{rec.topic}/{rec.partition}/{rec.offset}".encode())]
        futures.append(producer.send(input_topic, key=letter.get("key"),
                                     value=letter.get("value"), headers=headers))
    producer.flush(timeout=60)
    for future in futures:
        future.get(timeout=60)  # raises if a record was not delivered
    return report
