"""GPU benchmark: the CUDA-graph stepper (rwkv_stream.gpu) against peers on the same GPU, same weights.

Random weights of the real shapes (169M: 12 x 768; 1.5B: 24 x 2048; vocab 50277). Per shape:
  * ms per step at batch 1 (one token, graph replay, logits copied out),
  * tokens/s with 256 streams stepping one token each,
  * p50/p99 step latency at 256 streams with states synthesized at position 1e3 and at 1e6 (a position
    only changes the magnitudes of aa/bb/pp, not the work),
  * prefill tokens/s (one ragged forward of 16 streams x 256 tokens),
and the same steps for peers that import: this project's torch engine on CUDA (rwkv_stream.Model),
HF transformers RwkvForCausalLM, and the `rwkv` pip package (usually absent on the GPU image).
Writes JSON and prints a short table. Run: ``python bench/gpu_bench.py --out results.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rwkv_stream import ModelConfig
from rwkv_stream import kernels_ref as ref
from rwkv_stream.checkpoint import expected_shapes
from rwkv_stream.gpu import CudaGraphStepper

SHAPES = {
    "169m": ModelConfig(n_layer=12, n_embd=768, vocab_size=50277, ffn_dim=3072),
    "1.5b": ModelConfig(n_layer=24, n_embd=2048, vocab_size=50277, ffn_dim=8192),
    "tiny": ModelConfig(n_layer=2, n_embd=256, vocab_size=1000, ffn_dim=1024),
}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="169m,1.5b")
    p.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    p.add_argument("--streams", type=int, default=256)
    p.add_argument("--steps", type=int, default=200, help="timed steps per measurement")
    p.add_argument("--peers", default="engine,transformers,rwkv", help="comma list; '' for none")
    p.add_argument("--peer-shapes", default="169m,1.5b", help="shapes on which peers are measured")
    p.add_argument("--out", default="bench/results/gpu_bench.json")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="exercise this script on the CPU (tiny shape, reference ops, no graphs)")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.shapes, args.peer_shapes, args.steps, args.streams = "tiny", "tiny", 8, 8
    return args


class Env:
    """Where the benchmark runs: CUDA with the kernels, or (``--cpu-smoke``) the CPU with reference ops."""

    device = torch.device("cuda")
    ops: Any = None

    @classmethod
    def sync(cls) -> None:
        if cls.device.type == "cuda":
            torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------
# Timing helpers


def timed(fn: Callable[[int], Any], steps: int, warmup: int = 5) -> list[float]:
    """Host-side wall time per call, synchronizing after each (what a caller waiting for logits sees)."""
    for i in range(warmup):
        fn(i)
    Env.sync()
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        fn(i)
        Env.sync()
        times.append(time.perf_counter() - t0)
    return times


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def summarize(times: list[float], tokens_per_step: int) -> dict[str, float]:
    med = statistics.median(times)
    return {"ms_p50": round(med * 1e3, 4), "ms_p99": round(percentile(times, 99) * 1e3, 4),
            "tokens_per_s": round(tokens_per_step / med, 1)}


# ---------------------------------------------------------------------------------------------------
# Weights and states


def random_weights(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, seed: int = 0) -> dict:
    """BlinkDL-named random weights made on the GPU (same ranges as rwkv_stream.random_checkpoint,
    with time_decay spread wide enough to include very slow channels, as trained models have)."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(shape: tuple[int, ...]) -> torch.Tensor:
        return torch.rand(shape, generator=gen, device=device)

    def randn(shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=device)

    out = {}
    for key, shape in expected_shapes(cfg).items():
        if key.endswith("time_decay"):
            t = rand(shape) * 10 - 8                      # w from -exp(-8) to -exp(2)
        elif key.endswith("time_first"):
            t = randn(shape)
        elif ".time_mix_" in key:
            t = rand(shape)
        elif ".ln" in key or key.startswith("ln_out"):
            t = 1 + 0.2 * randn(shape) if key.endswith("weight") else 0.1 * randn(shape)
        elif key == "emb.weight":
            t = randn(shape)
        else:
            t = randn(shape) / math.sqrt(shape[1])
        out[key] = t if t.dim() == 1 else t.to(dtype)
    return out


def synthesize_position(pool: torch.Tensor, weights: dict, cfg: ModelConfig, slots: list[int],
                        position: float, seed: int = 1) -> None:
    """States as after ``position`` tokens: denominator = sum of decayed weights (bb * e^pp), numerator a
    weighted mean of values; previous-token rows like layer-norm outputs."""
    gen = torch.Generator(device=pool.device).manual_seed(seed)
    idx = torch.tensor(slots, device=pool.device)
    n, c = len(slots), cfg.n_embd
    for i in range(cfg.n_layer):
        w = -torch.exp(weights[f"blocks.{i}.att.time_decay"].float())
        log_den = torch.log(-torch.expm1(w * position)) - torch.log(-torch.expm1(w))  # log sum_j e^{j w}
        k_max = 3.0 + torch.rand(n, c, generator=gen, device=pool.device)
        pool[idx, i, ref.PP] = k_max + log_den - 2.0
        pool[idx, i, ref.BB] = math.exp(2.0) * torch.rand(n, c, generator=gen, device=pool.device).add_(0.5)
        pool[idx, i, ref.AA] = pool[idx, i, ref.BB] * torch.randn(n, c, generator=gen, device=pool.device)
        for row in (ref.ATT_X, ref.FFN_X):
            pool[idx, i, row] = torch.randn(n, c, generator=gen, device=pool.device)


# ---------------------------------------------------------------------------------------------------
# This project's stepper


def bench_stepper(cfg: ModelConfig, weights: dict, dtype: torch.dtype, args: argparse.Namespace) -> dict:
    streams = args.streams
    pool = torch.empty(streams + 1, cfg.n_layer, 5, cfg.n_embd, device=Env.device)
    ref.reset_slots(pool, range(streams + 1))
    t0 = time.perf_counter()
    stepper = CudaGraphStepper(weights, cfg.n_layer, cfg.n_embd, pool, dtype=dtype, ops=Env.ops)
    stepper.capture()
    setup_s = time.perf_counter() - t0
    vocab, slots = cfg.vocab_size, list(range(streams))
    res: dict[str, Any] = {"setup_s": round(setup_s, 2)}
    res["batch1"] = summarize(timed(lambda i: stepper.step([i % vocab], [streams]), args.steps), 1)
    res["eager_batch1"] = summarize(timed(lambda i: _eager(stepper, [i % vocab], [streams]), 20), 1)
    batch = timed(lambda i: stepper.step([(i * 7 + s) % vocab for s in slots], slots), args.steps // 2)
    res[f"streams{streams}"] = summarize(batch, streams)
    for pos in (1e3, 1e6):
        synthesize_position(pool, weights, cfg, slots, pos)
        times = timed(lambda i: stepper.step([(i + s) % vocab for s in slots], slots), args.steps // 2, warmup=0)
        logits = stepper.step(list(range(streams)), slots)
        res[f"streams{streams}_pos{pos:.0e}"] = {**summarize(times, streams),
                                                 "finite": bool(torch.isfinite(logits).all())}
    n_pre, len_pre = min(16, streams), 256 if Env.device.type == "cuda" else 8
    res[f"prefill_{n_pre}x{len_pre}"] = _prefill(stepper, cfg, n_pre, len_pre)
    if Env.device.type == "cuda":
        res["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return res


def _eager(stepper: CudaGraphStepper, tokens: list[int], slots: list[int]) -> torch.Tensor:
    graphs, stepper.use_graphs = stepper.use_graphs, False
    try:
        return stepper.step(tokens, slots)
    finally:
        stepper.use_graphs = graphs


def _prefill(stepper: CudaGraphStepper, cfg: ModelConfig, n_streams: int, length: int) -> dict:
    ref.reset_slots(stepper.pool, range(n_streams))
    toks = torch.randint(0, cfg.vocab_size, (n_streams * length,))
    offs = [i * length for i in range(n_streams + 1)]
    times = timed(lambda i: stepper.forward(toks, offs, list(range(n_streams))), 3, warmup=1)
    return summarize(times, n_streams * length)


# ---------------------------------------------------------------------------------------------------
# Peers


def bench_engine(cfg: ModelConfig, weights: dict, dtype: torch.dtype, args: argparse.Namespace) -> dict:
    """This project's torch engine (rwkv_stream.Model) on the same GPU: the non-kernel baseline."""
    from rwkv_stream.model import Model

    model = Model(weights, cfg, device=Env.device, dtype=dtype)
    pool = model.new_pool(args.streams, growable=False)
    slots = [pool.alloc() for _ in range(args.streams)]
    vocab = cfg.vocab_size
    one = timed(lambda i: model.step(pool, slots[:1], [[i % vocab]], logits="last"), args.steps // 4)
    many = timed(lambda i: model.step(pool, slots, [[(i + s) % vocab] for s in range(args.streams)],
                                      logits="last"), args.steps // 4)
    return {"batch1": summarize(one, 1), f"streams{args.streams}": summarize(many, args.streams)}


def _hf_names(weights: dict) -> dict:
    from rwkv_stream.random_checkpoint import to_hf_names

    return to_hf_names(weights)


def bench_transformers(cfg: ModelConfig, weights: dict, dtype: torch.dtype, args: argparse.Namespace) -> dict:
    import transformers
    from transformers import RwkvConfig, RwkvForCausalLM

    hf_cfg = RwkvConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer,
                        attention_hidden_size=cfg.n_embd, intermediate_size=cfg.ffn_dim,
                        rescale_every=6 if dtype == torch.float16 else 0, tie_word_embeddings=False)
    with Env.device:
        model = RwkvForCausalLM(hf_cfg).to(dtype).eval()
    model.load_state_dict({k: v.to(dtype) for k, v in _hf_names(weights).items()}, strict=False)
    vocab, n = cfg.vocab_size, args.streams
    state: list = [None, None]

    def one(i: int) -> None:
        state[0] = model(torch.tensor([[i % vocab]], device=Env.device), state=state[0], use_cache=True).state

    def many(i: int) -> None:
        ids = torch.tensor([[(i + s) % vocab] for s in range(n)], device=Env.device)
        state[1] = model(ids, state=state[1], use_cache=True).state

    return {"version": transformers.__version__, "batch1": summarize(timed(one, args.steps // 4), 1),
            f"streams{n}": summarize(timed(many, args.steps // 8), n)}


def bench_rwkv_package(cfg: ModelConfig, weights: dict, dtype: torch.dtype, args: argparse.Namespace) -> dict:
    os.environ.setdefault("RWKV_JIT_ON", "1")
    os.environ.setdefault("RWKV_CUDA_ON", "0")
    from rwkv.model import RWKV

    from rwkv_stream.checkpoint import save_pth

    with tempfile.TemporaryDirectory() as tmp:
        save_pth({k: v.cpu() for k, v in weights.items()}, Path(tmp) / "m.pth")
        strategy = f"{Env.device.type} {'fp16' if dtype == torch.float16 else 'fp32'}"
        model = RWKV(str(Path(tmp) / "m.pth"), strategy=strategy, verbose=False)
    state: list = [None]

    def one(i: int) -> None:
        _, state[0] = model.forward([i % cfg.vocab_size], state[0])

    return {"strategy": strategy, "batch1": summarize(timed(one, args.steps // 4), 1)}


PEERS: dict[str, Callable[..., dict]] = {
    "engine": bench_engine, "transformers": bench_transformers, "rwkv": bench_rwkv_package,
}


def run_peer(name: str, cfg: ModelConfig, weights: dict, dtype: torch.dtype, args: argparse.Namespace) -> dict:
    try:
        with torch.inference_mode():
            return PEERS[name](cfg, weights, dtype, args)
    except ImportError as exc:
        return {"skipped": f"not importable: {exc}"}
    except Exception as exc:  # noqa: BLE001 - a peer failing must not lose the other results
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}
    finally:
        release()


def release() -> None:
    gc.collect()
    if Env.device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------
# Driver


def machine() -> dict:
    if Env.device.type != "cuda":
        return {"cpu_smoke": True, "torch": torch.__version__}
    import cupy

    props = torch.cuda.get_device_properties(0)
    return {"gpu": props.name, "memory_gib": round(props.total_memory / 2**30, 1), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cupy": cupy.__version__, "python": sys.version.split()[0]}


def bench_shape(name: str, args: argparse.Namespace) -> dict:
    cfg, dtype = SHAPES[name], DTYPES[args.dtype]
    weights = random_weights(cfg, dtype, Env.device)
    out: dict[str, Any] = {"config": cfg.to_dict(), "dtype": args.dtype}
    with torch.inference_mode():
        if Env.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        out["rwkv-stream gpu"] = bench_stepper(cfg, weights, dtype, args)
    release()
    if name in args.peer_shapes.split(","):
        for peer in filter(None, args.peers.split(",")):
            out[peer] = run_peer(peer, cfg, weights, dtype, args)
    return out


def table(result: dict) -> str:
    rows = [f"{'shape':6} {'impl':16} {'b1 ms p50':>10} {'b1 ms p99':>10} {'N tok/s':>11} {'N ms p99':>9}"
            f" {'p99@1e3':>8} {'p99@1e6':>8}"]
    n = result["streams"]
    for shape, res in result["shapes"].items():
        for impl, r in res.items():
            if not isinstance(r, dict) or impl == "config":
                continue
            if "batch1" not in r:
                rows.append(f"{shape:6} {impl:16} {next(iter(r.values()))!s:.70}")
                continue
            many = r.get(f"streams{n}", {})
            pos = [r.get(f"streams{n}_pos{p}", {}).get("ms_p99", float("nan")) for p in ("1e+03", "1e+06")]
            rows.append(f"{shape:6} {impl:16} {r['batch1']['ms_p50']:10.3f} {r['batch1']['ms_p99']:10.3f} "
                        f"{many.get('tokens_per_s', float('nan')):11.0f} {many.get('ms_p99', float('nan')):9.3f} "
                        f"{pos[0]:8.3f} {pos[1]:8.3f}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke:
        Env.device, Env.ops = torch.device("cpu"), ref
    elif not torch.cuda.is_available():
        print("no CUDA device (use --cpu-smoke to exercise the script on the CPU)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    result: dict[str, Any] = {"machine": machine(), "streams": args.streams, "shapes": {}}
    for name in filter(None, args.shapes.split(",")):
        result["shapes"][name] = bench_shape(name, args)
        release()
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["machine"]))
    print(table(result))
    print(f"({args.dtype}; N = {args.streams} streams; p99@pos: N-stream step latency with states at that "
          f"position; wall {result['wall_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
