"""The processor's four topics and their settings (``rwkv-stream kafka init-topics``, and the processor's own
check at start-up).

Scaling rule: the input topic's partition count is the maximum parallelism (one partition is processed by one
member at a time); the state topic needs at least as many partitions (a stream's snapshots go to the state
partition numbered like its input partition), and the output and dead-letter topics get as many too, so an
output (and a dead letter) lands in the partition numbered like its input record's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from .config import ConfigError, ConsumerConfig

log = logging.getLogger("rwkv_stream.kafka")

# Short segments: the log cleaner compacts all but the active segment, and a restore reads everything not yet
# compacted.
STATE_TOPIC_CONFIG = {"cleanup.policy": "compact", "min.cleanable.dirty.ratio": "0.1", "segment.ms": "60000"}


@dataclass
class TopicSpec:
    name: str
    role: str  # input, output, dead_letter, state
    partitions: int
    configs: dict[str, str] = field(default_factory=dict)


def topic_plan(cfg: ConsumerConfig, partitions: int) -> list[TopicSpec]:
    """The four topics for an input topic of ``partitions`` partitions."""
    return [TopicSpec(cfg.input_topic, "input", partitions),
            TopicSpec(cfg.output_topic, "output", partitions),
            TopicSpec(cfg.dead_letter_topic, "dead_letter", partitions),
            TopicSpec(cfg.state_topic, "state", partitions, dict(STATE_TOPIC_CONFIG))]


def partition_count(admin: Any, topic: str) -> int | None:
    """Partitions of a topic; None if it does not exist. Broker errors propagate (the caller retries)."""
    from kafka.errors import UnknownTopicOrPartitionError

    try:
        meta = admin.describe_topics([topic])
    except UnknownTopicOrPartitionError:
        return None
    if not meta or meta[0].get("error_code", 0) != 0:
        return None
    return len(meta[0]["partitions"])


def create_topic(admin: Any, spec: TopicSpec, replication: int) -> bool:
    """Create a topic and wait for its leaders; False if it existed already."""
    from kafka.errors import TopicAlreadyExistsError

    created = True
    try:
        admin.create_topics({spec.name: {"num_partitions": spec.partitions, "replication_factor": replication,
                                         "configs": spec.configs}})
        log.info("created topic", extra={"topic": spec.name, "partitions": spec.partitions, "role": spec.role})
    except TopicAlreadyExistsError:
        created = False
    admin.wait_for_topics([spec.name], timeout_ms=30000)
    return created


def check_topic(spec: TopicSpec, have: int, input_partitions: int) -> None:
    """An existing topic that cannot work with the input topic is a configuration error."""
    if spec.role == "state" and have < input_partitions:
        raise ConfigError(f"state topic {spec.name!r} has {have} partitions, the input topic has {input_partitions}:"
                          " the state topic needs at least as many")


def init_topics(admin: Any, cfg: ConsumerConfig, partitions: int | None) -> list[dict[str, Any]]:
    """Create whichever of the four topics is missing (``rwkv-stream kafka init-topics``). ``partitions``: of
    the input topic if it is created (default: the input topic's, which must then exist). Returns a report."""
    have_input = partition_count(admin, cfg.input_topic)
    if have_input is None and partitions is None:
        raise ConfigError(f"input topic {cfg.input_topic!r} does not exist: give --partitions to create it")
    if have_input is not None and partitions is not None and partitions != have_input:
        raise ConfigError(f"input topic {cfg.input_topic!r} exists with {have_input} partitions, not {partitions}")
    n = have_input if have_input is not None else partitions
    report = []
    for spec in topic_plan(cfg, n):
        have = partition_count(admin, spec.name)
        if have is None:
            create_topic(admin, spec, cfg.replication_factor)
            report.append({"topic": spec.name, "role": spec.role, "partitions": spec.partitions, "created": True})
            continue
        check_topic(spec, have, n)
        report.append({"topic": spec.name, "role": spec.role, "partitions": have, "created": False})
    return report


def ensure_topics(admin: Any, cfg: ConsumerConfig) -> set[str]:
    """The processor's start-up check: the input topic must exist; the others are created (``create_topics``)
    or must exist. Returns the roles of the topics with the input's partition count (co-partitioned)."""
    partitions = partition_count(admin, cfg.input_topic)
    if partitions is None:
        raise ConfigError(f"input topic {cfg.input_topic!r} does not exist (create the topics with "
                          "`rwkv-stream kafka init-topics --config ... --partitions N`)")
    co_partitioned = set()
    for spec in topic_plan(cfg, partitions)[1:]:
        have = partition_count(admin, spec.name)
        if have is None and cfg.create_topics:
            create_topic(admin, spec, cfg.replication_factor)
            have = spec.partitions
        elif have is None:
            raise ConfigError(f"topic {spec.name!r} does not exist (and create_topics is off)")
        check_topic(spec, have, partitions)
        if have == partitions:
            co_partitioned.add(spec.role)
    return co_partitioned
