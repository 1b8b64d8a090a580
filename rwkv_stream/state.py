"""One stream's recurrent state, and its versioned, checksummed byte form.

A state is one fp32 tensor whose shape and empty value belong to the model family
(``config.state_shape``; the empty value is registered by the family's module with
:func:`register_empty_state`): RWKV-4 ``[n_layer, 5, C]`` with ``pp = EMPTY_PP``, RWKV-7
``[n_layer, 2C + H*N*N]`` all zeros. The bytes carry the family, so a state of one family is refused by a
model of another with a clear :class:`StateError`.

Byte format version 2 adds ``family`` to version 1's header; version 1 bytes (RWKV-4 only) are still read.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np
import torch
from torch import Tensor

from .wkv import EMPTY_PP

if TYPE_CHECKING:
    from .config import AnyConfig

STATE_MAGIC = "rwkv-stream/state"
STATE_FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
DEFAULT_FAMILY = "rwkv4"  # what version-1 bytes (and a State built without a family) hold
# RWKV-4: row order inside a layer's [5, C] block; the GPU kernels and the pool use the same order.
ROWS = ("att_x", "aa", "bb", "pp", "ffn_x")
ROW_PP = ROWS.index("pp")


class StateError(ValueError):
    """A state that cannot be used: corrupt bytes, another model's state, wrong shape."""


def _fill_rwkv4(t: Tensor) -> None:
    t[..., ROW_PP, :] = EMPTY_PP


# family -> what makes a zeroed state tensor (one stream, or a batch of them: leading dims) empty
_EMPTY_FILLS: dict[str, Callable[[Tensor], None] | None] = {"rwkv4": _fill_rwkv4}


def register_empty_state(family: str, fill: Callable[[Tensor], None] | None) -> None:
    """Declare a model family and what its empty state holds besides zeros (None: all zeros)."""
    _EMPTY_FILLS[family] = fill


def clear_state_(t: Tensor, family: str) -> Tensor:
    """Make ``t`` (one state or a batch of them) the empty state of ``family``, in place."""
    if family not in _EMPTY_FILLS:
        raise StateError(f"unknown model family {family!r} (known: {', '.join(sorted(_EMPTY_FILLS))})")
    t.zero_()
    fill = _EMPTY_FILLS[family]
    if fill is not None:
        fill(t)
    return t


def empty_state_tensor(config: AnyConfig, device: torch.device | str = "cpu", batch: int | None = None) -> Tensor:
    shape = tuple(config.state_shape) if batch is None else (batch, *config.state_shape)
    return clear_state_(torch.empty(shape, dtype=torch.float32, device=device), config.family)


@dataclass
class State:
    """The state of one stream after ``n_tokens`` tokens: ``tensor`` is fp32 in the shape of the model
    family (RWKV-4 ``[n_layer, 5, C]``, RWKV-7 ``[n_layer, 2C + H*N*N]``).

    ``meta`` carries small msgpack-able values that must travel with the state (an input offset, the
    text a streaming tokenizer holds back); the engine itself never reads it.
    """

    tensor: Tensor
    n_tokens: int
    fingerprint: str
    meta: dict[str, Any] = field(default_factory=dict)
    family: str = DEFAULT_FAMILY

    def copy(self) -> State:
        """A fork: an independent state that continues from the same point."""
        return State(self.tensor.clone(), self.n_tokens, self.fingerprint, dict(self.meta), self.family)

    def reset(self) -> None:
        """Back to the empty state of the same model, in place."""
        clear_state_(self.tensor, self.family)
        self.n_tokens = 0
        self.meta.clear()

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * 4

    def to_bytes(self) -> bytes:
        data = self.tensor.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4").tobytes()
        header = {
            "magic": STATE_MAGIC,
            "version": STATE_FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "n_tokens": int(self.n_tokens),
            "shape": list(self.tensor.shape),
            "meta": self.meta,
            "family": self.family,
        }
        return msgpack.packb({**header, "data": data, "checksum": _checksum(header, data)}, use_bin_type=True)

    @classmethod
    def from_bytes(
        cls, data: bytes, *, expected_fingerprint: str | None = None, device: torch.device | str = "cpu"
    ) -> State:
        """Parse :meth:`to_bytes` output; raises :class:`StateError` on corruption or a model mismatch."""
        obj = _unpack(data)
        fields = ("magic", "version", "fingerprint", "n_tokens", "shape", "meta")
        header = {k: obj[k] for k in (*fields, "family") if k in obj}
        if _checksum(header, obj["data"]) != obj["checksum"]:
            raise StateError("state bytes are corrupt: checksum mismatch")
        family = str(obj.get("family", DEFAULT_FAMILY))
        if expected_fingerprint is not None and obj["fingerprint"] != expected_fingerprint:
            raise StateError(
                f"state was made by model {obj['fingerprint']} ({family}), expected model {expected_fingerprint}"
            )
        if family not in _EMPTY_FILLS:
            raise StateError(f"state is of unknown model family {family!r}")
        shape = tuple(int(n) for n in obj["shape"])
        rwkv4_ok = family != "rwkv4" or (len(shape) == 3 and shape[1] == 5)
        if not shape or not rwkv4_ok or len(obj["data"]) != 4 * int(np.prod(shape)):
            raise StateError(f"state bytes hold {len(obj['data'])} bytes for shape {list(shape)}")
        array = np.frombuffer(obj["data"], dtype="<f4").reshape(shape).copy()
        return cls(torch.from_numpy(array).to(device), int(obj["n_tokens"]), obj["fingerprint"], obj["meta"], family)


def _unpack(data: bytes) -> dict[str, Any]:
    try:
        obj = msgpack.unpackb(data, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types on truncated input
        raise StateError(f"state bytes are truncated or not msgpack: {exc}") from exc
    if not isinstance(obj, dict) or obj.get("magic") != STATE_MAGIC:
        raise StateError("bytes are not an rwkv-stream state")
    if obj.get("version") not in READABLE_VERSIONS:
        raise StateError(
            f"state format version {obj.get('version')} not supported (this build reads {READABLE_VERSIONS})"
        )
    required = {"fingerprint", "n_tokens", "shape", "meta", "data", "checksum"} | (
        {"family"} if obj["version"] >= 2 else set())
    missing = required - set(obj)
    if missing:
        raise StateError(f"state bytes lack fields {sorted(missing)}")
    return obj


def _checksum(header: dict[str, Any], data: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(msgpack.packb(header, use_bin_type=True))
    h.update(data)
    return h.digest()
