"""bench/gpu_bench.py on the CPU (``--cpu-smoke``): rows reach the disk as they are measured."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "gpu_bench.py"


@pytest.fixture
def bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_bench_under_test", BENCH)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_rows_are_on_disk_before_a_later_step_dies(bench, tmp_path, monkeypatch, one_torch_thread):
    def dies(*args, **kw):
        raise KeyboardInterrupt  # what a timeout does to the rest of the run

    monkeypatch.setattr(bench, "bench_graphs", dies)
    out = tmp_path / "gpu_bench.json"
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--cpu-smoke", "--peers", "", "--rwkv7-shapes", "", "--out", str(out)])
    rows = [json.loads(line) for line in (tmp_path / "gpu_bench.jsonl").read_text().splitlines()]
    metrics = {r["metric"] for r in rows if r["impl"] == "rwkv-stream"}
    assert {"batch1", "batch8", "batch8_pos1e+03", "batch8_pos1e+06", "prefill_8x8"} <= metrics
    whole = json.loads(out.read_text())
    assert whole["shapes"]["tiny"]["rwkv-stream"]["batch8"]["tokens_per_s"] > 0


def test_cpu_smoke_runs_every_part(bench, tmp_path, one_torch_thread):
    out = tmp_path / "r.json"
    assert bench.main(["--cpu-smoke", "--peers", "transformers", "--rwkv7-shapes", "", "--out", str(out)]) == 0
    shapes = json.loads(out.read_text())["shapes"]["tiny"]
    assert shapes["rwkv-stream graphs"]["batch8"]["ms_p50"] > 0
    assert shapes["rwkv-stream"]["batch8_pos1e+06"]["finite"]
    hf = shapes["transformers"]
    assert "error" not in hf, hf
    assert hf["agreement"]["max_rel"] < 5e-3  # fp16 weights, fp32 CPU math on both sides


def test_cpu_smoke_rwkv7_rows(bench, tmp_path, one_torch_thread):
    """RWKV-7 rows: Model.step on the arena in place (kernels_ref7 in the kernels' place on the CPU) at each
    batch, prefills, the torch path beside it, and parity with the fp32 CPU model in fp32 and fp16."""
    out = tmp_path / "r7.json"
    assert bench.main(["--cpu-smoke", "--shapes", "", "--out", str(out)]) == 0
    shapes = json.loads(out.read_text())["shapes"]
    assert set(shapes) == {"rwkv7-tiny", "all"}
    ours, torch_path = shapes["rwkv7-tiny"]["rwkv-stream rwkv7"], shapes["rwkv7-tiny"]["rwkv-stream rwkv7 torch"]
    assert ours["kernels"] and ours["in_place"] and not torch_path["in_place"]
    for r in (ours, torch_path):
        assert "error" not in r, r
        assert r["batch1"]["tokens_per_s"] > 0 and r["batch8"]["tokens_per_s"] > 0
        assert r["prefill_8x8"]["tokens_per_s"] > 0 and r["prefill_1x16"]["tokens_per_s"] > 0
    assert ours["parity_float32"]["max_rel_forward"] < 1e-5 and ours["parity_float32"]["max_rel_steps"] < 1e-5
    assert ours["parity_float16"]["max_rel_forward"] < 2e-2 and ours["parity_float16"]["finite"]
    assert ours["agreement"]["max_rel"] < 1e-5


def test_gpu_profile_says_it_needs_a_gpu(monkeypatch, capsys):
    """bench/gpu_profile.py (torch.profiler over eager steps) exits 2 with one line where CUDA is absent."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = BENCH.with_name("gpu_profile.py")
    spec = importlib.util.spec_from_file_location("gpu_profile_under_test", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    assert module.main(["--steps", "1"]) == 2
    assert capsys.readouterr().err.strip() == "gpu_profile: no CUDA device"
