"""CPU benchmark: this engine's weight formats against rwkv.cpp (a ``librwkv`` the user already has), RWKV-4
and RWKV-7 (x070).

Prints one JSON object. Per format: its error against fp32 (max |logit error| / max |logit| over a short
sequence, against the engine's plain torch fp32 path), batch-1 ms per token (one token with state, full
logits), tokens/s of 16 live streams stepping one token each (full logits), prefill tokens/s of one stream's
long fragment, the weight bytes read per token and the fraction of the bandwidth floor (those bytes / the read
bandwidth measured in the same run, over the step's time: ``floor_fraction_best`` best read against best step,
``floor_fraction_p50`` median against median, ``floor_fraction_paired_p50`` the median over rounds of each
batch-1 step against a read made just before it). All cases of all engines, and the bandwidth probe,
run interleaved: each round times one step of every case in turn, so load from elsewhere on a shared host hits
all of them alike. The host's CPU and load averages (before and after) are in the JSON.

Families: ``--family rwkv4`` (default; shapes 169m, 430m, tiny) or ``--family rwkv7`` (x070 shapes 0.1b:
L12 x C768, 0.4b: L24 x C1024, head 64, vocabulary 65536, the released models' LoRA ranks 64/64/32/128).

Formats: ``float32, float16, bfloat16, q8_0`` run the compiled kernels where a compiler is present
(:mod:`rwkv_stream.cpu_kernels`; RWKV-7 takes whatever of them its model uses); ``torch:<format>`` builds the
same format on the plain torch path; ``int8`` and ``w8a8`` are torch-only formats (RWKV-4's ``w8a8`` has its
own compiled element-wise layer). Head experiments (not formats the engine builds): ``<format>+q8head`` with
the head quantized to q8_0 (the engine's q8_0 keeps an fp16 head, as rwkv.cpp's Q8_0 files do), ``<format>+fp16head``
with an fp16 head. Bytes per token count every matrix a
token reads (RWKV-7: the six C x C / FFN matrices and the four LoRAs of each layer) and the head, as stored.

rwkv.cpp: pass ``--librwkv PATH`` (or ``$RWKV_CPP_LIB``) and its model files of the same random weights:
``--save-pth FILE`` writes the checkpoint this bench uses (a BlinkDL ``.pth``; for RWKV-7 the x070 layout that
rwkv.cpp's converter detects by ``blocks.0.att.k_k``), which rwkv.cpp's own converter turns into its format
(``python python/convert_pytorch_to_ggml.py FILE out.bin FP16``); then
``--rwkvcpp-models FP32=a.bin,FP16=b.bin[,Q8_0=c.bin]`` (a missing Q8_0 is made with the library's
``rwkv_quantize_model_file`` from the FP16 or FP32 file, in a temporary file removed when the bench exits). Its
state and logits sizes come from the library (``rwkv_get_state_len``, ``rwkv_get_logits_len``). Without a
library the peer is skipped with a message and, for RWKV-4, the issue's figures (issue 18) are the comparison.
This repository holds no rwkv.cpp code.

    .venv/bin/python bench/cpu_vs_rwkvcpp.py [--family rwkv4|rwkv7] [--shape 169m|0.1b] [--formats ...]
        [--rounds 20] [--threads 2] [--librwkv PATH --rwkvcpp-models FP32=...,FP16=...] [--out FILE]
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from rwkv_stream import cpu_kernels
from rwkv_stream.bench import SHAPES, SHAPES7, machine_info
from rwkv_stream.config import AnyConfig
from rwkv_stream.linear import KernelLinear, Linear, Q8Linear, make_linear
from rwkv_stream.models import RecurrentModel, build_model
from rwkv_stream.random_checkpoint import random_tensors, save_pth

ISSUE_FIGURES = {  # issue 18: rwkv.cpp on a 2-core Zen 4 host, 169M shape, 2 threads (another host than today's)
    "rwkv.cpp FP32": {"error": 8e-7, "batch1_ms": 19.3, "floor_fraction": 0.84},
    "rwkv.cpp FP16": {"error": 0.00088, "batch1_ms": 9.65, "floor_fraction": 0.84, "streams16_tok_s": 103},
    "rwkv.cpp Q8_0": {"error": 0.019, "batch1_ms": 7.52, "floor_fraction": 0.72, "streams16_tok_s": 137},
}

FAMILY_SHAPES: dict[str, dict[str, AnyConfig]] = {"rwkv4": dict(SHAPES), "rwkv7": dict(SHAPES7)}
DEFAULT_SHAPE = {"rwkv4": "169m", "rwkv7": "0.1b"}
DEFAULT_FORMATS = {"rwkv4": "float32,float16,bfloat16,q8_0,w8a8,torch:float16",
                   "rwkv7": "float32,float16,bfloat16,q8_0,int8,w8a8"}

Step = Callable[[int], object]
Q8_HEAD = "+q8head"  # format suffix: the head as q8_0 too (an experiment; RWKV-4's q8_0 has an fp16 head)
FP16_HEAD = "+fp16head"  # format suffix: an fp16 head (an experiment for the formats whose head is not fp16)


def head_experiment(fmt: str, weight: torch.Tensor) -> Linear | None:
    """The head a format suffix asks for, else None (the format's own head)."""
    if fmt.endswith(Q8_HEAD):
        return Q8Linear(weight.float())
    if fmt.endswith(FP16_HEAD):
        return make_linear(weight.float(), torch.float16, kernels=cpu_kernels.load() is not None)
    return None


def build_format(tensors: dict[str, torch.Tensor], cfg: AnyConfig, fmt: str) -> RecurrentModel:
    """This engine's model of ``fmt`` (``[torch:]<format>[+q8head|+fp16head]``), as ``rwkv_stream.load`` builds it."""
    name = fmt.removeprefix("torch:").removesuffix(Q8_HEAD).removesuffix(FP16_HEAD)
    if fmt.startswith("torch:"):
        with cpu_kernels.disabled():
            model = build_model(tensors, cfg, dtype=name)
    else:
        model = build_model(tensors, cfg, dtype=name)
    head = head_experiment(fmt, tensors["head.weight"])
    if head is not None:
        model.head_linear = head
    return model


def load_average() -> list[float]:
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]


def cases(one: Step, streams: Step, prefill: Step, args: argparse.Namespace) -> dict[str, tuple[Step, int]]:
    every = {"batch1": (one, 1), f"streams{args.streams}": (streams, args.streams),
             f"prefill{args.prefill}": (prefill, args.prefill)}
    wanted = set(args.cases.split(","))
    return {name: case for name, case in every.items() if any(name.startswith(w) for w in wanted)}


def error_vs(ref: torch.Tensor, logits: torch.Tensor) -> float:
    return float((logits - ref).abs().max() / ref.abs().max())


def matrix_bytes(model: RecurrentModel) -> int:
    """Weight bytes one token reads: every matrix of the blocks (RWKV-7's LoRAs included) and the head, as
    stored (one embedding row is not counted)."""
    lins = [*model.linears(), model.head_linear]
    return sum(lin.nbytes for lin in lins)


def engine_path(model: RecurrentModel) -> str:
    """'kernels': one compiled call per layer (the model's ``_lib``, both families); 'torch+kernel products':
    torch element-wise work around compiled products (an RWKV-7 format without a compiled layer); 'torch'."""
    if getattr(model, "_lib", None) is not None:
        return "kernels"
    if model.family != "rwkv4" and cpu_kernels.load() is not None and any(
            isinstance(lin, KernelLinear) for lin in [*model.linears(), model.head_linear]):
        return "torch+kernel products"
    return "torch"


def engine_entry(model: RecurrentModel, tokens: list[int], ref: torch.Tensor, args: argparse.Namespace) -> dict:
    vocab, n = model.config.vocab_size, args.streams
    logits, _ = model.forward(tokens)
    state = [model.new_state()]

    def one(i: int) -> None:
        _, state[0] = model.forward([i % vocab], state[0])

    pool = model.new_pool(n)
    slots = [pool.alloc() for _ in range(n)]

    def streams(i: int) -> None:
        model.step(pool, slots, [[(i + s) % vocab] for s in range(n)], logits="all")

    prefill_tokens = [(7 * j) % vocab for j in range(args.prefill)]

    def prefill(i: int) -> None:
        model.forward_hidden(prefill_tokens)

    bytes_per_token = matrix_bytes(model)
    return {"error": error_vs(ref, logits), "bytes_per_token": bytes_per_token,
            "path": engine_path(model),
            "cases": cases(one, streams, prefill, args)}


class RwkvCpp:
    """The user's librwkv through its C API (rwkv.h): init, eval, eval_sequence, quantize."""

    def __init__(self, path: str) -> None:
        lib = ctypes.CDLL(path)
        lib.rwkv_init_from_file.argtypes = [ctypes.c_char_p, ctypes.c_uint32, ctypes.c_uint32]
        lib.rwkv_init_from_file.restype = ctypes.c_void_p
        lib.rwkv_eval.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        lib.rwkv_eval.restype = ctypes.c_bool
        lib.rwkv_eval_sequence.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
                                           ctypes.c_void_p, ctypes.c_void_p]
        lib.rwkv_eval_sequence.restype = ctypes.c_bool
        lib.rwkv_get_state_len.argtypes = [ctypes.c_void_p]
        lib.rwkv_get_state_len.restype = ctypes.c_size_t
        lib.rwkv_get_logits_len.argtypes = [ctypes.c_void_p]
        lib.rwkv_get_logits_len.restype = ctypes.c_size_t
        lib.rwkv_quantize_model_file.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p]
        lib.rwkv_quantize_model_file.restype = ctypes.c_bool
        lib.rwkv_init_state.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self.lib = lib

    def entry(self, model_file: str, threads: int, tokens: list[int], ref: torch.Tensor, fmt: str,
              args: argparse.Namespace, cfg: AnyConfig) -> dict:
        lib = self.lib
        ctx = lib.rwkv_init_from_file(model_file.encode(), threads, 0)
        if not ctx:
            return {"skipped": f"rwkv_init_from_file failed for {model_file}"}
        n_state, n_logits = lib.rwkv_get_state_len(ctx), lib.rwkv_get_logits_len(ctx)  # v7's state: L x (2C + C*N)
        if n_logits != cfg.vocab_size:
            return {"skipped": f"{model_file}: {n_logits} logits, not the shape's {cfg.vocab_size} (another model?)"}

        def new_state() -> torch.Tensor:
            st = torch.empty(n_state)
            lib.rwkv_init_state(ctx, st.data_ptr())
            return st

        state, out = new_state(), torch.empty(n_logits)
        rows = []
        for tok in tokens:
            lib.rwkv_eval(ctx, tok, state.data_ptr(), state.data_ptr(), out.data_ptr())
            rows.append(out.clone())
        error = error_vs(ref, torch.stack(rows))
        vocab, n = n_logits, args.streams
        st1 = new_state()

        def one(i: int) -> None:
            lib.rwkv_eval(ctx, i % vocab, st1.data_ptr(), st1.data_ptr(), out.data_ptr())

        states = [new_state() for _ in range(n)]

        def streams(i: int) -> None:  # no batching in rwkv.cpp: one eval per stream
            for s in range(n):
                lib.rwkv_eval(ctx, (i + s) % vocab, states[s].data_ptr(), states[s].data_ptr(), out.data_ptr())

        seq = (ctypes.c_uint32 * args.prefill)(*[(7 * j) % vocab for j in range(args.prefill)])

        def prefill(i: int) -> None:
            st = new_state()
            lib.rwkv_eval_sequence(ctx, seq, args.prefill, st.data_ptr(), st.data_ptr(), None)

        # bytes read per token: the file less its embedding matrix (one row of it is read per token); rwkv.cpp
        # keeps emb and head in FP16 in its FP16 and Q8_0 files (quantize converts the blocks' matrices only)
        emb_bytes = cfg.vocab_size * cfg.n_embd * (4 if fmt == "FP32" else 2)
        return {"error": error, "bytes_per_token": os.path.getsize(model_file) - emb_bytes, "path": model_file,
                "cases": cases(one, streams, prefill, args)}


def bandwidth_case(nbytes: int) -> tuple[Step, int, Callable[[float], float]]:
    """A read of ``nbytes`` (beyond the caches) by the compiled kernel, else by torch's sum, from memory placed
    as the engine places its weights (:func:`rwkv_stream.cpu_kernels.huge_page_buffer`: huge pages where Linux
    allows), so that the floor is the rate the weights could be read at, not a slower one."""
    lib = cpu_kernels.load()
    buf = cpu_kernels.huge_page_buffer(nbytes // 8 * 8).view(torch.int64).fill_(1)
    if lib is not None:
        def read(i: int) -> None:
            lib.rs_read_sum(buf.data_ptr(), buf.numel(), torch.get_num_threads())
    else:
        view = buf.view(torch.float32)

        def read(i: int) -> None:
            view.sum()
    return read, nbytes, lambda seconds: nbytes / seconds


def measure(impls: dict[str, dict], rounds: int, bw_bytes: int, warmup: int = 2) -> tuple[dict, dict]:
    """Every case of every engine once a round, after one read of the probe; each batch-1 step right after a
    read of its own (its paired probe, for ``floor_fraction_paired``: on a host whose neighbours come and go,
    a step and the read next to it meet the same load, where the run's best read and best step may not)."""
    cases = [(impl, name, case) for impl, info in impls.items() for name, case in info.get("cases", {}).items()]
    read, nbytes, _ = bandwidth_case(bw_bytes)
    times: dict[tuple[str, str], list[float]] = {(impl, name): [] for impl, name, _ in cases}
    paired: dict[str, list[float]] = {impl: [] for impl, name, _ in cases if name == "batch1"}
    bw_times: list[float] = []
    for r in range(-warmup, rounds):
        t0 = time.perf_counter()
        read(r)
        if r >= 0:
            bw_times.append(time.perf_counter() - t0)
        for impl, name, (step, _) in cases:
            if name == "batch1":
                t0 = time.perf_counter()
                read(r)
                if r >= 0:
                    paired[impl].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            step(r + warmup)
            if r >= 0:
                times[impl, name].append(time.perf_counter() - t0)
        print(f"round {r + 1}/{rounds}", file=sys.stderr, flush=True)
    bw = {"bytes": nbytes, "gb_s_best": round(nbytes / min(bw_times) / 1e9, 2),
          "gb_s_p50": round(nbytes / statistics.median(bw_times) / 1e9, 2)}
    results = {impl: {k: v for k, v in info.items() if k != "cases"} for impl, info in impls.items()}
    for impl, name, (_, tokens) in cases:
        ts = times[impl, name]
        med, best = statistics.median(ts), min(ts)
        results[impl][name] = {"ms_per_step_p50": round(med * 1e3, 3), "ms_per_step_min": round(best * 1e3, 3),
                               "tokens_per_s_p50": round(tokens / med, 1), "tokens_per_s_best": round(tokens / best, 1)}
    for info in results.values():
        if "batch1" in info and "bytes_per_token" in info:
            floor_best = info["bytes_per_token"] / (bw["gb_s_best"] * 1e9) * 1e3
            floor_p50 = info["bytes_per_token"] / (bw["gb_s_p50"] * 1e9) * 1e3
            info["floor_ms_at_best_bw"] = round(floor_best, 3)
            info["floor_fraction_best"] = round(floor_best / info["batch1"]["ms_per_step_min"], 3)
            info["floor_fraction_p50"] = round(floor_p50 / info["batch1"]["ms_per_step_p50"], 3)
    for impl, reads in paired.items():
        info = results[impl]
        if "bytes_per_token" in info:  # per round: (bytes / the paired read's rate) / the step's time
            ratios = [info["bytes_per_token"] * t_read / (nbytes * t_step)
                      for t_read, t_step in zip(reads, times[impl, "batch1"], strict=True)]
            info["floor_fraction_paired_p50"] = round(statistics.median(ratios), 3)
    return results, bw


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", default="rwkv4", choices=sorted(FAMILY_SHAPES))
    p.add_argument("--shape", default=None, help="rwkv4: 169m (default), 430m, tiny; rwkv7: 0.1b (default), 0.4b, tiny")
    p.add_argument("--formats", default=None, help=f"rwkv4: {DEFAULT_FORMATS['rwkv4']}; "
                                                   f"rwkv7: {DEFAULT_FORMATS['rwkv7']}")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--prefill", type=int, default=64, help="tokens of the long fragment (one stream, one call)")
    p.add_argument("--error-tokens", type=int, default=16)
    p.add_argument("--cases", default="batch1,streams,prefill", help="of batch1, streams, prefill")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bandwidth-mib", type=int, default=512)
    p.add_argument("--librwkv", default=os.environ.get("RWKV_CPP_LIB"), help="path of librwkv (or $RWKV_CPP_LIB)")
    p.add_argument("--rwkvcpp-models", default="", help="FMT=FILE,... (FP32, FP16, Q8_0) of the same weights")
    p.add_argument("--save-pth", default=None, help="write the random checkpoint (for rwkv.cpp's converter) and exit")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    shapes = FAMILY_SHAPES[args.family]
    args.shape = args.shape or DEFAULT_SHAPE[args.family]
    if args.shape not in shapes:
        p.error(f"--shape {args.shape!r} is not a {args.family} shape (one of {', '.join(sorted(shapes))})")
    args.formats = DEFAULT_FORMATS[args.family] if args.formats is None else args.formats
    rwkv4 = args.family == "rwkv4"
    torch.set_num_threads(args.threads)
    cfg = shapes[args.shape]
    tensors = random_tensors(cfg, seed=0)
    if args.save_pth:
        save_pth(tensors, Path(args.save_pth))
        print(json.dumps({"saved": args.save_pth, "shape": args.shape, **({} if rwkv4 else {"family": args.family})}))
        return 0
    load_before = load_average()
    tokens = [(31 * j + 5) % cfg.vocab_size for j in range(args.error_tokens)]
    result: dict = {"machine": {**machine_info(), "loadavg_before": load_before},
                    "kernels": cpu_kernels.features(), **({} if rwkv4 else {"family": args.family}),
                    "shape": args.shape, "config": cfg.to_dict()}
    impls: dict[str, dict] = {}
    with torch.inference_mode():
        with cpu_kernels.disabled():
            ref, _ = build_model(tensors, cfg, dtype="float32").forward(tokens)
        for fmt in filter(None, args.formats.split(",")):
            print(f"bench: building {fmt}", file=sys.stderr, flush=True)
            impls[f"rwkv-stream {fmt}"] = engine_entry(build_format(tensors, cfg, fmt), tokens, ref, args)
        impls.update(rwkvcpp_entries(args, cfg, tokens, ref, result))
        results, bw = measure(impls, args.rounds, args.bandwidth_mib << 20)
    result["read_bandwidth"] = bw
    result["results"] = results
    result["machine"]["loadavg_after"] = load_average()
    if rwkv4:  # the issue's peer figures are of the RWKV-4 169M shape
        result["issue_18_rwkvcpp_figures"] = ISSUE_FIGURES
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    del impls
    gc.collect()
    return 0


def rwkvcpp_entries(args: argparse.Namespace, cfg: AnyConfig, tokens: list[int], ref: torch.Tensor,
                    result: dict) -> dict[str, dict]:
    if not args.librwkv:
        against = "issue_18_rwkvcpp_figures and the floor" if args.family == "rwkv4" else "the floor"
        msg = f"rwkv.cpp skipped: no librwkv given (--librwkv PATH or $RWKV_CPP_LIB); compare with {against}"
        print(f"bench: {msg}", file=sys.stderr)
        result["rwkv.cpp"] = {"skipped": msg}
        return {}
    try:
        peer = RwkvCpp(args.librwkv)
    except OSError as exc:
        result["rwkv.cpp"] = {"skipped": f"cannot load {args.librwkv}: {exc}"}
        print(f"bench: {result['rwkv.cpp']['skipped']}", file=sys.stderr)
        return {}
    files = dict(item.split("=", 1) for item in filter(None, args.rwkvcpp_models.split(",")))
    if not files:
        result["rwkv.cpp"] = {"skipped": "no --rwkvcpp-models given (convert the --save-pth checkpoint with rwkv.cpp)"}
        return {}
    if "Q8_0" not in files:
        src = files.get("FP16") or files.get("FP32")
        tmp = tempfile.mkdtemp()
        atexit.register(shutil.rmtree, tmp, True)  # rwkv.cpp reads the file at init: removed when the bench exits
        out = os.path.join(tmp, "q8_0.bin")
        if src and peer.lib.rwkv_quantize_model_file(src.encode(), out.encode(), b"Q8_0"):
            files["Q8_0"] = out
    entries = {}
    for fmt, path in files.items():
        print(f"bench: rwkv.cpp {fmt}", file=sys.stderr, flush=True)
        entries[f"rwkv.cpp {fmt}"] = peer.entry(path, args.threads, tokens, ref, fmt, args, cfg)
    result["rwkv.cpp"] = {"library": args.librwkv, "files": files}
    return entries


if __name__ == "__main__":
    raise SystemExit(main())
