"""The processor's readiness: one state, logged on every change, exported as a metric and (optionally) a file.

States (``READINESS_STATES``):

* ``starting``: loading the model, connecting, joining the consumer group (or rejoining after a rebalance).
* ``waiting_for_broker``: the broker cannot be reached (start-up, restore); retrying with backoff.
* ``restoring``: reading the state topic of newly assigned partitions.
* ``ready``: a stable group member with every assigned partition restored: processing.
* ``stopping``: SIGTERM/SIGINT received: final checkpoint, leaving the group.

The file (``readiness_file`` setting) exists exactly while the state is ``ready`` (for a Kubernetes
``exec`` probe or a test); it holds one JSON line (state, pid, time). The metric is the Prometheus enum
``rwkv_stream_readiness{rwkv_stream_readiness="<state>"}`` (1 for the current state, 0 for the others).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import threading
import time
from pathlib import Path
from typing import Any

READINESS_STATES = ("starting", "waiting_for_broker", "restoring", "ready", "stopping")
log = logging.getLogger("rwkv_stream.kafka")


class Readiness:
    def __init__(self, metric: Any = None, path: str | os.PathLike | None = None) -> None:
        self.metric = metric  # a prometheus_client Enum over READINESS_STATES, or None
        self.path = Path(path) if path else None
        self.state = ""
        self._lock = threading.Lock()
        self.set("starting")

    def set(self, state: str, **fields: Any) -> None:
        if state not in READINESS_STATES:
            raise ValueError(f"unknown readiness state {state!r}")
        with self._lock:
            if state == self.state:
                return
            previous, self.state = self.state, state
        if self.metric is not None:
            self.metric.state(state)
        self._write_file(state)
        log.info("readiness", extra={"state": state, "previous": previous or None, **fields})

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def _write_file(self, state: str) -> None:
        if self.path is None:
            return
        if state != "ready":
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            return
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"state": state, "pid": os.getpid(), "ts": round(time.time(), 3)}) + "\n")
        tmp.replace(self.path)  # atomic: a reader never sees a half-written file

    def close(self) -> None:
        """The process ends: the file goes away whatever the state."""
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


class Backoff:
    """Capped exponential backoff with jitter: ``initial_s``, doubling up to ``max_s``; ``reset()`` on success."""

    def __init__(self, initial_s: float = 0.5, max_s: float = 30.0, rng: random.Random | None = None) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.attempt = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        delay = min(self.max_s, self.initial_s * (2 ** self.attempt))
        self.attempt += 1
        return delay * self._rng.uniform(0.8, 1.0)

    def reset(self) -> None:
        self.attempt = 0
