"""Per-stream state snapshots on a compacted Kafka topic: encode (compress/chunk), write, index, restore.

Layout: the state topic has (at least) the input topic's partitions; the snapshot of a stream read from input
partition ``p`` goes to state partition ``p`` with key = stream id. Record values (msgpack, ``v`` = 1):

* ``{"kind": "state", "stream", "applied", "fingerprint", "codec", "data"}``: the stream's
  :class:`~rwkv_stream.state.State` bytes (``codec`` ``none`` or ``zlib``) after applying input offset
  ``applied``.
* ``{"kind": "state", ..., "chunks": [[key, offset], ...], "size", "digest"}``: the same when the payload is
  larger than ``chunk_bytes``; the payload is split into ``chunk`` records (key ``<stream>\\x1f<applied>\\x1f<i>``)
  written and flushed before this manifest, which names their offsets. Superseded chunks are tombstoned.
* ``{"kind": "ended", "stream", "applied"}``: the stream ended at input offset ``applied``. Replayed input at
  or below it is skipped; once the consumer group's committed offset is past it, a null tombstone follows.

Restore reads a partition from the beginning to its end offset (the last stable offset when reading
``read_committed``), or further, to the end offset the last offset commit recorded in its metadata. If
several snapshots of a stream are present (before compaction), the one with the highest ``applied`` wins,
so a late write by a fenced-out consumer cannot roll a stream back; a tombstone deletes.
"""

from __future__ import annotations

import hashlib
import logging
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import msgpack

from .schema import SCHEMA_VERSION

log = logging.getLogger("rwkv_stream.kafka.state")
CHUNK_SEP = "\x1f"


class StateStoreError(RuntimeError):
    """Snapshots could not be written or read back."""


@dataclass
class Entry:
    """What the store knows about one stream of an assigned partition."""

    applied: int
    ended: bool = False
    offset: int | None = None  # state-topic offset of the main record; None while not yet written
    chunks: list[tuple[str, int]] = field(default_factory=list)
    data: bytes | None = None  # State bytes when cached in memory


@dataclass
class _Pending:
    partition: int
    stream: str
    kind: str  # "state", "ended", "tombstone", "chunk-tombstone"
    applied: int = -1
    data: bytes | None = None  # State bytes (kind "state")
    key: str | None = None  # record key when it is not the stream id (chunk tombstones)


@dataclass
class _Record:
    """One record to write: main records (state, ended, tombstones) and the chunks of large states."""

    write: _Pending
    key: str
    value: bytes | None  # None: a tombstone, or a chunked state (its manifest is packed at send time)
    chunks: list[tuple[str, bytes]] = field(default_factory=list)  # (key, value) written and flushed first
    manifest: dict[str, Any] | None = None  # chunked state: the manifest, without the chunks' offsets


@dataclass
class WriteBatch:
    """Snapshot writes taken from the store (main thread), sent by :meth:`StateStore.send` (any thread),
    then applied back with :meth:`StateStore.apply` (main thread)."""

    records: list[_Record]
    offsets: list[int] = field(default_factory=list)  # state-topic offset of each main record
    chunk_offsets: list[list[tuple[str, int]]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)


@dataclass
class SnapshotCodec:
    chunk_bytes: int = 512 * 1024
    compress_over: int = 64 * 1024

    def payload(self, data: bytes) -> tuple[str, bytes]:
        if len(data) > self.compress_over:
            packed = zlib.compress(data, 1)
            if len(packed) < len(data):
                return "zlib", packed
        return "none", data

    def chunks(self, payload: bytes) -> list[bytes]:
        return [payload[i : i + self.chunk_bytes] for i in range(0, len(payload), self.chunk_bytes)]


def unpack_payload(codec: str, payload: bytes) -> bytes:
    if codec == "zlib":
        return zlib.decompress(payload)
    if codec == "none":
        return payload
    raise StateStoreError(f"unknown state codec {codec!r}")


def _pack(value: dict[str, Any]) -> bytes:
    return msgpack.packb({"v": SCHEMA_VERSION, **value}, use_bin_type=True)


def _digest(payload: bytes) -> bytes:
    return hashlib.blake2b(payload, digest_size=16).digest()


class StateStore:
    """Index of the streams of the assigned partitions, pending snapshot writes, and restore."""

    def __init__(self, topic: str, reader: Any, fingerprint: str, *, codec: SnapshotCodec | None = None,
                 cache_bytes: int = 256 << 20, restore_timeout_s: float = 120.0) -> None:
        self.topic = topic
        self.reader = reader  # a KafkaConsumer without group, used for restore scans and lazy fetches
        self.fingerprint = fingerprint
        self.codec = codec or SnapshotCodec()
        self.cache_bytes = cache_bytes
        self.restore_timeout_s = restore_timeout_s
        self.index: dict[int, dict[str, Entry]] = {}
        self.state_end: dict[int, int] = {}
        self._pending: list[_Pending] = []
        self._written_chunks: dict[tuple[int, str], list[tuple[str, int]]] = {}
        self._cached = 0

    # ----------------------------------------------------------------------------- lookups
    def entry(self, partition: int, stream: str) -> Entry | None:
        return self.index.get(partition, {}).get(stream)

    def stored_bytes(self) -> int:
        return self._cached

    def load_bytes(self, partition: int, stream: str) -> bytes | None:
        """The State bytes of a stream with a snapshot (from the cache or read back from the topic)."""
        entry = self.entry(partition, stream)
        if entry is None or entry.ended:
            return None
        if entry.data is not None:
            return entry.data
        if entry.offset is None:
            raise StateStoreError(f"stream {stream!r} of partition {partition} has no snapshot offset")
        value = self._fetch(partition, entry.offset)
        return self._state_bytes(partition, value)

    # ----------------------------------------------------------------------------- staging
    def stage_state(self, partition: int, stream: str, applied: int, data: bytes) -> None:
        entries = self.index.setdefault(partition, {})
        old = entries.get(stream)
        self._uncache(old)
        entries[stream] = Entry(applied, data=data, chunks=old.chunks if old else [])
        self._cached += len(data)
        self._pending.append(_Pending(partition, stream, "state", applied, data))

    def stage_ended(self, partition: int, stream: str, applied: int) -> None:
        entries = self.index.setdefault(partition, {})
        old = entries.get(stream)
        self._uncache(old)
        entries[stream] = Entry(applied, ended=True, chunks=old.chunks if old else [])
        self._pending.append(_Pending(partition, stream, "ended", applied))

    def stage_tombstones(self, committed: dict[int, int]) -> int:
        """Null tombstones for ended streams whose end the group's committed offset has passed."""
        n = 0
        for partition, next_offset in committed.items():
            entries = self.index.get(partition, {})
            for stream in [s for s, e in entries.items() if e.ended and e.offset is not None
                           and e.applied < next_offset]:
                del entries[stream]
                self._pending.append(_Pending(partition, stream, "tombstone"))
                n += 1
        return n

    def has_pending(self) -> bool:
        return bool(self._pending)

    def _uncache(self, entry: Entry | None) -> None:
        if entry is not None and entry.data is not None:
            self._cached -= len(entry.data)
            entry.data = None

    # ----------------------------------------------------------------------------- writing
    def take(self) -> WriteBatch:
        """Encode every pending write (compression, chunking, tombstones for superseded chunks). Main thread."""
        pending, self._pending = self._pending, []
        records = []
        for w in pending:
            if w.kind in ("tombstone", "chunk-tombstone"):
                records.append(_Record(w, w.key or w.stream, None))
            elif w.kind == "ended":
                self._supersede_chunks(w, set())
                value = _pack({"kind": "ended", "stream": w.stream, "applied": w.applied})
                records.append(_Record(w, w.stream, value))
            else:
                records.append(self._state_record(w))
        # Chunk tombstones staged by _supersede_chunks go out in the same batch, after the new snapshots.
        records += [_Record(w, w.key or w.stream, None) for w in self._pending]
        self._pending = []
        return WriteBatch(records)

    def _state_record(self, w: _Pending) -> _Record:
        assert w.data is not None
        codec, payload = self.codec.payload(w.data)
        base = {"kind": "state", "stream": w.stream, "applied": w.applied, "fingerprint": self.fingerprint,
                "codec": codec}
        if len(payload) <= self.codec.chunk_bytes:
            self._supersede_chunks(w, set())
            return _Record(w, w.stream, _pack({**base, "data": payload}))
        chunks = []
        for i, part in enumerate(self.codec.chunks(payload)):
            key = CHUNK_SEP.join((w.stream, str(w.applied), str(i)))
            chunks.append((key, _pack({"kind": "chunk", "stream": w.stream, "applied": w.applied, "index": i,
                                       "data": part})))
        self._supersede_chunks(w, {k for k, _ in chunks})
        return _Record(w, w.stream, None, chunks, manifest={**base, "size": len(payload), "digest": _digest(payload)})

    def _supersede_chunks(self, w: _Pending, keep: set[str]) -> None:
        entry = self.entry(w.partition, w.stream)
        old = self._written_chunks.get((w.partition, w.stream), [])
        if entry is not None:
            old = old or entry.chunks
        for key, _ in old:
            if key not in keep:
                self._pending.append(_Pending(w.partition, w.stream, "chunk-tombstone", key=key))
        self._written_chunks.pop((w.partition, w.stream), None)

    def send(self, producer: Any, batch: WriteBatch, timeout_s: float = 60.0) -> None:
        """Write a batch and wait for the broker: chunks first (flushed, to learn their offsets), then the main
        records. Raises :class:`StateStoreError` if anything was not acknowledged. Any thread."""
        chunk_futures = [[(key, producer.send(self.topic, key=key.encode(), value=value, partition=r.write.partition))
                          for key, value in r.chunks] for r in batch.records]
        if any(chunk_futures):
            _flush(producer, timeout_s)
        batch.chunk_offsets = [[(key, _offset_of(f)) for key, f in futures] for futures in chunk_futures]
        futures = []
        for r, chunks in zip(batch.records, batch.chunk_offsets, strict=True):
            value = _pack({**r.manifest, "chunks": [list(c) for c in chunks]}) if r.manifest is not None else r.value
            futures.append(producer.send(self.topic, key=r.key.encode(), value=value, partition=r.write.partition))
        _flush(producer, timeout_s)
        batch.offsets = [_offset_of(f) for f in futures]

    def apply(self, batch: WriteBatch) -> None:
        """Record where a sent batch landed (index offsets, chunk lists, state end offsets). Main thread."""
        for r, offset, chunks in zip(batch.records, batch.offsets, batch.chunk_offsets, strict=True):
            w = r.write
            self.state_end[w.partition] = max(self.state_end.get(w.partition, 0), offset + 1)
            if w.kind not in ("state", "ended"):
                continue
            entry = self.entry(w.partition, w.stream)
            if entry is not None and entry.applied == w.applied and entry.ended == (w.kind == "ended"):
                entry.offset = offset
                entry.chunks = chunks
                if entry.data is not None and self._cached > self.cache_bytes:
                    self._uncache(entry)
            elif chunks:  # superseded before it was applied: its chunks must still be tombstoned later
                self._written_chunks[(w.partition, w.stream)] = chunks

    def requeue(self, batch: WriteBatch) -> None:
        """Put the writes of a batch that was not sent back in front of the pending ones."""
        self._pending = [r.write for r in batch.records] + self._pending

    # ----------------------------------------------------------------------------- restore
    def forget(self, partitions: list[int]) -> None:
        for p in partitions:
            for entry in self.index.pop(p, {}).values():
                self._uncache(entry)
            self.state_end.pop(p, None)
        self._pending = [w for w in self._pending if w.partition not in partitions]

    def restore(self, targets: dict[int, int]) -> dict[str, float]:
        """Read the state partitions in ``targets`` (partition -> minimum end offset to reach) from the
        beginning and rebuild their index. Returns restore statistics."""
        from kafka import TopicPartition

        t0 = time.monotonic()
        self.forget(list(targets))
        tps = [TopicPartition(self.topic, p) for p in targets]
        if not tps:
            return {"streams": 0, "records": 0, "seconds": 0.0}
        self.reader.assign(tps)
        self.reader.seek_to_beginning(*tps)
        ends = self.reader.end_offsets(tps)
        goal = {tp: max(ends.get(tp, 0), targets[tp.partition]) for tp in tps}
        chunks: dict[int, dict[str, tuple[int, bytes | None]]] = {tp.partition: {} for tp in tps}
        n = self._scan(goal, chunks)
        streams = 0
        for tp in tps:
            self.state_end[tp.partition] = goal[tp]
            streams += self._resolve_chunks(tp.partition, chunks[tp.partition])
        self.reader.assign([])
        return {"streams": streams, "records": n, "seconds": time.monotonic() - t0}

    def _scan(self, goal: dict[Any, int], chunks: dict[int, dict[str, tuple[int, bytes | None]]]) -> int:
        try:
            return self._scan_to(goal, chunks)
        finally:  # also when the broker went away mid-scan: the retry starts from a clean reader
            self.reader.resume(*self.reader.paused())

    def _scan_to(self, goal: dict[Any, int], chunks: dict[int, dict[str, tuple[int, bytes | None]]]) -> int:
        deadline = time.monotonic() + self.restore_timeout_s
        n = 0
        todo = {tp for tp, end in goal.items() if end > 0}
        while todo:
            if time.monotonic() > deadline:
                raise StateStoreError(f"restore of {sorted(tp.partition for tp in todo)} not done after "
                                      f"{self.restore_timeout_s:.0f} s (goal {goal})")
            for tp, records in self.reader.poll(timeout_ms=100, max_records=10000).items():
                for rec in records:
                    n += 1
                    self._apply(tp.partition, rec, chunks[tp.partition])
            done = {tp for tp in todo if self.reader.position(tp) >= goal[tp]}
            if done:  # finished partitions would make every fetch wait fetch_max_wait_ms for more data
                self.reader.pause(*done)
                todo -= done
        return n

    def _apply(self, partition: int, rec: Any, chunks: dict[str, tuple[int, bytes | None]]) -> None:
        key = rec.key.decode("utf-8")
        if CHUNK_SEP in key:
            chunks[key] = (rec.offset, rec.value)
            return
        entries = self.index.setdefault(partition, {})
        if rec.value is None:
            self._uncache(entries.pop(key, None))
            return
        value = msgpack.unpackb(rec.value, raw=False)
        old = entries.get(key)
        if old is not None and value["applied"] < old.applied:
            log.warning("ignoring a stale snapshot", extra={"stream": key, "partition": partition,
                                                            "applied": value["applied"], "have": old.applied})
            return
        self._uncache(old)
        if value["kind"] == "ended":
            entries[key] = Entry(value["applied"], ended=True, offset=rec.offset)
            return
        entry = Entry(value["applied"], offset=rec.offset, chunks=[tuple(c) for c in value.get("chunks", [])])
        if "data" in value and self._cached + len(value["data"]) <= self.cache_bytes:
            entry.data = unpack_payload(value["codec"], value["data"])
            self._cached += len(entry.data)
        entries[key] = entry

    def _resolve_chunks(self, partition: int, chunks: dict[str, tuple[int, bytes | None]]) -> int:
        """Assemble chunked snapshots from the chunks the scan saw (within the cache budget); tombstone
        chunks no snapshot refers to (left by a crash between chunks and manifest)."""
        entries = self.index.get(partition, {})
        used: set[str] = set()
        for entry in entries.values():
            used.update(k for k, _ in entry.chunks)
            raw = [chunks.get(k, (None, None))[1] for k, _ in entry.chunks]
            if entry.chunks and self._cached <= self.cache_bytes and all(r is not None for r in raw):
                manifest = msgpack.unpackb(self._fetch(partition, entry.offset), raw=False)
                entry.data = self._assemble(manifest, [msgpack.unpackb(r, raw=False)["data"] for r in raw])
                self._cached += len(entry.data)
        for key, (_offset, value) in chunks.items():
            if key not in used and value is not None:
                self._pending.append(_Pending(partition, key.split(CHUNK_SEP)[0], "chunk-tombstone", key=key))
        return len(entries)

    # ----------------------------------------------------------------------------- reading back
    def _fetch(self, partition: int, offset: int) -> bytes:
        """One record's value by offset, via the reader consumer."""
        from kafka import TopicPartition

        tp = TopicPartition(self.topic, partition)
        self.reader.assign([tp])
        self.reader.seek(tp, offset)
        deadline = time.monotonic() + self.restore_timeout_s
        try:
            while time.monotonic() < deadline:
                for rec in self.reader.poll(timeout_ms=200, max_records=1).get(tp, []):
                    if rec.offset != offset:
                        raise StateStoreError(f"state record {partition}@{offset} is gone (found {rec.offset})")
                    return rec.value
            raise StateStoreError(f"state record {partition}@{offset} not read within {self.restore_timeout_s} s")
        finally:
            self.reader.assign([])

    def _state_bytes(self, partition: int, raw: bytes) -> bytes:
        value = msgpack.unpackb(raw, raw=False)
        if value.get("kind") != "state":
            raise StateStoreError(f"expected a state record, got {value.get('kind')!r}")
        if "data" in value:
            return unpack_payload(value["codec"], value["data"])
        parts = [msgpack.unpackb(self._fetch(partition, off), raw=False)["data"] for _, off in value["chunks"]]
        return self._assemble(value, parts)

    @staticmethod
    def _assemble(manifest: dict[str, Any], parts: list[bytes]) -> bytes:
        payload = b"".join(parts)
        if len(payload) != manifest["size"] or _digest(payload) != manifest["digest"]:
            raise StateStoreError(f"chunks of stream {manifest['stream']!r} do not match their manifest")
        return unpack_payload(manifest["codec"], payload)


def _flush(producer: Any, timeout_s: float) -> None:
    try:
        producer.flush(timeout=timeout_s)
    except Exception as exc:
        raise StateStoreError(f"flushing state records failed: {exc!r}") from exc


def _offset_of(future: Any) -> int:
    if not future.is_done:
        raise StateStoreError("a state record was not acknowledged by the broker")
    if future.failed():
        raise StateStoreError(f"writing a state record failed: {future.exception!r}")
    return future.value.offset
