"""Matrix products for the weight formats the engine runs, each on its fastest CPU path.

Measured on a 2-core AVX-512 (bf16, VNNI) EPYC with the weights of the 169M model in DRAM (see BENCHMARKS.md):
oneDNN's bf16 GEMM is ~7x slower for a single row than ``torch.mv`` (it re-lays out the weight each call),
while int8 x int8 -> int32 products (``torch._int_mm``, VNNI) beat every float path at any row count (1 row:
4.8 ms per 169M step vs 7.3 ms for the weight-only int8 kernel and 22.6 ms fp32 ``mv``; 16 rows: 11 ms vs
20 ms bf16 GEMM). So:

- ``DenseLinear``: one row -> ``mv``; more rows -> ``F.linear`` (GEMM). On CUDA always ``F.linear``.
- ``Int8Linear``: weights int8 per output channel, activations quantized to int8 per row on the fly (symmetric,
  scale = row absmax / 127), exact int32 accumulation, then both scales applied in fp32. Each row is
  quantized on its own and integer sums are exact, so a row's result is bitwise independent of the other
  rows in the product (batch mates), whatever their number.

"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


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
    """int8 weights and activations (CPU). Error: per-row absmax/254 of each weight row and of each input row."""

    def __init__(self, weight: Tensor) -> None:
        if weight.device.type != "cpu":
            raise ValueError("int8 weights run on the CPU only; use float16/bfloat16 on GPUs")
        self.qweight, scales = quantize_rows(weight.float())
        self.scales = scales.reshape(-1)  # per output column of the product

    def __call__(self, x: Tensor) -> Tensor:
        return self.quantized(*quantize_rows(x.float()))

    def quantized(self, qx: Tensor, x_scales: Tensor) -> Tensor:
        """The product for rows already quantized by :func:`quantize_rows` (shared by several weights)."""
        # mat2 as the transposed view of [out, in]: oneDNN reads it without a copy
        return torch.mul(torch._int_mm(qx, self.qweight.t()), x_scales).mul_(self.scales)

    @property
    def nbytes(self) -> int:
        return self.qweight.numel() + self.scales.numel() * 4


def quantize_rows(m: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row int8: ``m ~= q * scales`` with ``q`` in [-127, 127] and ``scales`` ``[rows, 1]``."""
    scales = torch.linalg.vector_norm(m, float("inf"), dim=-1, keepdim=True).clamp_min_(1e-30).div_(127)
    return torch.div(m, scales).round_().to(torch.int8), scales


def project(linears: Sequence[Linear], xs: Tensor) -> list[Tensor]:
    """``[linears[i](xs[i]) for i ...]`` for ``xs`` ``[n, rows, in]``; int8 quantizes all inputs in one go."""
    if all(isinstance(lin, Int8Linear) for lin in linears):
        qx, scales = quantize_rows(xs.float())
        return [lin.quantized(q, s) for lin, q, s in zip(linears, qx, scales, strict=True)]
    return [lin(x) for lin, x in zip(linears, xs, strict=True)]


Linear = DenseLinear | Int8Linear


def make_linear(weight: Tensor, dtype: torch.dtype, int8: bool) -> Linear:
    return Int8Linear(weight) if int8 else DenseLinear(weight, dtype)
