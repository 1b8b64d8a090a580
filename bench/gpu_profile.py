"""Where a one-token GPU step spends its time: torch.profiler over ``Model.step`` at batch 1 (and one larger
batch) for the RWKV-4 169M and RWKV-7 0.1B shapes (random weights, fp16, arena in place).

Prints, per case: wall ms per step, the number of CUDA kernel launches and of host-device synchronizations
per step, and the top operators by host (self CPU) time and by device time. A step far slower than its device
time is launch- or sync-bound; the tables say which operators to fuse or move off the host.

    python bench/gpu_profile.py [--steps 20] [--batches 1,64]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_bench  # noqa: E402  (the benchmark's shapes and random weights)

from rwkv_stream.random_checkpoint import random_tensors, rwkv7_config  # noqa: E402


def build(family: str) -> tuple[object, int]:
    if family == "rwkv4":
        cfg = gpu_bench.SHAPES["169m"]
        weights = gpu_bench.random_weights(cfg, torch.float16, gpu_bench.Env.device)
        return gpu_bench.build_model(cfg, weights, torch.float16), cfg.vocab_size
    n_layer, n_embd, vocab, (rw, ra, rv, rg) = gpu_bench.SHAPES7["rwkv7-0.1b"]
    cfg7 = rwkv7_config(n_layer, n_embd, vocab, rank_w=rw, rank_a=ra, rank_v=rv, rank_g=rg)
    return gpu_bench.build_model7(cfg7, random_tensors(cfg7, seed=0), "float16"), vocab


def profile_case(model: object, vocab: int, batch: int, steps: int) -> str:
    pool = model.new_pool(batch, growable=False)  # type: ignore[attr-defined]
    slots = [pool.alloc() for _ in range(batch)]

    def step(i: int) -> None:
        model.step(pool, slots, [[(i + s) % vocab] for s in range(batch)], logits="last")  # type: ignore[attr-defined]

    for i in range(5):
        step(i)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            step(i)
        torch.cuda.synchronize()
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    syncs = sum(e.count for e in events if "Synchronize" in e.key or e.key in ("cudaMemcpy", "aten::item",
                                                                                 "aten::_local_scalar_dense"))
    head = (f"wall {wall_ms:.3f} ms/step; per step: {launches / steps:.0f} kernel launches, "
            f"{syncs / steps:.1f} sync-like calls (synchronize, blocking cudaMemcpy, item)")
    by_cpu = events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)
    by_dev = events.table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=60)
    return f"{head}\n-- by host time\n{by_cpu}\n-- by device time\n{by_dev}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--families", default="rwkv4,rwkv7")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_profile: no CUDA device", file=sys.stderr)
        return 2
    gpu_bench.Env.device = torch.device("cuda")
    with torch.inference_mode():
        for family in args.families.split(","):
            model, vocab = build(family)
            for batch in (int(b) for b in args.batches.split(",")):
                print(f"==== {family} batch {batch}", flush=True)
                print(profile_case(model, vocab, batch, args.steps), flush=True)
            del model
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
