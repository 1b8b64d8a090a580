"""Model configuration, inferred from checkpoint tensors rather than trusted from metadata."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

WEIGHT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
QUANTIZED_FORMATS = ("int8", "w8a8")  # CPU only; see rwkv_stream/linear.py
WEIGHT_FORMATS = (*WEIGHT_DTYPES, *QUANTIZED_FORMATS)  # every ``dtype`` that ``load`` accepts

# fp16 activations of RWKV-4 overflow unless the residual stream is halved every few layers.
FP16_RESCALE_EVERY = 6


@dataclass(frozen=True)
class ModelConfig:
    """Shapes of an RWKV-4 model. All values come from the tensors themselves."""

    n_layer: int
    n_embd: int
    vocab_size: int
    ffn_dim: int
    version: int = 4

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @property
    def state_floats(self) -> int:
        """fp32 values in one stream's state: five vectors of width C per layer."""
        return self.n_layer * 5 * self.n_embd


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype in WEIGHT_DTYPES.values():
            return dtype
        raise ValueError(f"unsupported weight dtype {dtype}; use one of {WEIGHT_FORMATS}")
    try:
        return WEIGHT_DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unsupported weight dtype {dtype!r}; use one of {WEIGHT_FORMATS}") from None
