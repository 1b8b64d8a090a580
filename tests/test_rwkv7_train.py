"""Training RWKV-7 in parallel mode (rwkv_stream/train/model7.py, `rwkv-stream train --family rwkv7`):
the chunked differentiable WKV equals the engine's one-token recurrence (values and gradients), the training
module equals the engine on its exported weights, a tiny model learns, and the command's run folder and
bundle load in the engine with streamed outputs equal to the training module's forward."""

from __future__ import annotations

import json
import random

import pytest
import torch
from test_train import _write_corpus

from rwkv_stream import load
from rwkv_stream.checkpoint import infer_config, validate
from rwkv_stream.loading import load_source
from rwkv_stream.models import Rwkv7Model
from rwkv_stream.models.rwkv7 import wkv7_step
from rwkv_stream.train.model7 import RWKV7, Train7Config, wkv7_chunk_batched, wkv7_parallel

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CFG = Train7Config(61, 32, 2, head_size=16, chunk_len=8)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))


def wkv_inputs(bsz: int, h: int, t: int, n: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    kk = torch.nn.functional.normalize(torch.randn(bsz, h, t, n, generator=gen), dim=-1)
    iclr = torch.rand(bsz, h, t, n, generator=gen)
    s = torch.randn(bsz, h, n, n, generator=gen)
    r, k, v = (torch.randn(bsz, h, t, n, generator=gen) for _ in range(3))
    log_decay = -0.6065306597 * torch.rand(bsz, h, t, n, generator=gen)
    return s, r, log_decay, k, v, -kk, kk * iclr


def sequential(s: torch.Tensor, r: torch.Tensor, log_decay: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token by token with the engine's step (in place on a copy): ``[B, H, T, N]`` vectors."""
    s = s.clone()
    ys = [wkv7_step(s, r[:, :, i], log_decay[:, :, i].exp(), k[:, :, i], v[:, :, i], a[:, :, i], b[:, :, i])
          for i in range(r.shape[2])]
    return torch.stack(ys, dim=2), s


def sequential_functional(s: torch.Tensor, r: torch.Tensor, log_decay: torch.Tensor, k: torch.Tensor,
                          v: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same recurrence without in-place updates (for autograd)."""
    ys = []
    for i in range(r.shape[2]):
        sa = (s * a[:, :, i].unsqueeze(-2)).sum(-1, keepdim=True)
        s = s * log_decay[:, :, i].exp().unsqueeze(-2) + sa * b[:, :, i].unsqueeze(-2) \
            + v[:, :, i].unsqueeze(-1) * k[:, :, i].unsqueeze(-2)
        ys.append((s * r[:, :, i].unsqueeze(-2)).sum(-1))
    return torch.stack(ys, dim=2), s


@pytest.mark.parametrize("chunk_len", [1, 5, 16, 32])
def test_parallel_wkv_equals_the_engines_one_token_steps(chunk_len: int) -> None:
    inputs = wkv_inputs(2, 3, 37, 16, seed=chunk_len)
    y, s = wkv7_parallel(*inputs, chunk_len=chunk_len)
    y_want, s_want = sequential(*inputs)
    assert rel(y, y_want) < 2e-5 and rel(s, s_want) < 2e-5


def test_parallel_wkv_gradients_match_sequential_autograd() -> None:
    inputs = wkv_inputs(1, 2, 20, 8, seed=3)
    weights = torch.randn(1, 2, 20, 8, generator=torch.Generator().manual_seed(4))
    grads = []
    for fn in (lambda *x: wkv7_parallel(*x, chunk_len=8), sequential_functional):
        leaves = [x.clone().requires_grad_(True) for x in inputs]
        y, s = fn(*leaves)
        ((y * weights).sum() + s.square().sum() * 0.1).backward()
        grads.append([leaf.grad for leaf in leaves])
    for name, g_par, g_seq in zip(("s", "r", "log_decay", "k", "v", "a", "b"), *grads, strict=True):
        assert g_par is not None and g_seq is not None
        assert rel(g_par, g_seq) < 1e-4, name


def test_chunk_function_does_not_modify_its_inputs() -> None:
    inputs = wkv_inputs(1, 1, 6, 4, seed=5)
    before = [x.clone() for x in inputs]
    wkv7_chunk_batched(*inputs)
    assert all(torch.equal(a, b) for a, b in zip(inputs, before, strict=True))


def randomized(cfg: Train7Config, seed: int) -> RWKV7:
    """A training module whose zero-initialised parts (LoRA down-projections, outputs, r_k) are random, so
    every term of the equations matters in a comparison."""
    torch.manual_seed(seed)
    model = RWKV7(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("w1", "a1", "v1", "g1", "output.weight", "ffn.value.weight", "r_k")):
                p.normal_(0, 0.3)
            if name == "emb.weight":
                p.normal_(0, 1)
    return model.eval()


def engine_of(model: RWKV7) -> Rwkv7Model:
    sd = model.checkpoint_state_dict()
    tensors = validate(sd, infer_config(sd))
    engine = Rwkv7Model(tensors, infer_config(tensors))
    return engine


def test_state_dict_has_blinkdl_x070_names_and_no_layer0_value_lora() -> None:
    sd = RWKV7(CFG).checkpoint_state_dict()
    assert sd["blocks.0.att.x_r"].shape == (1, 1, 32) and sd["blocks.1.att.r_k"].shape == (2, 16)
    assert sd["blocks.0.att.w1"].shape == (32, CFG.rank_w) and sd["blocks.0.att.w2"].shape == (CFG.rank_w, 32)
    assert "blocks.0.att.v1" not in sd and sd["blocks.1.att.v1"].shape == (32, CFG.rank_v)
    assert "blocks.0.ln0.weight" in sd and "blocks.1.ln0.weight" not in sd
    cfg = infer_config(sd)
    assert cfg.family == "rwkv7" and cfg.n_layer == 2 and cfg.head_size == 16


def test_training_module_equals_the_engine_whole_chunked_and_streamed() -> None:
    model = randomized(CFG, seed=1)
    engine = engine_of(model)
    ids = torch.randint(0, CFG.vocab_size, (2, 29), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(ids)
        # the training module carries its state across calls too
        first, state = model.forward_hidden(ids[:, :11])
        second, _ = model.forward_hidden(ids[:, 11:], state)
    assert rel(model.head(torch.cat([first, second], 1)), want) < 1e-5
    for b in range(2):
        got, _ = engine.forward(ids[b].tolist())
        assert rel(got, want[b]) < 1e-5
    pool = engine.new_pool(2)
    slots = [pool.alloc(), pool.alloc()]
    rows: list[list[torch.Tensor]] = [[], []]
    pos = [0, 0]
    rng = random.Random(3)
    while min(pos) < 29:
        take = [min(rng.choice([1, 1, 2, 9]), 29 - p) for p in pos]
        out = engine.step(pool, slots, [ids[b, pos[b] : pos[b] + take[b]].tolist() for b in range(2)])
        for b in range(2):
            rows[b].append((out.logits or [])[b])
            pos[b] += take[b]
    for b in range(2):
        assert rel(torch.cat(rows[b]), want[b]) < 1e-5


def test_a_tiny_model_learns() -> None:
    torch.manual_seed(0)
    model = RWKV7(CFG)
    pattern = torch.tensor([3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 9, 32])
    x = pattern.repeat(4, 4)[:, :41]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = model.loss(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


FLAGS = ["--family", "rwkv7", "--n-embd", "32", "--head-size", "16", "--n-layer", "2", "--vocab-size", "300",
         "--batch-size", "2", "--ctx", "32", "--warmup", "1", "--checkpoint-every", "3", "--device", "cpu",
         "--lr", "3e-3"]


def _train(*argv: str) -> int:
    from rwkv_stream.cli import main

    return main(["train", *argv])


def test_train_command_rwkv7_bundle_streams_like_the_training_module(tmp_path) -> None:
    corpus, out, bundle = tmp_path / "corpus", tmp_path / "run", tmp_path / "bundle"
    _write_corpus(corpus)
    assert _train("--task", "transcript", "--corpus", str(corpus), "--group", "2", "--out", str(out),
                  "--steps", "6", "--bundle", str(bundle), *FLAGS) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["training"]["family"] == "rwkv7" and metrics["training"]["head_size"] == 16
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [3, 6] and all(r["lm"] > 0 for r in log)

    sd = torch.load(out / "model.pth", weights_only=True)
    trained = RWKV7.from_state_dict(sd).eval()  # the exported (fp16-rounded) weights
    b = load_source(bundle)
    assert isinstance(b.model, Rwkv7Model) and b.heads.model_fingerprint == b.model.fingerprint
    assert isinstance(load(out / "model.pth"), Rwkv7Model)
    ids = b.tokenizer.encode(" it is a truth universally acknowledged that a single man")
    with torch.no_grad():
        want = trained(torch.tensor([ids]))[0]
    assert rel(b.model.forward(ids)[0], want) < 1e-5
    pool = b.model.new_pool(1)
    slot = pool.alloc()
    streamed = [(b.model.step(pool, [slot], [ids[i : i + 3]]).logits or [])[0] for i in range(0, len(ids), 3)]
    assert rel(torch.cat(streamed), want) < 1e-5

    # --init of that run continues it as RWKV-7; asking for the other family is a one-line refusal
    with pytest.raises(SystemExit, match="rwkv7 model, not rwkv4"):
        _train("--task", "transcript", "--corpus", str(corpus), "--out", str(tmp_path / "again"), "--steps", "1",
               "--init", str(out / "model.pth"), *[f if f != "rwkv7" else "rwkv4" for f in FLAGS])
