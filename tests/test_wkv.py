"""The engine's CPU WKV loop (NumPy, time-major) against the token-by-token torch recurrence it rearranges."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rwkv_stream import wkv

C = 24


def inputs(lengths: list[int], seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    k = torch.randn(n, C, generator=gen) * 3
    v = torch.randn(n, C, generator=gen)
    w = -torch.rand(C, generator=gen) * 2
    u = torch.randn(C, generator=gen)
    abp = torch.randn(len(lengths), 3, C, generator=gen)
    abp[:, 1] = abp[:, 1].abs() + 0.1  # the denominator of a real state is positive
    abp[:, 2] *= 5
    starts = torch.tensor([sum(lengths[:b]) for b in range(len(lengths))], dtype=torch.long)
    return k, v, w, u, abp, starts


def token_by_token(k, v, w, u, abp, starts, lengths):
    out = torch.empty_like(k)
    for b, n in enumerate(lengths):
        aa, bb, pp = abp[b : b + 1].unbind(1)
        for t in range(int(starts[b]), int(starts[b]) + n):
            out[t : t + 1], aa, bb, pp = wkv.wkv_step(k[t : t + 1], v[t : t + 1], w, u, aa, bb, pp)
        abp[b] = torch.cat((aa, bb, pp))
    return out


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 9), min_size=1, max_size=6), st.integers(0, 2**16))
def test_cpu_loop_matches_the_token_by_token_recurrence(lengths, seed):
    k, v, w, u, abp, starts = inputs(lengths, seed)
    want_state = abp.clone()
    want = token_by_token(k, v, w, u, want_state, starts, lengths)
    got = wkv.wkv_ragged(k, v, w, u, abp, starts, lengths)
    # NumPy's float32 exp is within ~2 ulp, torch's within 1: the two differ in the last bits only
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(abp, want_state, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("lengths", [[3, 0, 5], [1, 1], [7]])
def test_torch_loop_is_the_recurrence_bit_for_bit(lengths):
    k, v, w, u, abp, starts = inputs(lengths, 1)
    want_state = abp.clone()
    want = token_by_token(k, v, w, u, want_state, starts, lengths)
    tm = wkv.TimeMajor.of(starts, lengths)
    state = abp[tm.order]
    y = wkv._wkv_loop_torch(k[tm.rows], v[tm.rows], w, u, state, tm.active)
    assert torch.equal(y, want[tm.rows])
    assert torch.equal(state, want_state[tm.order])


def test_a_stream_gets_the_same_bits_whatever_shares_its_batch():
    lengths = [6, 2, 9, 1]
    k, v, w, u, abp, starts = inputs(lengths, 2)
    together = abp.clone()
    out = wkv.wkv_ragged(k, v, w, u, together, starts, lengths)
    alone = abp[:1].clone()
    mine = wkv.wkv_ragged(k[:6], v[:6], w, u, alone, starts[:1], lengths[:1])
    assert torch.equal(out[:6], mine)
    assert torch.equal(together[0], alone[0])


def test_time_major_layout():
    tm = wkv.TimeMajor.of(torch.tensor([0, 2, 2]), [2, 0, 3])
    assert tm.order.tolist() == [2, 0, 1]
    assert tm.active == [2, 2, 1]
    assert tm.rows.tolist() == [2, 0, 3, 1, 4]  # t=0: streams 2, 0; t=1: 2, 0; t=2: 2
    assert not tm.in_order
    assert wkv.TimeMajor.of(torch.tensor([0]), [4]).in_order  # one stream
    assert wkv.TimeMajor.of(torch.tensor([0, 1, 2]), [1, 1, 1]).in_order  # one token each


@pytest.mark.parametrize("lengths", [[1, 1, 1], [5]], ids=["one-token-each", "one-stream"])
def test_in_order_steps_write_through_a_strided_state_view(lengths):
    """The engine passes ``states[:, 1:4]`` of its ``[B, 5, C]`` work tensor; steps already in time-major order
    (one token per stream, or a single stream) update it in place."""
    k, v, w, u, abp, starts = inputs(lengths, 3)
    work = torch.randn(len(lengths), 5, C)
    work[:, 1:4] = abp
    before = work.clone()
    want_state = abp.clone()
    want = token_by_token(k, v, w, u, want_state, starts, lengths)
    got = wkv.wkv_ragged(k, v, w, u, work[:, 1:4], starts, lengths)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(work[:, 1:4], want_state, rtol=1e-4, atol=1e-5)
    assert torch.equal(work[:, 0], before[:, 0]) and torch.equal(work[:, 4], before[:, 4])
