"""Keyed live streams over a :class:`StatePool`: what integrations use to map a conversation id to a state."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Generic, TypeVar

from .model import LogitsMode, Model, StepOutput
from .state import State

K = TypeVar("K", bound=Hashable)


class StreamTable(Generic[K]):
    """Stream key -> pool slot, with least-recently-used eviction past ``max_streams``.

    ``on_evict(key, state)`` is called with a copy of the state of a stream pushed out by a new one, so the
    caller can persist it; a stream that is explicitly ended is not passed to it.
    """

    def __init__(
        self,
        model: Model,
        max_streams: int = 1024,
        on_evict: Callable[[K, State], None] | None = None,
        initial_capacity: int = 16,
    ) -> None:
        if max_streams < 1:
            raise ValueError(f"max_streams must be at least 1, got {max_streams}")
        self.model = model
        self.max_streams = max_streams
        self.on_evict = on_evict
        self.pool = model.new_pool(min(initial_capacity, max_streams))
        self._slots: OrderedDict[K, int] = OrderedDict()

    def __contains__(self, key: object) -> bool:
        return key in self._slots

    def __len__(self) -> int:
        return len(self._slots)

    def keys(self) -> list[K]:
        return list(self._slots)

    def slot(self, key: K) -> int:
        """The slot of ``key``, opening a fresh stream (and evicting the oldest if full) when it is new."""
        if key in self._slots:
            self._slots.move_to_end(key)
            return self._slots[key]
        while len(self._slots) >= self.max_streams:
            self.evict_oldest()
        slot = self.pool.alloc()
        self._slots[key] = slot
        return slot

    def n_tokens(self, key: K) -> int:
        return self.pool.n_tokens[self._slots[key]] if key in self._slots else 0

    def state(self, key: K) -> State:
        """A copy of the stream's state (a fresh one for an unknown key)."""
        if key not in self._slots:
            return self.model.new_state()
        return self.pool.read(self._slots[key])

    def fork(self, key: K) -> State:
        return self.state(key)

    def put(self, key: K, state: State) -> None:
        """Install ``state`` as the stream's state (restoring an exported or checkpointed stream)."""
        self.model.check_state(state)
        self.pool.write(self.slot(key), state)

    def reset(self, key: K) -> None:
        if key in self._slots:
            self.pool.reset(self._slots[key])

    def end(self, key: K) -> bool:
        """Forget the stream and free its slot. Returns whether it was live."""
        slot = self._slots.pop(key, None)
        if slot is None:
            return False
        self.pool.free(slot)
        return True

    def evict_oldest(self) -> K:
        key, slot = next(iter(self._slots.items()))
        state = self.pool.read(slot)
        self.end(key)
        if self.on_evict is not None:
            self.on_evict(key, state)
        return key

    def step(
        self, keys: Sequence[K], tokens: Sequence[Sequence[int]], *, logits: LogitsMode = "all",
        batch_invariant: bool = False,
    ) -> StepOutput:
        """Advance the given streams together (opening new ones as needed). Keys must be distinct.
        ``batch_invariant``: see :meth:`Model.step`."""
        if len(set(keys)) != len(keys):
            raise ValueError("a stream appears twice in one step; concatenate its tokens instead")
        if len(keys) > self.max_streams:
            raise ValueError(f"{len(keys)} streams in one step exceed max_streams={self.max_streams}")
        slots = [self.slot(k) for k in keys]
        return self.model.step(self.pool, slots, tokens, logits=logits, batch_invariant=batch_invariant)
