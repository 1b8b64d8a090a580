"""Model configuration, inferred from checkpoint tensors rather than trusted from metadata."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch

WEIGHT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
QUANTIZED_FORMATS = ("int8", "w8a8", "q8_0")  # CPU only; see rwkv_stream/linear.py
WEIGHT_FORMATS = (*WEIGHT_DTYPES, *QUANTIZED_FORMATS)  # every ``dtype`` that ``load`` accepts

# fp16 activations of RWKV-4 overflow unless the residual stream is halved every few layers.
FP16_RESCALE_EVERY = 6


@dataclass(frozen=True)
class ModelConfig:
    """Shapes of an RWKV-4 model. All values come from the tensors themselves.

    (The name predates RWKV-7: it is the RWKV-4 config; :class:`Rwkv7Config` is RWKV-7's, and
    :data:`AnyConfig` either. ``to_dict`` is what fingerprints hash, so it must not change.)
    """

    family: ClassVar[str] = "rwkv4"

    n_layer: int
    n_embd: int
    vocab_size: int
    ffn_dim: int
    version: int = 4

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def state_shape(self) -> tuple[int, ...]:
        """One stream's state: per layer five vectors of width C (see :mod:`rwkv_stream.models.rwkv4`)."""
        return (self.n_layer, 5, self.n_embd)

    @property
    def state_floats(self) -> int:
        """fp32 values in one stream's state: five vectors of width C per layer."""
        return self.n_layer * 5 * self.n_embd


@dataclass(frozen=True)
class Rwkv7Config:
    """Shapes of an RWKV-7 ("x070") model, all read from the tensors (``head_size`` from ``att.r_k``, the
    low-rank sizes from ``w1/a1/v1/g1``, ``ffn_dim`` from ``ffn.key.weight``)."""

    family: ClassVar[str] = "rwkv7"

    n_layer: int
    n_embd: int
    vocab_size: int
    ffn_dim: int
    head_size: int
    rank_w: int
    rank_a: int
    rank_v: int
    rank_g: int
    version: int = 7

    def __post_init__(self) -> None:
        if self.head_size < 1 or self.n_embd % self.head_size:
            raise ValueError(f"n_embd {self.n_embd} is not a multiple of head_size {self.head_size}")

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, **asdict(self)}

    @property
    def state_shape(self) -> tuple[int, ...]:
        """One stream's state: per layer ``[att shift C | ffn shift C | S as H x N x N]`` in one row (see
        :mod:`rwkv_stream.models.rwkv7`)."""
        return (self.n_layer, 2 * self.n_embd + self.n_head * self.head_size**2)

    @property
    def state_floats(self) -> int:
        return self.n_layer * (2 * self.n_embd + self.n_head * self.head_size**2)


AnyConfig = ModelConfig | Rwkv7Config


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype in WEIGHT_DTYPES.values():
            return dtype
        raise ValueError(f"unsupported weight dtype {dtype}; use one of {WEIGHT_FORMATS}")
    try:
        return WEIGHT_DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unsupported weight dtype {dtype!r}; use one of {WEIGHT_FORMATS}") from None


def resolve_device(device: str | int | torch.device) -> torch.device:
    """``device`` with its index filled in: ``"cuda"`` becomes ``cuda:<current device>``, so that a model, its
    pools and the tensors torch allocates for them compare equal (``torch.device("cuda") != "cuda:0"``)."""
    resolved = torch.device(device)
    if resolved.type == "cuda" and resolved.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return resolved
