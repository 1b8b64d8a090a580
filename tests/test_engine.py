"""Engine invariants: sequence == one-token == any chunking, batch invariance, hidden access, dtypes."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY
from hypothesis import given, settings
from hypothesis import strategies as st

from rwkv_stream import StateError, load

TEXT = [(7 * i + 3) % TINY.vocab_size for i in range(40)]


@pytest.fixture(scope="module")
def model(tiny_pth):
    return load(tiny_pth)


def run_chunks(model, tokens, cuts):
    state, rows = None, []
    bounds = [0, *sorted(set(cuts)), len(tokens)]
    for a, b in zip(bounds, bounds[1:], strict=False):
        if b > a:
            logits, state = model.forward(tokens[a:b], state)
            rows.append(logits)
    return torch.cat(rows), state


def test_one_token_mode_equals_sequence_mode(model):
    whole, whole_state = model.forward(TEXT)
    stepped, state = run_chunks(model, TEXT, range(1, len(TEXT)))
    torch.testing.assert_close(stepped, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state.tensor, whole_state.tensor, rtol=1e-5, atol=1e-5)
    assert state.n_tokens == whole_state.n_tokens == len(TEXT)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(TEXT) - 1), max_size=12))
def test_any_chunking_gives_the_same_logits(model, cuts):
    whole, _ = model.forward(TEXT)
    chunked, _ = run_chunks(model, TEXT, cuts)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)


def test_forward_does_not_mutate_the_input_state(model):
    _, state = model.forward(TEXT[:5])
    before = state.tensor.clone()
    model.forward(TEXT[5:9], state)
    assert torch.equal(state.tensor, before) and state.n_tokens == 5


def test_hidden_without_head(model):
    logits, _ = model.forward(TEXT[:9])
    hidden, _ = model.forward_hidden(TEXT[:9])
    assert hidden.shape == (9, TINY.n_embd)
    torch.testing.assert_close(model.head(hidden), logits)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=6), min_size=1, max_size=6),
    st.integers(min_value=0, max_value=5),
)
def test_stream_result_does_not_depend_on_batch_mates(model, lengths, target):
    """Ragged batch: each stream's logits equal running it alone, whoever shares the batch."""
    target %= len(lengths)
    pool = model.new_pool(2)
    slots = [pool.alloc() for _ in lengths]
    prefixes = [TEXT[i : i + 3] for i in range(len(lengths))]
    model.step(pool, slots, prefixes)
    news = [TEXT[10 + i : 10 + i + n] for i, n in enumerate(lengths)]
    out = model.step(pool, slots, news)
    for i, slot in enumerate(slots):
        alone_logits, alone_state = model.forward(news[i], model.forward(prefixes[i])[1])
        assert out.logits[i].shape == (lengths[i], TINY.vocab_size)
        torch.testing.assert_close(out.logits[i], alone_logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pool.read(slot).tensor, alone_state.tensor, rtol=1e-5, atol=1e-5)
        assert pool.n_tokens[slot] == 3 + lengths[i]


def test_step_logits_modes(model):
    pool = model.new_pool(4)
    a, b = pool.alloc(), pool.alloc()
    last = model.step(pool, [a, b], [TEXT[:4], TEXT[4:6]], logits="last")
    assert [t.shape[0] for t in last.logits] == [1, 1]
    none = model.step(pool, [a], [TEXT[6:8]], logits="none")
    assert none.logits is None and none.hidden[0].shape == (2, TINY.n_embd)


def test_step_rejects_a_slot_twice_and_dead_slots(model):
    pool = model.new_pool(2)
    a = pool.alloc()
    with pytest.raises(ValueError, match="twice"):
        model.step(pool, [a, a], [[1], [2]])
    pool.free(a)
    with pytest.raises(KeyError, match="not a live stream"):
        model.step(pool, [a], [[1]])


def test_bad_token_ids_name_the_value(model):
    """Lists and tuples of ints are checked in Python, anything else (tensors, nested lists) by torch: the
    same message, the same ids."""
    for bad in ([1, 97], (1, 97), torch.tensor([1, 97]), [[1], [97]]):
        with pytest.raises(ValueError, match="token id 97 out of range"):
            model.forward(bad)
    with pytest.raises(ValueError, match="token id -1 out of range"):
        model.forward([3, -1, 97])
    ids = [1, 5, 2]
    want = model.forward(torch.tensor(ids))[0]
    for same in (ids, tuple(ids), [torch.tensor(1), 5, 2]):
        assert torch.equal(model.forward(same)[0], want)


def test_state_of_another_model_is_refused(model, tmp_path):
    from rwkv_stream.random_checkpoint import random_tensors, save_pth

    save_pth(random_tensors(TINY, seed=2), tmp_path / "other.pth")
    other = load(tmp_path / "other.pth")
    with pytest.raises(StateError, match="made by model"):
        other.forward([1], model.forward([1])[1])


@pytest.mark.parametrize("dtype,tol", [("bfloat16", 0.05), ("float16", 0.01), ("int8", 0.05), ("w8a8", 0.05)])
def test_half_precision_weights_stay_close_to_fp32(tiny_pth, dtype, tol):
    """Stated tolerance, max |Δlogit| / max |logit| (3-layer model): bf16, int8, w8a8 ≤ 5e-2; fp16 ≤ 1e-2."""
    ref, ref_state = load(tiny_pth).forward(TEXT)
    half = load(tiny_pth, dtype=dtype)
    logits, state = half.forward(TEXT)
    assert logits.dtype == torch.float32 and state.tensor.dtype == torch.float32
    err = (logits - ref).abs().max() / ref.abs().max()
    assert err < tol, f"{dtype}: relative error {err:.3e}"
    assert half.fingerprint == load(tiny_pth).fingerprint


def test_w8a8_stream_is_bitwise_independent_of_batch_mates(tiny_pth):
    """w8a8 quantizes each activation row on its own and sums integers exactly: no rounding depends on batch mates."""
    model = load(tiny_pth, dtype="w8a8")
    pool = model.new_pool(4)
    alone, crowd = pool.alloc(), [pool.alloc() for _ in range(3)]
    solo = model.step(pool, [alone], [TEXT[:5]])
    shared = model.step(pool, [crowd[0], crowd[1], crowd[2]], [TEXT[20:27], TEXT[:5], [3]])
    assert torch.equal(solo.logits[0], shared.logits[1])
    assert torch.equal(pool.read(alone).tensor, pool.read(crowd[1]).tensor)


@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "int8", "w8a8"])
@pytest.mark.parametrize("mates", [[], [[5]], [[7, 8, 9], [1, 2]], [[4]] * 20, [list(range(30))]])
def test_batch_invariant_steps_are_bit_identical_whoever_shares_them(tiny_pth, one_torch_thread, fmt, mates):
    model = load(tiny_pth, dtype=fmt)
    assert model.invariant_rows is not None
    pool = model.new_pool(32)
    mine, *others = [pool.alloc() for _ in range(1 + len(mates))]
    solo = model.new_pool(2)
    alone = solo.alloc()
    for chunk in (TEXT[:6], TEXT[6:7], TEXT[7:10]):  # a ragged step, a one-token step, another ragged one
        shared = model.step(pool, [mine, *others], [chunk, *mates], batch_invariant=True)
        single = model.step(solo, [alone], [chunk], batch_invariant=True)
        assert torch.equal(shared.hidden[0], single.hidden[0])
        assert torch.equal(shared.logits[0], single.logits[0])
        assert torch.equal(pool.read(mine).tensor, solo.read(alone).tensor)


def test_invariance_probe_finds_the_row_count_a_kernel_needs():
    from rwkv_stream.linear import invariant_rows, padded_call

    cpu = torch.device("cpu")

    def from_three(x):  # another "kernel" below three rows
        return x * (1.0 if len(x) >= 3 else 1.0 + 2**-20)

    assert invariant_rows(from_three, 8, "test-from-three", cpu) == 3
    assert invariant_rows(lambda x: x * len(x), 8, "test-never", cpu) is None
    assert invariant_rows(lambda x: x * 2, 8, "test-always", torch.device("cuda")) is None  # no promise on GPUs
    x = torch.randn(1, 8)
    assert torch.equal(padded_call(from_three, x, 3), x)


def test_w8a8_products_quantize_each_row_on_its_own():
    from rwkv_stream.linear import W8A8Linear

    gen = torch.Generator().manual_seed(0)
    weight, x = torch.randn(300, 200, generator=gen), torch.randn(9, 200, generator=gen)
    x[4] *= 1000  # an outlier row must not cost the other rows precision
    got, want = W8A8Linear(weight)(x), x @ weight.T
    err = (got - want).abs().amax(dim=1) / want.abs().amax(dim=1)
    assert err.max() < 0.02, err
    assert torch.equal(W8A8Linear(weight)(x[:1]), got[:1])


def test_fp16_rescaling_keeps_a_deep_model_finite(tmp_path):
    """13 layers cross two rescale points (every 6 layers); outputs must stay finite and close to fp32."""
    from rwkv_stream import ModelConfig
    from rwkv_stream.random_checkpoint import random_tensors, save_pth

    cfg = ModelConfig(n_layer=13, n_embd=32, vocab_size=97, ffn_dim=128)
    save_pth(random_tensors(cfg, seed=5), tmp_path / "deep.pth")
    ref, _ = load(tmp_path / "deep.pth").forward(TEXT[:20])
    ours, _ = load(tmp_path / "deep.pth", dtype="float16").forward(TEXT[:20])
    assert torch.isfinite(ours).all()
    assert (ours - ref).abs().max() / ref.abs().max() < 0.02


def test_pool_grows_and_forks(model):
    pool = model.new_pool(1)
    a = pool.alloc()
    model.step(pool, [a], [TEXT[:5]])
    b = pool.fork(a)  # forces growth from capacity 1
    assert pool.capacity >= 2 and pool.live == 2
    out = model.step(pool, [a, b], [TEXT[5:7], TEXT[5:7]])
    torch.testing.assert_close(out.logits[0], out.logits[1])
    pool.reset(b)
    assert pool.n_tokens[b] == 0 and torch.equal(pool.read(b).tensor, model.new_state().tensor)


def test_w8a8_warns_once_where_int8_products_are_slow(monkeypatch):
    """Where torch's int8 products have no fast path (a scalar loop on AVX2-only CPUs), building w8a8 weights
    warns once per process, naming the remedy; where they are fast it stays quiet."""
    import warnings

    from rwkv_stream import linear

    linear.warn_if_int8_products_slow.cache_clear()
    monkeypatch.setattr(linear, "int8_products_slowdown", lambda: 20.0)
    with pytest.warns(UserWarning, match="w8a8 on this CPU.*20x slower.*use q8_0"):
        linear.W8A8Linear(torch.randn(8, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        linear.W8A8Linear(torch.randn(8, 32))  # once per process
    linear.warn_if_int8_products_slow.cache_clear()
    monkeypatch.setattr(linear, "int8_products_slowdown", lambda: 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        linear.W8A8Linear(torch.randn(8, 32))
    linear.warn_if_int8_products_slow.cache_clear()  # the next w8a8 model checks this CPU again


def test_int8_products_slowdown_is_measured():
    from rwkv_stream.linear import int8_products_slowdown

    assert 0.0 < int8_products_slowdown() < 1e4
