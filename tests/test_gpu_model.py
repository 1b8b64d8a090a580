"""The engine's Model on CUDA (kernels for WKV) against the CPU reference path. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

from rwkv_stream import load

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

TEXT = [(5 * i + 1) % 97 for i in range(48)]


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("float16", 2e-2), ("bfloat16", 5e-2)])
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
