"""The RWKV-4 WKV recurrence in plain torch: the CPU path and the reference for the CUDA kernels.

State per channel is ``(aa, bb, pp)``: the numerator and denominator of the decayed weighted average of past
values, both scaled by ``exp(-pp)`` so that nothing overflows however long the stream runs. All math is fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor

# pp of an empty state; with aa = bb = 0 its value cancels out, but every implementation uses it.
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


def wkv_ragged(
    k: Tensor, v: Tensor, w: Tensor, u: Tensor, abp: Tensor, starts: Tensor, lengths: list[int]
) -> Tensor:
    """WKV over a ragged batch: stream ``b`` owns rows ``starts[b] : starts[b] + lengths[b]`` of ``k``/``v``.

    ``abp`` is ``[B, 3, C]`` (aa, bb, pp), updated in place. Streams are ordered by decreasing length so
    the streams still active at time ``t`` are a prefix, and each step is one vector op over that prefix.
    """
    order = sorted(range(len(lengths)), key=lambda b: -lengths[b])
    idx = torch.tensor(order, dtype=torch.long, device=k.device)
    aa, bb, pp = (abp[idx, j].clone() for j in range(3))
    rows0 = starts[idx]
    sorted_lengths = [lengths[b] for b in order]
    out = torch.empty_like(k)
    active = len(order)
    for t in range(sorted_lengths[0] if order else 0):
        while sorted_lengths[active - 1] <= t:
            active -= 1
        rows = rows0[:active] + t
        kt, vt = k[rows], v[rows]
        o, a2, b2, p2 = wkv_step(kt, vt, w, u, aa[:active], bb[:active], pp[:active])
        out[rows] = o
        aa[:active], bb[:active], pp[:active] = a2, b2, p2
    abp[idx] = torch.stack((aa, bb, pp), dim=1)
    return out
