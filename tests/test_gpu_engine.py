"""CudaGraphStepper (kernels + cuBLAS + CUDA graphs, on a Model's own weights) against the plain reference.

Runs on the GPU (marked ``gpu``; CUDA graphs on) and on the CPU kernel emulator from
``test_gpu_kernels`` (no graphs), across chunking, batch composition, bucket padding and graph replays.
The reference is ``kernels_ref.reference_forward`` in fp32 on the CPU, with the same (cast) weights.
"""

from __future__ import annotations

import pytest
import torch
from test_gpu_kernels import device, emulated, emulator_lib  # noqa: F401  (fixtures)

from rwkv_stream import ModelConfig
from rwkv_stream import kernels_ref as ref
from rwkv_stream.gpu import CudaGraphStepper
from rwkv_stream.models import rwkv4
from rwkv_stream.random_checkpoint import random_tensors

CFG = ModelConfig(n_layer=3, n_embd=160, vocab_size=101, ffn_dim=4 * 160)
TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}
STREAMS = [[3, 17, 42, 5, 96, 0, 11, 64], [23, 8, 77], [31, 2, 2, 9, 50, 61], [7] * 10, [100, 1]]


@pytest.fixture(scope="module")
def tensors() -> dict[str, torch.Tensor]:
    return random_tensors(CFG, seed=4)


def new_pool(capacity: int, dev: torch.device) -> torch.Tensor:
    pool = torch.empty(capacity, CFG.n_layer, 5, CFG.n_embd, device=dev)
    ref.reset_slots(pool, range(capacity))
    return pool


class Pair:
    """The stepper and the reference, fed the same requests; every result is compared."""

    def __init__(self, tensors, dtype: torch.dtype, dev: torch.device, capacity: int = 12, **kw) -> None:
        self.weights = {k: v.to(dtype) for k, v in tensors.items()}
        self.model = rwkv4.Rwkv4Model(self.weights, CFG, device=dev, dtype=dtype)
        self.pool, self.ref_pool = new_pool(capacity, dev), new_pool(capacity, torch.device("cpu"))
        self.stepper = CudaGraphStepper(self.model, self.pool, **kw)
        self.tol = TOL[dtype]

    def check(self, got: torch.Tensor, want: torch.Tensor, what: str) -> None:
        got = got.float().cpu()
        assert got.shape == want.shape and torch.isfinite(got).all(), what
        err = float((got - want).abs().max() / want.abs().max())
        assert err < self.tol, f"{what}: relative error {err:.2e}"

    def forward(self, chunks: list[list[int]], slots: list[int]) -> None:
        offs = [0]
        for c in chunks:
            offs.append(offs[-1] + len(c))
        flat = [t for c in chunks for t in c]
        got = self.stepper.forward(flat, offs, slots, last_only=False)
        want = ref.reference_forward(self.weights, CFG.n_layer, flat, offs, slots, self.ref_pool)
        self.check(got, want, f"forward {[len(c) for c in chunks]}")

    def step(self, tokens: list[int], slots: list[int]) -> None:
        got = self.stepper.step(tokens, slots)
        want = ref.reference_forward(self.weights, CFG.n_layer, tokens, list(range(len(tokens) + 1)), slots,
                                     self.ref_pool)
        self.check(got, want, f"step x{len(tokens)}")

    def check_states(self) -> None:
        got, want = self.pool.cpu(), self.ref_pool
        empty = want[:, :, ref.PP] <= -1e29
        assert torch.equal(got[:, :, ref.PP][empty], want[:, :, ref.PP][empty])
        got, want = got.clone(), want.clone()
        got[:, :, ref.PP][empty] = 0.0
        want[:, :, ref.PP][empty] = 0.0
        for row in range(5):
            a, b = got[:, :, row], want[:, :, row]
            err = float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))
            assert err < self.tol * 10, f"state row {row}: relative error {err:.2e}"


@pytest.mark.parametrize("dtype,rescale", [(torch.float32, 0), (torch.float16, 1), (torch.bfloat16, 0)],
                         ids=["fp32", "fp16-rescaled", "bf16"])
def test_chunks_and_steps_match_reference(device, tensors, dtype, rescale, monkeypatch):  # noqa: F811
    """fp16 runs with the residual halved after every block (the model's weights pre-divided, as deep
    models have it every 6 blocks)."""
    if rescale:
        monkeypatch.setattr(rwkv4, "FP16_RESCALE_EVERY", rescale)
    if device.type == "cpu":  # the model as on CUDA: no fused CPU kernels (which keep fp16 unrescaled)
        monkeypatch.setattr(rwkv4, "FUSED_FORMATS", ())
    pair = Pair(tensors, dtype, device, buckets=(1, 2, 4))
    assert [lay.scale for lay in pair.stepper.w.layers] == ([0.5] * 3 if rescale else [1.0] * 3)
    slots = [7, 0, 11, 3, 5]
    pair.forward([s[:3] for s in STREAMS], slots)                  # prefill, ragged
    pair.forward([STREAMS[0][3:5], [], STREAMS[3][3:9]], [7, 11, 3])  # an empty stream
    for j in range(5):                                             # changing batch compositions
        batch = [b for b in range(len(STREAMS)) if (b + j) % 3 != 0] or [0]
        toks = [STREAMS[b][(j + 5) % len(STREAMS[b])] for b in batch]
        pair.step(toks, [slots[b] for b in batch])
    pair.step([1, 2, 3, 4, 5], slots)                              # > largest bucket: split in two
    pair.check_states()


def test_padding_and_capture_leave_other_slots_alone(device, tensors):  # noqa: F811
    pair = Pair(tensors, torch.float32, device, buckets=(4, 8))
    pair.forward([STREAMS[0], STREAMS[1]], [2, 9])
    before = pair.pool.clone()
    pair.stepper.capture()                                         # warm-up and capture use slot -1
    assert torch.equal(pair.pool, before)
    pair.step([5, 6, 7], [9, 4, 2])                                # bucket 4: one padding row
    changed = (pair.pool != before).flatten(1).any(1).nonzero().flatten().tolist()
    assert changed == [2, 4, 9]
    pair.check_states()


def test_graph_replays_match_eager(device, tensors):  # noqa: F811
    if device.type != "cuda":
        pytest.skip("graphs need CUDA")
    graphs = Pair(tensors, torch.bfloat16, device, use_graphs=True)
    eager = Pair(tensors, torch.bfloat16, device, use_graphs=False)
    for j in range(6):
        toks, slots = [(7 * j + b) % CFG.vocab_size for b in range(3 + j)], list(range(3 + j))
        a, b = graphs.stepper.step(toks, slots), eager.stepper.step(toks, slots)
        assert torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-2 * float(b.abs().max()))
    torch.testing.assert_close(graphs.pool, eager.pool, rtol=1e-2, atol=1e-2)


def test_slots_are_checked_at_the_stepper_boundary(device, tensors):  # noqa: F811
    """A slot twice in one batch (a race in the kernels), out of range or negative is refused before any
    launch, and the arena is left untouched."""
    pair = Pair(tensors, torch.float32, device, capacity=6, buckets=(4,))
    before = pair.pool.clone()
    bad = {"twice": [1, 3, 1], "out of range": [0, 6, 2], "out of range ": [0, -1, 2]}
    for what, slots in bad.items():
        with pytest.raises(ValueError, match=what.strip()):
            pair.stepper.step([5, 6, 7], slots)
        with pytest.raises(ValueError, match=what.strip()):
            pair.stepper.forward([5, 6, 7, 8], [0, 1, 3, 4], slots)
    with pytest.raises(ValueError, match="one slot per stream"):
        pair.stepper.step([5, 6, 7], [0, 1])
    assert torch.equal(pair.pool, before)
    pair.step([5, 6, 7], [5, 0, 2])  # distinct, in range: runs and matches the reference
    pair.check_states()


def test_stepper_uses_the_models_weights_in_place(device, tensors):  # noqa: F811
    """One set of weights: every matrix the stepper multiplies by is the model's tensor itself."""
    pair = Pair(tensors, torch.bfloat16, device)
    model, w = pair.model, pair.stepper.w
    assert w.emb is model.emb and w.head is model.head_linear.weight
    for mine, theirs in zip(w.layers, model.layers, strict=True):
        assert mine.att_kvr[0] is theirs.att_key.weight and mine.ffn_val is theirs.ffn_value.weight
        assert mine.att_mix.data_ptr() == theirs.att_mix.data_ptr() and mine.att_w is theirs.w
    with pytest.raises(ValueError, match="growable"):
        CudaGraphStepper(model, model.new_pool(4))
    with pytest.raises(ValueError, match="float32/float16/bfloat16"):
        CudaGraphStepper(rwkv4.Rwkv4Model(tensors, CFG, dtype="int8"), new_pool(2, torch.device("cpu")))


def test_a_bare_cuda_device_is_resolved_to_its_index(monkeypatch: pytest.MonkeyPatch) -> None:
    """``device="cuda"`` names the current GPU: models and pools store ``cuda:<index>`` so that their checks
    ``pool.data.device == model.device`` hold (torch.device("cuda") != torch.device("cuda:0")). On the first GPU
    run the bare name made RWKV-7 step a gathered copy instead of the arena and the graph stepper refuse the pool."""
    from rwkv_stream.config import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert resolve_device("cuda") == torch.device("cuda", 3)
    assert resolve_device(torch.device("cuda")) == torch.device("cuda", 3)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")
