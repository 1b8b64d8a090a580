"""RWKV-7 (x070) engine: family detection in both formats, the trained tiny fixture, chunked vs sequential
forms, family-shaped states and their bytes, batched ragged steps (batch-invariant), refusals."""

from __future__ import annotations

import json
import random
from pathlib import Path

import msgpack
import pytest
import torch

from rwkv_stream import CheckpointError, State, StateError, load
from rwkv_stream.checkpoint import infer_config
from rwkv_stream.models import Rwkv4Model, Rwkv7Model
from rwkv_stream.models.rwkv7 import wkv7_chunk, wkv7_step
from rwkv_stream.random_checkpoint import random_tensors, rwkv7_config, save_hf, save_pth

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "rwkv-tiny"
TINY7 = FIXTURES / "tiny-rwkv-7v0-834K.pth"
CFG = rwkv7_config(3, 128, 97, rank_w=8, rank_a=12, rank_v=4, rank_g=16, ffn_dim=448)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6))


@pytest.fixture(scope="module")
def tensors():
    return random_tensors(CFG, seed=7)


@pytest.fixture(scope="module")
def pth(tmp_path_factory, tensors) -> Path:
    path = tmp_path_factory.mktemp("r7") / "r7.pth"
    save_pth(tensors, path)
    return path


@pytest.fixture(scope="module")
def model(pth) -> Rwkv7Model:
    m = load(pth)
    assert isinstance(m, Rwkv7Model)
    return m


def tokens(n: int, seed: int = 0, vocab: int = 97) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(n)]


# ------------------------------------------------------------------------------------------ loading
def test_pth_and_hf_directory_load_as_the_same_rwkv7_model(tmp_path, tensors, model):
    assert model.family == "rwkv7" and model.config == CFG
    assert model.config.to_dict()["family"] == "rwkv7" and model.config.version == 7
    hf = load(save_hf(tensors, CFG, tmp_path / "hf"))
    assert isinstance(hf, Rwkv7Model) and hf.fingerprint == model.fingerprint
    ids = tokens(20)
    assert torch.equal(hf.forward(ids)[0], model.forward(ids)[0])
    sharded = load(save_hf(tensors, CFG, tmp_path / "sharded", shards=3))
    assert sharded.fingerprint == model.fingerprint


def test_fused_lerps_and_unused_layer0_value_lora_are_accepted(tmp_path, tensors, model):
    raw = {k: v for k, v in tensors.items() if ".att.x_" not in k}
    for i in range(CFG.n_layer):  # rwkv.cpp's fused [6, 1, C]
        raw[f"blocks.{i}.att.x_rwkvag"] = torch.stack([tensors[f"blocks.{i}.att.x_{m}"] for m in "rwkvag"])[:, None]
    raw["blocks.0.att.v0"] = torch.zeros(1, 1, CFG.n_embd)  # converters may carry layer 0's unused v-LoRA
    raw["blocks.0.att.v1"] = torch.zeros(CFG.n_embd, CFG.rank_v)
    raw["blocks.0.att.v2"] = torch.zeros(CFG.rank_v, CFG.n_embd)
    torch.save(raw, tmp_path / "fused.pth")
    again = load(tmp_path / "fused.pth")
    assert again.fingerprint == model.fingerprint


@pytest.mark.parametrize("extra,match", [("blocks.1.ffn.s_emb.weight", "DeepEmbed"),
                                         ("blocks.1.att.mystery", "unexpected tensor 'blocks.1.att.mystery'")])
def test_variants_and_unknown_tensors_are_refused(tmp_path, tensors, extra, match):
    torch.save({**tensors, extra: torch.zeros(4)}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=match):
        load(tmp_path / "bad.pth")


def test_a_missing_or_misshapen_tensor_is_named(tmp_path, tensors):
    torch.save({k: v for k, v in tensors.items() if k != "blocks.2.att.a2"}, tmp_path / "m.pth")
    with pytest.raises(CheckpointError, match="blocks.2.att.a2"):
        load(tmp_path / "m.pth")
    torch.save({**tensors, "blocks.1.att.key.weight": torch.zeros(128, 64)}, tmp_path / "s.pth")
    with pytest.raises(CheckpointError, match=r"blocks.1.att.key.weight.*\[128, 64\].*\[128, 128\]"):
        load(tmp_path / "s.pth")


def test_hf_config_saying_rwkv7_over_rwkv4_tensors_is_refused(tmp_path, tiny_tensors):
    from conftest import TINY

    directory = save_hf(tiny_tensors, TINY, tmp_path / "hf4")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "model_type": "rwkv7"}))
    with pytest.raises(CheckpointError, match="model_type 'rwkv7'"):
        load(directory)


# ------------------------------------------------------------------------------------------ trained fixture
@pytest.fixture(scope="module")
def tiny7():
    if not TINY7.exists():
        pytest.skip(f"fixture missing: {TINY7}")
    return load(TINY7), json.loads(TINY7.with_suffix(".expected.json").read_text())


def test_trained_tiny_rwkv7_reproduces_the_expected_logits(tiny7):
    model, want = tiny7
    assert model.config.n_layer == 12 and model.config.n_head == 1 and model.config.head_size == 64
    seq = want["sequence"]
    logits, state = model.forward(seq["tokens"])
    first = torch.tensor(seq["logits_first_steps"])
    assert rel(logits[:16], first) < 1e-5
    assert rel(logits[-1], torch.tensor(seq["logits_last_step"])) < 1e-5
    assert logits.argmax(-1).tolist() == seq["argmax_per_step"]
    assert abs(float(logits.double().sum()) - seq["sum_all"]) < 1e-5 * abs(seq["sum_all"])
    # one token at a time
    st = None
    for i, tok in enumerate(seq["tokens"][:16]):
        one, st = model.forward([tok], st)
        assert rel(one[0], first[i]) < 1e-5
    # rwkv.cpp's own test: after '"in' the summed difference is within its tolerance
    cpp = want["rwkv_cpp_test"]
    out, _ = model.forward(cpp["tokens"])
    diff = float((out[-1] - torch.tensor(cpp["rwkv_cpp_expected_logits"])).sum())
    assert abs(diff) <= cpp["rwkv_cpp_tolerance_on_sum"]
    # greedy continuation from the state
    got, last = [], logits[-1]
    for _ in range(len(want["greedy_continuation"]["tokens"])):
        got.append(int(last.argmax()))
        nxt, state = model.forward([got[-1]], state)
        last = nxt[-1]
    assert got == want["greedy_continuation"]["tokens"]


# ------------------------------------------------------------------------------------------ chunked form
@pytest.mark.parametrize("chunk_len", [1, 7, 32, 64])
@pytest.mark.parametrize("decay_bias", [-6.0, 0.0, 6.0])
def test_chunked_wkv_equals_token_by_token(chunk_len, decay_bias):
    gen = torch.Generator().manual_seed(chunk_len)
    h, n = 2, 64

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    log_decay = -torch.exp(torch.tensor(-0.5)) * torch.sigmoid(r(chunk_len, h, n) + decay_bias)
    rr, k, v = r(chunk_len, h, n), r(chunk_len, h, n), r(chunk_len, h, n)
    kk = torch.nn.functional.normalize(r(chunk_len, h, n), dim=-1)
    iclr = torch.sigmoid(r(chunk_len, h, n))
    s0 = r(h, n, n)
    s_seq, s_chunk = s0.clone().unsqueeze(0), s0.clone()
    ys = [wkv7_step(s_seq, rr[t : t + 1], log_decay[t : t + 1].exp(), k[t : t + 1], v[t : t + 1],
                    -kk[t : t + 1], (kk * iclr)[t : t + 1]) for t in range(chunk_len)]
    y = wkv7_chunk(s_chunk, rr, log_decay, k, v, -kk, kk * iclr)
    assert rel(y, torch.cat(ys)) < 2e-6
    assert rel(s_chunk, s_seq[0]) < 2e-6


def test_chunked_prefill_equals_sequential_model_forward(model):
    ids = tokens(150, seed=3)
    chunked, st_c = model.forward(ids)
    pool = model.new_pool(1)
    slot = pool.alloc()
    out = model.step(pool, [slot], [ids], batch_invariant=True)  # always token by token
    assert out.logits is not None
    assert rel(chunked, out.logits[0]) < 1e-5
    assert rel(st_c.tensor, pool.read(slot).tensor) < 1e-5


# ------------------------------------------------------------------------------------------ state
def test_state_layout_bytes_and_family(model):
    c, h, n = CFG.n_embd, CFG.n_head, CFG.head_size
    empty = model.new_state()
    assert empty.family == "rwkv7" and tuple(empty.tensor.shape) == (CFG.n_layer, 2 * c + h * n * n)
    assert not empty.tensor.any() and empty.nbytes == CFG.state_floats * 4 == model.state_bytes
    _, st = model.forward(tokens(9))
    st.meta["offset"] = 9
    back = State.from_bytes(st.to_bytes(), expected_fingerprint=model.fingerprint)
    assert back.family == "rwkv7" and back.meta == {"offset": 9} and torch.equal(back.tensor, st.tensor)
    a, sa = model.forward(tokens(5, 1), st)
    b, sb = model.forward(tokens(5, 1), back)
    assert torch.equal(a, b) and torch.equal(sa.tensor, sb.tensor)
    back.reset()
    assert back.n_tokens == 0 and torch.equal(back.tensor, empty.tensor)


def test_a_state_of_the_other_family_is_refused_clearly(model, tiny_pth):
    rwkv4 = load(tiny_pth)
    assert isinstance(rwkv4, Rwkv4Model)
    with pytest.raises(StateError, match="rwkv4 state.*this model is rwkv7"):
        model.forward([1], rwkv4.new_state())
    with pytest.raises(StateError, match="rwkv7 state.*this model is rwkv4"):
        rwkv4.forward([1], model.new_state())
    data = model.forward([1, 2])[1].to_bytes()
    with pytest.raises(StateError, match=r"\(rwkv7\), expected model"):
        State.from_bytes(data, expected_fingerprint=rwkv4.fingerprint)
    pool = rwkv4.new_pool(1)
    with pytest.raises(StateError, match="rwkv7 state, pool is for an rwkv4"):
        pool.alloc(model.new_state())


def test_version1_rwkv4_state_bytes_still_load(tiny_pth):
    """Bytes written before states carried a family (format 1) read back as RWKV-4 states."""
    from rwkv_stream.state import STATE_MAGIC, _checksum

    rwkv4 = load(tiny_pth)
    _, st = rwkv4.forward([3, 4, 5])
    data = st.tensor.numpy().astype("<f4").tobytes()
    header = {"magic": STATE_MAGIC, "version": 1, "fingerprint": rwkv4.fingerprint, "n_tokens": 3,
              "shape": list(st.tensor.shape), "meta": {}}
    old = msgpack.packb({**header, "data": data, "checksum": _checksum(header, data)}, use_bin_type=True)
    back = State.from_bytes(old, expected_fingerprint=rwkv4.fingerprint)
    assert back.family == "rwkv4" and torch.equal(back.tensor, st.tensor)
    assert torch.equal(rwkv4.forward([6], back)[0], rwkv4.forward([6], st)[0])


# ------------------------------------------------------------------------------------------ batched steps
def test_ragged_batched_steps_equal_each_stream_alone(model):
    rng = random.Random(11)
    streams = {s: tokens(rng.randrange(1, 40), seed=s) for s in range(6)}
    want = {s: model.forward(ids)[0] for s, ids in streams.items()}
    for invariant in (False, True):
        pool = model.new_pool(2)  # grows
        slots = {s: pool.alloc() for s in streams}
        got: dict[int, list[torch.Tensor]] = {s: [] for s in streams}
        pos = dict.fromkeys(streams, 0)
        while any(pos[s] < len(streams[s]) for s in streams):
            batch = [s for s in streams if pos[s] < len(streams[s]) and rng.random() < 0.7]
            take = {s: streams[s][pos[s] : pos[s] + rng.choice([1, 1, 2, 5, 12])] for s in batch}
            out = model.step(pool, [slots[s] for s in batch], [take[s] for s in batch], batch_invariant=invariant)
            assert out.logits is not None
            for s, lg in zip(batch, out.logits, strict=True):
                got[s].append(lg)
                pos[s] += len(take[s])
        for s in streams:
            assert rel(torch.cat(got[s]), want[s]) < 1e-5, (s, invariant)


def test_batch_invariant_steps_are_bit_identical_whatever_the_batch_mates_and_splits(model):
    ids = tokens(23, seed=5)

    def run(splits: list[int], mates: int) -> torch.Tensor:
        pool = model.new_pool(4)
        me = pool.alloc()
        others = [pool.alloc() for _ in range(mates)]
        rows, at = [], 0
        for n in splits:
            mate_tokens = [tokens(1 + (j + at) % 4, seed=at + j) for j in range(mates)]
            out = model.step(pool, [me, *others], [ids[at : at + n], *mate_tokens], batch_invariant=True)
            assert out.logits is not None
            rows.append(out.logits[0])
            at += n
        return torch.cat(rows)

    want = run([23], 0)
    for splits, mates in (([1] * 23, 3), ([5, 1, 9, 8], 1), ([12, 11], 5)):
        assert torch.equal(run(splits, mates), want), (splits, mates)


@pytest.mark.parametrize("dtype,tol", [("bfloat16", 0.1), ("float16", 0.05), ("int8", 0.1), ("w8a8", 0.2)])
def test_other_weight_formats_run_close_to_fp32(pth, model, dtype, tol):
    ids = tokens(30, seed=9)
    want = model.forward(ids)[0]
    other = load(pth, dtype=dtype)
    assert other.fingerprint == model.fingerprint
    assert rel(other.forward(ids)[0], want) < tol


def test_config_is_read_from_the_tensors(tensors):
    cfg = infer_config(tensors)
    assert cfg == CFG and cfg.n_head == 2 and cfg.state_shape == (3, 2 * 128 + 2 * 64 * 64)


def test_an_rwkv7_checkpoint_round_trips_through_a_bundle(tmp_path):
    from rwkv_stream.loading import load_source, save_bundle

    cfg = rwkv7_config(2, 64, 65536, rank_w=8, rank_a=8, rank_v=8, rank_g=8)
    save_pth(random_tensors(cfg, seed=4, dtype=torch.bfloat16), tmp_path / "w.pth")  # bf16, as released
    loaded = load_source(tmp_path / "w.pth", tokenizer="world")
    assert isinstance(loaded.model, Rwkv7Model) and loaded.model.config == cfg
    again = load_source(save_bundle(loaded, tmp_path / "b"))
    assert isinstance(again.model, Rwkv7Model) and again.model.fingerprint == loaded.model.fingerprint
    ids = loaded.need_tokenizer().encode("a bundle of RWKV-7")
    assert torch.equal(again.model.forward(ids)[0], loaded.model.forward(ids)[0])
