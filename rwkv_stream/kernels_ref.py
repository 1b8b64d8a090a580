"""Plain torch reference implementations of the CUDA kernels in ``cuda/*.cu`` (CPU-runnable).

Every function here has the same signature and semantics as its counterpart in :mod:`rwkv_stream.gpu`,
so tests can compare the two and :class:`rwkv_stream.gpu.CudaGraphStepper` can run on either (pass this
module as ``ops``). All math is fp32; results are cast to the output dtype at the end.

State arena (shared with the CPU engine): ``pool_data`` is fp32 ``[capacity, n_layer, 5, C]`` with rows
``[att_x, aa, bb, pp, ffn_x]`` per layer. ``slots`` are int32 row indices into the arena; a negative
slot is a stateless row (padding): it starts from the initial state and nothing is written back.
``offsets`` ([B + 1], int32) splits a flat ``[N, C]`` batch into streams: stream ``b`` owns tokens
``offsets[b] .. offsets[b + 1] - 1``; ``offsets=None`` means one token per stream (N == B).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .state import ROWS
from .wkv import EMPTY_PP, wkv_output, wkv_update

ATT_X, AA, BB, PP, FFN_X = (ROWS.index(name) for name in ("att_x", "aa", "bb", "pp", "ffn_x"))
LN_EPS = 1e-5
HALF_MAX = 65504.0


def reset_slots(pool_data: torch.Tensor, slots: torch.Tensor | Sequence[int]) -> None:
    """Put the given slots into the initial state (aa = bb = 0, pp = EMPTY_PP, previous-token rows 0)."""
    idx = torch.as_tensor(slots, dtype=torch.long, device=pool_data.device)
    pool_data[idx] = 0.0
    pool_data[idx, :, PP] = EMPTY_PP


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 -> dtype the way the kernels do it: fp16 saturates at +-65504 (NaN stays NaN)."""
    if dtype == torch.float16:
        x = torch.where(x > HALF_MAX, HALF_MAX, torch.where(x < -HALF_MAX, -HALF_MAX, x))
    return x.to(dtype)


def _store(result: torch.Tensor, out: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    if out is None:
        return _cast(result, dtype)
    out.copy_(_cast(result, out.dtype))
    return out


def _initial_state(n: int, c: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    zeros = torch.zeros(n, c, dtype=torch.float32, device=device)
    return zeros, zeros.clone(), torch.full((n, c), EMPTY_PP, dtype=torch.float32, device=device)


def _load_state(pool_data: torch.Tensor, slots: torch.Tensor, layer: int) -> tuple[torch.Tensor, ...]:
    """(aa, bb, pp), each [B, C] fp32 copies; stateless (negative) slots get the initial state."""
    slots = slots.long()
    aa, bb, pp = _initial_state(slots.numel(), pool_data.shape[-1], pool_data.device)
    live = slots >= 0
    if bool(live.any()):
        rows = pool_data[slots[live], layer]
        aa[live], bb[live], pp[live] = rows[:, AA], rows[:, BB], rows[:, PP]
    return aa, bb, pp


def _save_state(pool_data: torch.Tensor, slots: torch.Tensor, layer: int, state: Sequence[torch.Tensor],
                keep: torch.Tensor | None = None) -> None:
    slots = slots.long()
    live = slots >= 0 if keep is None else (slots >= 0) & keep
    if not bool(live.any()):
        return
    idx = slots[live]
    for row, value in zip((AA, BB, PP), state, strict=True):
        pool_data[idx, layer, row] = value[live]


def wkv_token(aa: torch.Tensor, bb: torch.Tensor, pp: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              w: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One token of the stable recurrence (fp32 vectors); returns (wkv, aa, bb, pp).

    The equations are :mod:`rwkv_stream.wkv`'s (this only has the kernels' argument order)."""
    return (wkv_output(k, v, u, aa, bb, pp), *wkv_update(k, v, w, aa, bb, pp))


def _gate(y: torch.Tensor, r: torch.Tensor | None) -> torch.Tensor:
    return y if r is None else y * torch.sigmoid(r.float())


def wkv_step(k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor, pool_data: torch.Tensor,
             slots: torch.Tensor, layer: int, r: torch.Tensor | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """WKV for one token per stream (k, v [B, C]); updates aa/bb/pp of ``slots`` in place.

    Returns ``wkv`` (or ``sigmoid(r) * wkv`` when r is given) in k's dtype, or written into ``out``.
    """
    aa, bb, pp = _load_state(pool_data, slots, layer)
    y, aa, bb, pp = wkv_token(aa, bb, pp, k.float(), v.float(), w.float(), u.float())
    _save_state(pool_data, slots, layer, (aa, bb, pp))
    return _store(_gate(y, r), out, k.dtype)


def _offsets_list(offsets: torch.Tensor | Sequence[int]) -> list[int]:
    return [int(o) for o in (offsets.tolist() if isinstance(offsets, torch.Tensor) else offsets)]


def wkv_ragged(k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor, pool_data: torch.Tensor,
               slots: torch.Tensor, offsets: torch.Tensor | Sequence[int], layer: int,
               r: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """WKV over a ragged flat batch (k, v [N, C]); stream b owns tokens offsets[b]..offsets[b+1]-1.

    Streams are processed token by token; their final aa/bb/pp are written back (streams with no
    tokens keep their state).
    """
    offs = _offsets_list(offsets)
    n_streams = len(offs) - 1
    y = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    aa, bb, pp = _load_state(pool_data, slots, layer)
    kf, vf, wf, uf = k.float(), v.float(), w.float(), u.float()
    for b in range(n_streams):
        a, d, p = aa[b], bb[b], pp[b]  # numerator, denominator, exponent of stream b
        for t in range(offs[b], offs[b + 1]):
            y[t], a, d, p = wkv_token(a, d, p, kf[t], vf[t], wf, uf)
        aa[b], bb[b], pp[b] = a, d, p
    lengths = torch.tensor([offs[b + 1] - offs[b] for b in range(n_streams)], device=k.device)
    _save_state(pool_data, slots, layer, (aa, bb, pp), keep=lengths > 0)
    return _store(_gate(y, r), out, k.dtype)


def _stack_mixes(mixes: torch.Tensor | Sequence[torch.Tensor], c: int) -> torch.Tensor:
    if isinstance(mixes, torch.Tensor):
        return mixes.float().reshape(-1, c)
    return torch.stack([m.float().reshape(c) for m in mixes])


def _previous_rows(xa: torch.Tensor, pool_data: torch.Tensor, slots: torch.Tensor,
                   offs: list[int], layer: int, row: int) -> torch.Tensor:
    """prev[t] = xa[t-1] inside a stream, the state row for each stream's first token (0 if stateless)."""
    prev = torch.zeros(xa.shape, dtype=torch.float32, device=xa.device)
    xf = xa.float()
    for b in range(len(offs) - 1):
        t0, t1 = offs[b], offs[b + 1]
        if t1 <= t0:
            continue
        slot = int(slots[b])
        if slot >= 0:
            prev[t0] = pool_data[slot, layer, row]
            pool_data[slot, layer, row] = xf[t1 - 1]
        prev[t0 + 1:t1] = xf[t0:t1 - 1]
    return prev


def token_shift_ragged(xa: torch.Tensor, mixes: torch.Tensor | Sequence[torch.Tensor],
                       pool_data: torch.Tensor, slots: torch.Tensor,
                       offsets: torch.Tensor | Sequence[int] | None, layer: int, row: int,
                       out: torch.Tensor | None = None, token_stream: torch.Tensor | None = None) -> torch.Tensor:
    """Token-shift mixes for a ragged batch: ``out[m, t] = xa[t] * mix[m] + prev[t] * (1 - mix[m])``.

    ``mixes`` is [n_mix, C] (or a sequence of C-vectors); ``row`` is ATT_X or FFN_X. The last xa of each
    stream is written into that state row. Returns [n_mix, N, C] in xa's dtype (or fills ``out``).
    ``token_stream`` (the kernel's precomputed stream of each token) is accepted for the same signature
    and not needed here.
    """
    n, c = xa.shape
    offs = list(range(n + 1)) if offsets is None else _offsets_list(offsets)
    mix = _stack_mixes(mixes, c).to(xa.device)
    prev = _previous_rows(xa, pool_data, slots.cpu(), offs, layer, row)
    result = xa.float().unsqueeze(0) * mix[:, None] + prev.unsqueeze(0) * (1.0 - mix[:, None])
    return _store(result, out, xa.dtype)


def relu_square(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``max(x, 0)^2`` elementwise (out may be x itself)."""
    return _store(torch.relu(x.float()).square(), out, x.dtype)


def add_layernorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  delta: torch.Tensor | None = None, gate: torch.Tensor | None = None, scale: float = 1.0,
                  eps: float = LN_EPS, out: torch.Tensor | None = None,
                  out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Residual update then layer norm, per row of the fp32 residual stream ``x`` [N, C] (in place):

    ``x = (x + sigmoid(gate) * delta) * scale`` (no gate: ``x + delta``; no delta: ``x * scale``), and
    returns ``layer_norm(x) * weight + bias`` in ``out_dtype`` (default: delta's dtype, else fp32).
    """
    xn = x.float()
    if delta is not None:
        d = delta.float()
        xn = xn + (d if gate is None else d * torch.sigmoid(gate.float()))
    if scale != 1.0:
        xn = xn * scale
    x.copy_(xn)
    y = F.layer_norm(xn, (xn.shape[-1],), weight.float(), bias.float(), eps)
    dtype = out_dtype or (delta.dtype if delta is not None else torch.float32)
    return _store(y, out, dtype)


# ---------------------------------------------------------------------------------------------------
# A whole-model reference forward (fp32, plain and sequential) for engine tests.


def _layer_norm(x: torch.Tensor, weights: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weights[f"{name}.weight"].float(),
                        weights[f"{name}.bias"].float(), LN_EPS)


def _mix(x: torch.Tensor, prev: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    m = mix.float().reshape(-1)
    return x * m + prev * (1.0 - m)


def _time_mixing(x: torch.Tensor, st: torch.Tensor, wt: dict[str, torch.Tensor], p: str) -> torch.Tensor:
    """One token of attention for one stream; st is that stream's layer state [5, C] (updated)."""
    xa = _layer_norm(x, wt, f"{p}.ln1")
    prev, st[ATT_X] = st[ATT_X].clone(), xa

    def lin(name: str, inp: torch.Tensor) -> torch.Tensor:
        return inp @ wt[f"{p}.att.{name}.weight"].float().T

    k = lin("key", _mix(xa, prev, wt[f"{p}.att.time_mix_k"]))
    v = lin("value", _mix(xa, prev, wt[f"{p}.att.time_mix_v"]))
    r = lin("receptance", _mix(xa, prev, wt[f"{p}.att.time_mix_r"]))
    w = -torch.exp(wt[f"{p}.att.time_decay"].float())
    y, st[AA], st[BB], st[PP] = wkv_token(st[AA], st[BB], st[PP], k, v, w, wt[f"{p}.att.time_first"].float())
    return lin("output", torch.sigmoid(r) * y)


def _channel_mixing(x: torch.Tensor, st: torch.Tensor, wt: dict[str, torch.Tensor], p: str) -> torch.Tensor:
    xf = _layer_norm(x, wt, f"{p}.ln2")
    prev, st[FFN_X] = st[FFN_X].clone(), xf
    k = _mix(xf, prev, wt[f"{p}.ffn.time_mix_k"]) @ wt[f"{p}.ffn.key.weight"].float().T
    r = _mix(xf, prev, wt[f"{p}.ffn.time_mix_r"]) @ wt[f"{p}.ffn.receptance.weight"].float().T
    return torch.sigmoid(r) * (torch.relu(k).square() @ wt[f"{p}.ffn.value.weight"].float().T)


def forward_token(weights: dict[str, torch.Tensor], n_layer: int, token: int,
                  state: torch.Tensor) -> torch.Tensor:
    """Logits (fp32 [V]) for one token of one stream; ``state`` is that stream's [n_layer, 5, C] (updated)."""
    x = _layer_norm(weights["emb.weight"][token].float(), weights, "blocks.0.ln0")
    for i in range(n_layer):
        x = x + _time_mixing(x, state[i], weights, f"blocks.{i}")
        x = x + _channel_mixing(x, state[i], weights, f"blocks.{i}")
    return _layer_norm(x, weights, "ln_out") @ weights["head.weight"].float().T


def reference_forward(weights: dict[str, torch.Tensor], n_layer: int, tokens: torch.Tensor,
                      offsets: Sequence[int] | torch.Tensor, slots: Sequence[int] | torch.Tensor,
                      pool_data: torch.Tensor) -> torch.Tensor:
    """Logits (fp32 [N, V]) for a ragged batch, one token at a time per stream, updating ``pool_data``."""
    weights = {name: t.detach().float().cpu() for name, t in weights.items()}
    offs = _offsets_list(offsets)
    toks = [int(t) for t in torch.as_tensor(tokens).tolist()]
    slot_list = [int(s) for s in torch.as_tensor(slots).tolist()]
    rows = [torch.empty(0)] * len(toks)
    for b, slot in enumerate(slot_list):
        state = pool_data[slot].float().cpu()
        for t in range(offs[b], offs[b + 1]):
            rows[t] = forward_token(weights, n_layer, toks[t], state)
        pool_data[slot] = state.to(pool_data.device)
    return torch.stack(rows) if rows else torch.empty(0)
