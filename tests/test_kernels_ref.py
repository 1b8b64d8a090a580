"""CPU checks of the kernel references (rwkv_stream.kernels_ref) and of the GPU stepper's pipeline.

The references must agree with a plain, unstabilized float64 recurrence run token by token, for ragged
batches (empty streams, stateless padding rows, chunking). The whole-model reference agrees with HF
transformers, and CudaGraphStepper run with the reference ops on the CPU agrees with the whole-model
reference, so on a GPU only the kernels and graphs remain to be checked.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY

from rwkv_stream import kernels_ref as ref
from rwkv_stream.gpu import CudaGraphStepper
from rwkv_stream.models import rwkv4
from rwkv_stream.models.rwkv4 import Rwkv4Model
from rwkv_stream.wkv import EMPTY_PP

C = 24


def random_pool(capacity: int, n_layer: int, c: int, gen: torch.Generator) -> torch.Tensor:
    """A state arena with realistic non-empty states (pp in a log range, aa/bb consistent with it)."""
    pool = torch.randn(capacity, n_layer, 5, c, generator=gen)
    pool[:, :, ref.BB] = torch.rand(capacity, n_layer, c, generator=gen) * 3 + 0.1
    pool[:, :, ref.AA] = pool[:, :, ref.BB] * torch.randn(capacity, n_layer, c, generator=gen)
    pool[:, :, ref.PP] = torch.randn(capacity, n_layer, c, generator=gen) * 2
    return pool


def wkv_inputs(n: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    k = torch.randn(n, C, generator=gen) * 2
    v = torch.randn(n, C, generator=gen)
    w = -torch.exp(torch.rand(C, generator=gen) * 6 - 4)
    u = torch.randn(C, generator=gen)
    return k, v, w, u


def naive_wkv(k, v, w, u, state, lengths):
    """Unstabilized float64 recurrence: true numerator/denominator, one token at a time per stream."""
    k, v, w, u = (t.double() for t in (k, v, w, u))
    out, finals, t = torch.zeros_like(k), [], 0
    for b, n in enumerate(lengths):
        aa, bb, pp = (state[b, r].double() for r in (ref.AA, ref.BB, ref.PP))
        num, den = aa * torch.exp(pp), bb * torch.exp(pp)
        for _ in range(n):
            e = torch.exp(u + k[t])
            out[t] = (num + e * v[t]) / (den + e)
            num = torch.exp(w) * num + torch.exp(k[t]) * v[t]
            den = torch.exp(w) * den + torch.exp(k[t])
            t += 1
        finals.append((num, den))
    return out, finals


def offsets_of(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize("lengths", [[1, 1, 1], [5, 0, 3, 1], [7], [0, 2, 9, 4]])
def test_wkv_ragged_matches_naive_recurrence(lengths):
    gen = torch.Generator().manual_seed(sum(lengths))
    k, v, w, u = wkv_inputs(sum(lengths), gen)
    pool = random_pool(6, 2, C, gen)
    slots = torch.tensor([4, 0, 5, 2][: len(lengths)], dtype=torch.int32)
    before = pool.clone()
    y = ref.wkv_ragged(k, v, w, u, pool, slots, offsets_of(lengths), layer=1)
    expected, finals = naive_wkv(k, v, w, u, before[slots.long(), 1], lengths)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-6)
    for b, (num, den) in enumerate(finals):
        st = pool[int(slots[b]), 1]
        torch.testing.assert_close((st[ref.AA].double() * torch.exp(st[ref.PP].double())), num, rtol=1e-4,
                                   atol=1e-6)
        torch.testing.assert_close((st[ref.BB].double() * torch.exp(st[ref.PP].double())), den, rtol=1e-4,
                                   atol=1e-6)
    stepped = {int(s) for s, n in zip(slots.tolist(), lengths, strict=False) if n > 0}
    for s in range(6):
        assert torch.equal(pool[s], before[s]) != (s in stepped), f"slot {s}"
    assert torch.equal(pool[:, 0], before[:, 0])  # other layers untouched


def test_wkv_from_empty_state_and_stateless_rows():
    gen = torch.Generator().manual_seed(3)
    k, v, w, u = wkv_inputs(4, gen)
    pool = random_pool(3, 1, C, gen)
    ref.reset_slots(pool, [1])
    before = pool.clone()
    y = ref.wkv_ragged(k, v, w, u, pool, torch.tensor([1, -1], dtype=torch.int32), [0, 2, 4], layer=0)
    empty = torch.zeros(2, 5, C)
    empty[:, ref.PP] = EMPTY_PP
    expected, _ = naive_wkv(k, v, w, u, empty, [2, 2])
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(pool[0], before[0]) and torch.equal(pool[2], before[2])  # slot -1 wrote nothing
    assert not torch.equal(pool[1], before[1])


def test_wkv_chunking_and_step_agree():
    gen = torch.Generator().manual_seed(4)
    k, v, w, u = wkv_inputs(6, gen)
    pool = random_pool(2, 1, C, gen)
    one = pool.clone()
    slots = torch.tensor([1], dtype=torch.int32)
    full = ref.wkv_ragged(k, v, w, u, one, slots, [0, 6], 0)
    rows = [ref.wkv_ragged(k[:4], v[:4], w, u, pool, slots, [0, 4], 0)]
    rows += [ref.wkv_step(k[t:t + 1], v[t:t + 1], w, u, pool, slots, 0) for t in (4, 5)]
    torch.testing.assert_close(torch.cat(rows), full, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(pool, one, rtol=1e-6, atol=1e-7)


def test_wkv_matches_engine_reference():
    from rwkv_stream import wkv

    gen = torch.Generator().manual_seed(5)
    lengths = [3, 1, 4]
    k, v, w, u = wkv_inputs(8, gen)
    pool = random_pool(3, 1, C, gen)
    abp = pool[[2, 0, 1], 0, 1:4].clone()
    theirs = wkv.wkv_ragged(k, v, w, u, abp, torch.tensor([0, 3, 4]), lengths)
    ours = ref.wkv_ragged(k, v, w, u, pool, torch.tensor([2, 0, 1], dtype=torch.int32), offsets_of(lengths), 0)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(pool[[2, 0, 1], 0, 1:4], abp, rtol=1e-6, atol=1e-7)


def test_wkv_gate_and_dtypes():
    gen = torch.Generator().manual_seed(6)
    k, v, w, u = wkv_inputs(3, gen)
    r = torch.randn(3, C, generator=gen)
    pool = random_pool(3, 1, C, gen)
    plain = ref.wkv_step(k, v, w, u, pool.clone(), torch.arange(3, dtype=torch.int32), 0)
    gated = ref.wkv_step(k, v, w, u, pool.clone(), torch.arange(3, dtype=torch.int32), 0, r=r)
    torch.testing.assert_close(gated, plain * torch.sigmoid(r))
    half = ref.wkv_step(k.half(), v.half(), w, u, pool.clone(), torch.arange(3, dtype=torch.int32), 0)
    assert half.dtype == torch.float16
    out = torch.empty(3, C)
    ref.wkv_step(k.half(), v.half(), w, u, pool.clone(), torch.arange(3, dtype=torch.int32), 0, out=out)
    torch.testing.assert_close(out, half.float(), rtol=1e-3, atol=1e-3)


def naive_token_shift(xa, mixes, state_rows, lengths):
    prev_rows, t = [], 0
    for b, n in enumerate(lengths):
        prev = state_rows[b]
        for _ in range(n):
            prev_rows.append(prev)
            prev = xa[t]
            t += 1
    prev = torch.stack(prev_rows)
    return torch.stack([xa * m + prev * (1 - m) for m in mixes])


@pytest.mark.parametrize("lengths", [[1, 1, 1, 1], [3, 0, 1, 5], [6]])
def test_token_shift_ragged_matches_naive(lengths):
    gen = torch.Generator().manual_seed(len(lengths))
    n = sum(lengths)
    xa = torch.randn(n, C, generator=gen)
    mixes = torch.rand(3, C, generator=gen)
    pool = random_pool(5, 2, C, gen)
    slots = torch.tensor([3, 1, 4, 0][: len(lengths)], dtype=torch.int32)
    before = pool.clone()
    out = ref.token_shift_ragged(xa, mixes, pool, slots, offsets_of(lengths), 1, ref.FFN_X)
    expected = naive_token_shift(xa, mixes, before[slots.long(), 1, ref.FFN_X], lengths)
    torch.testing.assert_close(out, expected)
    ends = offsets_of(lengths)[1:] - 1
    for b, s in enumerate(slots.tolist()):
        want = xa[int(ends[b])] if lengths[b] else before[s, 1, ref.FFN_X]
        assert torch.equal(pool[s, 1, ref.FFN_X], want)
    assert torch.equal(pool[:, :, :ref.FFN_X], before[:, :, :ref.FFN_X])


def test_token_shift_one_token_per_stream_and_padding():
    gen = torch.Generator().manual_seed(9)
    xa = torch.randn(3, C, generator=gen)
    mixes = torch.rand(2, C, generator=gen)
    pool = random_pool(2, 1, C, gen)
    before = pool.clone()
    slots = torch.tensor([1, -1, 0], dtype=torch.int32)
    out = ref.token_shift_ragged(xa.bfloat16(), mixes, pool, slots, None, 0, ref.ATT_X)
    rows = torch.stack([before[1, 0, 0], torch.zeros(C), before[0, 0, 0]])
    expected = naive_token_shift(xa.bfloat16().float(), mixes, rows, [1, 1, 1])
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)
    assert torch.equal(pool[1, 0, 0], xa[0].bfloat16().float())


def test_add_layernorm_and_relu_square():
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(4, C, generator=gen)
    delta, gate = torch.randn(4, C, generator=gen), torch.randn(4, C, generator=gen)
    wt, bias = torch.randn(C, generator=gen), torch.randn(C, generator=gen)
    x0 = x.clone()
    y = ref.add_layernorm(x, wt, bias, delta=delta, gate=gate, scale=0.5)
    want_x = (x0 + torch.sigmoid(gate) * delta) * 0.5
    torch.testing.assert_close(x, want_x)
    torch.testing.assert_close(y, F.layer_norm(want_x, (C,), wt, bias, 1e-5))
    big = torch.tensor([[-3.0, 0.5, 300.0]], dtype=torch.float16)
    assert ref.relu_square(big).tolist() == [[0.0, 0.25, 65504.0]]  # saturates instead of inf


# ---------------------------------------------------------------------------------------------------
# Whole model: the reference forward vs HF, and the stepper pipeline (reference ops, CPU) vs the reference.

TOKENS = [3, 17, 42, 5, 96, 0, 11, 64, 23, 8, 77, 31]


def fresh_pool(capacity: int) -> torch.Tensor:
    pool = torch.empty(capacity, TINY.n_layer, 5, TINY.n_embd)
    ref.reset_slots(pool, range(capacity))
    return pool


def test_reference_forward_matches_transformers(tiny_tensors, tiny_hf):
    transformers = pytest.importorskip("transformers")
    model = transformers.RwkvForCausalLM.from_pretrained(tiny_hf).eval()
    with torch.no_grad():
        theirs = model(torch.tensor([TOKENS])).logits[0]
    pool = fresh_pool(3)
    chunks = [TOKENS[:5], TOKENS[5:6], TOKENS[6:]]
    rows = [ref.reference_forward(tiny_tensors, TINY.n_layer, c, [0, len(c)], [2], pool) for c in chunks]
    ours = torch.cat(rows)
    err = (ours - theirs).abs().max() / theirs.abs().max()
    assert err < 1e-5, f"relative error {err:.2e}"


def _streams() -> list[list[int]]:
    return [TOKENS[:7], TOKENS[3:], [5, 9], TOKENS[::-1]]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
def test_stepper_pipeline_on_cpu_matches_reference(tiny_tensors, dtype, tol):
    """forward (ragged chunks) then step (one token per stream, shuffled slots) vs the reference."""
    weights = {k: v.to(dtype) for k, v in tiny_tensors.items()}
    pool, expected_pool = fresh_pool(6), fresh_pool(6)
    stepper = CudaGraphStepper(Rwkv4Model(weights, TINY, dtype=dtype), pool, ops=ref)
    streams, slots = _streams(), [4, 0, 5, 2]
    prefix = [s[:-2] for s in streams]
    offs = offsets_of([len(p) for p in prefix])
    flat = [t for p in prefix for t in p]
    got = stepper.forward(flat, offs, slots, last_only=False).float()
    want = ref.reference_forward(weights, TINY.n_layer, flat, offs, slots, expected_pool)
    assert (got - want).abs().max() / want.abs().max() < tol
    for j in (-2, -1):
        order = [2, 0, 3, 1]
        toks = [streams[b][j] for b in order]
        got = stepper.step(toks, [slots[b] for b in order]).float()
        want = ref.reference_forward(weights, TINY.n_layer, toks, list(range(5)), [slots[b] for b in order],
                                     expected_pool)
        assert (got - want).abs().max() / want.abs().max() < tol
    assert (pool - expected_pool).abs().max() < tol * 100


def test_stepper_fp16_rescaling_matches_reference(tiny_tensors, monkeypatch):
    """fp16 weights with the residual halved every layer (the model's rescaling every 1 layer) still match
    fp32 logits."""
    weights = {k: v.half() for k, v in tiny_tensors.items()}
    try:
        F.linear(torch.ones(1, 2, dtype=torch.float16), torch.ones(2, 2, dtype=torch.float16))
    except RuntimeError:
        pytest.skip("no fp16 matmul on this CPU build")
    pool, expected_pool = fresh_pool(2), fresh_pool(2)
    monkeypatch.setattr(rwkv4, "FP16_RESCALE_EVERY", 1)
    stepper = CudaGraphStepper(Rwkv4Model(weights, TINY, dtype=torch.float16), pool, ops=ref)
    assert [layer.scale for layer in stepper.w.layers] == [0.5] * TINY.n_layer
    got = stepper.forward(TOKENS, [0, len(TOKENS)], [1], last_only=False).float()
    want = ref.reference_forward(weights, TINY.n_layer, TOKENS, [0, len(TOKENS)], [1], expected_pool)
    assert (got - want).abs().max() / want.abs().max() < 2e-2
