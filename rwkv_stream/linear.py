"""Matrix products for the weight formats the engine runs, each on its fastest CPU path.

Measured on a 2-core AVX-512 (bf16, VNNI) EPYC with the weights of the 169M model in DRAM (see BENCHMARKS.md):
oneDNN's bf16 GEMM is ~7x slower for a single row than ``torch.mv`` (it re-lays out the weight each call); the
weight-only int8 kernel beats the float paths up to ~4 rows; int8 x int8 -> int32 products (``torch._int_mm``,
VNNI) beat everything at any row count (one 169M step, 1 row: 4.8 ms vs 7.3 ms weight-only int8 and 22.6 ms
fp32 ``mv``; 16 rows: 11 ms vs 20 ms bf16 GEMM, matrices alone). So:

- ``DenseLinear`` (float formats): one row -> ``mv``; more rows -> ``F.linear`` (GEMM). On CUDA always GEMM.
- ``Int8Linear`` (format ``int8``): weight-only int8 per output channel, bf16 activations, for up to
  ``INT8_MAX_ROWS`` rows (``torch._weight_int8pack_mm``); above that a bf16 copy of the weights (the format
  holds both). Accuracy between bf16 and w8a8 (see BENCHMARKS.md).
- ``W8A8Linear`` (format ``w8a8``): int8 weights per output channel and activations quantized to int8 per row
  on the fly (symmetric, scale = row absmax / 127), exact int32 sums, both scales applied in fp32. The fastest
  CPU format at any row count where torch's int8 products have a fast path (VNNI); elsewhere torch runs a
  scalar loop, the slowest format by far, and loading warns (:func:`warn_if_int8_products_slow`). Each row is
  quantized on its own and integer sums are exact, so a row's result is bitwise independent of the other rows
  in the product (its batch mates). Less accurate, since the activations are rounded too (see BENCHMARKS.md).

Batch invariance (:func:`invariant_rows`): float GEMM libraries pick kernels by the number of rows, and a row
computed by another kernel can differ in its last bits. No library promises which row counts share a kernel,
so the engine probes it once per weight shape: the smallest row count from which every row of a product is
bit-identical whatever the other rows (4 with MKL on the machine of BENCHMARKS.md). Products padded to at
least that many rows give a stream the same bits whichever streams share its step.
"""

from __future__ import annotations

import ctypes
import functools
import time
import warnings
from collections.abc import Callable, Hashable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import cpu_kernels

INT8_MAX_ROWS = 4
SLOW_INT8_FACTOR = 4.0  # torch's int8 product this many times slower than its fp32 one: w8a8 warns at load
PROBE_MAX_ROWS = 16  # a format that needs more rows than this for invariance is treated as variant
PROBE_CHECK_ROWS = 32  # row counts checked up to this


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

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def kernel_key(self) -> Hashable:
        return ("dense", tuple(self.weight.shape), self.weight.dtype, self.weight.device.type)


class _RowQuantized:
    """int8 weights quantized per output row (CPU), what both int8 formats keep."""

    fmt = ""

    qweight: Tensor

    def _quantize(self, weight: Tensor) -> Tensor:
        """Sets ``qweight``; returns the per-row scales ``[out, 1]``."""
        _require_cpu(weight, self.fmt)
        self.qweight, scales = quantize_rows(weight.float())
        return scales

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1]

    @property
    def kernel_key(self) -> Hashable:
        return (self.fmt, tuple(self.qweight.shape))


class Int8Linear(_RowQuantized):
    """Weight-only int8 (CPU). Error: per-row absmax/254 of each weight, i.e. ~0.4% of the row's largest."""

    fmt = "int8"

    def __init__(self, weight: Tensor) -> None:
        scales = self._quantize(weight)
        self.scales = scales.reshape(-1).to(torch.bfloat16)
        self.dense = DenseLinear(self.qweight.float() * scales, torch.bfloat16)

    def __call__(self, x: Tensor) -> Tensor:
        if x.shape[0] <= INT8_MAX_ROWS:
            return torch._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), self.qweight, self.scales).float()
        return self.dense(x)

    @property
    def nbytes(self) -> int:
        return self.qweight.numel() + self.dense.nbytes


class W8A8Linear(_RowQuantized):
    """int8 weights and activations (CPU). Error: per-row absmax/254 of each weight row and of each input row."""

    fmt = "w8a8"

    def __init__(self, weight: Tensor) -> None:
        warn_if_int8_products_slow()
        self.scales = self._quantize(weight).reshape(-1)  # per output column of the product
        # kept as the [out, in] view of an [in, out] matrix: _int_mm reads a contiguous mat2 ~20% faster than
        # the transposed layout (oneDNN, 512 x 192 x 768); the integer sums, hence the bits, are the same
        self.qweight = self.qweight.t().contiguous().t()

    def __call__(self, x: Tensor) -> Tensor:
        return self.quantized(*quantize_rows(x.float()))

    def quantized(self, qx: Tensor, x_scales: Tensor) -> Tensor:
        """The product for rows already quantized by :func:`quantize_rows` (shared by several weights)."""
        # mat2: the contiguous [in, out] matrix behind qweight
        return torch._int_mm(qx, self.qweight.t()).float().mul_(x_scales).mul_(self.scales)

    @property
    def nbytes(self) -> int:
        return self.qweight.numel() + self.scales.numel() * 4


class KernelLinear:
    """Weights packed once for the compiled CPU kernels (:mod:`rwkv_stream.cpu_kernels`): fp32, fp16 or bf16 as
    stored, products accumulated in fp32. Each row of a product is computed on its own by the same
    instructions whatever the row count: bitwise independent of its batch mates (invariant from one row)."""

    fmt = "kernel"
    column_layout = False  # W^T stored, ``weight`` its view (ColumnKernelLinear)

    stored: Tensor  # the contiguous tensor the kernel reads (``weight``, or ``W^T`` in the column layout)
    weight: Tensor

    def __init__(self, weight: Tensor, dtype: torch.dtype) -> None:
        _require_cpu(weight, "compiled-kernel")
        out, n_in = weight.shape
        self.scales: Tensor | None = None
        self.mat = cpu_kernels.RsMat(cpu_kernels.KINDS[dtype], out, n_in, n_in, None, None, int(self.column_layout))
        w = weight.to(dtype)
        self._keep((w.t() if self.column_layout else w).contiguous())

    def _keep(self, stored: Tensor) -> None:
        """Compute from ``stored`` from now on: ``weight`` (``[out, in]``) is it or, in the column layout, its
        transposed view; the kernel is pointed at it."""
        self.stored = stored
        self.weight = stored.t() if self.column_layout else stored
        self.mat.w = stored.data_ptr()

    def __call__(self, x: Tensor) -> Tensor:
        lib = cpu_kernels.load()
        assert lib is not None, "KernelLinear is only made when the kernels are loaded"
        return self._kernel(lib, x)

    def gemm(self, x: Tensor) -> Tensor:
        """The same product through torch's GEMM (MKL/oneDNN): faster for many rows, but its bits depend on the
        row count, so only for steps that promise no bit-exactness (see ``Rwkv4Model._run``)."""
        return F.linear(x.to(self.weight.dtype), self.weight).float()

    def _kernel(self, lib: ctypes.CDLL, x: Tensor) -> Tensor:
        if x.dtype != torch.float32 or not x.is_contiguous():
            x = x.to(torch.float32).contiguous()
        y = torch.empty(x.shape[0], self.mat.out, dtype=torch.float32)
        lib.rs_matmul(ctypes.byref(self.mat), x.data_ptr(), x.shape[0], y.data_ptr(), torch.get_num_threads())
        return y

    def move_into(self, buf: Tensor) -> None:
        """Keep the packed weights in ``buf`` (uint8, at least :attr:`nbytes` long) from now on: copied there,
        the kernel pointed at them; the old storage is released (see :func:`pack_in_arena`)."""
        flat = self.stored.reshape(-1).view(torch.uint8)
        buf[: flat.numel()].copy_(flat)
        self._keep(buf[: flat.numel()].view(self.stored.dtype).view(self.stored.shape))

    @property
    def nbytes(self) -> int:
        extra = 0 if self.scales is None else self.scales.numel() * 4
        return self.weight.numel() * self.weight.element_size() + extra

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def kernel_key(self) -> Hashable:
        return (self.fmt, tuple(self.weight.shape), self.weight.dtype, cpu_kernels.load() is not None)


class ColumnKernelLinear(KernelLinear):
    """:class:`KernelLinear` for short rows (:func:`short_rows`: RWKV-7's second low-rank matrices, 32-128 inputs
    and thousands of outputs), stored transposed: ``stored`` is ``W^T`` ``[in, out]`` and ``weight`` its
    ``[out, in]`` view (the same memory; values as stored, not contiguous). The kernel takes 64 outputs at a
    time, one multiply-add per input over all of them and no per-output reduction (row by row, each output pays
    a horizontal sum for 32-128 multiply-adds: 5 GB/s a thread with the weights in L2 on the Zen 1 host of
    BENCHMARKS.md, 12 GB/s in columns; see ``col_unit`` in :mod:`rwkv_stream.cpu_kernels`). Rows are still
    bitwise independent of their batch mates."""

    fmt = "kernel-columns"
    column_layout = True


COLUMN_MAX_IN = 128  # short rows: at most this many inputs ...
COLUMN_MIN_RATIO = 4  # ... and at least this many times as many outputs


def short_rows(shape: Sequence[int]) -> bool:
    """Whether a ``[out, in]`` matrix runs faster in the column layout (:class:`ColumnKernelLinear`): few inputs,
    many more outputs (RWKV-7's second low-rank matrices: 768 x 32..128 at the 0.1B shape; on the Zen 1 host of
    BENCHMARKS.md their products went from 45-50 to 33-35 us a layer at one row, two threads)."""
    out, n_in = shape
    return n_in <= COLUMN_MAX_IN and out >= COLUMN_MIN_RATIO * n_in


class Q8Linear(KernelLinear):
    """Format ``q8_0`` (CPU): int8 weights with one fp16 scale per block of 32 inputs, packed once for the kernel
    (:func:`rwkv_stream.cpu_kernels.pack_q8_0`: row pairs, scales inline, one sequential stream); activations
    quantized on the fly to int16 per block of 32 (error ~1/65534 of the block's largest, next to the weights'
    1/254), exact integer block sums (see :mod:`rwkv_stream.cpu_kernels`). Without the compiled kernels, a
    torch emulation of the same arithmetic (the same quantized values and exact block sums; slower)."""

    fmt = "q8_0"

    def __init__(self, weight: Tensor) -> None:
        _require_cpu(weight, self.fmt)
        if weight.shape[1] % cpu_kernels.QBLOCK:
            raise ValueError(f"q8_0 needs inputs in blocks of {cpu_kernels.QBLOCK}, not {weight.shape[1]}")
        out, n_in = weight.shape
        q, scales = cpu_kernels.quantize_q8_0(weight)
        packed = cpu_kernels.pack_q8_0(q, scales)  # scales inline: nothing else is read
        self.scales = None
        self._shape = (out, n_in)
        self._unpacked: tuple[Tensor, Tensor] | None = None
        self.mat = cpu_kernels.RsMat(cpu_kernels.KIND_Q8, out, n_in, packed.shape[1] * cpu_kernels.GROUP, None, None)
        self._keep(packed)  # ``weight`` is the packed tensor

    def __call__(self, x: Tensor) -> Tensor:
        lib = cpu_kernels.load()
        if lib is not None:
            return self._kernel(lib, x)
        return q8_0_reference(*self.unpacked(), x)

    def unpacked(self) -> tuple[Tensor, Tensor]:
        """int8 ``q`` ``[out, in]`` and fp32 ``scales`` ``[out, in // 32]`` (the torch emulation's operands)."""
        if self._unpacked is None:
            self._unpacked = cpu_kernels.unpack_q8_0(self.weight, *self._shape)
        return self._unpacked

    @property
    def nbytes(self) -> int:
        return self.weight.numel()

    @property
    def in_features(self) -> int:
        return self._shape[1]

    @property
    def kernel_key(self) -> Hashable:
        return (self.fmt, self._shape, cpu_kernels.load() is not None)


ARENA_ALIGN = 4096  # each matrix of an arena starts on a page: the kernels' vector loads stay aligned


def pack_in_arena(linears: Sequence[KernelLinear]) -> Tensor:
    """Move the weights of ``linears`` into one buffer in the given order (the order a step reads them) that
    is backed by huge pages where Linux allows (:func:`rwkv_stream.cpu_kernels.huge_page_buffer`): a step then
    streams the weights through few TLB entries, and each product's look-ahead prefetch runs on into the next
    matrix. Values and results are unchanged (the same bytes elsewhere). Returns the buffer (it is also kept
    alive by the linears' views)."""
    sizes = [-(-lin.weight.numel() * lin.weight.element_size() // ARENA_ALIGN) * ARENA_ALIGN for lin in linears]
    arena = cpu_kernels.huge_page_buffer(max(1, sum(sizes)))
    offset = 0
    for lin, size in zip(linears, sizes, strict=True):
        lin.move_into(arena[offset : offset + size])
        offset += size
    return arena


@functools.cache
def int8_products_slowdown() -> float:
    """How many times slower torch's int8 x int8 -> int32 product (``torch._int_mm``, what ``w8a8`` runs on) is
    than its fp32 product of the same shape on this CPU (16 x 768 x 768, best of 3; measured once per process).
    With VNNI it is faster than fp32; without a fast path (the AVX2-only Zen 1 host of BENCHMARKS.md) torch runs
    a scalar loop, ~10x slower than fp32 and ~25x slower than ``q8_0``."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (16, 768), dtype=torch.int8, generator=gen)
    b = torch.randint(-127, 128, (768, 768), dtype=torch.int8, generator=gen)
    af, bf = a.float(), b.float()

    def best(fn: Callable[[], Tensor]) -> float:
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    return best(lambda: torch._int_mm(a, b)) / max(best(lambda: af @ bf), 1e-9)


@functools.cache
def warn_if_int8_products_slow() -> None:
    """One warning per process (the check runs once) when ``w8a8`` would run on a CPU where torch's int8
    products are slow (see :func:`int8_products_slowdown`): the format is then the slowest, not the fastest,
    and ``q8_0`` (more accurate too) is the one to use."""
    slowdown = int8_products_slowdown()
    if slowdown > SLOW_INT8_FACTOR:
        warnings.warn(
            f"w8a8 on this CPU: torch's int8 matrix products have no fast path here (CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}; {slowdown:.0f}x slower than fp32 products), so w8a8 "
            "steps will be slow; use q8_0 (compiled kernels, more accurate) or float16", stacklevel=3)


def q8_0_reference(qweight: Tensor, scales: Tensor, x: Tensor) -> Tensor:
    """The ``q8_0`` product in torch: activations quantized to int16 per block of 32 as the kernel does, block
    sums exact (in fp64), rounded to fp32 as the kernel converts them, scaled and summed in fp32."""
    out, n_in = qweight.shape
    nb = n_in // cpu_kernels.QBLOCK
    xq, xs = cpu_kernels.quantize_activations(x.float())
    blocks = torch.bmm(xq.double().reshape(-1, nb, cpu_kernels.QBLOCK).transpose(0, 1),
                       qweight.double().reshape(out, nb, cpu_kernels.QBLOCK).permute(1, 2, 0))  # [nb, rows, out]
    return (blocks.float() * (xs.t().unsqueeze(-1) * scales.t().unsqueeze(1))).sum(0)


Linear = DenseLinear | Int8Linear | W8A8Linear | KernelLinear


def quantize_rows(m: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row int8: ``m ~= q * scales`` with ``q`` in [-127, 127] and ``scales`` ``[..., rows, 1]``."""
    scales = m.abs().amax(dim=-1, keepdim=True).clamp_min_(1e-30).div_(127)  # faster than vector_norm(inf)
    return torch.div(m, scales).round_().to(torch.int8), scales


def project(linears: Sequence[Linear], xs: Tensor) -> list[Tensor]:
    """``[linears[i](xs[i]) for i ...]`` for ``xs`` ``[n, rows, in]``; w8a8 quantizes all inputs in one go."""
    w8a8 = [lin for lin in linears if isinstance(lin, W8A8Linear)]
    if len(w8a8) == len(linears):
        qx, scales = quantize_rows(xs.float())
        return [lin.quantized(q, s) for lin, q, s in zip(w8a8, qx, scales, strict=True)]
    return [lin(x) for lin, x in zip(linears, xs, strict=True)]


_probed: dict[Hashable, int | None] = {}


def invariant_rows(fn: Callable[[Tensor], Tensor], in_features: int, key: Hashable, device: torch.device) -> int | None:
    """Smallest row count from which ``fn`` gives each row the same bits whatever the other rows, or None.

    Probed once per ``key`` (kernel family, weight shape, dtype; and the thread count) with random rows: the
    products of every row count from 1 to ``PROBE_CHECK_ROWS``, at two offsets, against one product of all
    the rows. None on CUDA (cuBLAS promises nothing) or when no count up to ``PROBE_MAX_ROWS`` works.
    """
    if device.type != "cpu":
        return None
    key = (key, torch.get_num_threads())
    if key not in _probed:
        _probed[key] = _probe(fn, in_features, device)
    return _probed[key]


@torch.no_grad()
def _probe(fn: Callable[[Tensor], Tensor], in_features: int, device: torch.device) -> int | None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(PROBE_CHECK_ROWS + 5, in_features, generator=gen).to(device)
    whole = fn(x)
    counts = range(1, PROBE_CHECK_ROWS + 1)
    same = [all(torch.equal(fn(x[s : s + n]), whole[s : s + n]) for s in (0, 5)) for n in counts]
    for n in range(1, PROBE_MAX_ROWS + 1):
        if all(same[n - 1 :]):
            return n
    return None


def invariant_call(fn: Callable[[Tensor], Tensor], x: Tensor, key: Hashable) -> Tensor:
    """``fn(x)`` with each row's bits independent of the other rows: padded to :func:`invariant_rows`."""
    need = invariant_rows(fn, x.shape[1], key, x.device)
    return padded_call(fn, x, need) if need else fn(x)


def padded_call(fn: Callable[[Tensor], Tensor], x: Tensor, min_rows: int) -> Tensor:
    """``fn(x)`` computed on at least ``min_rows`` rows (zero rows appended, their results dropped)."""
    n = x.shape[0]
    if n >= min_rows:
        return fn(x)
    return fn(torch.cat((x, x.new_zeros(min_rows - n, *x.shape[1:]))))[:n]


def make_linear(weight: Tensor, dtype: torch.dtype, fmt: str | None = None, *, kernels: bool = False) -> Linear:
    """``fmt``: None for plain ``dtype`` weights, or one of :data:`QUANTIZED_FORMATS`. ``kernels``: float
    weights packed for the compiled CPU kernels (the caller checked :func:`rwkv_stream.cpu_kernels.load`)."""
    if fmt == "q8_0":
        return Q8Linear(weight)
    if kernels and fmt is None and weight.shape[1] % cpu_kernels.QBLOCK == 0:
        return (ColumnKernelLinear if short_rows(weight.shape) else KernelLinear)(weight, dtype)
    if fmt == "int8":
        return Int8Linear(weight)
    if fmt == "w8a8":
        return W8A8Linear(weight)
    return DenseLinear(weight, dtype)


def _require_cpu(weight: Tensor, fmt: str) -> None:
    if weight.device.type != "cpu":
        raise ValueError(f"{fmt} weights run on the CPU only; use float16/bfloat16 on GPUs")
