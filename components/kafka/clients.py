"""The processor's Kafka clients: their configurations and their creation.

* the group consumer (input topic, the consumer group, offsets),
* the state reader (a consumer without a group: restore scans and lazy snapshot fetches),
* the producers: ``"out"`` (outputs and dead letters; with exactly-once also the snapshots, in one transaction)
  and, in at-least-once, ``"state"`` (snapshots, batched up to 1 MiB per partition),
* a short-lived admin client that creates missing topics at start-up.

Client options from the ``[client]`` table go to every client that knows them (security settings included).
"""

from __future__ import annotations

import time
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError

from . import client_compat
from .config import ConsumerConfig
from .state_store import StateStoreError
from .topics import ensure_topics

# Broker trouble, which the processor waits out (retrying with backoff) instead of exiting.
BROKER_ERRORS: tuple[type[Exception], ...] = (KafkaError, StateStoreError, OSError)


class ClientFactory:
    """Builds the processor's clients from its configuration."""

    def __init__(self, cfg: ConsumerConfig) -> None:
        self.cfg = cfg

    def new_consumer(self) -> KafkaConsumer:
        return KafkaConsumer(**self.consumer_config())

    def new_state_reader(self) -> KafkaConsumer:
        return KafkaConsumer(**self.reader_config())

    def new_producer(self, role: str) -> KafkaProducer:
        """The output producer (``"out"``) or the at-least-once snapshot producer (``"state"``). A transactional
        one fails loudly where kafka-python would silently bump its epoch (and lose the open transaction)."""
        producer = KafkaProducer(**self.producer_config(role))
        client_compat.fail_loudly_instead_of_epoch_bump(producer)
        return producer

    def create_missing_topics(self) -> set[str]:
        """Check the topics, creating missing output, dead-letter and state topics (``create_topics``); returns
        the roles (``"output"``, ``"dead_letter"``, ...) of those with the input's partition count."""
        cfg = self.cfg
        admin = KafkaAdminClient(bootstrap_servers=cfg.bootstrap_servers,
                                 client_id=f"rwkv-stream-{cfg.resolved_instance_id}-admin",
                                 **self._options_for(KafkaAdminClient.DEFAULT_CONFIG))
        try:
            return set(ensure_topics(admin, cfg))
        finally:
            admin.close()

    # ----------------------------------------------------------------------------- configurations
    def consumer_config(self) -> dict[str, Any]:
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
            "partition_assignment_strategy": (_assignor(cfg.assignor),),
            "group_instance_id": cfg.resolved_instance_id if cfg.static_membership else None,
            "metrics_enabled": False,  # kafka-python's own sensors (see producer_config)
            **self._options_for(KafkaConsumer.DEFAULT_CONFIG),
        }

    def reader_config(self) -> dict[str, Any]:
        cfg = self.cfg
        group_settings = ("group_id", "isolation_level", "auto_offset_reset")
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
            **{k: v for k, v in self._options_for(KafkaConsumer.DEFAULT_CONFIG).items() if k not in group_settings},
        }

    def producer_config(self, role: str) -> dict[str, Any]:
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
            **self._options_for(KafkaProducer.DEFAULT_CONFIG),
        }
        if cfg.exactly_once:
            options["transactional_id"] = cfg.resolved_transactional_id
            options["transaction_timeout_ms"] = cfg.transaction_timeout_ms
        return options

    def _options_for(self, known: dict[str, Any]) -> dict[str, Any]:
        """The ``[client]`` options this kind of client knows."""
        return {k: v for k, v in self.cfg.client.items() if k in known}


def _assignor(name: str) -> Any:
    from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor
    from kafka.coordinator.assignors.range import RangePartitionAssignor
    from kafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor

    return {"cooperative-sticky": CooperativeStickyAssignor, "range": RangePartitionAssignor,
            "roundrobin": RoundRobinPartitionAssignor}[name]


def prime_metadata(consumer: KafkaConsumer, topic: str, timeout_s: float = 10.0) -> None:
    """Load the input topic's metadata before the first poll (a kafka-python 3.0.12 race otherwise can leave
    the first group leader with an empty assignment; see tests/kafka_broker.py)."""
    deadline = time.monotonic() + timeout_s
    while not consumer.partitions_for_topic(topic) and time.monotonic() < deadline:
        time.sleep(0.05)
