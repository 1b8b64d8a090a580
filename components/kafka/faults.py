"""Fault injection for the fault-matrix tests (off unless ``RWKV_STREAM_KAFKA_FAULTS`` is set).

Rules, separated by ``;``:

* ``kill@POINT=N``: SIGKILL this process the N-th time it reaches POINT (a real kill: nothing is flushed).
* ``kill@POINT~P``: SIGKILL with probability P each time it reaches POINT.
* ``commit_fail~P``: each offset commit (or transaction commit) fails with probability P, raising before
  anything is sent, as a commit refused by the broker would.
* ``hold@POINT=PATH``: the first time it reaches POINT, log "fault injection: holding" and wait until the file
  PATH exists (a test does something meanwhile, e.g. stops the broker, then creates the file).
* ``fail@text=SUBSTRING``: processing a fragment whose text contains SUBSTRING raises, every time (a poison
  record): the fragments before it in its batch are applied first, as when an engine error hits mid-batch.
* ``seed=N``: seed of the random choices (default 0).

Points: ``batch_mid`` (half of a batch's outputs sent), ``after_outputs_flush``, ``after_state_write``,
``before_commit``, ``after_commit``, ``before_restore_scan``, ``after_restore``, ``processing_error`` (a batch's
processing raised; before the rollback).
"""

from __future__ import annotations

import logging
import os
import random
import signal
import sys
import time

ENV = "RWKV_STREAM_KAFKA_FAULTS"
POINTS = ("batch_mid", "after_outputs_flush", "after_state_write", "before_commit", "after_commit",
          "before_restore_scan", "after_restore", "processing_error")
log = logging.getLogger("rwkv_stream.kafka.faults")


class InjectedCommitFailure(RuntimeError):
    """An offset commit failed on purpose (fault injection)."""


class InjectedProcessingError(RuntimeError):
    """Processing a fragment failed on purpose (fault injection: a poison record)."""


class Faults:
    def __init__(self, spec: str | None = None) -> None:
        spec = os.environ.get(ENV, "") if spec is None else spec
        self.kill_at: dict[str, int] = {}
        self.kill_p: dict[str, float] = {}
        self.commit_fail_p = 0.0
        self.hold_at: dict[str, str] = {}
        self.fail_texts: list[str] = []
        seed = 0
        for rule in filter(None, (r.strip() for r in spec.split(";"))):
            if rule.startswith("seed="):
                seed = int(rule[5:])
            elif rule.startswith("commit_fail~"):
                self.commit_fail_p = float(rule[len("commit_fail~"):])
            elif rule.startswith("fail@text="):
                self.fail_texts.append(rule[len("fail@text="):])
            elif rule.startswith("hold@") and "=" in rule:
                point, path = rule[5:].split("=", 1)
                self.hold_at[self._point(point)] = path
            elif rule.startswith("kill@") and "=" in rule:
                point, n = rule[5:].split("=")
                self.kill_at[self._point(point)] = int(n)
            elif rule.startswith("kill@") and "~" in rule:
                point, p = rule[5:].split("~")
                self.kill_p[self._point(point)] = float(p)
            else:
                raise ValueError(f"{ENV}: cannot parse rule {rule!r}")
        self.enabled = bool(self.kill_at or self.kill_p or self.commit_fail_p or self.hold_at or self.fail_texts)
        self._rng = random.Random(seed)
        self._count: dict[str, int] = {}

    @staticmethod
    def _point(name: str) -> str:
        if name not in POINTS:
            raise ValueError(f"{ENV}: unknown point {name!r}; known: {', '.join(POINTS)}")
        return name

    def point(self, name: str) -> None:
        if not self.enabled:
            return
        n = self._count[name] = self._count.get(name, 0) + 1
        if self.kill_at.get(name) == n or (name in self.kill_p and self._rng.random() < self.kill_p[name]):
            log.warning("fault injection: SIGKILL", extra={"point": name, "count": n})
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        if name in self.hold_at:
            self._hold(name, self.hold_at.pop(name))

    @staticmethod
    def _hold(name: str, path: str) -> None:
        log.warning("fault injection: holding", extra={"point": name, "until": path})
        while not os.path.exists(path):
            time.sleep(0.05)
        log.warning("fault injection: released", extra={"point": name})

    def first_failing(self, texts: list[str]) -> int | None:
        """The index of the first fragment text a ``fail@text`` rule makes fail, if any."""
        if not self.fail_texts:
            return None
        return next((i for i, t in enumerate(texts) if any(f in t for f in self.fail_texts)), None)

    def commit(self) -> None:
        if self.commit_fail_p and self._rng.random() < self.commit_fail_p:
            raise InjectedCommitFailure("injected offset commit failure")
