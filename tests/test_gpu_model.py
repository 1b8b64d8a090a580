"""The engine's Model on CUDA (token shift and WKV kernels over the slot arena, in place) against the CPU path.

The GPU tests are marked ``gpu`` (skipped without one). The same CUDA branch of the model also runs here on
the CPU with its kernels in the g++ emulation (``test_gpu_kernels``): everything but the GPU itself.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY
from test_gpu_kernels import emulated, emulator_lib  # noqa: F401  (fixtures)

from rwkv_stream import gpu, load
from rwkv_stream.models.rwkv4 import Rwkv4Model

on_gpu = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

TEXT = [(5 * i + 1) % 97 for i in range(48)]


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("float16", 2e-2), ("bfloat16", 5e-2)])
@on_gpu[0]
@on_gpu[1]
def test_gpu_forward_matches_cpu_across_chunks(tiny_pth, dtype, tol):
    cpu = load(tiny_pth, dtype=dtype if dtype != "float16" else "float32")
    gpu = load(tiny_pth, device="cuda", dtype=dtype)
    assert gpu._kernels is not None, "CUDA kernels did not load"
    ref, ref_state = cpu.forward(TEXT)
    state, rows = None, []
    for a, b in ((0, 7), (7, 8), (8, 30), (30, 48)):
        logits, state = gpu.forward(TEXT[a:b], state)
        rows.append(logits.cpu())
    got = torch.cat(rows)
    assert torch.isfinite(got).all()
    assert ((got - ref).abs().max() / ref.abs().max()) < tol
    assert ((state.tensor.cpu() - ref_state.tensor).abs().max() / ref_state.tensor.abs().max()) < max(tol, 1e-4)


@on_gpu[0]
@on_gpu[1]
def test_gpu_batch_mates_do_not_change_a_stream(tiny_pth):
    model = load(tiny_pth, device="cuda")
    pool = model.new_pool(8)
    slots = [pool.alloc() for _ in range(5)]
    lengths = [1, 4, 0, 7, 2]
    news = [TEXT[i : i + n] for i, n in enumerate(lengths)]
    out = model.step(pool, slots, news)
    for i, n in enumerate(lengths):
        if n:
            alone, _ = model.forward(news[i])
            torch.testing.assert_close(out.logits[i], alone, rtol=1e-5, atol=1e-5)


@on_gpu[0]
@on_gpu[1]
def test_gpu_step_updates_the_arena_in_place(tiny_pth):
    model = load(tiny_pth, device="cuda")
    pool = model.new_pool(8, growable=False)
    slots = [pool.alloc() for _ in range(3)]
    arena = pool.data.data_ptr()
    model.step(pool, slots, [[1, 2], [3], [4, 5, 6]])
    assert pool.data.data_ptr() == arena
    cpu = load(tiny_pth)
    cpu_pool = cpu.new_pool(8)
    cpu_slots = [cpu_pool.alloc() for _ in range(3)]
    cpu.step(cpu_pool, cpu_slots, [[1, 2], [3], [4, 5, 6]])
    torch.testing.assert_close(pool.data.cpu(), cpu_pool.data, rtol=1e-4, atol=1e-5)


def test_cuda_branch_steps_the_arena_in_place_emulated(emulated, tiny_tensors, monkeypatch):  # noqa: F811
    """Model.step's CUDA branch (kernels in the emulator) gives the CPU path's logits and states, reads and
    writes the arena's slots directly (the arena is never gathered into a copy nor scattered back), leaves
    other slots alone, and its forward() on a lone state agrees too."""
    cpu, kern = Rwkv4Model(tiny_tensors, TINY), Rwkv4Model(tiny_tensors, TINY)
    kern._kernels = gpu  # the CUDA branch, on the CPU through the emulated launches
    cpu_pool, pool = cpu.new_pool(6), kern.new_pool(6)
    for p in (cpu_pool, pool):
        for _ in range(6):
            p.alloc()
    assert kern._steps_arena_in_place(pool) and not cpu._steps_arena_in_place(cpu_pool)
    arena = pool.data.data_ptr()
    real_select, real_copy = torch.Tensor.index_select, torch.Tensor.index_copy_

    def no_gather(self, *args, **kw):
        assert self.data_ptr() != arena, "the arena was gathered into a copy"
        return real_select(self, *args, **kw)

    def no_scatter(self, *args, **kw):
        assert self.data_ptr() != arena, "states were scattered back into the arena"
        return real_copy(self, *args, **kw)

    monkeypatch.setattr(torch.Tensor, "index_select", no_gather)
    monkeypatch.setattr(torch.Tensor, "index_copy_", no_scatter)
    rounds = [([4, 1, 3], [[5, 6, 7], [8], [9, 10]]), ([1, 4, 0], [[11], [12], [13]]), ([3, 0], [[14, 15], []])]
    for slots, toks in rounds:
        before = pool.data.clone()
        want = cpu.step(cpu_pool, slots, toks)
        got = kern.step(pool, slots, toks)
        assert pool.data.data_ptr() == arena
        for g, w in zip(got.logits or [], want.logits or [], strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pool.data, cpu_pool.data, rtol=1e-5, atol=1e-5)
        untouched = [s for s in range(6) if s not in [sl for sl, t in zip(slots, toks, strict=True) if t]]
        assert torch.equal(pool.data[untouched], before[untouched])
    a, state_a = cpu.forward([3, 1, 4, 1, 5])
    b, state_b = kern.forward([3, 1, 4, 1, 5])
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state_b.tensor, state_a.tensor, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("float16", 2e-3)])
@on_gpu[0]
@on_gpu[1]
def test_gpu_logits_match_transformers_on_the_gpu(tiny_hf, dtype, tol):
    """Model on CUDA (kernels) against HF transformers' RwkvForCausalLM on the same GPU and checkpoint."""
    transformers = pytest.importorskip("transformers")
    torch_dtype = getattr(torch, dtype)
    hf = transformers.RwkvForCausalLM.from_pretrained(tiny_hf).to("cuda", torch_dtype).eval()
    ours = load(tiny_hf, device="cuda", dtype=dtype)
    assert ours._kernels is not None, "CUDA kernels did not load"
    with torch.no_grad():
        theirs = hf(torch.tensor([TEXT], device="cuda")).logits[0].float().cpu()
    got, _ = ours.forward(TEXT)
    err = float((got.cpu() - theirs).abs().max() / theirs.abs().max())
    assert err <= tol, f"{dtype}: relative error {err:.2e} against transformers"
