"""Prometheus metrics and JSON-lines logging of the stream processor."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, start_http_server

from .readiness import READINESS_STATES

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
_STANDARD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class Metrics:
    """The processor's metrics in a registry of their own (several processors can share a process)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.records = Counter("rwkv_stream_records", "Input records handled", ["result"], registry=r)
        self.tokens = Counter("rwkv_stream_tokens", "Tokens stepped through the model (rate: tokens/s)",
                              registry=r)
        self.fragment_latency = Histogram("rwkv_stream_fragment_latency_seconds",
                                          "Input record timestamp (producer) to output sent", buckets=LATENCY_BUCKETS,
                                          registry=r)
        self.processing_latency = Histogram("rwkv_stream_processing_latency_seconds",
                                            "Record polled to output sent", buckets=LATENCY_BUCKETS, registry=r)
        self.live_streams = Gauge("rwkv_stream_live_streams", "Streams with a state in memory", registry=r)
        self.known_streams = Gauge("rwkv_stream_known_streams", "Streams of the assigned partitions (live + "
                                   "evicted to the state topic)", registry=r)
        self.state_bytes = Gauge("rwkv_stream_state_bytes", "Bytes of live stream states", registry=r)
        self.cached_state_bytes = Gauge("rwkv_stream_cached_state_bytes", "Snapshot bytes cached in memory",
                                        registry=r)
        self.rebalances = Counter("rwkv_stream_rebalances", "Partition assignment changes", ["kind"], registry=r)
        self.dead_letters = Counter("rwkv_stream_dead_letters", "Records sent to the dead-letter topic", ["reason"],
                                    registry=r)
        self.checkpoints = Counter("rwkv_stream_checkpoints", "Checkpoints", ["result"], registry=r)
        self.checkpoint_seconds = Histogram("rwkv_stream_checkpoint_seconds", "Checkpoint duration",
                                            buckets=LATENCY_BUCKETS, registry=r)
        self.snapshots = Counter("rwkv_stream_snapshots", "State snapshots written", registry=r)
        self.evictions = Counter("rwkv_stream_evictions", "Streams evicted from memory", ["reason"], registry=r)
        self.restores = Counter("rwkv_stream_restored_streams", "Streams found in the state topic on assignment",
                                registry=r)
        self.paused = Gauge("rwkv_stream_paused_partitions", "Partitions paused for backpressure", registry=r)
        self.buffered = Gauge("rwkv_stream_buffered_records", "Polled records waiting for processing", registry=r)
        self.processing_errors = Counter("rwkv_stream_processing_errors", "Batches (or isolated records) whose "
                                         "processing raised, each followed by a rollback", ["scope"], registry=r)
        self.commit_failures = Counter("rwkv_stream_commit_failures", "Offset commits that failed", registry=r)
        self.readiness = Enum("rwkv_stream_readiness", "Processor state (1 for the current one)",
                              states=list(READINESS_STATES), registry=r)
        self.broker_errors = Counter("rwkv_stream_broker_unavailable", "Times the broker could not be reached "
                                     "(each followed by a backoff and a retry)", ["during"], registry=r)
        self.consumer_lag = Gauge("rwkv_stream_consumer_lag", "Input records not processed yet: the partition's "
                                  "high watermark minus the next offset to process", ["partition"], registry=r)

    def forget_partition(self, partition: int) -> None:
        """A partition left this member: its lag is no longer ours to report."""
        with contextlib.suppress(KeyError):
            self.consumer_lag.remove(str(partition))

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        start_http_server(port, addr=addr, registry=self.registry)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the record's ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("kafka").setLevel(max(logging.WARNING, root.level))
