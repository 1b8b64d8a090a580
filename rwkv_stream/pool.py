"""A pool of stream states in fixed slots of one tensor: the unit that batched steps (CPU or GPU) work on."""

from __future__ import annotations

import torch
from torch import Tensor

from .config import AnyConfig, resolve_device
from .state import State, StateError, clear_state_, empty_state_tensor


class StatePool:
    """``data[slot]`` is one stream's fp32 state (``config.state_shape``: RWKV-4 ``[n_layer, 5, C]``, RWKV-7
    ``[n_layer, 2C + H*N*N]``); slots are reused after :meth:`free`.

    The tensor stays in place between steps so kernels can address streams by slot index. When full, a
    growable pool doubles its capacity (which moves ``data``: callers must not keep views across ``alloc``).
    """

    def __init__(
        self,
        config: AnyConfig,
        fingerprint: str,
        capacity: int = 64,
        *,
        device: torch.device | str = "cpu",
        growable: bool = True,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"pool capacity must be at least 1, got {capacity}")
        self.config = config
        self.family = config.family
        self.fingerprint = fingerprint
        self.device = resolve_device(device)
        self.growable = growable
        self.data: Tensor = empty_state_tensor(config, self.device, batch=capacity)
        self.n_tokens: list[int] = [0] * capacity
        self._live = [False] * capacity
        self._free = list(range(capacity - 1, -1, -1))

    @property
    def capacity(self) -> int:
        return self.data.shape[0]

    @property
    def live(self) -> int:
        return self.capacity - len(self._free)

    def alloc(self, state: State | None = None) -> int:
        """A fresh slot, empty or holding a copy of ``state``."""
        if not self._free:
            if not self.growable:
                raise RuntimeError(f"state pool is full ({self.capacity} live streams)")
            self._grow(self.capacity * 2)
        slot = self._free.pop()
        self._live[slot] = True
        if state is None:
            self._clear(slot)
        else:
            self.write(slot, state)
        return slot

    def free(self, slot: int) -> None:
        self.check_live(slot)
        self._live[slot] = False
        self._free.append(slot)

    def reset(self, slot: int) -> None:
        self.check_live(slot)
        self._clear(slot)

    def read(self, slot: int) -> State:
        """A copy of the slot's state (safe to keep, serialize or feed to ``Model.forward``)."""
        self.check_live(slot)
        return State(self.data[slot].clone(), self.n_tokens[slot], self.fingerprint, family=self.family)

    def write(self, slot: int, state: State) -> None:
        self.check_live(slot)
        if state.family != self.family:
            raise StateError(f"state is an {state.family} state, pool is for an {self.family} model")
        if state.fingerprint != self.fingerprint:
            raise StateError(f"state was made by model {state.fingerprint}, pool is for {self.fingerprint}")
        if tuple(state.tensor.shape) != tuple(self.data.shape[1:]):
            raise StateError(f"state has shape {list(state.tensor.shape)}, expected {list(self.data.shape[1:])}")
        self.data[slot].copy_(state.tensor)
        self.n_tokens[slot] = state.n_tokens

    def fork(self, slot: int) -> int:
        """A new slot continuing from the same point as ``slot``."""
        return self.alloc(self.read(slot))

    def check_live(self, slot: int) -> None:
        if not 0 <= slot < self.capacity or not self._live[slot]:
            raise KeyError(f"slot {slot} is not a live stream in this pool")

    def _clear(self, slot: int) -> None:
        clear_state_(self.data[slot], self.family)
        self.n_tokens[slot] = 0

    def _grow(self, capacity: int) -> None:
        old = self.capacity
        data = empty_state_tensor(self.config, self.device, batch=capacity)
        data[:old] = self.data
        self.data = data
        self.n_tokens.extend([0] * (capacity - old))
        self._live.extend([False] * (capacity - old))
        self._free = list(range(capacity - 1, old - 1, -1)) + self._free
