"""bench/cpu_vs_rwkvcpp.py for RWKV-7: the checkpoint ``--save-pth`` writes has the x070 layout rwkv.cpp's converter
expects, the bench runs without a peer, and it counts RWKV-7's weight bytes per format. With ``RWKV_CPP_LIB``
(a built librwkv) and ``RWKV_CPP_CONVERTER`` (rwkv.cpp's ``python/convert_pytorch_to_ggml.py``) set, rwkv.cpp's
logits on the same random checkpoint are checked against ours; CI has neither, so that test skips."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rwkv_stream import cpu_kernels, load
from rwkv_stream.bench import SHAPES7
from rwkv_stream.linear import Q8Linear
from rwkv_stream.models import build_model
from rwkv_stream.random_checkpoint import random_tensors

ROOT = Path(__file__).resolve().parents[1]
CFG = SHAPES7["tiny"]
# what rwkv.cpp (rwkv_model_loading.inc) reads of an x070 layer, before its converter merges the six lerps
RWKVCPP_LAYER = ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias", "att.w0", "att.w1", "att.w2", "att.a0",
                 "att.a1", "att.a2", "att.g1", "att.g2", "att.r_k", "att.k_k", "att.k_a", "att.key.weight",
                 "att.value.weight", "att.receptance.weight", "att.output.weight", "att.ln_x.weight",
                 "att.ln_x.bias", "ffn.x_k", "ffn.key.weight", "ffn.value.weight")


def _bench_module():
    spec = importlib.util.spec_from_file_location("cpu_vs_rwkvcpp", ROOT / "bench" / "cpu_vs_rwkvcpp.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def bench():
    threads = torch.get_num_threads()  # main() sets the process's torch threads
    yield _bench_module()
    torch.set_num_threads(threads)


def _run(bench, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "bench.json"
    argv = ["--family", "rwkv7", "--shape", "tiny", "--rounds", "1", "--bandwidth-mib", "8", "--prefill", "4",
            "--streams", "2", "--threads", "1", "--error-tokens", "6", "--out", str(out), *extra]
    assert bench.main(argv) == 0
    return json.loads(out.read_text())


def test_save_pth_rwkv7_has_the_layout_of_rwkv_cpp_converter(bench, tmp_path, capsys):
    path = tmp_path / "m7.pth"
    assert bench.main(["--family", "rwkv7", "--shape", "tiny", "--save-pth", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["family"] == "rwkv7"
    sd = torch.load(path, map_location="cpu")
    c, h, n = CFG.n_embd, CFG.n_head, CFG.head_size
    ranks = {"w": CFG.rank_w, "a": CFG.rank_a, "v": CFG.rank_v, "g": CFG.rank_g}
    assert "blocks.0.att.k_k" in sd  # how the converter tells x070
    assert sd["emb.weight"].shape == sd["head.weight"].shape == (CFG.vocab_size, c)
    assert "blocks.0.ln0.weight" in sd and "ln_out.weight" in sd
    keys = list(sd)
    for i in range(CFG.n_layer):
        p = f"blocks.{i}."
        assert all(p + name in sd for name in RWKVCPP_LAYER)
        # the converter concatenates att.x_* in the order it meets them into x_rwkvag [6, 1, C]
        lerps = [k.rsplit(".", 1)[1] for k in keys if k.startswith(p + "att.x_")]
        assert lerps == ["x_r", "x_w", "x_k", "x_v", "x_a", "x_g"]
        for name in (*lerps, "w0", "a0", "k_k", "k_a"):
            assert sd[p + "att." + name].shape == (1, 1, c)
        assert sd[p + "ffn.x_k"].shape == (1, 1, c)
        assert sd[p + "att.r_k"].shape == (h, n)  # rwkv.cpp takes the head count from r_k
        for which, rank in ranks.items():  # row-vector form: the converter transposes them to [rank, C], [C, rank]
            if which == "v" and i == 0:
                assert not {p + "att.v0", p + "att.v1", p + "att.v2"} & set(sd)  # layer 0 has no value residual
                continue
            assert sd[f"{p}att.{which}1"].shape == (c, rank) and sd[f"{p}att.{which}2"].shape == (rank, c)
        if i:
            assert sd[p + "att.v0"].shape == (1, 1, c)
    tokens = [1, 5, 999, 0, 42]
    with torch.inference_mode(), cpu_kernels.disabled():
        expect, _ = build_model(random_tensors(CFG, seed=0), CFG).forward(tokens)
        got, _ = load(path).forward(tokens)
    assert torch.equal(got, expect)


def test_rwkv7_without_a_peer_reports_every_case_and_counts_its_bytes(bench, tmp_path):
    data = _run(bench, tmp_path, "--formats", "float32,q8_0,q8_0+q8head,w8a8")
    assert data["family"] == "rwkv7" and data["shape"] == "tiny" and data["config"]["n_layer"] == CFG.n_layer
    assert "skipped" in data["rwkv.cpp"] and "issue_18_rwkvcpp_figures" not in data
    rows = data["results"]
    c, f, v = CFG.n_embd, CFG.ffn_dim, CFG.vocab_size
    lora = c * (CFG.rank_w + CFG.rank_a + CFG.rank_g) * 2  # two matrices each; v from layer 1 on
    params = CFG.n_layer * (4 * c * c + 2 * c * f + lora) + (CFG.n_layer - 1) * c * CFG.rank_v * 2
    assert rows["rwkv-stream float32"]["bytes_per_token"] == 4 * (params + v * c)
    assert rows["rwkv-stream float32"]["error"] == 0
    q8, q8head = rows["rwkv-stream q8_0"], rows["rwkv-stream q8_0+q8head"]  # the same body, another head
    q8_head = Q8Linear(random_tensors(CFG, seed=0)["head.weight"]).nbytes  # as packed (inputs padded)
    assert q8_head >= v * c * 34 // 32
    assert q8["bytes_per_token"] - v * c * 2 == q8head["bytes_per_token"] - q8_head  # q8_0's head is fp16
    for name, row in rows.items():
        assert row["error"] < 0.5, name
        assert row["batch1"]["ms_per_step_p50"] > 0 and row["floor_fraction_best"] > 0
        assert row["floor_fraction_paired_p50"] > 0
        assert row["streams2"]["tokens_per_s_p50"] > 0 and row["prefill4"]["tokens_per_s_p50"] > 0


def test_a_shape_of_the_other_family_is_refused(bench):
    with pytest.raises(SystemExit):
        bench.main(["--family", "rwkv7", "--shape", "169m"])


@pytest.mark.skipif(not (os.environ.get("RWKV_CPP_LIB") and os.environ.get("RWKV_CPP_CONVERTER")),
                    reason="needs RWKV_CPP_LIB (librwkv) and RWKV_CPP_CONVERTER (rwkv.cpp's converter script)")
def test_rwkv_cpp_agrees_with_our_fp32_on_the_same_rwkv7_checkpoint(bench, tmp_path):
    pth, model_file = tmp_path / "m7.pth", tmp_path / "m7-fp32.bin"
    assert bench.main(["--family", "rwkv7", "--shape", "tiny", "--save-pth", str(pth)]) == 0
    subprocess.run([sys.executable, os.environ["RWKV_CPP_CONVERTER"], str(pth), str(model_file), "FP32"],
                   check=True, capture_output=True)
    data = _run(bench, tmp_path, "--formats", "float32", "--cases", "batch1",
                "--librwkv", os.environ["RWKV_CPP_LIB"], "--rwkvcpp-models", f"FP32={model_file}")
    peer, ours = data["results"]["rwkv.cpp FP32"], data["results"]["rwkv-stream float32"]
    assert peer["error"] < 1e-5
    # rwkv.cpp's count is its file less the embedding: its vectors and headers too (~1% at this size)
    assert abs(peer["bytes_per_token"] - ours["bytes_per_token"]) < 0.03 * ours["bytes_per_token"]
