"""RWKV-7 logits parity (fp32, all logits, 1e-5 relative) with two independent implementations from PyPI:
the `rwkv` package (RWKV_x070, strategy 'cpu fp32') and `rwkv7-hf` (HF-style pure PyTorch), on random x070
checkpoints of several shapes in both formats: whole, randomly chunked with state-bytes round trips, and one
token at a time.

The `rwkv` package picks its model class when imported (RWKV_V7_ON=1 makes every RWKV an RWKV_x070), and
tests/test_parity.py imports it for RWKV-4, so it runs here in a child process.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rwkv_stream import State, load
from rwkv_stream.random_checkpoint import random_tensors, rwkv7_config, save_hf, save_pth, to_hf_names_rwkv7

pytestmark = pytest.mark.usefixtures("one_torch_thread")
RTOL = 1e-5
N_TOKENS = 48
SHAPES = {  # name: (L, C, vocab, ranks w/a/v/g, ffn)
    "L2C64": (2, 64, 97, (8, 8, 4, 16), 256),
    "L3C128": (3, 128, 131, (16, 12, 8, 24), 448),
    "L4C192": (4, 192, 300, (32, 32, 16, 64), 768),
}

CHILD = r"""
import json, os, sys
os.environ["RWKV_V7_ON"] = "1"; os.environ["RWKV_JIT_ON"] = "0"; os.environ["RWKV_CUDA_ON"] = "0"
import torch
torch.set_num_threads(1)
from rwkv.model import RWKV
jobs = json.load(open(sys.argv[1]))
out = {}
for name, job in jobs.items():
    model = RWKV(job["stem"], strategy="cpu fp32")
    for plan, chunks in job["plans"].items():
        state, rows = None, []
        for chunk in chunks:
            logits, state = model.forward(chunk, state, full_output=True)
            rows.append(logits.reshape(len(chunk), -1).clone())
        out[f"{name}/{plan}"] = (torch.cat(rows), [s.clone() for s in state])
torch.save(out, sys.argv[2])
"""


def config_of(name: str):
    n_layer, n_embd, vocab, (rw, ra, rv, rg), ffn = SHAPES[name]
    return rwkv7_config(n_layer, n_embd, vocab, rank_w=rw, rank_a=ra, rank_v=rv, rank_g=rg, ffn_dim=ffn)


def plans_of(name: str) -> dict[str, list[list[int]]]:
    rng = random.Random(name)
    ids = [rng.randrange(SHAPES[name][2]) for _ in range(N_TOKENS)]
    chunks, at = [], 0
    while at < len(ids):
        n = rng.choice([1, 2, 3, 7, 9, 16, 20])
        chunks.append(ids[at : at + n])
        at += n
    return {"whole": [ids], "chunked": chunks, "one": [[t] for t in ids]}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("rwkv7-parity")
    out = {}
    for i, name in enumerate(SHAPES):
        cfg = config_of(name)
        tensors = random_tensors(cfg, seed=100 + i)
        save_pth(tensors, root / f"{name}.pth")
        out[name] = {"cfg": cfg, "tensors": tensors, "pth": root / f"{name}.pth",
                     "hf": save_hf(tensors, cfg, root / f"{name}-hf")}
    return out


@pytest.fixture(scope="module")
def rwkv_package(checkpoints, tmp_path_factory) -> dict:
    pytest.importorskip("rwkv")
    root = tmp_path_factory.mktemp("rwkv7-oracle")
    jobs = {name: {"stem": str(c["pth"].with_suffix("")), "plans": plans_of(name)} for name, c in checkpoints.items()}
    (root / "jobs.json").write_text(json.dumps(jobs))
    (root / "child.py").write_text(CHILD)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(root / "child.py"), str(root / "jobs.json"), str(root / "out.pt")],
                   check=True, env=env, capture_output=True, timeout=600)
    return torch.load(root / "out.pt")


def run_plan(model, chunks: list[list[int]], round_trip: bool) -> tuple[torch.Tensor, State]:
    state, rows = None, []
    for chunk in chunks:
        logits, state = model.forward(chunk, state)
        if round_trip:
            state = State.from_bytes(state.to_bytes(), expected_fingerprint=model.fingerprint)
        rows.append(logits)
    assert state is not None
    return torch.cat(rows), state


@pytest.mark.parametrize("fmt", ["pth", "hf"])
@pytest.mark.parametrize("plan", ["whole", "chunked", "one"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_matches_the_rwkv_package(checkpoints, rwkv_package, name, plan, fmt):
    model = load(checkpoints[name][fmt])
    ours, state = run_plan(model, plans_of(name)[plan], round_trip=plan == "chunked")
    theirs, their_state = rwkv_package[f"{name}/{plan}"]
    assert rel(ours, theirs) < RTOL
    cfg = checkpoints[name]["cfg"]
    c, h, n = cfg.n_embd, cfg.n_head, cfg.head_size
    for i in range(cfg.n_layer):  # the package keeps [att_x_prev, att_kv [H, V, K], ffn_x_prev] per layer
        row = state.tensor[i]
        assert rel(row[:c], their_state[3 * i]) < RTOL
        assert rel(row[2 * c :].view(h, n, n), their_state[3 * i + 1]) < RTOL
        assert rel(row[c : 2 * c], their_state[3 * i + 2]) < RTOL


@pytest.fixture(scope="module")
def hf_models(checkpoints) -> dict:
    rwkv7_hf = pytest.importorskip("rwkv7_hf")
    out = {}
    for name, c in checkpoints.items():
        cfg = c["cfg"]
        hf_cfg = rwkv7_hf.RWKV7Config(
            vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer,
            head_dim=cfg.head_size, num_heads=cfg.n_head, intermediate_size=cfg.ffn_dim,
            hidden_ratio=cfg.ffn_dim / cfg.n_embd, decay_low_rank_dim=cfg.rank_w, a_low_rank_dim=cfg.rank_a,
            v_low_rank_dim=cfg.rank_v, gate_low_rank_dim=cfg.rank_g)
        model = rwkv7_hf.RWKV7ForCausalLM(hf_cfg).eval()
        model.load_state_dict(to_hf_names_rwkv7(c["tensors"]), strict=True)  # our HF names are theirs
        out[name] = model
    return out


@pytest.mark.parametrize("plan", ["whole", "chunked", "one"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_matches_rwkv7_hf(checkpoints, hf_models, name, plan):
    model = load(checkpoints[name]["hf"])
    chunks = plans_of(name)[plan]
    ours, _ = run_plan(model, chunks, round_trip=plan == "chunked")
    rows, cache = [], None
    with torch.no_grad():
        for chunk in chunks:
            out = hf_models[name](torch.tensor([chunk]), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            rows.append(out.logits[0])
    assert rel(ours, torch.cat(rows)) < RTOL


def test_fixture_path_is_the_shared_one():
    """The trained fixture is read from ../shared, never copied into the repo."""
    repo = Path(__file__).resolve().parents[1]
    for folder in ("tests", "rwkv_stream", "bench"):
        assert not list((repo / folder).rglob("tiny-rwkv-*.pth"))
