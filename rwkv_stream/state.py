"""One stream's recurrent state, and its versioned, checksummed byte form."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import torch
from torch import Tensor

from .config import ModelConfig
from .wkv import EMPTY_PP

STATE_MAGIC = "rwkv-stream/state"
STATE_FORMAT_VERSION = 1
# Row order inside a layer's [5, C] block; the GPU kernels and the pool use the same order.
ROWS = ("att_x", "aa", "bb", "pp", "ffn_x")
ROW_PP = ROWS.index("pp")


class StateError(ValueError):
    """A state that cannot be used: corrupt bytes, another model's state, wrong shape."""


def empty_state_tensor(config: ModelConfig, device: torch.device | str = "cpu", batch: int | None = None) -> Tensor:
    shape = (config.n_layer, 5, config.n_embd) if batch is None else (batch, config.n_layer, 5, config.n_embd)
    t = torch.zeros(shape, dtype=torch.float32, device=device)
    t[..., ROW_PP, :] = EMPTY_PP
    return t


@dataclass
class State:
    """The state of one stream after ``n_tokens`` tokens: ``tensor`` is ``[n_layer, 5, C]`` fp32.

    ``meta`` carries small msgpack-able values that must travel with the state (an input offset, the
    text a streaming tokenizer holds back); the engine itself never reads it.
    """

    tensor: Tensor
    n_tokens: int
    fingerprint: str
    meta: dict[str, Any] = field(default_factory=dict)

    def copy(self) -> State:
        """A fork: an independent state that continues from the same point."""
        return State(self.tensor.clone(), self.n_tokens, self.fingerprint, dict(self.meta))

    def reset(self) -> None:
        """Back to the empty state of the same model, in place."""
        self.tensor.zero_()
        self.tensor[:, ROW_PP] = EMPTY_PP
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
        }
        return msgpack.packb({**header, "data": data, "checksum": _checksum(header, data)}, use_bin_type=True)

    @classmethod
    def from_bytes(
        cls, data: bytes, *, expected_fingerprint: str | None = None, device: torch.device | str = "cpu"
    ) -> State:
        """Parse :meth:`to_bytes` output; raises :class:`StateError` on corruption or a model mismatch."""
        obj = _unpack(data)
        header = {k: obj[k] for k in ("magic", "version", "fingerprint", "n_tokens", "shape", "meta")}
        if _checksum(header, obj["data"]) != obj["checksum"]:
            raise StateError("state bytes are corrupt: checksum mismatch")
        if expected_fingerprint is not None and obj["fingerprint"] != expected_fingerprint:
            raise StateError(
                f"state was made by model {obj['fingerprint']}, expected model {expected_fingerprint}"
            )
        shape = tuple(obj["shape"])
        if len(shape) != 3 or shape[1] != 5 or len(obj["data"]) != 4 * int(np.prod(shape)):
            raise StateError(f"state bytes hold {len(obj['data'])} bytes for shape {list(shape)}")
        array = np.frombuffer(obj["data"], dtype="<f4").reshape(shape).copy()
        return cls(torch.from_numpy(array).to(device), int(obj["n_tokens"]), obj["fingerprint"], obj["meta"])


def _unpack(data: bytes) -> dict[str, Any]:
    try:
        obj = msgpack.unpackb(data, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types on truncated input
        raise StateError(f"state bytes are truncated or not msgpack: {exc}") from exc
    if not isinstance(obj, dict) or obj.get("magic") != STATE_MAGIC:
        raise StateError("bytes are not an rwkv-stream state")
    if obj.get("version") != STATE_FORMAT_VERSION:
        raise StateError(
            f"state format version {obj.get('version')} not supported (this build reads {STATE_FORMAT_VERSION})"
        )
    missing = {"fingerprint", "n_tokens", "shape", "meta", "data", "checksum"} - set(obj)
    if missing:
        raise StateError(f"state bytes lack fields {sorted(missing)}")
    return obj


def _checksum(header: dict[str, Any], data: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(msgpack.packb(header, use_bin_type=True))
    h.update(data)
    return h.digest()
