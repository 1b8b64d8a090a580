"""The RWKV-4 WKV recurrence: :func:`wkv_step` in plain torch is the reference (token by token, as the
equations read); :func:`wkv_ragged` runs it over a ragged batch, on the CPU as a NumPy loop over time steps
(tested against the reference in ``tests/test_wkv.py``). The CUDA kernels are checked against
:mod:`rwkv_stream.kernels_ref`, which follows the same equations.

State per channel is ``(aa, bb, pp)``: the numerator and denominator of the decayed weighted average of past
values, both scaled by ``exp(-pp)`` so that nothing overflows however long the stream runs. All math is fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

# pp of an empty state; with aa = bb = 0 its value cancels out, but every implementation uses it. This is the
# one definition: the state, the pool, training, the kernel references and (as the fp32 value, injected at
# NVRTC compile time by rwkv_stream.gpu.constant_defines) the CUDA kernels all take it from here.
EMPTY_PP = -1e30


def wkv_output(k: Tensor, v: Tensor, u: Tensor, aa: Tensor, bb: Tensor, pp: Tensor) -> Tensor:
    """wkv for the current token: past (aa/bb) plus the current token weighted by ``exp(u + k)``."""
    ww = u + k
    q = torch.maximum(pp, ww)
    e1 = torch.exp(pp - q)
    e2 = torch.exp(ww - q)
    return (e1 * aa + e2 * v) / (e1 * bb + e2)


def wkv_update(
    k: Tensor, v: Tensor, w: Tensor, aa: Tensor, bb: Tensor, pp: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Decay the state by ``exp(w)`` and add the current token with weight ``exp(k)``."""
    ww = pp + w
    q = torch.maximum(ww, k)
    e1 = torch.exp(ww - q)
    e2 = torch.exp(k - q)
    return e1 * aa + e2 * v, e1 * bb + e2, q


def wkv_step(
    k: Tensor, v: Tensor, w: Tensor, u: Tensor, aa: Tensor, bb: Tensor, pp: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One token for a batch of streams: ``k, v, aa, bb, pp`` are ``[B, C]``; returns ``(wkv, aa, bb, pp)``."""
    out = wkv_output(k, v, u, aa, bb, pp)
    return (out, *wkv_update(k, v, w, aa, bb, pp))


@dataclass(frozen=True)
class TimeMajor:
    """A ragged batch laid out time-major for the WKV loop (built once per step, shared by all layers).

    Streams are ordered by decreasing length, so the streams still running at time ``t`` are a prefix of
    that order; ``rows`` lists, for ``t = 0, 1, ...``, the flat rows of those streams, and ``active[t]`` is
    the prefix length. Each time step is then a contiguous slice of the gathered inputs and of the state.
    """

    order: Tensor  # [B] stream indices by decreasing length
    rows: Tensor  # [N] flat row of each time-major position
    active: list[int]  # streams still running at each time step

    @property
    def in_order(self) -> bool:
        """``order`` and ``rows`` are the identity (rows packed in stream order, as :func:`wkv_ragged` takes
        them): one stream, or one token per stream."""
        return len(self.order) == 1 or self.active == [len(self.order)]

    @classmethod
    def of(cls, starts: Tensor, lengths: list[int]) -> TimeMajor:
        order = sorted(range(len(lengths)), key=lambda b: -lengths[b])
        sorted_lengths = [lengths[b] for b in order]
        steps = sorted_lengths[0] if order else 0
        active = [sum(1 for n in sorted_lengths if n > t) for t in range(steps)]
        first = starts.tolist()
        rows = [first[b] + t for t, n in enumerate(active) for b in order[:n]]  # built in Python: small, per step
        device = starts.device
        idx = torch.tensor(order, dtype=torch.long, device=device)
        return cls(idx, torch.tensor(rows, dtype=torch.long, device=device), active)


def wkv_ragged(
    k: Tensor, v: Tensor, w: Tensor, u: Tensor, abp: Tensor, starts: Tensor, lengths: list[int],
    layout: TimeMajor | None = None,
) -> Tensor:
    """WKV over a ragged batch: stream ``b`` owns rows ``starts[b] : starts[b] + lengths[b]`` of ``k``/``v``,
    packed in stream order (``starts`` are the running sums of ``lengths``, as :class:`~rwkv_stream.model.Ragged`
    lays them out).

    ``abp`` is ``[B, 3, C]`` (aa, bb, pp), updated in place; pass ``layout`` to reuse one built per step.
    The arithmetic is :func:`wkv_step`'s, token after token. On the CPU the loop runs on NumPy views of the
    same memory: for the short fragments of live streams the loop is all per-op overhead, and a NumPy op on
    a few hundred floats costs about a third of a torch op. Every element is computed on its own in both,
    so a stream's result never depends on the other streams of the batch.
    """
    tm = layout if layout is not None else TimeMajor.of(starts, lengths)
    if not tm.active:
        return torch.empty_like(k)
    in_place = tm.in_order  # already time-major (the common live cases): work on the caller's memory, no gathers
    kt, vt = (k.float(), v.float()) if in_place else (k[tm.rows].float(), v[tm.rows].float())
    state = abp if in_place else abp[tm.order]  # a copy when gathered; streams without tokens keep their rows
    if k.device.type == "cpu":
        y = torch.empty_like(kt)
        _wkv_loop_numpy(kt.numpy(), vt.numpy(), w.float().numpy(), u.float().numpy(), state.numpy(), tm.active,
                        y.numpy())
    else:
        y = _wkv_loop_torch(kt, vt, w, u, state, tm.active)
    if in_place:
        return y.to(k.dtype)
    out = torch.empty_like(k)
    out[tm.rows] = y.to(out.dtype)
    abp[tm.order] = state
    return out


def _wkv_loop_numpy(
    k: np.ndarray, v: np.ndarray, w: np.ndarray, u: np.ndarray, state: np.ndarray, active: list[int],
    y: np.ndarray,
) -> None:
    """The time-major loop: ``state`` ``[B, 3, C]`` is advanced in place and ``y`` ``[N, C]`` filled.

    Output and update share each step's ops: a step works on ``[streams, 2, C]`` arrays whose first row is
    the output (``pp`` against ``u + k``) and whose second is the update (``pp + w`` against ``k``).
    """
    targets = np.empty((k.shape[0], 2, k.shape[1]), dtype=np.float32)  # [N, 2, C]
    np.add(u, k, out=targets[:, 0])
    targets[:, 1] = k
    values = v[:, None]
    offsets = np.zeros((2, w.shape[0]), dtype=np.float32)  # [2, C]
    offsets[1] = w
    aa, bb, pp = state[:, 0:1], state[:, 1:2], state[:, 2:3]
    pos = 0
    for t, n in enumerate(active):
        s = slice(pos, pos + n)
        e1 = pp[:n] + offsets
        q = np.maximum(e1, targets[s])
        np.exp(np.subtract(e1, q, out=e1), out=e1)
        e2 = np.subtract(targets[s], q)
        np.exp(e2, out=e2)
        num = e1 * aa[:n]
        num += e2 * values[s]
        den = e1 * bb[:n]
        den += e2
        np.divide(num[:, 0], den[:, 0], out=y[s])
        aa, bb, pp = num[:, 1:2], den[:, 1:2], q[:, 1:2]
        done = active[t + 1] if t + 1 < len(active) else 0
        if done < n:  # streams that end at this step keep their state
            state[done:n] = np.concatenate((aa[done:], bb[done:], pp[done:]), axis=1)
        pos += n


def _wkv_loop_torch(k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor, active: list[int]) -> Tensor:
    """The same loop in torch, one :func:`wkv_step` per time step (devices without CUDA kernels)."""
    y = torch.empty_like(k)
    pos = 0
    for n in active:
        s = slice(pos, pos + n)
        st = state[:n]
        y[s], st[:, 0], st[:, 1], st[:, 2] = wkv_step(k[s], v[s], w, u, st[:, 0], st[:, 1], st[:, 2])
        pos += n
    return y
