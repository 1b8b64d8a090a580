"""CuPy backend of RWKV-7's WKV: ``cuda/rwkv7/wkv7.cu`` compiled with NVRTC, launched on torch's stream.

Three ops over the slot arena (each mirrors the function of the same name in :mod:`rwkv_stream.kernels_ref7`),
all the model needs to step streams in place in the pool (``Rwkv7Model._run_arena``; nothing gathered):

* :func:`wkv7_step`: one token for a batch of streams, each addressed by its slot index;
* :func:`wkv7_ragged`: a ragged flat batch of tokens (prefill), stream ``i`` owning rows
  ``offsets[i] .. offsets[i+1]-1``;
* :func:`token_shift7`: the token-shift mixes of one layer's time mix (six) or channel mix (one), reading and
  updating the arena's shift vectors (the kernel ``shift7``).

Arena contract: ``pool_data`` fp32 ``[capacity, n_layer, 2C + H*N*N]`` (last axis contiguous), per layer
``[att shift C | ffn shift C | S as H x N(value) x N(key)]``: :class:`rwkv_stream.pool.StatePool`'s ``data``
for RWKV-7, or any tensor of that layout (the engine passes the gathered states of a step). ``slots`` int32
``[B]`` on the device (negative: a stateless row that starts from zero and writes nothing back; a slot must
not appear twice in one call); ``offsets`` int32 ``[B + 1]`` with ``offsets[B] == rows``. The vectors
``r, w, k, v, a, b`` are fp32 ``[rows, C]`` sharing one row stride (channel stride 1): ``w`` is the log of the
decay, ``a = -kk``, ``b = kk * iclr``. Head sizes 16, 32 and 64 are compiled (every released model uses 64);
the token shift works for any head size.

Kernel design: one block per (head, stream), one thread per value row of the head's N x N state; the row
lives in registers for the whole call, so a call reads and writes each state once, whatever its token count,
and the tile moves through shared memory so those accesses are coalesced. The prefill kernel stages the
vectors of 16 tokens at a time in shared memory and runs the recurrence token by token on the registers:
on CUDA cores that is T*N^2 multiply-adds per head, the same as the chunked (WY) algebra of
:func:`rwkv_stream.models.rwkv7.wkv7_chunk` without its T^2 terms; the chunked algebra pays off only on
tensor-core tiles, which these kernels do not use.

NVRTC compiles with CuPy's ``-ftz=true``; ``expf`` may differ from torch's ``exp`` in the last bit.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from rwkv_stream import gpu

__all__ = ["ATT_SHIFT", "FFN_SHIFT", "HEAD_SIZES", "SIGNATURES", "SOURCE", "available", "entry_points",
           "kernel_source", "load_kernels", "stream_of_tokens", "token_shift7", "wkv7_ragged", "wkv7_step"]

SOURCE = "rwkv7/wkv7.cu"  # under the kernel directory (gpu.source_dir())
HEAD_SIZES = (16, 32, 64)
MAX_GRID_Y = 65535
SHIFT_BLOCK = 128  # threads per block of shift7 (along channels)
ATT_SHIFT, FFN_SHIFT = 0, 1  # which shift vector of a layer's arena row: offset 0 or C
stream_of_tokens = gpu.stream_of_tokens  # int32 [rows]: the stream of each flat token (torch, no host sync)

# Parameter kinds per entry-point family, in order (checked against the PTX by tests/test_rwkv7_kernels.py).
SIGNATURES: dict[str, tuple[str, ...]] = {
    "wkv7_step": ("i32", "i32", "ptr", "ptr", "ptr", "ptr", "ptr", "ptr", "i64", "ptr", "i32", "ptr", "i64",
                  "i64", "ptr", "i64"),
    "wkv7_ragged": ("i32", "i32", "ptr", "ptr", "ptr", "ptr", "ptr", "ptr", "ptr", "i64", "ptr", "i32", "ptr",
                    "i64", "i64", "ptr", "i64"),
    "shift7": ("i32", "i32", "ptr", "i64", "ptr", "ptr", "ptr", "i32", "i32", "ptr", "i64", "i64", "i32", "ptr",
               "ptr", "i64", "i64"),
}
PER_HEAD_SIZE = ("wkv7_step", "wkv7_ragged")  # families compiled once per head size (``_n16`` ...)


def entry_points() -> list[str]:
    return [*(f"{fam}_n{n}" for n in HEAD_SIZES for fam in PER_HEAD_SIZE), "shift7"]


def family(name: str) -> str:
    """``wkv7_step_n64`` -> ``wkv7_step``; ``shift7`` -> ``shift7``."""
    return name.rsplit("_n", 1)[0]


def kernel_source() -> str:
    return gpu.source_dir().joinpath(*SOURCE.split("/")).read_text()


def nvrtc_options(arch: str | None = None) -> tuple[str, ...]:
    """The RWKV-4 kernels' options (C++17, CUDA headers; ``arch`` only for compile checks)."""
    return gpu.nvrtc_options(arch)


# ---------------------------------------------------------------------------------------------------
# Compiled module and launches

_LOCK = threading.Lock()
_KERNELS: dict[str, Any] = {}


def load_kernels() -> dict[str, Any]:
    """Compile the module once per process (CuPy caches it per device and on disk)."""
    if not _KERNELS:
        with _LOCK:
            if not _KERNELS:
                import cupy

                module = cupy.RawModule(code=kernel_source(), options=nvrtc_options())
                _KERNELS.update({name: module.get_function(name) for name in entry_points()})
    return _KERNELS


def available(device: torch.device) -> bool:
    """Whether the kernels can run on ``device`` (CUDA, CuPy importable, the module compiles)."""
    if device.type != "cuda":
        return False
    try:
        load_kernels()
    except Exception as exc:  # noqa: BLE001 - no CuPy / NVRTC: the torch path runs instead
        warnings.warn(f"RWKV-7 CUDA kernels unavailable ({exc}); using the torch path", stacklevel=2)
        return False
    return True


class _StreamHandle:
    def __init__(self, ptr: int) -> None:
        self.ptr = ptr

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.ptr)


def _stream(device: torch.device) -> Any:
    import cupy

    ptr = int(torch.cuda.current_stream(device).cuda_stream)
    if ptr == 0:
        return cupy.cuda.Stream.null
    with contextlib.suppress(Exception):
        return cupy.cuda.Stream.from_external(_StreamHandle(ptr))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return cupy.cuda.ExternalStream(ptr, int(device.index or 0))


def _pack(kind: str, value: Any) -> Any:
    import numpy as np

    if kind == "ptr":
        return np.uint64(0 if value is None else value.data_ptr())
    return {"i64": np.int64, "i32": np.int32, "f32": np.float32}[kind](value)


def _launch(name: str, grid: tuple[int, int, int], block: tuple[int, int, int], args: Sequence[Any],
            device: torch.device) -> None:
    import cupy

    kernel = load_kernels()[name]
    packed = tuple(_pack(kind, a) for kind, a in zip(SIGNATURES[family(name)], args, strict=True))
    with cupy.cuda.Device(int(device.index or 0)), _stream(device):
        kernel(grid, block, packed)


# ---------------------------------------------------------------------------------------------------
# Argument checks (shapes, dtypes, strides; never read device memory)


def _device_of(*tensors: torch.Tensor | None) -> torch.device:
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1 or next(iter(devices)).type != "cuda":
        raise ValueError(f"all tensors must be on one CUDA device, got {sorted(map(str, devices))}")
    return next(iter(devices))


def _head_size(pool_data: torch.Tensor, c: int) -> int:
    if pool_data.dtype != torch.float32 or pool_data.dim() != 3 or pool_data.stride(2) != 1:
        raise ValueError(f"pool_data must be fp32 [capacity, n_layer, 2C + H*N*N] with a contiguous last axis, "
                         f"got {tuple(pool_data.shape)} {pool_data.dtype} strides {pool_data.stride()}")
    extra = pool_data.shape[2] - 2 * c
    n = extra // c if extra > 0 and extra % c == 0 else 0
    if n not in HEAD_SIZES:
        raise ValueError(f"arena rows of {pool_data.shape[2]} floats for C = {c}: head size {n or '?'} "
                         f"is not one of {HEAD_SIZES}")
    return n


def _checks(vecs: Sequence[torch.Tensor], out: torch.Tensor, pool_data: torch.Tensor, layer: int,
            index: Sequence[torch.Tensor]) -> tuple[int, torch.device]:
    rows, c = vecs[0].shape
    ld = vecs[0].stride(0)
    for t in vecs:
        if t.dtype != torch.float32 or t.shape != (rows, c) or t.stride() != (ld, 1):
            raise ValueError(f"r, w, k, v, a, b must be fp32 [{rows}, {c}] sharing one row stride with channel "
                             f"stride 1, got {tuple(t.shape)} {t.dtype} strides {t.stride()}")
    if out.dtype != torch.float32 or out.shape != (rows, c) or out.stride(1) != 1:
        raise ValueError(f"out must be fp32 [{rows}, {c}] with channel stride 1, got {tuple(out.shape)} {out.dtype}")
    n = _head_size(pool_data, c)
    if not 0 <= layer < pool_data.shape[1]:
        raise ValueError(f"layer {layer} out of range for {pool_data.shape[1]} layers")
    for ix in index:
        if ix.dtype != torch.int32 or not ix.is_contiguous():
            raise ValueError(f"slots/offsets must be contiguous int32, got {ix.dtype}")
    _check_disjoint((out, pool_data), (*vecs, *index))
    return n, _device_of(*vecs, out, pool_data, *index)


def _extent(t: torch.Tensor) -> tuple[int, int]:
    span = 1 + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride(), strict=True))
    return t.data_ptr(), t.data_ptr() + span * t.element_size()


def _check_disjoint(written: Sequence[torch.Tensor], read: Sequence[torch.Tensor]) -> None:
    """The kernels' pointers are ``__restrict__``: what they write may not overlap anything else."""
    ws = [t for t in written if t.numel()]
    others = [t for t in read if t.numel()]
    for i, w in enumerate(ws):
        a0, a1 = _extent(w)
        for o in ws[i + 1 :] + others:
            b0, b1 = _extent(o)
            if a0 < b1 and b0 < a1:
                raise ValueError(f"an output {tuple(w.shape)} overlaps another argument {tuple(o.shape)} in memory")


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _out(r: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    return torch.empty(r.shape, dtype=torch.float32, device=r.device) if out is None else out


# ---------------------------------------------------------------------------------------------------
# Ops (same signatures as rwkv_stream.kernels_ref7)


def wkv7_step(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
              b: torch.Tensor, pool_data: torch.Tensor, slots: torch.Tensor, layer: int,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """One token per stream (vectors ``[B, C]``); the states of ``slots`` ``[B]`` advance in place."""
    out = _out(r, out)
    rows, c = r.shape
    if rows == 0:
        return out
    n, dev = _checks((r, w, k, v, a, b), out, pool_data, layer, (slots,))
    if slots.numel() != rows or rows > MAX_GRID_Y:
        raise ValueError(f"need one slot per row (<= {MAX_GRID_Y}), got {slots.numel()} for {rows} rows")
    args = (rows, c, r, w, k, v, a, b, r.stride(0), slots, layer, pool_data, pool_data.stride(0),
            pool_data.stride(1), out, out.stride(0))
    _launch(f"wkv7_step_n{n}", (c // n, rows, 1), (n, 1, 1), args, dev)
    return out


def wkv7_ragged(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                b: torch.Tensor, pool_data: torch.Tensor, slots: torch.Tensor, offsets: torch.Tensor, layer: int,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """A ragged flat batch (vectors ``[rows, C]``): stream ``i`` owns rows ``offsets[i] .. offsets[i+1]-1``
    and state ``slots[i]``; its tokens run in order. A stream without tokens keeps its state."""
    out = _out(r, out)
    rows, c = r.shape
    n_streams = offsets.numel() - 1
    if rows == 0 or n_streams <= 0:
        return out
    n, dev = _checks((r, w, k, v, a, b), out, pool_data, layer, (slots, offsets))
    if slots.numel() != n_streams or n_streams > MAX_GRID_Y:
        raise ValueError(f"need one slot per stream (<= {MAX_GRID_Y}), got {slots.numel()} for {n_streams}")
    args = (n_streams, c, offsets, r, w, k, v, a, b, r.stride(0), slots, layer, pool_data, pool_data.stride(0),
            pool_data.stride(1), out, out.stride(0))
    _launch(f"wkv7_ragged_n{n}", (c // n, n_streams, 1), (n, 1, 1), args, dev)
    return out


def token_shift7(x: torch.Tensor, mix: torch.Tensor, pool_data: torch.Tensor, slots: torch.Tensor,
                 offsets: torch.Tensor | None, layer: int, which: int, out: torch.Tensor | None = None,
                 token_stream: torch.Tensor | None = None) -> torch.Tensor:
    """Token-shift mixes ``[n_mix, rows, C]`` fp32 of ``x`` ``[rows, C]`` (fp32, channel stride 1):
    ``x + (prev - x) * mix[m]`` with ``prev`` the stream's previous row, or for its first row the shift vector
    ``which`` (:data:`ATT_SHIFT` or :data:`FFN_SHIFT`) of layer ``layer`` of its slot, which then holds the
    stream's last row. ``mix`` fp32 ``[n_mix, C]`` contiguous. ``offsets`` None: one row per stream (``slots``
    ``[rows]``); else stream ``i`` owns rows ``offsets[i] .. offsets[i+1]-1``, and ``token_stream``
    (:func:`stream_of_tokens`, computed here when not given) maps each row to its stream."""
    rows, c = x.shape
    n_mix = mix.shape[0]
    if out is None:
        out = torch.empty((n_mix, rows, c), dtype=torch.float32, device=x.device)
    n_streams = rows if offsets is None else offsets.numel() - 1
    if rows == 0 or n_streams <= 0:
        return out
    if x.dtype != torch.float32 or x.stride(1) != 1:
        raise ValueError(f"x must be fp32 [rows, C] with channel stride 1, got {x.dtype} strides {x.stride()}")
    if mix.dtype != torch.float32 or mix.shape != (n_mix, c) or not mix.is_contiguous():
        raise ValueError(f"mix must be contiguous fp32 [n_mix, {c}], got {tuple(mix.shape)} {mix.dtype}")
    if out.dtype != torch.float32 or out.shape != (n_mix, rows, c) or out.stride(2) != 1:
        raise ValueError(f"out must be fp32 [{n_mix}, {rows}, {c}] with channel stride 1, got {tuple(out.shape)}")
    if which not in (ATT_SHIFT, FFN_SHIFT):
        raise ValueError(f"which must be ATT_SHIFT ({ATT_SHIFT}) or FFN_SHIFT ({FFN_SHIFT}), not {which}")
    if pool_data.dtype != torch.float32 or pool_data.dim() != 3 or pool_data.stride(2) != 1 \
            or pool_data.shape[2] < 2 * c:
        raise ValueError(f"pool_data must be fp32 [capacity, n_layer, 2C + H*N*N] with a contiguous last axis, "
                         f"got {tuple(pool_data.shape)} {pool_data.dtype}")
    if not 0 <= layer < pool_data.shape[1]:
        raise ValueError(f"layer {layer} out of range for {pool_data.shape[1]} layers")
    if offsets is not None and token_stream is None:
        token_stream = stream_of_tokens(offsets, rows)
    if offsets is None:
        token_stream = None
    for ix in (slots, offsets, token_stream):
        if ix is not None and (ix.dtype != torch.int32 or not ix.is_contiguous()):
            raise ValueError(f"slots/offsets/token_stream must be contiguous int32, got {ix.dtype}")
    if slots.numel() != n_streams:
        raise ValueError(f"need one slot per stream, got {slots.numel()} for {n_streams}")
    if token_stream is not None and token_stream.numel() != rows:
        raise ValueError(f"token_stream needs one entry per row, got {token_stream.numel()} for {rows}")
    _check_disjoint((out, pool_data), (x, mix, slots, *(t for t in (offsets, token_stream) if t is not None)))
    dev = _device_of(x, mix, pool_data, slots, offsets, token_stream, out)
    args = (rows, c, x, x.stride(0), offsets, token_stream, slots, layer, which, pool_data, pool_data.stride(0),
            pool_data.stride(1), n_mix, mix, out, out.stride(0), out.stride(1))
    _launch("shift7", (_cdiv(c, SHIFT_BLOCK), min(rows, MAX_GRID_Y), 1), (SHIFT_BLOCK, 1, 1), args, dev)
    return out
