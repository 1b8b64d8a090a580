"""GPU benchmark: this project's RWKV-4 and RWKV-7 on CUDA against peers on the same GPU, same weights.

Random weights of the real shapes (169M: 12 x 768; 1.5B: 24 x 2048; vocab 50277). Per shape:
  * ``rwkv-stream``: the engine as production runs it (``Model.step`` on the slot arena, kernels in place):
    ms per step and tokens/s at each batch size (``--batches``, default 1,16,64,256), and p50/p99 step
    latency at the largest batch with states synthesized at stream position 1e3 and at 1e6 (a position only
    changes the magnitudes of aa/bb/pp, not the work); prefill tokens/s (16 streams x 256 tokens);
  * ``rwkv-stream graphs``: the same model's weights through ``CudaGraphStepper`` (CUDA graph replays);
  * peers that import: HF transformers ``RwkvForCausalLM`` and the ``rwkv`` pip package run as its users run
    it (``RWKV_JIT_ON=1``, ``RWKV_CUDA_ON=1``: its CUDA kernel; if that kernel cannot be built the row says so);
  * agreement: max relative difference of our GPU logits against each peer's over the same 32 tokens.
RWKV-7 (``--rwkv7-shapes``, default the 0.1B shape L12 x C768, vocab 65536, released LoRA ranks; random x070
weights), impl ``rwkv-stream rwkv7``:
  * ``Model.step`` on the slot arena in place (the shift7 / wkv7 kernels of ``rwkv_stream.gpu7``): one token
    per stream at each batch size, ms p50/p99 and tokens/s, in ``--dtype``; prefill tokens/s of 16 streams x
    256 tokens and of one stream x 1024 (the ragged kernel; every token's state update in order);
  * ``rwkv-stream rwkv7 torch``: the same model with the kernels off (``RWKV_STREAM_KERNELS=0``: states gathered
    per step, torch one-token form, chunked parallel prefill), batch 1 / largest and the prefills;
  * ``parity_float32`` / ``parity_float16``: GPU logits (whole forward over 32 tokens, and the same tokens as
    one-token steps) against the fp32 CPU model of the same weights, max relative error over all logits.
Every measurement is one JSON row appended to ``<out>l`` (JSON Lines, flushed as measured) and the
whole result is rewritten to ``<out>`` after each row, so a timeout loses nothing already measured.
Run: ``python bench/gpu_bench.py --out results.json`` (``--cpu-smoke`` exercises it on the CPU).
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

from rwkv_stream import ModelConfig, kernels_ref7
from rwkv_stream import kernels_ref as ref
from rwkv_stream.checkpoint import expected_shapes
from rwkv_stream.gpu import CudaGraphStepper

SHAPES = {
    "169m": ModelConfig(n_layer=12, n_embd=768, vocab_size=50277, ffn_dim=3072),
    "1.5b": ModelConfig(n_layer=24, n_embd=2048, vocab_size=50277, ffn_dim=8192),
    "tiny": ModelConfig(n_layer=2, n_embd=256, vocab_size=1000, ffn_dim=1024),
}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
SHAPES7 = {  # RWKV-7 (x070): layers, width, vocabulary, LoRA ranks (w, a, v, g)
    "rwkv7-0.1b": (12, 768, 65536, (64, 64, 32, 128)),
    "rwkv7-0.4b": (24, 1024, 65536, (64, 64, 32, 128)),
    "rwkv7-tiny": (2, 128, 1000, (8, 8, 4, 16)),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="169m,1.5b")
    p.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    p.add_argument("--streams", type=int, default=256, help="the largest batch (streams stepping together)")
    p.add_argument("--batches", default="1,16,64,256", help="batch sizes measured (capped at --streams)")
    p.add_argument("--steps", type=int, default=200, help="timed steps per measurement")
    p.add_argument("--peers", default="engine,transformers,rwkv", help="comma list; '' for none")
    p.add_argument("--peer-shapes", default="169m,1.5b", help="shapes on which peers are measured")
    p.add_argument("--rwkv7-shapes", default="rwkv7-0.1b", help=f"RWKV-7 shapes ({', '.join(SHAPES7)}; '' for none)")
    p.add_argument("--rwkv7-parity", default="float32,float16", help="dtypes of the RWKV-7 GPU-vs-CPU parity rows")
    p.add_argument("--out", default="bench/results/gpu_bench.json")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="exercise this script on the CPU (tiny shape, reference ops, no graphs)")
    args = p.parse_args(argv)
    if args.cpu_smoke:  # the tiny shapes of the families asked for
        args.shapes = "tiny" if args.shapes else ""
        args.rwkv7_shapes = "rwkv7-tiny" if args.rwkv7_shapes else ""
        args.peer_shapes, args.steps, args.streams, args.batches = "tiny", 8, 8, "1,8"
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


# ---------------------------------------------------------------------------------------------------
# Rows as they are measured


class Rows:
    """Appends each measurement as one JSON line (flushed and synced) and rewrites the whole result."""

    def __init__(self, out: str, result: dict) -> None:
        self.result = result
        self.json = Path(out) if out else None
        self.lines = Path(out + "l") if out else None
        if self.json is not None and self.lines is not None:
            self.json.parent.mkdir(parents=True, exist_ok=True)
            self.lines.write_text("")
            self._write_json()

    def emit(self, shape: str, impl: str, metric: str, value: Any) -> None:
        self.result["shapes"].setdefault(shape, {}).setdefault(impl, {})[metric] = value
        row = {"shape": shape, "impl": impl, "metric": metric, "value": value,
               "t_s": round(time.perf_counter() - T0, 1)}
        print(json.dumps(row), file=sys.stderr, flush=True)
        if self.lines is not None:
            with self.lines.open("a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self._write_json()

    def _write_json(self) -> None:
        assert self.json is not None
        tmp = self.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.result, indent=2) + "\n")
        tmp.replace(self.json)


T0 = time.perf_counter()


def batches(args: argparse.Namespace) -> list[int]:
    return sorted({min(int(b), args.streams) for b in args.batches.split(",") if b.strip()})


# ---------------------------------------------------------------------------------------------------
# This project: the engine (Model.step, arena in place) and the graph stepper on the same weights


def build_model(cfg: ModelConfig, weights: dict, dtype: torch.dtype) -> Any:
    from rwkv_stream.models.rwkv4 import Rwkv4Model

    return Rwkv4Model(weights, cfg, device=Env.device, dtype=dtype)


def bench_engine(name: str, cfg: ModelConfig, model: Any, args: argparse.Namespace, rows: Rows) -> None:
    impl = "rwkv-stream"
    rows.emit(name, impl, "kernels", model._kernels is not None)
    pool = model.new_pool(args.streams, growable=False)
    slots = [pool.alloc() for _ in range(args.streams)]
    vocab = cfg.vocab_size
    for n in batches(args):
        times = timed(lambda i, n=n: model.step(pool, slots[:n], [[(i + s) % vocab] for s in range(n)],
                                                 logits="last"), max(4, args.steps // 4))
        rows.emit(name, impl, f"batch{n}", summarize(times, n))
    n = args.streams
    for pos in (1e3, 1e6):
        synthesize_position(pool.data, model, cfg, slots, pos)
        times = timed(lambda i: model.step(pool, slots, [[(i + s) % vocab] for s in range(n)], logits="last"),
                      max(4, args.steps // 4), warmup=0)
        out = model.step(pool, slots, [[s % vocab] for s in range(n)], logits="last")
        finite = all(bool(torch.isfinite(lg).all()) for lg in out.logits or [])
        rows.emit(name, impl, f"batch{n}_pos{pos:.0e}", {**summarize(times, n), "finite": finite})
    n_pre, len_pre = min(16, args.streams), 256 if Env.device.type == "cuda" else 8
    for s in slots[:n_pre]:
        pool.reset(s)
    toks = torch.randint(0, vocab, (n_pre, len_pre)).tolist()
    times = timed(lambda i: model.step(pool, slots[:n_pre], toks, logits="last"), 3, warmup=1)
    rows.emit(name, impl, f"prefill_{n_pre}x{len_pre}", summarize(times, n_pre * len_pre))


def bench_graphs(name: str, cfg: ModelConfig, model: Any, args: argparse.Namespace, rows: Rows) -> None:
    impl = "rwkv-stream graphs"
    streams = args.streams
    pool = model.new_pool(streams + 1, growable=False)
    t0 = time.perf_counter()
    stepper = CudaGraphStepper(model, pool, ops=Env.ops)
    stepper.capture()
    rows.emit(name, impl, "setup_s", round(time.perf_counter() - t0, 2))
    vocab, slots = cfg.vocab_size, list(range(streams))
    for n in batches(args):
        times = timed(lambda i, n=n: stepper.step([(i * 7 + s) % vocab for s in range(n)], slots[:n]),
                      max(4, args.steps // 2))
        rows.emit(name, impl, f"batch{n}", summarize(times, n))
    for pos in (1e3, 1e6):
        synthesize_position(pool.data, model, cfg, slots, pos)
        times = timed(lambda i: stepper.step([(i + s) % vocab for s in slots], slots), max(4, args.steps // 2),
                      warmup=0)
        logits = stepper.step(list(range(streams)), slots)
        rows.emit(name, impl, f"batch{streams}_pos{pos:.0e}",
                  {**summarize(times, streams), "finite": bool(torch.isfinite(logits).all())})
    if Env.device.type == "cuda":
        rows.emit(name, impl, "peak_mem_gib", round(torch.cuda.max_memory_allocated() / 2**30, 2))


def synthesize_position(pool: torch.Tensor, model: Any, cfg: ModelConfig, slots: list[int], position: float,
                        seed: int = 1) -> None:
    """States as after ``position`` tokens: denominator = sum of decayed weights (bb * e^pp), numerator a
    weighted mean of values; previous-token rows like layer-norm outputs."""
    gen = torch.Generator(device=pool.device).manual_seed(seed)
    idx = torch.tensor(slots, device=pool.device)
    n, c = len(slots), cfg.n_embd
    for i, layer in enumerate(model.layers):
        w = layer.w.float().to(pool.device)
        log_den = torch.log(-torch.expm1(w * position)) - torch.log(-torch.expm1(w))  # log sum_j e^{j w}
        k_max = 3.0 + torch.rand(n, c, generator=gen, device=pool.device)
        pool[idx, i, ref.PP] = k_max + log_den - 2.0
        pool[idx, i, ref.BB] = math.exp(2.0) * torch.rand(n, c, generator=gen, device=pool.device).add_(0.5)
        pool[idx, i, ref.AA] = pool[idx, i, ref.BB] * torch.randn(n, c, generator=gen, device=pool.device)
        for row in (ref.ATT_X, ref.FFN_X):
            pool[idx, i, row] = torch.randn(n, c, generator=gen, device=pool.device)


# ---------------------------------------------------------------------------------------------------
# Peers: speed, and agreement of logits with ours over the same tokens

AGREE_TOKENS = 32


def our_logits(model: Any, cfg: ModelConfig) -> torch.Tensor:
    """Our logits token by token (the streaming path) for the agreement checks, fp32 on the CPU."""
    pool = model.new_pool(1)
    slot = pool.alloc()
    toks = [(17 * i + 3) % cfg.vocab_size for i in range(AGREE_TOKENS)]
    return torch.cat([model.step(pool, [slot], [[t]]).logits[0] for t in toks]).float().cpu()  # type: ignore[index]


def agreement(ours: torch.Tensor, theirs: torch.Tensor) -> dict:
    theirs = theirs.float().cpu()
    diff = (ours - theirs).abs()
    return {"max_rel": float(diff.max() / theirs.abs().max()),
            "argmax_same": float((ours.argmax(-1) == theirs.argmax(-1)).float().mean())}


def _hf_names(weights: dict) -> dict:
    from rwkv_stream.random_checkpoint import to_hf_names

    return to_hf_names(weights)


def bench_transformers(name: str, cfg: ModelConfig, weights: dict, dtype: torch.dtype, args: argparse.Namespace,
                       rows: Rows, ours: torch.Tensor) -> None:
    import transformers
    from transformers import RwkvConfig, RwkvForCausalLM

    impl = "transformers"
    rows.emit(name, impl, "version", transformers.__version__)
    hf_cfg = RwkvConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer,
                        attention_hidden_size=cfg.n_embd, intermediate_size=cfg.ffn_dim,
                        rescale_every=6 if dtype == torch.float16 else 0, tie_word_embeddings=False)
    with Env.device:
        model = RwkvForCausalLM(hf_cfg).to(dtype).eval()
    model.load_state_dict({k: v.to(dtype) for k, v in _hf_names(weights).items()}, strict=False)
    toks = [(17 * i + 3) % cfg.vocab_size for i in range(AGREE_TOKENS)]
    st = None
    theirs = []
    for t in toks:
        out = model(torch.tensor([[t]], device=Env.device), state=st, use_cache=True)
        st = out.state
        theirs.append(out.logits[0])
    rows.emit(name, impl, "agreement", agreement(ours, torch.cat(theirs)))
    vocab = cfg.vocab_size
    for n in batches(args):
        state: list = [None]

        def step(i: int, n: int = n, state: list = state) -> None:
            ids = torch.tensor([[(i + s) % vocab] for s in range(n)], device=Env.device)
            state[0] = model(ids, state=state[0], use_cache=True).state

        rows.emit(name, impl, f"batch{n}", summarize(timed(step, max(4, args.steps // 8)), n))


def bench_rwkv_package(name: str, cfg: ModelConfig, weights: dict, dtype: torch.dtype, args: argparse.Namespace,
                       rows: Rows, ours: torch.Tensor) -> None:
    """The `rwkv` package as its users run it: TorchScript on and, on CUDA, its own CUDA kernel."""
    impl = "rwkv"
    if "rwkv.model" not in sys.modules:
        os.environ["RWKV_JIT_ON"] = "1"
        os.environ["RWKV_CUDA_ON"] = "1" if Env.device.type == "cuda" else "0"
    try:
        from rwkv.model import RWKV
    except ImportError:
        raise
    except Exception as exc:  # noqa: BLE001 - its CUDA kernel failed to build (no nvcc/ninja): run without it
        rows.emit(name, impl, "cuda_kernel_error", f"{type(exc).__name__}: {exc}"[:300])
        for mod in [m for m in sys.modules if m == "rwkv" or m.startswith("rwkv.")]:
            del sys.modules[mod]
        os.environ["RWKV_CUDA_ON"] = "0"
        from rwkv.model import RWKV
    rows.emit(name, impl, "env", {k: os.environ.get(k) for k in ("RWKV_JIT_ON", "RWKV_CUDA_ON")})

    from rwkv_stream.checkpoint import save_pth

    with tempfile.TemporaryDirectory() as tmp:
        save_pth({k: v.cpu() for k, v in weights.items()}, Path(tmp) / "m.pth")
        strategy = f"{Env.device.type} {'fp16' if dtype == torch.float16 else 'fp32'}"
        model = RWKV(str(Path(tmp) / "m.pth"), strategy=strategy, verbose=False)
    rows.emit(name, impl, "strategy", strategy)
    toks = [(17 * i + 3) % cfg.vocab_size for i in range(AGREE_TOKENS)]
    st = None
    theirs = []
    for t in toks:
        out, st = model.forward([t], st)
        theirs.append(out.reshape(1, -1))
    rows.emit(name, impl, "agreement", agreement(ours, torch.cat(theirs)))
    state: list = [None]

    def one(i: int) -> None:
        _, state[0] = model.forward([i % cfg.vocab_size], state[0])

    rows.emit(name, impl, "batch1", summarize(timed(one, max(4, args.steps // 4)), 1))


PEERS: dict[str, Callable[..., None]] = {"transformers": bench_transformers, "rwkv": bench_rwkv_package}


def run_peer(peer: str, name: str, rows: Rows, *call: Any) -> None:
    try:
        with torch.inference_mode():
            PEERS[peer](name, *call[:4], rows, call[4])
    except ImportError as exc:
        rows.emit(name, peer, "skipped", f"not importable: {exc}")
    except Exception as exc:  # noqa: BLE001 - a peer failing must not lose the other results
        rows.emit(name, peer, "error", f"{type(exc).__name__}: {exc}"[:500])
    finally:
        release()


def release() -> None:
    gc.collect()
    if Env.device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------
# RWKV-7: Model.step on the arena in place (gpu7 kernels), the torch path, parity with the CPU model

PARITY_TOKENS = 32


def build_model7(cfg: Any, tensors: dict, dtype: str, kernels: bool = True) -> Any:
    """An RWKV-7 model on the bench device; on the CPU (``--cpu-smoke``) its CUDA branch runs on the torch
    references of the kernels (kernels_ref7), so the arena path is what is exercised there too. Without
    ``kernels``: the plain torch path (no CUDA kernels, and no compiled CPU layer either)."""
    from rwkv_stream import cpu_kernels
    from rwkv_stream.models import Rwkv7Model

    if not kernels:
        with cpu_kernels.disabled():
            model = Rwkv7Model(tensors, cfg, device=Env.device, dtype=dtype)
        model._kernels = None
        return model
    model = Rwkv7Model(tensors, cfg, device=Env.device, dtype=dtype)
    if Env.device.type == "cpu":
        model._kernels = kernels_ref7
    return model


def bench_rwkv7_speed(name: str, cfg: Any, model: Any, impl: str, args: argparse.Namespace, rows: Rows,
                      sizes: list[int]) -> None:
    pool = model.new_pool(args.streams, growable=False)
    slots = [pool.alloc() for _ in range(args.streams)]
    rows.emit(name, impl, "in_place", bool(model._steps_arena_in_place(pool)))
    vocab = cfg.vocab_size
    for n in sizes:
        times = timed(lambda i, n=n: model.step(pool, slots[:n], [[(i + s) % vocab] for s in range(n)],
                                                 logits="last"), max(4, args.steps // 4))
        rows.emit(name, impl, f"batch{n}", summarize(times, n))
    long = Env.device.type == "cuda"
    for n_pre, len_pre in ((min(16, args.streams), 256 if long else 8), (1, 1024 if long else 16)):
        toks = torch.randint(0, vocab, (n_pre, len_pre)).tolist()

        def prefill(_i: int, n_pre: int = n_pre, toks: list = toks) -> None:
            for s in slots[:n_pre]:
                pool.reset(s)
            model.step(pool, slots[:n_pre], toks, logits="last")

        rows.emit(name, impl, f"prefill_{n_pre}x{len_pre}", summarize(timed(prefill, 3, warmup=1), n_pre * len_pre))


def rwkv7_logits(model: Any, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 CPU logits of ``ids`` as one forward (prefill path) and as one-token steps on a pool."""
    whole, _ = model.forward(ids)
    pool = model.new_pool(2)
    pool.alloc()  # the stream in slot 1: the kernels address a slot other than 0
    slot = pool.alloc()
    steps = torch.cat([model.step(pool, [slot], [[t]]).logits[0] for t in ids])
    return whole.float().cpu(), steps.float().cpu()


def bench_rwkv7(name: str, args: argparse.Namespace, rows: Rows) -> None:
    from rwkv_stream.random_checkpoint import random_tensors, rwkv7_config

    n_layer, n_embd, vocab, (rw, ra, rv, rg) = SHAPES7[name]
    cfg = rwkv7_config(n_layer, n_embd, vocab, rank_w=rw, rank_a=ra, rank_v=rv, rank_g=rg)
    rows.result["shapes"].setdefault(name, {})["config"] = cfg.to_dict()
    tensors = random_tensors(cfg, seed=0)
    impl = "rwkv-stream rwkv7"
    if Env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sizes = batches(args)
    with torch.inference_mode():
        for kernels, label, pick in ((True, impl, sizes), (False, impl + " torch", sorted({sizes[0], sizes[-1]}))):
            try:
                model = build_model7(cfg, tensors, args.dtype, kernels)
                if kernels:
                    rows.emit(name, label, "kernels", model._kernels is not None)
                    rows.emit(name, label, "state_bytes", model.state_bytes)
                bench_rwkv7_speed(name, cfg, model, label, args, rows, pick)
            except Exception as exc:  # noqa: BLE001 - keep going: the other rows still count
                rows.emit(name, label, "error", f"{type(exc).__name__}: {exc}"[:500])
            finally:
                model = None
                release()
        if Env.device.type == "cuda":
            rows.emit(name, impl, "peak_mem_gib", round(torch.cuda.max_memory_allocated() / 2**30, 2))
        ids = [(17 * i + 3) % vocab for i in range(PARITY_TOKENS)]
        from rwkv_stream.models import Rwkv7Model

        ref_whole, ref_steps = rwkv7_logits(Rwkv7Model(tensors, cfg), ids)  # fp32 on the CPU
        for dtype in filter(None, args.rwkv7_parity.split(",")):
            try:
                whole, steps = rwkv7_logits(build_model7(cfg, tensors, dtype), ids)
                scale = float(ref_whole.abs().max())
                value = {"max_rel_forward": float((whole - ref_whole).abs().max()) / scale,
                         "max_rel_steps": float((steps - ref_steps).abs().max()) / scale,
                         "argmax_same": float((whole.argmax(-1) == ref_whole.argmax(-1)).float().mean()),
                         "finite": bool(torch.isfinite(whole).all() and torch.isfinite(steps).all())}
                rows.emit(name, impl, f"parity_{dtype}", value)
                if dtype == "float32":
                    rows.emit(name, impl, "agreement", {"max_rel": max(value["max_rel_forward"],
                                                                       value["max_rel_steps"]),
                                                        "argmax_same": value["argmax_same"]})
            except Exception as exc:  # noqa: BLE001
                rows.emit(name, impl, f"parity_{dtype}", {"error": f"{type(exc).__name__}: {exc}"[:500]})
            finally:
                release()


# ---------------------------------------------------------------------------------------------------
# Driver


def machine() -> dict:
    if Env.device.type != "cuda":
        return {"cpu_smoke": True, "torch": torch.__version__}
    import cupy

    props = torch.cuda.get_device_properties(0)
    return {"gpu": props.name, "memory_gib": round(props.total_memory / 2**30, 1), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cupy": cupy.__version__, "python": sys.version.split()[0]}


def bench_shape(name: str, args: argparse.Namespace, rows: Rows) -> None:
    cfg, dtype = SHAPES[name], DTYPES[args.dtype]
    weights = random_weights(cfg, dtype, Env.device)
    rows.result["shapes"].setdefault(name, {})["config"] = cfg.to_dict()
    if Env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        model = build_model(cfg, weights, dtype)
        for fn in (bench_engine, bench_graphs):
            try:
                fn(name, cfg, model, args, rows)
            except Exception as exc:  # noqa: BLE001 - keep going: the other rows still count
                rows.emit(name, fn.__name__, "error", f"{type(exc).__name__}: {exc}"[:500])
        ours = our_logits(model, cfg) if name in args.peer_shapes.split(",") else None
    del model
    release()
    if ours is not None:
        for peer in filter(None, args.peers.split(",")):
            if peer in PEERS:
                run_peer(peer, name, rows, cfg, weights, dtype, args, ours)


def table(result: dict, sizes: list[int]) -> str:
    cols = [f"b{n} ms p50" for n in sizes] + [f"b{sizes[-1]} tok/s", "p99@1e3", "p99@1e6", "max_rel"]
    lines = [f"{'shape':10} {'impl':24} " + " ".join(f"{c:>11}" for c in cols)]
    n = sizes[-1]
    for shape, res in result["shapes"].items():
        if shape == "all":
            continue
        for impl, r in res.items():
            if impl == "config" or not isinstance(r, dict):
                continue

            def get(metric: str, key: str, r: dict = r) -> float:
                v = r.get(metric)
                return float(v.get(key, math.nan)) if isinstance(v, dict) else math.nan

            vals = [get(f"batch{b}", "ms_p50") for b in sizes] + [
                get(f"batch{n}", "tokens_per_s"), get(f"batch{n}_pos1e+03", "ms_p99"),
                get(f"batch{n}_pos1e+06", "ms_p99"), get("agreement", "max_rel")]
            note = next((f"{k}: {v}" for k, v in r.items() if k in ("error", "skipped", "cuda_kernel_error")), "")
            cells = " ".join(f"{v:11.4g}" for v in vals)
            lines.append(f"{shape:10} {impl:24} {cells}" + (f"  {note:.80}" if note else ""))
    return "\n".join(lines)


def table7(result: dict) -> str:
    """RWKV-7 rows the main table has no column for: prefill rates and the parity of each dtype."""
    lines = []
    for shape, res in result["shapes"].items():
        for impl, r in res.items():
            if not impl.startswith("rwkv-stream rwkv7") or not isinstance(r, dict):
                continue
            cells = [f"{k}: {v['tokens_per_s']:.6g} tok/s" for k, v in r.items()
                     if k.startswith("prefill_") and isinstance(v, dict)]
            cells += [f"{k}: fwd {v.get('max_rel_forward', math.nan):.2e} steps {v.get('max_rel_steps', math.nan):.2e}"
                      for k, v in r.items() if k.startswith("parity_") and isinstance(v, dict)]
            cells += [f"{k}: {v}" for k, v in r.items() if k in ("in_place", "error")]
            lines.append(f"{shape} {impl}: " + "; ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke:
        Env.device, Env.ops = torch.device("cpu"), ref
    elif not torch.cuda.is_available():
        print("no CUDA device (use --cpu-smoke to exercise the script on the CPU)", file=sys.stderr)
        return 2
    result: dict[str, Any] = {"machine": machine(), "dtype": args.dtype, "streams": args.streams, "shapes": {}}
    rows = Rows(args.out, result)
    for name in filter(None, args.rwkv7_shapes.split(",")):
        bench_rwkv7(name, args, rows)
        release()
    for name in filter(None, args.shapes.split(",")):
        bench_shape(name, args, rows)
        release()
    result["wall_s"] = round(time.perf_counter() - T0, 1)
    rows.emit("all", "bench", "wall_s", result["wall_s"])
    print(json.dumps(result["machine"]))
    print(table(result, batches(args)))
    print(f"({args.dtype}; batch = streams stepping one token each; p99@pos: largest-batch step latency with "
          f"states at that stream position; max_rel: logits vs ours (rwkv7: ours on the GPU vs the fp32 CPU "
          f"model); wall {result['wall_s']} s)")
    rwkv7_rows = table7(result)
    if rwkv7_rows:
        print(rwkv7_rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
