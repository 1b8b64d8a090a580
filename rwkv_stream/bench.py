"""CPU benchmark: this engine against HF transformers and the `rwkv` package, same weights, same process.

Prints one JSON object. Measures ms per token at batch 1 (one token per step, with state), tokens/s with 16
streams stepping one token each, fragment throughput (16 streams x 8 tokens per step), and a long stream
through a small model to show the cost per token and the memory stay flat. ``*_hidden_only`` skips the LM
head (what tagging and classification heads need).

All implementations and cases are measured interleaved: each round times one step of every case in turn, so
a burst of load from elsewhere on a shared machine slows all of them alike instead of one whole series.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from .config import ModelConfig
from .model import LogitsMode, Model, StepOutput
from .random_checkpoint import random_tensors, rwkv7_config, save_pth, to_hf_names

SHAPES = {
    "169m": ModelConfig(n_layer=12, n_embd=768, vocab_size=50277, ffn_dim=3072),
    "430m": ModelConfig(n_layer=24, n_embd=1024, vocab_size=50277, ffn_dim=4096),
    "tiny": ModelConfig(n_layer=4, n_embd=128, vocab_size=1000, ffn_dim=512),
}
RWKV7_RANKS = dict(rank_w=64, rank_a=64, rank_v=32, rank_g=128)  # the released 0.1B / 0.4B models' LoRA sizes
SHAPES7 = {  # RWKV-7 (x070), World vocabulary, head size 64
    "0.1b": rwkv7_config(12, 768, 65536, ffn_dim=3072, **RWKV7_RANKS),
    "0.4b": rwkv7_config(24, 1024, 65536, ffn_dim=4096, **RWKV7_RANKS),
    "tiny": rwkv7_config(2, 128, 1000, ffn_dim=512, rank_w=32, rank_a=32, rank_v=32, rank_g=32),  # for tests
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", default="169m", choices=sorted(SHAPES))
    p.add_argument("--dtypes", default="float32,bfloat16", help="weight dtypes of this engine to measure")
    p.add_argument("--peers", default="transformers,rwkv", help="comma list; '' for none")
    p.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--fragment", type=int, default=8, help="tokens per stream per step in the fragment test")
    p.add_argument("--long-stream", type=int, default=100_000, help="tokens for the flat-latency test (0: skip)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default=None, help="also write the JSON here")


Case = tuple[Callable[[int], object], int]  # one step (given the round number), tokens it processes


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = SHAPES[args.shape]
    tensors = random_tensors(cfg, seed=0)
    result: dict = {"machine": machine_info(), "shape": args.shape, "config": cfg.to_dict(), "results": {}}
    with torch.inference_mode():
        impls: dict[str, dict] = {}
        for dtype in filter(None, args.dtypes.split(",")):
            impls[f"rwkv-stream {dtype}"] = {"cases": engine_cases(Model(tensors, cfg, dtype=dtype), args)}
        for peer in filter(None, args.peers.split(",")):
            print(f"bench: setting up {peer}", file=sys.stderr)
            impls[peer] = PEERS[peer](tensors, cfg, args)
        result["results"] = measure_interleaved(impls, args.steps)
        del impls
        gc.collect()
        if args.long_stream:
            result["long_stream"] = bench_long_stream(args.long_stream)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


def measure_interleaved(impls: dict[str, dict], rounds: int, warmup: int = 3) -> dict:
    """Per implementation: its metadata plus a summary per case, all cases timed round-robin."""
    cases = [(impl, name, case) for impl, info in impls.items() for name, case in info.get("cases", {}).items()]
    times: dict[tuple[str, str], list[float]] = {(impl, name): [] for impl, name, _ in cases}
    for r in tqdm(range(-warmup, rounds), desc="bench rounds", unit="round", file=sys.stderr, disable=None):
        for impl, name, (step, _) in cases:
            t0 = time.perf_counter()
            step(r + warmup)
            if r >= 0:
                times[impl, name].append(time.perf_counter() - t0)
    results = {impl: {k: v for k, v in info.items() if k != "cases"} for impl, info in impls.items()}
    for impl, name, (_, tokens) in cases:
        results[impl][name] = summarize(times[impl, name], tokens)
    return results


def machine_info() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()}


def summarize(times: list[float], tokens_per_step: int) -> dict:
    med = statistics.median(times)
    return {"ms_per_step_p50": round(med * 1e3, 3), "ms_per_step_p99": round(percentile(times, 99) * 1e3, 3),
            "ms_per_step_min": round(min(times) * 1e3, 3), "tokens_per_s": round(tokens_per_step / med, 1)}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def engine_cases(model: Model, args: argparse.Namespace) -> dict[str, Case]:
    vocab, n = model.config.vocab_size, args.streams
    state = [model.new_state()]

    def one(i: int) -> None:
        _, state[0] = model.forward([i % vocab], state[0])

    pools = {case: model.new_pool(n) for case in ("streams", "hidden", "fragments")}  # a stream set per case
    slots = {case: [pool.alloc() for _ in range(n)] for case, pool in pools.items()}

    def step(case: str, tokens: list[list[int]], logits: LogitsMode = "all") -> StepOutput:
        return model.step(pools[case], slots[case], tokens, logits=logits)

    return {
        "batch1": (one, 1),
        f"streams{n}": (lambda i: step("streams", [[(i + s) % vocab] for s in range(n)]), n),
        f"streams{n}_hidden_only": (lambda i: step("hidden", [[(i + s) % vocab] for s in range(n)], "none"), n),
        f"streams{n}_fragments{args.fragment}": (
            lambda i: step("fragments", [[(i + s + j) % vocab for j in range(args.fragment)] for s in range(n)]),
            n * args.fragment),
    }


def bench_transformers(tensors: dict, cfg: ModelConfig, args: argparse.Namespace) -> dict:
    try:
        from transformers import RwkvConfig, RwkvForCausalLM
    except ImportError as exc:
        return {"skipped": str(exc)}
    hf_cfg = RwkvConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer,
                        attention_hidden_size=cfg.n_embd, intermediate_size=cfg.ffn_dim, rescale_every=0,
                        tie_word_embeddings=False)
    model = RwkvForCausalLM(hf_cfg).eval()
    model.load_state_dict(to_hf_names(tensors), strict=False)
    state: list = [None]

    def one(i: int) -> None:
        state[0] = model(torch.tensor([[i % cfg.vocab_size]]), state=state[0], use_cache=True).state

    bstate: list = [None]

    def batch(i: int) -> None:
        ids = torch.tensor([[(i + s) % cfg.vocab_size] for s in range(args.streams)])
        bstate[0] = model(ids, state=bstate[0], use_cache=True).state

    return {"version": __import__("transformers").__version__,
            "cases": {"batch1": (one, 1), f"streams{args.streams}": (batch, args.streams)}}


def bench_rwkv_package(tensors: dict, cfg: ModelConfig, args: argparse.Namespace) -> dict:
    os.environ.setdefault("RWKV_JIT_ON", "1")
    os.environ.setdefault("RWKV_CUDA_ON", "0")
    try:
        from rwkv.model import RWKV
    except ImportError as exc:
        return {"skipped": str(exc)}
    with tempfile.TemporaryDirectory() as tmp:
        save_pth(tensors, Path(tmp) / "m.pth")
        model = RWKV(str(Path(tmp) / "m.pth"), strategy="cpu fp32", verbose=False)
    state: list = [None]

    def one(i: int) -> None:
        _, state[0] = model.forward([i % cfg.vocab_size], state[0])

    states: list = [None] * args.streams

    def streams(i: int) -> None:  # the package steps one stream per call
        for s in range(args.streams):
            _, states[s] = model.forward([(i + s) % cfg.vocab_size], states[s])

    return {"version": _version("rwkv"),
            "cases": {"batch1": (one, 1), f"streams{args.streams}": (streams, args.streams)}}


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


PEERS = {"transformers": bench_transformers, "rwkv": bench_rwkv_package}


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bench_long_stream(n_tokens: int, window: int = 1000) -> dict:
    """One stream, one token per step, through the small 'tiny' shape: latency and RSS, first vs last."""
    cfg = SHAPES["tiny"]
    model = Model(random_tensors(cfg, seed=1), cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # products of a 128-wide model are too small to split across threads
    state = model.new_state()
    times: list[float] = []
    rss: dict[str, float] = {}
    for i in tqdm(range(n_tokens), desc="long stream", unit="token", file=sys.stderr, disable=None, mininterval=1):
        t0 = time.perf_counter()
        _, state = model.forward([i % cfg.vocab_size], state)
        times.append(time.perf_counter() - t0)
        if i + 1 == window:
            rss["after_first_window_mib"] = round(rss_mib(), 1)
    rss["at_end_mib"] = round(rss_mib(), 1)
    torch.set_num_threads(threads)
    first, last = times[:window], times[-window:]
    return {"shape": "tiny", "config": cfg.to_dict(), "tokens": n_tokens,
            "first_window_ms_p50": round(statistics.median(first) * 1e3, 4),
            "last_window_ms_p50": round(statistics.median(last) * 1e3, 4),
            "first_window_ms_p99": round(percentile(first, 99) * 1e3, 4),
            "last_window_ms_p99": round(percentile(last, 99) * 1e3, 4),
            "first_window_ms_min": round(min(first) * 1e3, 4), "last_window_ms_min": round(min(last) * 1e3, 4),
            "threads": 1, **rss}
