"""CuPy backend: the kernels in ``cuda/*.cu`` compiled with NVRTC, launched on torch's current stream.

The engine imports this module without CuPy; ``cupy`` is imported lazily by :func:`load_kernels`.
Tensors are shared zero-copy: kernels receive raw device pointers (``data_ptr()``) and strides.
Each op mirrors the plain torch reference of the same name in :mod:`rwkv_stream.kernels_ref`.

State arena contract: ``pool_data`` fp32 ``[capacity, n_layer, 5, C]`` (channel stride 1), rows per
layer ``[att_x, aa, bb, pp, ffn_x]``; ``slots`` int32 on the device (negative = stateless padding row);
``offsets`` int32 ``[B + 1]`` on the device with ``offsets[B] == N`` (the caller guarantees it; the
kernels do not read past it). A slot must not appear twice in one batch: these ops do not check it (that
would read device memory); :class:`CudaGraphStepper` and ``Model.step`` check the slots they are given.
Buffers a kernel writes (outputs, the arena) must not overlap the buffers it reads; the ops check that
(the kernels declare their pointers ``__restrict__``), except ``relu_square``, which may run in place.

CuPy compiles with ``-ftz=true``: fp32 denormals flush to zero inside the kernels (harmless here: they
only arise as vanishing exp() terms). fp16 outputs saturate at +-65504 instead of overflowing to inf.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import re
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from rwkv_stream.config import resolve_device
from rwkv_stream.kernels_ref import ATT_X, FFN_X, LN_EPS, reset_slots
from rwkv_stream.state import ROWS
from rwkv_stream.wkv import EMPTY_PP

if TYPE_CHECKING:
    if sys.version_info >= (3, 11):
        from importlib.resources.abc import Traversable
    else:
        from importlib.abc import Traversable

__all__ = [
    "CudaGraphStepper", "add_layernorm", "load_kernels", "relu_square", "reset_slots", "stream_of_tokens",
    "token_shift_ragged", "wkv_ragged", "wkv_step",
]

SOURCES = ("wkv4.cu", "token_shift.cu", "fused.cu")
COMMON_HEADER = "rwkv_common.cuh"
SUFFIX = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
WKV_PAIRS = ("f32_f32", "f16_f16", "f16_f32", "bf16_bf16", "bf16_f32")
BLOCK = 128          # threads per block along channels
MAX_GRID_Y = 65535

# Kernel parameter kinds per entry-point family, in order (checked against the PTX by the tests).
# ptr: device pointer (u64), i64: long long, i32: int, f32: float.
SIGNATURES: dict[str, tuple[str, ...]] = {
    "wkv_step": ("i32", "i32", "ptr", "i64", "ptr", "i64", "ptr", "i64", "ptr", "ptr", "ptr", "i32",
                 "ptr", "i64", "i64", "i64", "ptr", "i64"),
    "wkv_ragged": ("i32", "i32", "ptr", "ptr", "i64", "ptr", "i64", "ptr", "i64", "ptr", "ptr", "ptr",
                   "i32", "ptr", "i64", "i64", "i64", "ptr", "i64"),
    "token_shift": ("i32", "i32", "ptr", "i64", "ptr", "ptr", "ptr", "i32", "i32", "ptr", "i64", "i64",
                    "i64", "i32", "ptr", "ptr", "i64", "i64"),
    "relu_square": ("i64", "ptr", "ptr"),
    "add_layernorm": ("i32", "i32", "ptr", "i64", "ptr", "i64", "ptr", "i64", "f32", "ptr", "ptr", "f32",
                      "ptr", "i64"),
}


def entry_points() -> dict[str, list[str]]:
    """extern "C" kernel names defined by each source file."""
    dtypes = list(SUFFIX.values())
    return {
        "wkv4.cu": [f"{fam}_{pair}" for pair in WKV_PAIRS for fam in ("wkv_step", "wkv_ragged")],
        "token_shift.cu": [f"token_shift_{s}" for s in dtypes],
        "fused.cu": [f"{fam}_{s}" for s in dtypes for fam in ("relu_square", "add_layernorm")],
    }


def family(name: str) -> str:
    """Signature family of an entry-point name, e.g. ``wkv_step_f16_f32`` -> ``wkv_step``."""
    return next(f for f in sorted(SIGNATURES, key=len, reverse=True) if name.startswith(f + "_"))


# ---------------------------------------------------------------------------------------------------
# Sources and NVRTC options


def source_dir() -> Traversable:
    """Where the ``.cu`` sources are: the installed package ``rwkv_stream.cuda``, else the repo's ``cuda/``."""
    with contextlib.suppress(ModuleNotFoundError, TypeError, ValueError):
        root = importlib.resources.files("rwkv_stream.cuda")
        if root.joinpath(SOURCES[0]).is_file():
            return root
    return Path(__file__).resolve().parent.parent / "cuda"


def kernel_source(name: str) -> str:
    """The source of one ``.cu`` file with the shared header inlined (so CuPy's cache key covers it)."""
    root = source_dir()
    header = root.joinpath(COMMON_HEADER).read_text().replace("#pragma once", "")
    return root.joinpath(name).read_text().replace(f'#include "{COMMON_HEADER}"', header)


def _header_major(include: Path) -> int | None:
    api = include / "cuda_runtime_api.h"
    if not api.is_file():
        return None
    match = re.search(r"#define\s+CUDART_VERSION\s+(\d+)", api.read_text(errors="replace"))
    return int(match.group(1)) // 1000 if match else None


def _include_candidates() -> Iterator[Path]:
    import os

    for env in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(env):
            yield Path(os.environ[env]) / "include"
    with contextlib.suppress(ImportError):
        import nvidia  # the pip CUDA wheels (namespace package)

        for base in nvidia.__path__:
            yield from sorted(Path(base).glob("*/include"))
    yield Path("/usr/local/cuda/include")


def cuda_include_dir(prefer_major: int | None = None) -> str | None:
    """A directory holding ``cuda_fp16.h``/``cuda_bf16.h``, preferring headers of ``prefer_major``."""
    found = [d for d in _include_candidates() if (d / "cuda_fp16.h").is_file() and (d / "cuda_bf16.h").is_file()]
    if prefer_major is not None:
        found.sort(key=lambda d: _header_major(d) != prefer_major)
    return str(found[0]) if found else None


def nvrtc_major() -> int | None:
    try:
        from cupy_backends.cuda.libs import nvrtc

        return int(nvrtc.getVersion()[0])
    except Exception:  # noqa: BLE001 - no NVRTC: let the compile itself report it
        return None


def constant_defines() -> tuple[str, ...]:
    """``-D`` options for the constants the kernels share with Python, defined once there: the empty state's
    ``pp`` (:data:`rwkv_stream.wkv.EMPTY_PP`, as the exact fp32 the arena holds) and the state rows
    (:data:`rwkv_stream.state.ROWS`). ``rwkv_common.cuh`` refuses to compile without them."""
    pp = float(torch.tensor(EMPTY_PP, dtype=torch.float32))
    rows = (f"-DRWKV_ROW_{name.upper()}={i}" for i, name in enumerate(ROWS))
    return (f"-DRWKV_EMPTY_PP=({pp.hex()}f)", *rows)


def nvrtc_options(arch: str | None = None) -> tuple[str, ...]:
    """Options for NVRTC; ``arch`` (e.g. ``compute_90``) only for compile checks (CuPy picks its own)."""
    opts = ["-std=c++17", *constant_defines()]
    include = cuda_include_dir(nvrtc_major())
    if include:
        opts.append(f"-I{include}")
    if arch:
        opts.append(f"--gpu-architecture={arch}")
    return tuple(opts)


# ---------------------------------------------------------------------------------------------------
# Compiled modules and launches


class _Kernels:
    """All entry points, compiled once per process (CuPy caches per device and on disk)."""

    def __init__(self) -> None:
        import cupy

        options = nvrtc_options()
        self.kernels: dict[str, Any] = {}
        for src, names in entry_points().items():
            module = cupy.RawModule(code=kernel_source(src), options=options)
            for name in names:
                self.kernels[name] = module.get_function(name)

    def get(self, name: str) -> Any:
        return self.kernels[name]


_LOCK = threading.Lock()
_KERNELS: _Kernels | None = None
_WARM: set[int] = set()
_STREAMS: dict[tuple[int, int], Any] = {}


def _registry() -> _Kernels:
    global _KERNELS
    if _KERNELS is None:
        with _LOCK:
            if _KERNELS is None:
                _KERNELS = _Kernels()
    return _KERNELS


def load_kernels(device: torch.device | int | str | None = None, warm: bool = True) -> None:
    """Compile every kernel (once) and, if ``warm``, launch each once on ``device``."""
    dev = resolve_device("cuda" if device is None else device)
    _registry()
    if warm and dev.index not in _WARM:
        _warm_up(dev)
        _WARM.add(int(dev.index))


class _StreamHandle:
    """Implements the CUDA stream protocol for a raw ``cudaStream_t``."""

    def __init__(self, ptr: int) -> None:
        self.ptr = ptr

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.ptr)


def _wrap_stream(ptr: int, device_index: int) -> Any:
    import cupy

    if ptr == 0:
        return cupy.cuda.Stream.null
    with contextlib.suppress(Exception):
        return cupy.cuda.Stream.from_external(_StreamHandle(ptr))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return cupy.cuda.ExternalStream(ptr, device_index)


def _current_stream(device: torch.device) -> Any:
    ptr = int(torch.cuda.current_stream(device).cuda_stream)
    key = (int(device.index or 0), ptr)
    stream = _STREAMS.get(key)
    if stream is None:
        stream = _STREAMS[key] = _wrap_stream(ptr, key[0])
    return stream


def _ptr(t: torch.Tensor | None) -> Any:
    import numpy as np

    return np.uint64(0 if t is None else t.data_ptr())


_PACKERS: dict[str, Callable[[Any], Any]] = {}


def _packers() -> dict[str, Callable[[Any], Any]]:
    """Kernel argument kind -> numpy scalar constructor (CuPy passes numpy scalars by value)."""
    if not _PACKERS:
        import numpy as np

        _PACKERS.update({"ptr": _ptr, "i64": np.int64, "i32": np.int32, "f32": np.float32})
    return _PACKERS


def _launch(name: str, grid: tuple[int, int, int], block: tuple[int, int, int], args: Sequence[Any],
            device: torch.device) -> None:
    import cupy

    kernel = _registry().get(name)
    pack = _packers()
    packed = tuple(pack[kind](a) for kind, a in zip(SIGNATURES[family(name)], args, strict=True))
    index = int(device.index or 0)
    ctx = cupy.cuda.Device(index) if cupy.cuda.runtime.getDevice() != index else contextlib.nullcontext()
    with ctx, _current_stream(device):
        kernel(grid, block, packed)


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


# ---------------------------------------------------------------------------------------------------
# Argument checks (cheap: shapes, dtypes, strides; never read device memory)


def _check_cuda(*tensors: torch.Tensor | None) -> torch.device:
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1 or next(iter(devices)).type != "cuda":
        raise ValueError(f"all tensors must be on one CUDA device, got {sorted(map(str, devices))}")
    return next(iter(devices))


def _check_rows(c: int, dtype: torch.dtype, *mats: torch.Tensor | None) -> None:
    for m in mats:
        if m is None:
            continue
        if m.dim() != 2 or m.shape[1] != c or m.stride(1) != 1 or m.dtype != dtype:
            raise ValueError(f"expected [rows, {c}] {dtype} with channel stride 1, got "
                             f"{tuple(m.shape)} {m.dtype} strides {m.stride()}")


def _check_vectors(c: int, *vecs: torch.Tensor) -> None:
    for v in vecs:
        if v.dtype != torch.float32 or v.numel() != c or not v.is_contiguous():
            raise ValueError(f"expected a contiguous fp32 vector of {c}, got {tuple(v.shape)} {v.dtype}")


def _check_state(pool_data: torch.Tensor, c: int, layer: int, *index: torch.Tensor | None) -> None:
    if pool_data.dtype != torch.float32 or pool_data.dim() != 4 or pool_data.shape[2:] != (5, c):
        raise ValueError(f"pool_data must be fp32 [capacity, n_layer, 5, {c}], got "
                         f"{tuple(pool_data.shape)} {pool_data.dtype}")
    if pool_data.stride(3) != 1 or not 0 <= layer < pool_data.shape[1]:
        raise ValueError(f"bad pool_data strides {pool_data.stride()} or layer {layer}")
    for ix in index:
        if ix is not None and (ix.dtype != torch.int32 or not ix.is_contiguous()):
            raise ValueError(f"slots/offsets must be contiguous int32, got {ix.dtype}")


def _extent(t: torch.Tensor) -> tuple[int, int]:
    """Byte range [start, end) that a strided tensor can touch."""
    span = 1 + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride(), strict=True)) if t.numel() else 0
    start = t.data_ptr()
    return start, start + span * t.element_size()


def _check_disjoint(written: Sequence[torch.Tensor | None], read: Sequence[torch.Tensor | None]) -> None:
    """Kernels declare their pointers ``__restrict__``: a written buffer may not overlap any other buffer."""
    ws = [t for t in written if t is not None and t.numel()]
    others = [t for t in read if t is not None and t.numel()]
    for i, w in enumerate(ws):
        a0, a1 = _extent(w)
        for o in ws[i + 1:] + others:
            b0, b1 = _extent(o)
            if a0 < b1 and b0 < a1:
                raise ValueError(f"an output {tuple(w.shape)} overlaps another argument {tuple(o.shape)} in memory")


def _suffix(dtype: torch.dtype) -> str:
    try:
        return SUFFIX[dtype]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype}; use one of {list(SUFFIX)}") from None


def _ld(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.stride(0)


def _state_strides(pool_data: torch.Tensor) -> tuple[int, int, int]:
    s = pool_data.stride()
    return s[0], s[1], s[2]


# ---------------------------------------------------------------------------------------------------
# Ops (same signatures as rwkv_stream.kernels_ref)


def _wkv_out(k: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if out.dtype not in (k.dtype, torch.float32):
        raise ValueError(f"wkv output must be {k.dtype} or fp32, got {out.dtype}")
    return out


def _wkv_checks(k: torch.Tensor, v: torch.Tensor, r: torch.Tensor | None, out: torch.Tensor,
                w: torch.Tensor, u: torch.Tensor, pool_data: torch.Tensor, slots: torch.Tensor,
                offsets: torch.Tensor | None, layer: int) -> torch.device:
    c = k.shape[1]
    _check_rows(c, k.dtype, k, v, r)
    _check_rows(c, out.dtype, out)
    _check_vectors(c, w, u)
    _check_state(pool_data, c, layer, slots, offsets)
    _check_disjoint((out, pool_data), (k, v, r, w, u, slots, offsets))
    return _check_cuda(k, v, r, out, w, u, pool_data, slots, offsets)


def wkv_step(k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor, pool_data: torch.Tensor,
             slots: torch.Tensor, layer: int, r: torch.Tensor | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """WKV for one token per stream (k, v [B, C]); updates aa/bb/pp of ``slots`` in place.

    Returns wkv (``sigmoid(r) * wkv`` if r is given) in k's dtype, or in ``out`` (k's dtype or fp32).
    """
    out = _wkv_out(k, out)
    b, c = k.shape
    if b == 0:
        return out
    dev = _wkv_checks(k, v, r, out, w, u, pool_data, slots, None, layer)
    if slots.numel() != b or b > MAX_GRID_Y:
        raise ValueError(f"need one slot per row (<= {MAX_GRID_Y}), got {slots.numel()} for {b} rows")
    name = f"wkv_step_{_suffix(k.dtype)}_{_suffix(out.dtype)}"
    args = (b, c, k, k.stride(0), v, v.stride(0), r, _ld(r), w, u, slots, layer, pool_data,
            *_state_strides(pool_data), out, out.stride(0))
    _launch(name, (_cdiv(c, BLOCK), b, 1), (BLOCK, 1, 1), args, dev)
    return out


def wkv_ragged(k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor, pool_data: torch.Tensor,
               slots: torch.Tensor, offsets: torch.Tensor, layer: int, r: torch.Tensor | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """WKV over a ragged flat batch (k, v [N, C]); stream b owns tokens offsets[b]..offsets[b+1]-1."""
    out = _wkv_out(k, out)
    n, c = k.shape
    b = offsets.numel() - 1
    if n == 0 or b <= 0:
        return out
    dev = _wkv_checks(k, v, r, out, w, u, pool_data, slots, offsets, layer)
    if slots.numel() != b or b > MAX_GRID_Y:
        raise ValueError(f"need one slot per stream (<= {MAX_GRID_Y}), got {slots.numel()} for {b}")
    name = f"wkv_ragged_{_suffix(k.dtype)}_{_suffix(out.dtype)}"
    args = (b, c, offsets, k, k.stride(0), v, v.stride(0), r, _ld(r), w, u, slots, layer, pool_data,
            *_state_strides(pool_data), out, out.stride(0))
    _launch(name, (_cdiv(c, BLOCK), b, 1), (BLOCK, 1, 1), args, dev)
    return out


def _mix_matrix(mixes: torch.Tensor | Sequence[torch.Tensor], c: int, device: torch.device) -> torch.Tensor:
    if isinstance(mixes, torch.Tensor) and mixes.dtype == torch.float32 and mixes.is_contiguous():
        return mixes.reshape(-1, c)
    if isinstance(mixes, torch.Tensor):
        return mixes.float().reshape(-1, c).contiguous()
    return torch.stack([m.float().reshape(c) for m in mixes]).to(device)


def stream_of_tokens(offsets: torch.Tensor, n: int) -> torch.Tensor:
    """int32 ``[n]``: the stream of each flat token (``b`` for tokens ``offsets[b] .. offsets[b + 1] - 1``),
    computed once per batch on the device without a host sync (``n == offsets[-1]``, known to the caller)."""
    b = offsets.numel() - 1
    streams = torch.arange(b, dtype=torch.int32, device=offsets.device)
    return torch.repeat_interleave(streams, (offsets[1:] - offsets[:-1]).long(), output_size=n)


def token_shift_ragged(xa: torch.Tensor, mixes: torch.Tensor | Sequence[torch.Tensor],
                       pool_data: torch.Tensor, slots: torch.Tensor, offsets: torch.Tensor | None,
                       layer: int, row: int, out: torch.Tensor | None = None,
                       token_stream: torch.Tensor | None = None) -> torch.Tensor:
    """Token-shift mixes ``[n_mix, N, C]`` (xa's dtype); writes each stream's last xa into state ``row``.

    ``token_stream`` (int32 ``[N]``, :func:`stream_of_tokens`) maps each token to its stream; pass it when
    several layers share one batch (it is computed here otherwise). Not read when ``offsets`` is None.
    """
    n, c = xa.shape
    mix = _mix_matrix(mixes, c, xa.device)
    n_mix = mix.shape[0]
    if out is None:
        out = torch.empty((n_mix, n, c), dtype=xa.dtype, device=xa.device)
    b = n if offsets is None else offsets.numel() - 1
    if n == 0 or b <= 0:
        return out
    if out.shape != (n_mix, n, c) or out.stride(2) != 1 or out.dtype != xa.dtype or row not in (ATT_X, FFN_X):
        raise ValueError(f"bad out {tuple(out.shape)} {out.dtype} or row {row}")
    _check_rows(c, xa.dtype, xa)
    if offsets is not None and token_stream is None:
        token_stream = stream_of_tokens(offsets, n)
    if offsets is None:
        token_stream = None
    _check_state(pool_data, c, layer, slots, offsets, token_stream)
    if token_stream is not None and token_stream.numel() != n:
        raise ValueError(f"token_stream needs one entry per token, got {token_stream.numel()} for {n}")
    _check_disjoint((out, pool_data), (xa, mix, slots, offsets, token_stream))
    dev = _check_cuda(xa, mix, pool_data, slots, offsets, token_stream, out)
    if slots.numel() != b:
        raise ValueError(f"need one slot per stream, got {slots.numel()} for {b}")
    args = (n, c, xa, xa.stride(0), offsets, token_stream, slots, layer, row, pool_data,
            *_state_strides(pool_data), n_mix, mix, out, out.stride(0), out.stride(1))
    grid = (_cdiv(c, BLOCK), min(n, MAX_GRID_Y), 1)
    _launch(f"token_shift_{_suffix(xa.dtype)}", grid, (BLOCK, 1, 1), args, dev)
    return out


def relu_square(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``max(x, 0)^2`` elementwise over a contiguous tensor (``out`` may be ``x``)."""
    out = torch.empty_like(x) if out is None else out
    if not (x.is_contiguous() and out.is_contiguous()) or out.shape != x.shape or out.dtype != x.dtype:
        raise ValueError("relu_square needs contiguous x and out of one shape and dtype")
    n = x.numel()
    if n == 0:
        return out
    dev = _check_cuda(x, out)
    grid = (min(_cdiv(n, 256), 8192), 1, 1)
    _launch(f"relu_square_{_suffix(x.dtype)}", grid, (256, 1, 1), (n, x, out), dev)
    return out


def _ln_block(c: int) -> int:
    """Threads per row for add_layernorm: about 4 channels per thread, whole warps, at most 1024."""
    return 32 * max(1, min(32, _cdiv(c, 128)))


def add_layernorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  delta: torch.Tensor | None = None, gate: torch.Tensor | None = None, scale: float = 1.0,
                  eps: float = LN_EPS, out: torch.Tensor | None = None,
                  out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x = (x + sigmoid(gate) * delta) * scale`` in place (fp32 x [N, C]); returns layer_norm(x)."""
    n, c = x.shape
    dtype = out.dtype if out is not None else out_dtype or (delta.dtype if delta is not None else torch.float32)
    out = torch.empty((n, c), dtype=dtype, device=x.device) if out is None else out
    if n == 0:
        return out
    _check_rows(c, torch.float32, x)
    _check_rows(c, dtype, delta, gate, out)
    _check_vectors(c, weight, bias)
    _check_disjoint((x, out), (delta, gate, weight, bias))
    if gate is not None and delta is None:
        raise ValueError("gate needs delta")
    dev = _check_cuda(x, weight, bias, delta, gate, out)
    args = (n, c, x, x.stride(0), delta, _ld(delta), gate, _ld(gate), scale, weight, bias, eps, out,
            out.stride(0))
    _launch(f"add_layernorm_{_suffix(dtype)}", (n, 1, 1), (_ln_block(c), 1, 1), args, dev)
    return out


def _warm_up(device: torch.device) -> None:
    """Launch every entry point once on tiny inputs (module load, first-launch costs) and sync."""
    c, n, layers = 64, 3, 1
    pool = torch.zeros((2, layers, 5, c), dtype=torch.float32, device=device)
    reset_slots(pool, [0, 1])
    slots = torch.tensor([0, -1, 1], dtype=torch.int32, device=device)
    offsets = torch.tensor([0, 2, 2, 3], dtype=torch.int32, device=device)
    vec = torch.zeros(c, dtype=torch.float32, device=device)
    for dtype in SUFFIX:
        xs = torch.zeros((n, c), dtype=dtype, device=device)
        for out_dtype in {dtype, torch.float32}:
            out = torch.empty((n, c), dtype=out_dtype, device=device)
            wkv_step(xs, xs, vec, vec, pool, slots, 0, r=xs, out=out)
            wkv_ragged(xs, xs, vec, vec, pool, slots, offsets, 0, r=xs, out=out)
        token_shift_ragged(xs, vec.expand(3, c).contiguous(), pool, slots, offsets, 0, ATT_X)
        relu_square(xs, out=xs)
        add_layernorm(torch.zeros((n, c), device=device), vec, vec, delta=xs, gate=xs, scale=0.5)
    reset_slots(pool, [0, 1])
    torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------
# Whole-model one-token step: cuBLAS matmuls (torch) + the kernels above, captured in CUDA graphs.


@dataclass
class _Layer:
    """One block's tensors, all views of the model's own (nothing is copied)."""

    ln1: tuple[torch.Tensor, torch.Tensor]      # fp32 weight, bias
    ln2: tuple[torch.Tensor, torch.Tensor]
    att_mix: torch.Tensor                       # fp32 [3, C]: k, v, r
    att_w: torch.Tensor                         # fp32 [C]: -exp(time_decay)
    att_u: torch.Tensor                         # fp32 [C]: time_first
    att_kvr: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # key, value, receptance [C, C] (out, in)
    att_out: torch.Tensor                       # [C, C]
    ffn_mix: torch.Tensor                       # fp32 [2, C]: k, r
    ffn_key: torch.Tensor                       # [F, C]
    ffn_rec: torch.Tensor                       # [C, C]
    ffn_val: torch.Tensor                       # [C, F]
    scale: float                                # residual scale after this block (fp16 rescaling)


@dataclass
class _Graph:
    graph: Any                                  # torch.cuda.CUDAGraph
    tokens: torch.Tensor                        # static int64 [bucket]
    slots: torch.Tensor                         # static int32 [bucket]
    logits: torch.Tensor                        # static output [bucket, V]


DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _dense(linear: Any, what: str) -> torch.Tensor:
    weight = getattr(linear, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dtype not in SUFFIX:
        raise ValueError(f"CudaGraphStepper needs float32/float16/bfloat16 weights; {what} is {type(linear).__name__}")
    return weight


class _Weights:
    """The stepper's view of an RWKV-4 model's prepared weights (:class:`rwkv_stream.models.rwkv4.Rwkv4Model`):
    the same tensors in the same memory, ln0 already folded into the embeddings, fp16 rescaling already in
    the output matrices."""

    def __init__(self, model: Any) -> None:
        from .models import rwkv4

        if getattr(model, "family", None) != "rwkv4":
            raise ValueError(f"CudaGraphStepper runs RWKV-4 models, not {getattr(model, 'family', type(model))}")
        self.dtype: torch.dtype = model.dtype
        self.device: torch.device = model.device
        self.emb: torch.Tensor = model.emb
        self.head = _dense(model.head_linear, "the head")
        self.ln_out: tuple[torch.Tensor, torch.Tensor] = model.ln_out
        every = rwkv4.FP16_RESCALE_EVERY if model._rescale else 0
        self.layers = []
        for i, layer in enumerate(model.layers):
            c = layer.w.numel()
            self.layers.append(_Layer(
                ln1=layer.ln1, ln2=layer.ln2, att_mix=layer.att_mix.reshape(3, c), att_w=layer.w, att_u=layer.u,
                att_kvr=(_dense(layer.att_key, "att.key"), _dense(layer.att_value, "att.value"),
                         _dense(layer.att_receptance, "att.receptance")),
                att_out=_dense(layer.att_output, "att.output"), ffn_mix=layer.ffn_mix.reshape(2, c),
                ffn_key=_dense(layer.ffn_key, "ffn.key"), ffn_rec=_dense(layer.ffn_receptance, "ffn.receptance"),
                ffn_val=_dense(layer.ffn_value, "ffn.value"),
                scale=0.5 if every and (i + 1) % every == 0 else 1.0))


class CudaGraphStepper:
    """Runs an RWKV-4 model over a batch of state slots: torch (cuBLAS) matmuls + this module's kernels.

    ``model``: an RWKV-4 model (``rwkv_stream.load(..., device="cuda", dtype=...)``) in float32, float16 or
    bfloat16; the stepper uses its prepared weights as they are (one copy in GPU memory). ``pool``: the
    model's :class:`~rwkv_stream.pool.StatePool` (``model.new_pool(n, growable=False)``: graphs hold the
    arena's address) or a bare fp32 arena ``[capacity, n_layer, 5, C]``.
    :meth:`step` runs one token per stream and, on CUDA, replays a CUDA graph captured per batch-size
    bucket (static token/slot buffers; padding rows use slot -1, which reads the initial state and
    writes nothing). :meth:`forward` runs a ragged multi-token batch eagerly (prefill / chunks). Slots are
    checked (distinct, in range) before anything runs. ``ops`` defaults to this module; pass
    :mod:`rwkv_stream.kernels_ref` to run the same pipeline on the CPU. Logits come back in the weight dtype.
    """

    def __init__(self, model: Any, pool: Any, *, ops: ModuleType | None = None,
                 buckets: Sequence[int] = DEFAULT_BUCKETS, use_graphs: bool | None = None) -> None:
        self.w = _Weights(model)
        self.device, self.dtype = self.w.device, self.w.dtype
        self.n_layer, self.n_embd = len(self.w.layers), int(self.w.emb.shape[1])
        self._pool_owner = pool if not isinstance(pool, torch.Tensor) else None
        pool_data = pool if isinstance(pool, torch.Tensor) else pool.data
        if tuple(pool_data.shape[1:]) != (self.n_layer, 5, self.n_embd) or not pool_data.is_contiguous():
            raise ValueError(f"the arena must be contiguous [capacity, {self.n_layer}, 5, {self.n_embd}]")
        if pool_data.device != self.device or pool_data.dtype != torch.float32:
            raise ValueError(f"the arena must be fp32 on {self.device}, got {pool_data.dtype} on {pool_data.device}")
        if self._pool_owner is not None and getattr(self._pool_owner, "growable", False):
            raise ValueError("graphs hold the arena's address: use a fixed pool (new_pool(n, growable=False))")
        self.pool = pool_data
        self.ops = ops if ops is not None else sys.modules[__name__]
        self.buckets = tuple(sorted(buckets))
        on_cuda = self.device.type == "cuda"
        self.use_graphs = on_cuda if use_graphs is None else (use_graphs and on_cuda)
        self._graphs: dict[int, _Graph] = {}
        if on_cuda and self.ops is sys.modules[__name__]:
            load_kernels(self.device)

    # -- the layer pipeline (offsets None: one token per stream) ------------------------------------

    def _run(self, tokens: torch.Tensor, slots: torch.Tensor, offsets: torch.Tensor | None) -> torch.Tensor:
        """Final ln_out output [N, C] (weight dtype) for token ids; updates the state slots."""
        ops, w = self.ops, self.w
        token_stream = None if offsets is None else stream_of_tokens(offsets, tokens.numel())
        x = w.emb.index_select(0, tokens).float()             # residual stream, fp32 [N, C]
        xa = ops.add_layernorm(x, *w.layers[0].ln1, out_dtype=self.dtype)
        for i, layer in enumerate(w.layers):
            nxt = w.layers[i + 1].ln1 if i + 1 < self.n_layer else w.ln_out
            xf = self._time_mix(i, layer, x, xa, slots, offsets, token_stream)
            xa = self._channel_mix(i, layer, nxt, x, xf, slots, offsets, token_stream)
        return xa

    def _time_mix(self, i: int, layer: _Layer, x: torch.Tensor, xa: torch.Tensor, slots: torch.Tensor,
                  offsets: torch.Tensor | None, token_stream: torch.Tensor | None) -> torch.Tensor:
        ops = self.ops
        mixed = ops.token_shift_ragged(xa, layer.att_mix, self.pool, slots, offsets, i, ATT_X,
                                       token_stream=token_stream)
        k, v, r = (F.linear(m, wt) for m, wt in zip(mixed, layer.att_kvr, strict=True))
        if offsets is None:
            y = ops.wkv_step(k, v, layer.att_w, layer.att_u, self.pool, slots, i, r=r)
        else:
            y = ops.wkv_ragged(k, v, layer.att_w, layer.att_u, self.pool, slots, offsets, i, r=r)
        return ops.add_layernorm(x, *layer.ln2, delta=F.linear(y, layer.att_out))

    def _channel_mix(self, i: int, layer: _Layer, nxt: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor,
                     xf: torch.Tensor, slots: torch.Tensor, offsets: torch.Tensor | None,
                     token_stream: torch.Tensor | None) -> torch.Tensor:
        ops = self.ops
        mixed = ops.token_shift_ragged(xf, layer.ffn_mix, self.pool, slots, offsets, i, FFN_X,
                                       token_stream=token_stream)
        k = F.linear(mixed[0], layer.ffn_key)
        k = ops.relu_square(k, out=k)
        r = F.linear(mixed[1], layer.ffn_rec)
        return ops.add_layernorm(x, *nxt, delta=F.linear(k, layer.ffn_val), gate=r, scale=layer.scale)

    # -- public entry points --------------------------------------------------------------------------

    def forward(self, tokens: torch.Tensor | Sequence[int], offsets: torch.Tensor | Sequence[int],
                slots: torch.Tensor | Sequence[int], *, last_only: bool = True) -> torch.Tensor:
        """Eager ragged pass: stream b = tokens[offsets[b]:offsets[b+1]] on state slot slots[b].

        Returns logits for each stream's last token ([B, V]; every stream needs >= 1 token) or, with
        ``last_only=False``, for every token ([N, V]).
        """
        offs = torch.as_tensor(offsets, dtype=torch.int32).cpu()
        toks = torch.as_tensor(tokens).reshape(-1)
        lengths = offs[1:] - offs[:-1]
        if int(offs[0]) != 0 or int(offs[-1]) != toks.numel() or bool((lengths < 0).any()):
            raise ValueError("offsets must start at 0, be non-decreasing and end at len(tokens)")
        if last_only and bool((lengths == 0).any()):
            raise ValueError("last_only needs at least one token per stream")
        dev = self.device
        slot_list = self._checked_slots(slots, len(offs) - 1)
        hidden = self._run(toks.to(dev, torch.long), self._slots(slot_list), offs.to(dev))
        if last_only:
            hidden = hidden.index_select(0, (offs[1:].long() - 1).to(dev))
        return F.linear(hidden, self.w.head)

    def step(self, tokens: torch.Tensor | Sequence[int], slots: torch.Tensor | Sequence[int], *,
             copy: bool = True) -> torch.Tensor:
        """One token per stream (tokens[b] on slot slots[b]); logits [B, V] in the weight dtype.

        With graphs, batches are padded to the next bucket and replayed; larger batches run in
        pieces of the largest bucket. ``copy=False`` returns a view of the graph's static output,
        valid only until the next call.
        """
        toks = torch.as_tensor(tokens).reshape(-1)
        slot_t = torch.tensor(self._checked_slots(slots, toks.numel()), dtype=torch.int32)
        if not self.use_graphs:
            hidden = self._run(toks.to(self.device, torch.long), self._slots(slot_t), None)
            return F.linear(hidden, self.w.head)
        top = self.buckets[-1]
        parts = [self._replay(toks[s:s + top], slot_t[s:s + top], copy or toks.numel() > top)
                 for s in range(0, toks.numel(), top)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def capture(self, buckets: Sequence[int] | None = None) -> None:
        """Capture graphs now (else lazily at first use of each bucket); a no-op without graphs."""
        if not self.use_graphs:
            return
        for size in buckets or self.buckets:
            self._graph(size)

    # -- graphs ---------------------------------------------------------------------------------------

    def _checked_slots(self, slots: torch.Tensor | Sequence[int], count: int) -> list[int]:
        """The slots as host ints: one per stream, each in [0, capacity), no slot twice (two rows of one
        batch on one slot race in the kernels). A device tensor is copied to the host (a sync): pass lists."""
        values = [int(s) for s in (slots.reshape(-1).tolist() if isinstance(slots, torch.Tensor) else slots)]
        if len(values) != count:
            raise ValueError(f"need one slot per stream: {len(values)} slots for {count} streams")
        capacity = self.pool.shape[0]
        bad = [s for s in values if not 0 <= s < capacity]
        if bad:
            raise ValueError(f"slot {bad[0]} out of range for a pool of {capacity}")
        if len(set(values)) != len(values):
            dup = next(s for s in values if values.count(s) > 1)
            raise ValueError(f"slot {dup} appears twice in one batch; feed a stream's tokens as one stream")
        return values

    def _slots(self, slots: torch.Tensor | Sequence[int]) -> torch.Tensor:
        return torch.as_tensor(slots).reshape(-1).to(self.device, torch.int32).contiguous()

    def _bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def _graph(self, size: int) -> _Graph:
        graph = self._graphs.get(size)
        if graph is None:
            graph = self._graphs[size] = self._capture(size)
        return graph

    def _capture(self, size: int) -> _Graph:
        dev = self.device
        tokens = torch.zeros(size, dtype=torch.long, device=dev)
        slots = torch.full((size,), -1, dtype=torch.int32, device=dev)  # stateless: warm-up writes nothing
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):
                F.linear(self._run(tokens, slots, None), self.w.head)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            logits = F.linear(self._run(tokens, slots, None), self.w.head)
        return _Graph(graph, tokens, slots, logits)

    def _replay(self, toks: torch.Tensor, slots: torch.Tensor, copy: bool) -> torch.Tensor:
        n = toks.numel()
        g = self._graph(self._bucket(n))
        g.tokens[:n].copy_(toks, non_blocking=True)
        g.slots[:n].copy_(slots, non_blocking=True)
        if n < g.tokens.numel():
            g.tokens[n:].zero_()
            g.slots[n:].fill_(-1)
        g.graph.replay()
        return g.logits[:n].clone() if copy else g.logits[:n]
