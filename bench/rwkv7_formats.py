"""Accuracy of RWKV-7's weight formats (bf16, fp16, int8, w8a8) against fp32 on CPU; prints JSON.

    .venv/bin/python bench/rwkv7_formats.py [--tokens 256] [--random-shape 12x768] [--threads 1]

Models: rwkv.cpp's trained tiny x070 (``shared/fixtures/rwkv-tiny/tiny-rwkv-7v0-834K.pth``, byte-level; text:
the demo transcript's bytes) and a random x070 of the given shape (random weights in realistic ranges, the
0.1B model's L12 x C768 by default, vocabulary 4096). Per format, over the whole sequence run as one call
and as one-token steps: the largest |logit error| relative to the largest |logit|, the relative L2 error of
all logits, top-1 agreement with fp32, mean KL(fp32 || format) per token, the relative L2 error of the final
state, and for the trained model the bits per byte of the text under each format.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from rwkv_stream import load
from rwkv_stream.models import Rwkv7Model
from rwkv_stream.random_checkpoint import random_tensors, rwkv7_config

ROOT = Path(__file__).resolve().parents[1]
TINY7 = ROOT.parent / "shared" / "fixtures" / "rwkv-tiny" / "tiny-rwkv-7v0-834K.pth"
FORMATS = ("bfloat16", "float16", "int8", "w8a8")


def compare(ref: torch.Tensor, got: torch.Tensor, ref_state: torch.Tensor, got_state: torch.Tensor,
            ids: list[int] | None) -> dict[str, float]:
    logp_ref, logp = F.log_softmax(ref, -1), F.log_softmax(got, -1)
    out = {
        "max_rel_logit_error": float((got - ref).abs().max() / ref.abs().max()),
        "rel_l2_logit_error": float((got - ref).norm() / ref.norm()),
        "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).float().mean()),
        "mean_kl_nats": float((logp_ref.exp() * (logp_ref - logp)).sum(-1).mean()),
        "rel_l2_state_error": float((got_state - ref_state).norm() / ref_state.norm()),
    }
    if ids is not None:
        out["bits_per_byte"] = bits_per_token(logp, ids)
    return {k: round(v, 6) for k, v in out.items()}


def bits_per_token(logp: torch.Tensor, ids: list[int]) -> float:
    target = torch.tensor(ids[1:])
    return float(-logp[:-1].gather(1, target[:, None]).mean() / math.log(2))


def run(model: Rwkv7Model, ids: list[int], stepwise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if not stepwise:
        logits, state = model.forward(ids)
        return logits, state.tensor
    state, rows = None, []
    for tok in ids:
        lg, state = model.forward([tok], state)
        rows.append(lg)
    assert state is not None
    return torch.cat(rows), state.tensor


def measure(name: str, make: dict[str, Rwkv7Model] | None, source: object, ids: list[int], bytes_text: bool
            ) -> dict:
    report: dict = {"model": name, "tokens": len(ids), "formats": {}}
    models = {fmt: load(source, dtype=fmt) if make is None else make[fmt] for fmt in ("float32", *FORMATS)}
    for mode in ("whole", "one_token_steps"):
        t0 = time.time()
        ref, ref_state = run(models["float32"], ids, mode != "whole")
        if bytes_text:
            report.setdefault("float32_bits_per_byte", {})[mode] = round(bits_per_token(F.log_softmax(ref, -1), ids), 4)
        for fmt in FORMATS:
            got, state = run(models[fmt], ids, mode != "whole")
            report["formats"].setdefault(fmt, {})[mode] = compare(ref, got, ref_state, state,
                                                                  ids if bytes_text else None)
        print(f"{name} {mode}: {time.time() - t0:.1f} s", file=sys.stderr)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--random-shape", default="12x768", help="LAYERSxWIDTH of the random model ('' to skip)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    text = (ROOT / "rwkv_stream" / "data" / "demo" / "sample_transcript.txt").read_bytes()
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "torch": torch.__version__, "threads": args.threads}
    result: dict = {"machine": machine, "models": []}
    if TINY7.exists():
        ids = list(text[: args.tokens])
        result["models"].append(measure("rwkv.cpp tiny-rwkv-7v0-834K (trained, L12 x C64, bytes)", None, TINY7,
                                        ids, bytes_text=True))
    if args.random_shape:
        n_layer, n_embd = (int(x) for x in args.random_shape.split("x"))
        cfg = rwkv7_config(n_layer, n_embd, 4096, rank_w=64, rank_a=64, rank_v=32, rank_g=128)
        tensors = random_tensors(cfg, seed=0)
        make = {fmt: Rwkv7Model(tensors, cfg, dtype=fmt) for fmt in ("float32", *FORMATS)}
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(0, cfg.vocab_size, (min(args.tokens, 128),), generator=gen).tolist()
        result["models"].append(measure(f"random x070 L{n_layer} x C{n_embd} (vocab 4096)", make, None, ids,
                                        bytes_text=False))
    json.dump(result, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
