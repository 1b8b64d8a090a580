"""CPU benchmark of RWKV-7 (x070): this engine against the `rwkv` package's v7 path (RWKV_x070, 'cpu fp32'),
same random weights, fp32. Prints one JSON object.

Rows per shape (0.1B: L12 x C768, 0.4B: L24 x C1024, World vocabulary 65536, released LoRA ranks):
- ``one_token_ms``: one token with state (batch 1), median ms;
- ``prefill_tok_s``: a fresh stream's prompt of ``--prefill`` tokens in one call (ours: the chunked form;
  ``prefill_sequential_tok_s``: token-by-token state updates, what batch-invariant steps use);
- ``streams16_tok_s``: 16 live streams in one pool stepping one token each (ours only);
- ``state_bytes``: one stream's state.
The host's load is recorded beside the rows (load average, share of all cores busy and stolen during each
shape: on a shared machine that decides how far the numbers can be trusted).

    .venv/bin/python bench/rwkv7_cpu.py [--threads 1] [--shapes 0.1b,0.4b] [--rounds 1] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from rwkv_stream.models import Rwkv7Model
from rwkv_stream.random_checkpoint import random_tensors, rwkv7_config, save_pth

SHAPES = {
    "0.1b": dict(n_layer=12, n_embd=768),
    "0.4b": dict(n_layer=24, n_embd=1024),
}
RANKS = dict(rank_w=64, rank_a=64, rank_v=32, rank_g=128)  # the released 0.1B / 0.4B models' LoRA sizes
VOCAB = 65536

PEER = r"""
import json, os, statistics, sys, time
os.environ["RWKV_V7_ON"] = "1"; os.environ["RWKV_JIT_ON"] = "0"; os.environ["RWKV_CUDA_ON"] = "0"
import torch
torch.set_num_threads(int(sys.argv[2]))
from rwkv.model import RWKV
stem, steps, prefill = sys.argv[1], int(sys.argv[3]), int(sys.argv[4])
model = RWKV(stem, strategy="cpu fp32")
ids = [(i * 7919) % 65536 for i in range(prefill)]
with torch.no_grad():
    _, state = model.forward(ids[:4], None)
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        _, state = model.forward([ids[i % prefill]], state)
        times.append(time.perf_counter() - t0)
    one = statistics.median(times[2:]) * 1e3
    pre = []
    for _ in range(3):
        t0 = time.perf_counter(); model.forward(ids, None); pre.append(time.perf_counter() - t0)
print(json.dumps({"one_token_ms": one, "prefill_tok_s": prefill / min(pre)}))
"""


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


@torch.no_grad()
def bench_ours(model: Rwkv7Model, steps: int, prefill: int) -> dict:
    ids = [(i * 7919) % VOCAB for i in range(prefill)]
    _, state = model.forward(ids[:4])
    box = [state]

    def one() -> None:
        box[0] = model.forward([ids[len(box) % prefill]], box[0])[1]

    timed(one, 2)
    one_ms = statistics.median(timed(one, steps)) * 1e3
    prefill_s = min(timed(lambda: model.forward(ids), 3))
    pool = model.new_pool(1)
    slot = pool.alloc()

    def sequential() -> None:
        pool.reset(slot)
        model.step(pool, [slot], [ids], logits="all", batch_invariant=True)

    seq_s = min(timed(sequential, 2))
    pool16 = model.new_pool(16)
    slots = [pool16.alloc() for _ in range(16)]
    model.step(pool16, slots, [[i] for i in range(16)])
    s16 = statistics.median(timed(lambda: model.step(pool16, slots, [[ids[i]] for i in range(16)], logits="last"),
                                  max(3, steps // 4)))
    return {"one_token_ms": one_ms, "prefill_tok_s": prefill / prefill_s, "prefill_sequential_tok_s": prefill / seq_s,
            "streams16_tok_s": 16 / s16, "state_bytes": model.state_bytes}


def cpu_times() -> list[int]:
    """Aggregate jiffies from /proc/stat: user nice system idle iowait irq softirq steal."""
    with contextlib.suppress(OSError, StopIteration):
        line = next(x for x in Path("/proc/stat").read_text().splitlines() if x.startswith("cpu "))
        return [int(v) for v in line.split()[1:9]]
    return []


def loadavg() -> str:
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return ""


def host_load(before: list[int], after: list[int]) -> dict:
    """Share of all cores busy (anyone's work, this benchmark's included) and stolen by the hypervisor."""
    if not before or not after:
        return {}
    d = [b - a for a, b in zip(before, after, strict=True)]
    total = sum(d) or 1
    return {"busy_share": round((total - d[3] - d[4]) / total, 3), "steal_share": round(d[7] / total, 3)}


def machine() -> dict:
    cpu = ""
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    return {"cpu": cpu or platform.processor(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": sys.version.split()[0]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="0.1b,0.4b")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared 2-core machine)")
    p.add_argument("--steps", type=int, default=20, help="timed one-token steps")
    p.add_argument("--prefill", type=int, default=128, help="prompt tokens")
    p.add_argument("--peers", default="rwkv", help="'rwkv' or '' for none")
    p.add_argument("--rounds", type=int, default=1,
                   help="rounds per shape, ours and the peer alternating; rows are each metric's median")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    result: dict = {"machine": machine(), "prefill_tokens": args.prefill, "dtype": "float32", "rounds": args.rounds,
                    "results": {}}
    result["host"] = {"loadavg_start": loadavg(), "start_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    jiffies = cpu_times()
    for name in args.shapes.split(","):
        shape_jiffies = cpu_times()
        cfg = rwkv7_config(**SHAPES[name], vocab_size=VOCAB, **RANKS)
        tensors = random_tensors(cfg, seed=0)
        row: dict = {"config": cfg.to_dict()}
        rounds: dict[str, list[dict]] = {"rwkv_stream": [], "rwkv_package_v7": []}
        with tempfile.TemporaryDirectory() as tmp:
            if "rwkv" in args.peers.split(","):
                save_pth(tensors, Path(tmp) / "m.pth")
            model = Rwkv7Model(tensors, cfg)
            del tensors
            gc.collect()
            for _ in range(args.rounds):  # ours and the peer alternate, so both see the same host load
                rounds["rwkv_stream"].append(bench_ours(model, args.steps, args.prefill))
                if "rwkv" in args.peers.split(","):
                    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
                    out = subprocess.run([sys.executable, "-c", PEER, str(Path(tmp) / "m"), str(args.threads),
                                          str(args.steps), str(args.prefill)], env=env, capture_output=True,
                                         text=True, check=True)
                    rounds["rwkv_package_v7"].append(json.loads(out.stdout.strip().splitlines()[-1]))
            del model
            gc.collect()
        for impl, runs in rounds.items():
            if runs:  # the median of each metric over the rounds; every round kept beside it
                row[impl] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                if len(runs) > 1:
                    row[impl + "_rounds"] = runs
        row["host"] = {**host_load(shape_jiffies, cpu_times()), "loadavg_after": loadavg()}
        result["results"][name] = row
        print(f"{name}: {json.dumps(row)}", file=sys.stderr)
    result["host"].update({**host_load(jiffies, cpu_times()), "loadavg_end": loadavg(),
                           "end_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
