"""The state topic as the session layer's store: the processor's evicted and ended streams go to it.

:class:`StateTopicSessions` adapts :class:`~components.kafka.state_store.StateStore` to
:class:`rwkv_stream.sessions.SessionStore`: an evicted stream's session bytes are *staged* as its snapshot
(written with the next checkpoint, in the same transaction under exactly-once, and readable from the store's
cache until then); an ended stream becomes an ``ended`` entry, so replayed input at or below its last offset
is skipped. A snapshot that cannot be used (another model's, corrupt) is logged and the stream starts afresh
from its recorded offset: the processor never dies on a bad snapshot.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable

from rwkv_stream.sessions import Ended, check_session_bytes
from rwkv_stream.state import StateError

from .state_store import StateStore

log = logging.getLogger("rwkv_stream.kafka.state")


class StateTopicSessions:
    """A :class:`~rwkv_stream.sessions.SessionStore` over the state topic; keys are ``(partition, stream)``."""

    def __init__(self, store: StateStore, fingerprint: str) -> None:
        self.store = store
        self.fingerprint = fingerprint

    def load(self, key: Hashable) -> bytes | Ended | None:
        partition, stream = _split(key)
        entry = self.store.entry(partition, stream)
        if entry is None:
            return None
        if entry.ended:
            return Ended(entry.applied)
        data = self.store.load_bytes(partition, stream)
        try:
            check_session_bytes(data or b"", self.fingerprint)
        except StateError as exc:
            log.error("cannot restore a stream's state; starting it afresh",
                      extra={"stream": stream, "partition": partition, "error": str(exc)})
            return Ended(entry.applied)
        return data

    def save(self, key: Hashable, data: bytes, position: int) -> None:
        partition, stream = _split(key)
        self.store.stage_state(partition, stream, position, data)

    def remove(self, key: Hashable, position: int) -> None:
        partition, stream = _split(key)
        self.store.stage_ended(partition, stream, position)


def _split(key: Hashable) -> tuple[int, str]:
    partition, stream = key  # type: ignore[misc]
    return int(partition), str(stream)
