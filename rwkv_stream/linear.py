"""Matrix-vector products for the weight formats the engine runs, each on its fastest CPU path.

Measured on a 2-core AVX-512 (bf16) EPYC with the weights of the 169M model in DRAM (see BENCHMARKS.md):
oneDNN's bf16 GEMM is ~7x slower for a single row than ``torch.mv`` (it re-lays out the weight each call),
and the int8 weight-only kernel beats everything up to ~4 rows but loses to bf16 GEMM beyond. So:

- ``DenseLinear``: one row -> ``mv``; more rows -> ``F.linear`` (GEMM). On CUDA always ``F.linear``.
- ``Int8Linear``: per-output-channel symmetric int8 weights (bf16 activations, fp32 accumulation) for up to
  ``INT8_MAX_ROWS`` rows; above that a bf16 copy of the weights is used (so int8 mode holds both).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

INT8_MAX_ROWS = 4


class DenseLinear:
    def __init__(self, weight: Tensor, dtype: torch.dtype) -> None:
        self.weight = weight.to(dtype).contiguous()
        self._mv = self.weight.device.type == "cpu"

    def __call__(self, x: Tensor) -> Tensor:
        x = x.to(self.weight.dtype)
        if self._mv and x.shape[0] == 1:
            return torch.mv(self.weight, x[0]).unsqueeze(0).float()
        return F.linear(x, self.weight).float()

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


class Int8Linear:
    """Weight-only int8 (CPU). Error: per-row absmax/254 of each weight, i.e. ~0.4% of the row's largest."""

    def __init__(self, weight: Tensor) -> None:
        if weight.device.type != "cpu":
            raise ValueError("int8 weights run on the CPU only; use float16/bfloat16 on GPUs")
        weight = weight.float()
        scales = weight.abs().amax(dim=1).clamp_min(1e-12) / 127
        self.qweight = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        self.scales = scales.to(torch.bfloat16)
        self.dense = DenseLinear(self.qweight.float() * scales[:, None], torch.bfloat16)

    def __call__(self, x: Tensor) -> Tensor:
        if x.shape[0] <= INT8_MAX_ROWS:
            return torch._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), self.qweight, self.scales).float()
        return self.dense(x)

    @property
    def nbytes(self) -> int:
        return self.qweight.numel() + self.dense.nbytes


Linear = DenseLinear | Int8Linear


def make_linear(weight: Tensor, dtype: torch.dtype, int8: bool) -> Linear:
    return Int8Linear(weight) if int8 else DenseLinear(weight, dtype)
