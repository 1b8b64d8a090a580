"""The compiled RWKV-7 CPU layer (rwkv_stream.cpu_kernels_rwkv7) for float16 / bfloat16 / q8_0: against fp32
with the same weights and against the torch path of the same format, on random x070 checkpoints of several
shapes and on the trained tiny fixture; bit-exact batch and split invariance (steps, forward, sessions with
eviction); the torch fallback (switch, env var, shapes the kernels don't take).

Tolerances (max |logit error| / max |logit|):

- kernel vs an fp32 torch model holding the kernel model's own rounded weights (the same fp16 / bf16 values,
  the q8_0 weights dequantized): both compute in fp32 from the same numbers, so 16-bit formats agree to fp32
  rounding (measured 1e-6, bound 2e-5); q8_0 also rounds each product's activations to int16 per block of 32
  (relative error 1/65534 of the block's largest), measured 0.6-3e-4 through these random models, bound 1e-3.
  This is the precise check of the C code: a wrong equation changes logits by 1e-2 to 1.
- kernel vs the torch path of the same format: the torch path also rounds the activations to fp16 / bf16 before
  each product (the kernel keeps them fp32), so the two differ by about the format's own error: the bound is
  twice the torch path's distance from fp32 plus 1e-3, and the kernel must not be further from fp32 than
  1.5x the torch path plus 1e-3.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import NON_NATIVE_BUILDS, kernels_built_for

from rwkv_stream import cpu_kernels, cpu_kernels_rwkv7, load
from rwkv_stream.linear import KernelLinear, Q8Linear
from rwkv_stream.models import Rwkv7Model
from rwkv_stream.random_checkpoint import random_tensors, rwkv7_config
from rwkv_stream.sessions import Fragment, MemoryStore, SessionTable
from rwkv_stream.state import State

pytestmark = pytest.mark.usefixtures("one_torch_thread")
needs_kernels = pytest.mark.skipif(cpu_kernels_rwkv7.load() is None, reason="no C compiler: kernels not built")

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "rwkv-tiny"
TINY7 = FIXTURES / "tiny-rwkv-7v0-834K.pth"
FORMATS = ("float16", "bfloat16", "q8_0")
SAME_WEIGHTS_TOL = {"float16": 2e-5, "bfloat16": 2e-5, "q8_0": 1e-3}
SHAPES = {  # name: L, C, vocab, head size, ffn, ranks w/a/v/g
    "C64N64": (2, 64, 97, 64, 256, (8, 8, 4, 16)),
    "C128N32": (3, 128, 131, 32, 448, (16, 12, 8, 24)),
    "C96N24": (2, 96, 50, 24, 352, (8, 8, 4, 16)),  # head size not a multiple of 16: the scalar head code
    "C160N16": (2, 160, 70, 16, 640, (8, 8, 8, 40)),
    "C256N128": (1, 256, 64, 128, 1024, (32, 32, 32, 32)),
}


def config_of(name: str):
    n_layer, n_embd, vocab, head, ffn, (rw, ra, rv, rg) = SHAPES[name]
    return rwkv7_config(n_layer, n_embd, vocab, head_size=head, ffn_dim=ffn, rank_w=rw, rank_a=ra, rank_v=rv,
                        rank_g=rg)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def tokens(n: int, vocab: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(n)]


def dense_weight(lin) -> torch.Tensor:
    """The fp32 matrix a kernel-packed linear computes with."""
    if isinstance(lin, Q8Linear):
        q, s = lin.unpacked()
        out, n_in = q.shape
        return (q.float().view(out, n_in // 32, 32) * s.unsqueeze(-1)).view(out, n_in).contiguous()
    return lin.weight.float().contiguous()


def same_weights_fp32(model: Rwkv7Model, tensors, cfg) -> Rwkv7Model:
    """An fp32 torch-path model computing with ``model``'s rounded weights."""
    ref = Rwkv7Model(tensors, cfg, "cpu", "float32")
    ref.emb = model.emb.float()
    for ours, theirs in zip([*model.linears(), model.head_linear], [*ref.linears(), ref.head_linear], strict=True):
        theirs.weight = dense_weight(ours)  # type: ignore[union-attr]
    return ref


def torch_path(tensors, cfg, fmt: str) -> Rwkv7Model:
    with cpu_kernels.disabled():
        model = Rwkv7Model(tensors, cfg, "cpu", fmt)
    assert model._lib is None
    return model


@pytest.fixture(scope="module")
def random_models():
    cache: dict = {}

    def get(name: str, fmt: str):
        if (name, fmt) not in cache:
            cfg = config_of(name)
            tensors = random_tensors(cfg, seed=3)
            cache[name, fmt] = (Rwkv7Model(tensors, cfg, "cpu", fmt), tensors, cfg)
        return cache[name, fmt]

    return get


# ------------------------------------------------------------------------------------------ accuracy
@needs_kernels
@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("fmt", FORMATS)
def test_kernel_layer_matches_fp32_with_the_same_weights_and_the_torch_path(random_models, name, fmt):
    model, tensors, cfg = random_models(name, fmt)
    assert model._lib is not None and all(isinstance(m, KernelLinear) for m in model.linears())
    ids = tokens(24, cfg.vocab_size, seed=1)
    got, state = model.forward(ids)
    want, want_state = same_weights_fp32(model, tensors, cfg).forward(ids)
    assert rel(got, want) < SAME_WEIGHTS_TOL[fmt]
    assert rel(state.tensor, want_state.tensor) < 50 * SAME_WEIGHTS_TOL[fmt]
    fp32, _ = Rwkv7Model(tensors, cfg, "cpu", "float32").forward(ids)
    other, _ = torch_path(tensors, cfg, fmt).forward(ids)
    torch_err = rel(other, fp32)
    assert rel(got, other) < 2 * torch_err + 1e-3
    assert rel(got, fp32) < 1.5 * torch_err + 1e-3


@needs_kernels
@pytest.mark.parametrize("fmt", FORMATS)
def test_trained_tiny_model_on_the_kernels(fmt):
    if not TINY7.exists():
        pytest.skip(f"fixture missing: {TINY7}")
    want = json.loads(TINY7.with_suffix(".expected.json").read_text())["sequence"]
    model = load(TINY7, dtype=fmt)
    assert isinstance(model, Rwkv7Model) and model._lib is not None
    with cpu_kernels.disabled():
        other = load(TINY7, dtype=fmt)
    logits, _ = model.forward(want["tokens"])
    ref = torch.tensor(want["logits_first_steps"])
    other_logits, _ = other.forward(want["tokens"])
    torch_err = rel(other_logits[:16], ref)
    assert rel(logits[:16], ref) < 1.5 * torch_err + 1e-3  # the fp32 oracle (rwkv package)
    assert rel(logits, other_logits) < 2 * torch_err + 1e-3
    assert rel(logits[-1], torch.tensor(want["logits_last_step"])) < {"float16": 5e-3}.get(fmt, 3e-2)
    # greedy choices of a trained model survive the format
    agree = (logits.argmax(-1) == torch.tensor(want["argmax_per_step"])).float().mean()
    assert agree > 0.9
    tensors = torch.load(TINY7)
    from rwkv_stream.checkpoint import infer_config

    cfg = infer_config(tensors)
    exact, _ = same_weights_fp32(model, {k: v.float() for k, v in tensors.items()}, cfg).forward(want["tokens"])
    assert rel(logits, exact) < SAME_WEIGHTS_TOL[fmt]


# ------------------------------------------------------------------------------------------ bits
@needs_kernels
@pytest.mark.parametrize("fmt", ["float16", "q8_0"])
@pytest.mark.parametrize("name", ["C128N32", "C96N24"])
@pytest.mark.parametrize("in_place", [False, True])
def test_a_stream_gets_the_same_bits_alone_or_with_any_batch_mates(random_models, fmt, name, in_place):
    model, _, cfg = random_models(name, fmt)
    model.cpu_steps_in_place = in_place
    rng = random.Random(5)
    mine = [tokens(n, cfg.vocab_size, seed=10 + n) for n in (3, 1, 4, 2)]
    pool = model.new_pool(8)
    slot = pool.alloc()
    alone = [model.step(pool, [slot], [chunk]).logits[0] for chunk in mine]  # type: ignore[index]
    alone_state = pool.read(slot).tensor.clone()
    assert model._steps_arena_in_place(pool) == in_place
    state = None  # forward() runs on a copy of the state (step() in place on the pool's arena with in_place)
    for chunk, want in zip(mine, alone, strict=True):
        out, state = model.forward(chunk, state)
        assert torch.equal(out, want)
    assert state is not None and torch.equal(state.tensor, alone_state)
    for mates in (1, 2, 5):
        for invariant in (False, True):
            pool = model.new_pool(8)
            slots = [pool.alloc() for _ in range(mates + 1)]
            got = []
            for chunk in mine:
                batch = [chunk] + [tokens(rng.randrange(0, 5), cfg.vocab_size, rng.randrange(99)) for _ in slots[1:]]
                where = rng.randrange(len(slots))  # our stream anywhere in the batch
                order = list(range(len(slots)))
                order[0], order[where] = order[where], order[0]
                out = model.step(pool, [slots[i] for i in order], [batch[i] for i in order],
                                 batch_invariant=invariant)
                got.append(out.logits[order.index(0)])  # type: ignore[index]
            for a, b in zip(got, alone, strict=True):
                assert torch.equal(a, b)
            assert torch.equal(pool.read(slots[0]).tensor, alone_state)


@needs_kernels
@pytest.mark.parametrize("fmt", FORMATS)
def test_whole_token_by_token_and_any_split_give_the_same_bits(random_models, fmt):
    model, _, cfg = random_models("C64N64", fmt)
    ids = tokens(40, cfg.vocab_size, seed=2)
    whole, whole_state = model.forward(ids)
    rng = random.Random(fmt)
    for splits in ([1] * 40, [7, 1, 13, 19], [20, 20], [3, 30, 7]):
        state: State | None = None
        rows, pos = [], 0
        for n in splits:
            out, state = model.forward(ids[pos : pos + n], state)
            if rng.random() < 0.5:  # through the state's bytes
                assert state is not None
                state = State.from_bytes(state.to_bytes())
            rows.append(out)
            pos += n
        assert state is not None
        assert torch.equal(torch.cat(rows), whole)
        assert torch.equal(state.tensor, whole_state.tensor)


@needs_kernels
@pytest.mark.parametrize("fmt", ["float16", "q8_0"])
def test_the_thread_count_does_not_change_the_bits(random_models, fmt):
    model, _, cfg = random_models("C128N32", fmt)
    ids = tokens(9, cfg.vocab_size, seed=8)
    one, one_state = model.forward(ids)
    before = torch.get_num_threads()
    torch.set_num_threads(3)  # products dealt to threads in other chunks, heads to other threads
    try:
        three, three_state = model.forward(ids)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, three) and torch.equal(one_state.tensor, three_state.tensor)


@needs_kernels
@pytest.mark.parametrize(("fmt", "in_place"), [("bfloat16", False), ("q8_0", False), ("q8_0", True)])
def test_sessions_with_eviction_give_each_stream_its_bits_alone(fmt, in_place):
    from rwkv_stream.tokenizer import load_tokenizer

    tok = load_tokenizer("world")
    cfg = rwkv7_config(2, 64, tok.vocab_size, rank_w=8, rank_a=8, rank_v=4, rank_g=16)
    model = Rwkv7Model(random_tensors(cfg, seed=21), cfg, "cpu", fmt)
    assert model._lib is not None
    model.cpu_steps_in_place = in_place
    rng = random.Random(fmt)
    words = ["so", "the", "meeting", "is", "on", "monday", "café", "🙂", "and", "then", "we", "vote", "10:30"]
    pieces: dict[str, list[str]] = {}
    for i in range(6):
        text = " ".join(rng.choice(words) for _ in range(rng.randrange(2, 25)))
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, 3)))
        pieces[f"s{i}"] = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    order = [key for key, ps in pieces.items() for _ in ps]
    rng.shuffle(order)  # streams interleaved, each stream's pieces in order
    nxt = dict.fromkeys(pieces, 0)
    frags = []
    for key in order:
        frags.append((key, pieces[key][nxt[key]]))
        nxt[key] += 1

    def hidden_of(results, into: dict) -> None:
        for r in results:
            if r.hidden is not None and len(r.hidden):
                into.setdefault(r.key, []).append(r.hidden)

    alone, want = SessionTable(model, tok), {}
    for key, ps in pieces.items():
        for p in ps:
            hidden_of(alone.feed([Fragment(key, p)]), want)
    table, got = SessionTable(model, tok, max_streams=2, store=MemoryStore()), {}
    for at in range(0, len(frags), 4):
        hidden_of(table.feed([Fragment(k, p) for k, p in frags[at : at + 4]]), got)
    assert table.evictions > 0
    for key in pieces:
        assert torch.equal(torch.cat(got[key]), torch.cat(want[key])), key
        assert table.export(key) == alone.export(key), key  # state and last hidden vector, bit for bit


# ------------------------------------------------------------------------------------------ fallback
def test_shapes_the_kernels_do_not_take_run_the_torch_path():
    cfg = rwkv7_config(2, 80, 60, head_size=16, ffn_dim=320)  # C not a multiple of 32
    tensors = random_tensors(cfg, seed=4)
    model = Rwkv7Model(tensors, cfg, "cpu", "float16")
    assert model._lib is None
    ids = tokens(12, 60)
    got, _ = model.forward(ids)
    fp32, _ = Rwkv7Model(tensors, cfg, "cpu", "float32").forward(ids)
    assert rel(got, fp32) < 2e-2


@needs_kernels
def test_the_switch_and_the_env_var_give_the_torch_path(monkeypatch):
    cfg = config_of("C64N64")
    tensors = random_tensors(cfg, seed=3)
    ids = tokens(10, cfg.vocab_size)
    with cpu_kernels.disabled():
        assert cpu_kernels_rwkv7.load() is None
        off = Rwkv7Model(tensors, cfg, "cpu", "float16")
        assert off._lib is None
        assert not any(isinstance(m, KernelLinear) for m in off.linears())
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    cpu_kernels.reset()
    try:
        env_off = Rwkv7Model(tensors, cfg, "cpu", "float16")
        assert env_off._lib is None
    finally:
        monkeypatch.delenv(cpu_kernels.ENV_SWITCH)
        cpu_kernels.reset()
    assert torch.equal(env_off.forward(ids)[0], off.forward(ids)[0])  # the same torch path
    on = Rwkv7Model(tensors, cfg, "cpu", "float16")
    assert on._lib is not None
    assert not torch.equal(on.forward(ids)[0], off.forward(ids)[0])
    assert Rwkv7Model(tensors, cfg, "cpu", "float32")._lib is None  # float32 stays on torch (MKL)


@needs_kernels
@NON_NATIVE_BUILDS
@pytest.mark.parametrize("shape", ["C64N64", "C96N24"])
def test_builds_without_avx512_or_any_vector_code_agree_with_the_native_one(monkeypatch, tmp_path, march, shape):
    """CPUs without AVX-512 (the AVX2 code) or without AVX2 (plain C: products, per-head work and exp all
    scalar) run the same layer: close to the native build (other exp and summation code, so not bitwise) and
    still batch-invariant bit for bit within the build."""
    cfg = config_of(shape)
    tensors = random_tensors(cfg, seed=11)
    ids = tokens(9, cfg.vocab_size, seed=4)
    native = {fmt: Rwkv7Model(tensors, cfg, "cpu", fmt).forward(ids)[0] for fmt in ("float16", "q8_0")}
    with kernels_built_for(monkeypatch, tmp_path, march, cpu_kernels_rwkv7.reset):
        for fmt, want in native.items():
            model = Rwkv7Model(tensors, cfg, "cpu", fmt)
            assert model._lib is not None and str(tmp_path) in model._lib._name
            got, _ = model.forward(ids)
            assert rel(got, want) < 2e-4, (fmt, rel(got, want))
            pool = model.new_pool(4)
            alone, mates = pool.alloc(), [pool.alloc(), pool.alloc()]
            solo = model.step(pool, [alone], [ids[:4]]).logits
            shared = model.step(pool, [mates[0], mates[1]], [ids[5:], ids[:4]]).logits
            assert torch.equal(solo[0], shared[1])
            # one token from a state into a fresh one (forward; the vector builds store it non-temporally) is the
            # in-place step's token
            _, state = model.forward(ids[:4], model.new_state())
            one, state = model.forward(ids[4:5], state)
            assert torch.equal(one[0], model.step(pool, [alone], [ids[4:5]]).logits[0].reshape(one[0].shape))
            assert torch.equal(state.tensor.reshape(pool.data[alone].shape), pool.data[alone])


@needs_kernels
@pytest.mark.parametrize("fmt", ["float16", "q8_0"])
def test_reading_one_state_buffer_and_writing_another_equals_updating_in_place(random_models, fmt):
    """``run_layers(..., source=...)`` (what ``forward`` runs: no copy of the states first) gives the bits of the
    in-place update of a copy, leaves ``source`` as it was, and carries over a stream with no tokens. A stream of
    one token takes the non-temporal stores of its new state (vector builds, aligned states)."""
    model, _, cfg = random_models("C128N32", fmt)
    lengths = [2, 0, 3, 1]
    pool = model.new_pool(4)
    slots = [pool.alloc() for _ in lengths]
    model.step(pool, slots, [tokens(4, cfg.vocab_size, seed=20 + i) for i in range(len(lengths))])  # non-trivial
    source = pool.data[: len(lengths)].clone()
    before = source.clone()
    ids = torch.tensor(tokens(sum(lengths), cfg.vocab_size, seed=30))
    x_in = model.emb[ids].float().contiguous()
    in_place, x_a = source.clone(), x_in.clone()
    args = (lengths, model._fused_layers, model.n_head, model.head_size, cfg.ffn_dim, model.gn_eps)
    cpu_kernels_rwkv7.run_layers(model._lib, x_a, in_place, *args)
    out, x_b = torch.full_like(source, float("nan")), x_in.clone()
    cpu_kernels_rwkv7.run_layers(model._lib, x_b, out, *args, source=source)
    assert torch.equal(source, before)
    assert torch.equal(out, in_place) and torch.equal(x_b, x_a)
    assert torch.equal(out[1], before[1])  # the stream without tokens: its state copied over

    state = model.new_state()
    _, state = model.forward(tokens(5, cfg.vocab_size, seed=31), state)
    kept = state.tensor.clone()
    model.forward(tokens(3, cfg.vocab_size, seed=32), state)
    assert torch.equal(state.tensor, kept)  # forward leaves its input state alone
