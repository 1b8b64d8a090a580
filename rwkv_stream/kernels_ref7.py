"""Plain torch references of the RWKV-7 CUDA kernels (``cuda/rwkv7/wkv7.cu``, launched by
:mod:`rwkv_stream.gpu7`), with the same signatures and the same arena contract.

The math is the engine's own (:func:`rwkv_stream.models.rwkv7.wkv7_step`, the CPU path), applied one token
at a time per stream, so a kernel that matches these matches the CPU engine.

Arena: ``pool_data`` fp32 ``[capacity, n_layer, 2C + H*N*N]``; per layer ``[att shift | ffn shift | S]``
with ``S`` as ``[H, N(value), N(key)]``. ``slots`` int32, one per stream; a negative slot is a stateless row
(zero state, nothing written back). Vectors ``r, w, k, v, a, b`` are fp32 ``[rows, C]``: ``w`` is the LOG
of the decay, ``a = -kk``, ``b = kk * iclr``. Returns ``y`` ``[rows, C]`` fp32. :func:`token_shift7` reads
and updates a layer's shift vectors (``which``: 0 the att one, 1 the ffn one) and returns the mixes.

The module has the whole op set the model's arena path calls (``Rwkv7Model._run_arena``), so that path also
runs on the CPU with these references in place of the kernels (tests, ``bench/gpu_bench.py --cpu-smoke``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rwkv_stream.models.rwkv7 import wkv7_step as _step

ATT_SHIFT, FFN_SHIFT = 0, 1


def stream_of_tokens(offsets: Tensor, n: int) -> Tensor:
    """int32 ``[n]``: the stream of each flat row (``i`` for rows ``offsets[i] .. offsets[i+1]-1``)."""
    streams = torch.arange(offsets.numel() - 1, dtype=torch.int32, device=offsets.device)
    return torch.repeat_interleave(streams, (offsets[1:] - offsets[:-1]).long(), output_size=n)


def _state_view(pool_data: Tensor, slot: int, layer: int, h: int, n: int) -> Tensor | None:
    if slot < 0:
        return None
    c = h * n
    return pool_data[slot, layer, 2 * c :].view(1, h, n, n)


def _run_stream(vecs: tuple[Tensor, ...], rows: range, pool_data: Tensor, slot: int, layer: int, h: int, n: int,
                out: Tensor) -> None:
    view = _state_view(pool_data, slot, layer, h, n)
    s = torch.zeros(1, h, n, n, dtype=torch.float32, device=out.device) if view is None else view.clone()
    for t in rows:  # vecs: r, decay, k, v, a, b
        out[t] = _step(s, *(x[t].view(1, h, n) for x in vecs)).view(-1)
    if view is not None:
        view.copy_(s)


def _prepare(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, pool_data: Tensor,
             out: Tensor | None) -> tuple[tuple[Tensor, ...], int, int, Tensor]:
    c = r.shape[1]
    n = _head_size(pool_data, c)
    decay = w.float().exp()
    vecs = (r.float(), decay, k.float(), v.float(), a.float(), b.float())
    out = torch.empty(r.shape, dtype=torch.float32, device=r.device) if out is None else out
    return vecs, c // n, n, out


def _head_size(pool_data: Tensor, c: int) -> int:
    """N from the arena's row length ``2C + H*N*N = 2C + C*N``."""
    extra = pool_data.shape[-1] - 2 * c
    if extra <= 0 or extra % c:
        raise ValueError(f"arena rows of {pool_data.shape[-1]} floats do not fit C = {c}")
    return extra // c


def wkv7_step(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, pool_data: Tensor,
              slots: Tensor, layer: int, out: Tensor | None = None) -> Tensor:
    """One token per stream (vectors ``[B, C]``, ``slots`` ``[B]``); the states of ``slots`` advance in place."""
    vecs, h, n, out = _prepare(r, w, k, v, a, b, pool_data, out)
    for i, slot in enumerate(slots.tolist()):
        _run_stream(vecs, range(i, i + 1), pool_data, int(slot), layer, h, n, out)
    return out


def wkv7_ragged(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, pool_data: Tensor,
                slots: Tensor, offsets: Tensor, layer: int, out: Tensor | None = None) -> Tensor:
    """Ragged flat batch: stream ``i`` owns rows ``offsets[i] .. offsets[i+1]-1`` and state ``slots[i]``;
    its tokens run in order, one at a time."""
    vecs, h, n, out = _prepare(r, w, k, v, a, b, pool_data, out)
    offs = offsets.tolist()
    for i, slot in enumerate(slots.tolist()):
        if offs[i + 1] > offs[i]:
            _run_stream(vecs, range(offs[i], offs[i + 1]), pool_data, int(slot), layer, h, n, out)
    return out


def token_shift7(x: Tensor, mix: Tensor, pool_data: Tensor, slots: Tensor, offsets: Tensor | None, layer: int,
                 which: int, out: Tensor | None = None, token_stream: Tensor | None = None) -> Tensor:
    """Mixes ``[n_mix, rows, C]``: ``x + (prev - x) * mix[m]`` (the engine's ``addcmul``), ``prev`` the stream's
    previous row or, for its first row, the slot's shift vector ``which`` of ``layer`` (zero for a negative
    slot), which is then overwritten with the stream's last row. ``offsets`` None: one row per stream."""
    rows, c = x.shape
    offs = list(range(rows + 1)) if offsets is None else [int(o) for o in offsets.tolist()]
    sx = torch.empty_like(x)
    for i, slot in enumerate(int(s) for s in slots.tolist()):
        t0, t1 = offs[i], offs[i + 1]
        if t1 <= t0:
            continue
        vec = pool_data[slot, layer, which * c : (which + 1) * c] if slot >= 0 else None
        sx[t0] = 0.0 if vec is None else vec
        sx[t0 + 1 : t1] = x[t0 : t1 - 1]
        if vec is not None:
            vec.copy_(x[t1 - 1])
    result = torch.addcmul(x, sx - x, mix.unsqueeze(1))
    if out is None:
        return result
    out.copy_(result)
    return out
