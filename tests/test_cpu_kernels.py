"""The compiled CPU kernels (rwkv_stream.cpu_kernels) and their fallback: products against torch, rows
independent of their batch mates, the fused RWKV-4 layer against the torch path, q8_0 with and without a
compiler, and the rwkv.cpp comparison bench on a tiny shape."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import NON_NATIVE_BUILDS, TINY, kernels_built_for

from rwkv_stream import cpu_kernels, load
from rwkv_stream.linear import ColumnKernelLinear, KernelLinear, Q8Linear, make_linear, q8_0_reference

ROOT = Path(__file__).resolve().parents[1]
TEXT = [5, 17, 3, 88, 42, 1, 0, 96, 33, 7, 64, 12, 9, 50, 21, 70]
needs_kernels = pytest.mark.skipif(cpu_kernels.load() is None, reason="no C compiler: kernels not built")


@pytest.fixture
def no_kernels(monkeypatch, tmp_path):
    """As on a machine without a compiler: kernels off for this test, library state restored after."""
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    cpu_kernels.reset()
    yield
    monkeypatch.delenv(cpu_kernels.ENV_SWITCH)
    cpu_kernels.reset()


@needs_kernels
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_float_kernels_match_torch(dtype, tol):
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(70, 96, generator=gen), torch.randn(9, 96, generator=gen)
    lin = KernelLinear(w, dtype)
    ref = x @ w.to(dtype).float().t()
    y = lin(x)
    assert y.dtype == torch.float32 and y.shape == (9, 70)
    assert (y - ref).abs().max() / ref.abs().max() < (1e-6 if dtype != torch.float32 else tol)
    assert (y - x @ w.t()).abs().max() / ref.abs().max() < tol


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("out,n_in", [(768, 64), (770, 32), (100, 128), (33, 96), (7, 32)])  # 64-wide units, tails
def test_column_layout_products_match_torch_and_keep_the_weight_view(dtype, out, n_in):
    gen = torch.Generator().manual_seed(6)
    w, x = torch.randn(out, n_in, generator=gen), torch.randn(5, n_in, generator=gen)
    lin = ColumnKernelLinear(w, dtype)
    assert lin.weight.shape == (out, n_in) and torch.equal(lin.weight, w.to(dtype))  # a view of the W^T storage
    assert lin.stored.is_contiguous() and lin.weight.data_ptr() == lin.stored.data_ptr() == lin.mat.w
    assert lin.nbytes == out * n_in * lin.weight.element_size()
    ref = (x.double() @ w.to(dtype).double().t())
    y = lin(x)
    assert y.shape == (5, out) and (y.double() - ref).abs().max() / ref.abs().max() < 1e-6
    assert (lin.gemm(x).double() - ref).abs().max() / ref.abs().max() < 1e-2  # torch's GEMM on the same view


def test_short_rows_take_the_column_layout():
    gen = torch.Generator().manual_seed(7)
    assert isinstance(make_linear(torch.randn(768, 64, generator=gen), torch.float16, kernels=True),
                      ColumnKernelLinear)
    for shape in [(64, 768), (768, 768), (200, 64), (768, 160)]:  # long rows, or not 4x as many outputs
        lin = make_linear(torch.randn(*shape, generator=gen), torch.float16, kernels=True)
        assert type(lin) is KernelLinear, shape


@needs_kernels
@pytest.mark.parametrize("out,n_in", [(50, 128), (51, 512), (8, 768)])  # 128: inputs padded to a group of 256
def test_q8_0_kernel_matches_its_torch_emulation_and_fp32(out, n_in):
    gen = torch.Generator().manual_seed(1)
    w, x = torch.randn(out, n_in, generator=gen), torch.randn(7, n_in, generator=gen)
    lin = Q8Linear(w)
    y = lin(x)
    q, scales = cpu_kernels.quantize_q8_0(w)
    assert torch.equal(scales, scales.half().float())  # fp16 scales, as packed
    emulated = q8_0_reference(q, scales, x)
    assert (y - emulated).abs().max() <= 1e-5 * emulated.abs().max()  # same integers, fp32 sums in another order
    ref = x @ w.t()
    assert (y - ref).abs().max() / ref.abs().max() < 0.01  # int16 activations: the weights' rounding dominates
    groups, pairs = -(-n_in // 256), -(-out // 2)
    assert lin.nbytes == pairs * groups * (32 + 512)  # scales inline, rows in pairs, inputs padded
    uq, us = lin.unpacked()
    assert torch.equal(uq, q) and torch.equal(us, scales)


def test_q8_0_packing_round_trips_and_pads():
    gen = torch.Generator().manual_seed(4)
    for out, n_in in [(1, 32), (3, 288), (10, 512)]:
        q, s = cpu_kernels.quantize_q8_0(torch.randn(out, n_in, generator=gen))
        packed = cpu_kernels.pack_q8_0(q, s)
        assert packed.dtype == torch.uint8
        assert packed.shape == (-(-out // 2), -(-n_in // 256), cpu_kernels.PAIR_GROUP_BYTES)
        uq, us = cpu_kernels.unpack_q8_0(packed, out, n_in)
        assert torch.equal(uq, q) and torch.equal(us, s)


@needs_kernels
def test_q8_0_and_float_bits_are_the_same_on_avx2_and_scalar_builds(tmp_path):
    """The AVX-512 build (where the CPU has it), an AVX2 build and a build without vector code give q8_0
    products the same bits (exact integer block sums, then the same fp32 operations per lane), and so do
    column-layout products (one fmaf chain per output); the row-major float kinds agree between AVX-512 and
    AVX2."""
    compiler = cpu_kernels.shutil.which("cc") or cpu_kernels.shutil.which("gcc")
    src = tmp_path / "k.c"
    src.write_text(cpu_kernels.SOURCE)
    libs = {}
    for name, march in [("avx2", ["-march=x86-64-v3", "-mf16c"]), ("scalar", ["-march=x86-64"])]:
        so = tmp_path / f"{name}.so"
        flags = [f for f in cpu_kernels.CFLAGS if f != "-march=native"]
        proc = subprocess.run([compiler, *flags, *march, str(src), "-o", str(so), "-lm"], capture_output=True)
        if proc.returncode:
            pytest.skip(f"{name} build failed: {proc.stderr[-200:]!r}")
        lib = ctypes.CDLL(str(so))
        lib.rs_matmul.argtypes = [ctypes.POINTER(cpu_kernels.RsMat), ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                  ctypes.c_int]
        libs[name] = lib
    gen = torch.Generator().manual_seed(5)
    columns = lambda w: ColumnKernelLinear(w, torch.float16)  # noqa: E731
    for make, builds, shapes in [(Q8Linear, ("avx2", "scalar"), [(9, 96), (6, 768)]),
                                 (lambda w: KernelLinear(w, torch.float16), ("avx2",), [(9, 96), (6, 768)]),
                                 (columns, ("avx2", "scalar"), [(200, 64), (97, 32)])]:
        for out, n_in in shapes:
            lin = make(torch.randn(out, n_in, generator=gen))
            x = torch.randn(5, n_in, generator=gen)
            native = lin(x)
            for name in builds:
                for n in (1, 5):
                    y = torch.empty(n, out)
                    libs[name].rs_matmul(ctypes.byref(lin.mat), x.data_ptr(), n, y.data_ptr(), 1)
                    assert torch.equal(y, native[:n]), (name, n, out, n_in)


@needs_kernels
@pytest.mark.parametrize("make", [lambda w: KernelLinear(w, torch.float16), lambda w: KernelLinear(w, torch.float32),
                                  lambda w: KernelLinear(w, torch.bfloat16), Q8Linear,
                                  lambda w: ColumnKernelLinear(w, torch.float16),
                                  lambda w: ColumnKernelLinear(w, torch.bfloat16)])
@pytest.mark.parametrize("n_in", [64, 256, 768, 1056])
@pytest.mark.parametrize("out", [33, 34, 35])  # AVX2 16-bit products over 4+ rows: weight rows in threes, and the rest
def test_each_row_is_bitwise_independent_of_the_others(make, n_in, out):
    gen = torch.Generator().manual_seed(2)
    lin = make(torch.randn(out, n_in, generator=gen))
    x = torch.randn(11, n_in, generator=gen)
    whole = lin(x)
    for n in range(1, 11):
        for s in (0, 11 - n):
            assert torch.equal(lin(x[s:s + n]), whole[s:s + n])


@needs_kernels
@pytest.mark.parametrize("fmt,tol", [("float16", 5e-3), ("bfloat16", 5e-2), ("q8_0", 5e-2)])
def test_fused_layers_match_the_torch_path(tiny_pth, fmt, tol):
    ref_model = _torch_model(tiny_pth, "float32")
    ref, ref_state = ref_model.forward(TEXT)
    model = load(tiny_pth, dtype=fmt)
    assert model._lib is not None  # the compiled path
    logits, state = model.forward(TEXT)
    assert (logits - ref).abs().max() / ref.abs().max() < tol
    assert (state.tensor - ref_state.tensor).abs().max() < max(tol, 1e-4) * ref_state.tensor.abs().max()
    one = model.new_state()
    rows = []
    for tok in TEXT:  # one token per call: the same bits as the whole sequence in one call
        out, one = model.forward([tok], one)
        rows.append(out)
    assert torch.equal(torch.cat(rows), logits)
    assert torch.equal(one.tensor, state.tensor)


@needs_kernels
@pytest.mark.parametrize("fmt", ["float16", "q8_0"])
def test_fused_path_on_a_real_width(tmp_path, fmt):
    """256 wide: the grouped q8_0 layout inside the fused layers."""
    from rwkv_stream import ModelConfig
    from rwkv_stream.random_checkpoint import random_tensors, save_pth

    cfg = ModelConfig(n_layer=2, n_embd=256, vocab_size=97, ffn_dim=1024)
    save_pth(random_tensors(cfg, seed=3), tmp_path / "w.pth")
    ref, _ = _torch_model(tmp_path / "w.pth", "float32").forward(TEXT)
    model = load(tmp_path / "w.pth", dtype=fmt)
    logits, state = model.forward(TEXT)
    assert (logits - ref).abs().max() / ref.abs().max() < (5e-3 if fmt == "float16" else 3e-2)
    pool = model.new_pool(4)
    a, b, c = pool.alloc(), pool.alloc(), pool.alloc()
    solo = model.step(pool, [a], [TEXT[:3]])
    shared = model.step(pool, [b, c], [[9, 9, 9, 9, 9], TEXT[:3]])
    assert torch.equal(solo.logits[0], shared.logits[1])


@needs_kernels
@NON_NATIVE_BUILDS
def test_fused_layers_built_without_avx512_or_vector_code_agree_with_the_native_build(monkeypatch, tmp_path,
                                                                                      tiny_pth, march):
    """The AVX2 and plain-C builds of the fused RWKV-4 layers (q8_0 inputs padded to a group; the tiny model's
    channel-mix key is in the column layout) against the native build: the same numbers up to WKV's exp (vector
    vs libm), and batch mates still change no bits."""
    native = {fmt: load(tiny_pth, dtype=fmt).forward(TEXT)[0] for fmt in ("float16", "q8_0")}
    with kernels_built_for(monkeypatch, tmp_path, march, cpu_kernels.reset):
        for fmt, want in native.items():
            model = load(tiny_pth, dtype=fmt)
            assert model._lib is not None and str(tmp_path) in model._lib._name
            got, _ = model.forward(TEXT)
            assert (got - want).abs().max() / want.abs().max() < 2e-4, fmt
            pool = model.new_pool(4)
            alone, mates = pool.alloc(), [pool.alloc(), pool.alloc()]
            solo = model.step(pool, [alone], [TEXT[:4]]).logits
            shared = model.step(pool, mates, [TEXT[5:], TEXT[:4]]).logits
            assert torch.equal(solo[0], shared[1])  # type: ignore[index]


@needs_kernels
@pytest.mark.parametrize("fmt", ["float16", "bfloat16", "q8_0"])
def test_fused_steps_do_not_depend_on_batch_mates_even_without_padding(tiny_pth, fmt):
    model = load(tiny_pth, dtype=fmt)
    assert model.invariant_rows == 1  # no padding needed: each row is computed on its own
    pool = model.new_pool(8)
    alone, crowd = pool.alloc(), [pool.alloc() for _ in range(3)]
    solo = model.step(pool, [alone], [TEXT[:5]])
    shared = model.step(pool, crowd, [TEXT[20:27] or [4, 4], TEXT[:5], [3]])
    assert torch.equal(solo.logits[0], shared.logits[1])
    assert torch.equal(pool.read(alone).tensor, pool.read(crowd[1]).tensor)


def test_q8_0_runs_without_a_compiler(tiny_pth, no_kernels):
    assert cpu_kernels.load() is None
    model = load(tiny_pth, dtype="q8_0")
    assert model._lib is None
    ref, _ = load(tiny_pth).forward(TEXT)
    logits, _ = model.forward(TEXT)
    assert (logits - ref).abs().max() / ref.abs().max() < 5e-2
    pool = model.new_pool(4)
    a, b = pool.alloc(), pool.alloc()
    solo = model.step(pool, [a], [TEXT[:4]], batch_invariant=True)
    shared = model.step(pool, [b, pool.alloc()], [TEXT[:4], [7, 8, 9]], batch_invariant=True)
    assert torch.equal(solo.logits[0], shared.logits[0])


@needs_kernels
def test_fallback_and_compiled_q8_0_agree(tiny_pth, monkeypatch):
    compiled, _ = load(tiny_pth, dtype="q8_0").forward(TEXT)
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    cpu_kernels.reset()
    try:
        fallback, _ = load(tiny_pth, dtype="q8_0").forward(TEXT)
    finally:
        monkeypatch.delenv(cpu_kernels.ENV_SWITCH)
        cpu_kernels.reset()
    assert (compiled - fallback).abs().max() / fallback.abs().max() < 1e-3


@pytest.mark.parametrize("cc", ["missing", "failing"])
def test_no_or_broken_compiler_logs_one_line_and_falls_back(tiny_pth, monkeypatch, tmp_path, caplog, cc):
    monkeypatch.setenv("RWKV_STREAM_CACHE", str(tmp_path / "cache"))
    if cc == "missing":
        monkeypatch.setattr(cpu_kernels.shutil, "which", lambda name: None)
    else:
        script = tmp_path / "cc"
        script.write_text("#!/bin/sh\n[ \"$1\" = --version ] && { echo fake 1.0; exit 0; }\necho 'boom' >&2\nexit 1\n")
        script.chmod(0o755)
        monkeypatch.setenv("CC", str(script))
    cpu_kernels.reset()
    try:
        with caplog.at_level(logging.WARNING, logger="rwkv_stream.cpu_kernels"):
            assert cpu_kernels.load() is None
            model = load(tiny_pth, dtype="float16")
        assert len(caplog.records) == 1 and "torch path" in caplog.records[0].getMessage()
        assert model._lib is None
        logits, _ = model.forward(TEXT)
        assert torch.isfinite(logits).all()
    finally:
        cpu_kernels.reset()


@needs_kernels
def test_kernels_are_cached_under_the_user_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("RWKV_STREAM_CACHE", str(tmp_path))
    cpu_kernels.reset()
    try:
        assert cpu_kernels.load() is not None
        assert list((tmp_path / "cpu-kernels").glob("rwkv_stream_cpu_*.so"))
    finally:
        cpu_kernels.reset()


def test_old_builds_are_pruned_and_used_ones_kept(monkeypatch, tmp_path):
    monkeypatch.setenv("RWKV_STREAM_CACHE", str(tmp_path))
    cache = tmp_path / "cpu-kernels"
    cache.mkdir()
    stale, recent, other = cache / "rs_test_0001.so", cache / "rs_test_0002.so", cache / "another_0003.so"
    for path in (stale, recent, other):
        path.write_bytes(b"")
    month = 31 * 86400
    os.utime(stale, (os.path.getatime(stale) - month, os.path.getmtime(stale) - month))
    os.utime(other, (os.path.getatime(other) - month, os.path.getmtime(other) - month))
    if cpu_kernels.find_compiler() is None:
        pytest.skip("no C compiler")
    built = cpu_kernels.build_library(cpu_kernels.find_compiler(), "rs_test", "int rs_test(void) { return 3; }",
                                      (["-O1", "-fPIC", "-shared"],))
    assert built.exists() and not stale.exists()  # a month unused: removed when a new build lands
    assert recent.exists() and other.exists()  # recently used, or another library's: kept
    os.utime(built, (0, 0))
    assert cpu_kernels.build_library(cpu_kernels.find_compiler(), "rs_test", "int rs_test(void) { return 3; }",
                                     (["-O1", "-fPIC", "-shared"],)) == built
    assert built.stat().st_mtime > 86400  # a cache hit marks the build as used


def test_bench_runs_on_a_tiny_shape_and_prints_json(monkeypatch):
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "cpu_vs_rwkvcpp.py"), "--shape", "tiny", "--rounds", "1",
         "--formats", "float16,q8_0,torch:float32", "--bandwidth-mib", "8", "--prefill", "4", "--streams", "2",
         "--threads", "1"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert "skipped" in data["rwkv.cpp"]  # no librwkv given
    assert "loadavg_before" in data["machine"] and data["read_bandwidth"]["gb_s_best"] > 0
    row = data["results"]["rwkv-stream q8_0"]
    assert row["error"] < 0.05 and row["batch1"]["ms_per_step_p50"] > 0 and row["floor_fraction_best"] > 0
    assert row["floor_fraction_paired_p50"] > 0
    assert data["results"]["rwkv-stream torch:float32"]["path"] == "torch"


def _torch_model(path, fmt):
    with cpu_kernels.disabled():
        return load(path, dtype=fmt)


def test_tiny_config_is_kernel_sized():
    assert TINY.n_embd % cpu_kernels.QBLOCK == 0 and TINY.ffn_dim % cpu_kernels.QBLOCK == 0


@needs_kernels
def test_float32_stays_on_the_torch_path(tiny_pth):
    """The default format runs MKL's products with or without a compiler (same bits; prefill and batched
    session steps several times faster than the kernels' few rows at a time)."""
    model = load(tiny_pth, dtype="float32")
    assert model._lib is None
    with cpu_kernels.disabled():
        plain = load(tiny_pth, dtype="float32")
    assert torch.equal(model.forward(TEXT)[0], plain.forward(TEXT)[0])


@needs_kernels
@pytest.mark.parametrize("fmt", ["float16", "q8_0"])
def test_bits_do_not_depend_on_threads_or_schedule(tiny_pth, fmt):
    """Output rows are dealt to threads in chunks (dynamic by default); whoever computes a row computes it alike,
    so one thread, two threads, static, dynamic and guided schedules and any chunk size give the same bits."""
    lib = cpu_kernels.load()
    model = load(tiny_pth, dtype=fmt)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ref, ref_state = model.forward(TEXT)
        torch.set_num_threads(2)
        for mode, chunk in [(1, 64), (1, 1), (0, 0), (2, 4)]:
            lib.rs_set_schedule(mode, chunk)
            logits, state = model.forward(TEXT)
            assert torch.equal(logits, ref) and torch.equal(state.tensor, ref_state.tensor), (mode, chunk)
    finally:
        lib.rs_set_schedule(0, 64)  # the default: static shares
        torch.set_num_threads(threads)


def test_no_compiler_in_a_fresh_process_runs_the_torch_path(tiny_pth, tmp_path):
    """As on a user's machine without a compiler: ``CC`` names nothing and no ``cc``/``gcc`` is on ``PATH`` (and,
    separately, the kernels switched off): q8_0 and float16 load, step and give finite logits on the torch path."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    code = ("import sys, torch; from rwkv_stream import cpu_kernels, load; assert cpu_kernels.load() is None; "
            "m = load(sys.argv[1], dtype='q8_0'); assert m._lib is None; "
            "assert torch.isfinite(m.forward([1, 2, 3])[0]).all(); "
            "assert torch.isfinite(load(sys.argv[1], dtype='float16').forward([4, 5])[0]).all(); print('ok')")
    for env_extra in ({"CC": "/nonexistent", "PATH": str(bin_dir)}, {cpu_kernels.ENV_SWITCH: "0"}):
        env = {**{k: v for k, v in os.environ.items() if k not in ("CC", cpu_kernels.ENV_SWITCH)},
               "RWKV_STREAM_CACHE": str(tmp_path / "cache"), **env_extra}
        out = subprocess.run([sys.executable, "-c", code, str(tiny_pth)], capture_output=True, text=True,
                             timeout=300, cwd=ROOT, env=env)
        assert out.returncode == 0 and out.stdout.strip() == "ok", (env_extra, out.stderr[-2000:])


def test_huge_page_buffer_is_aligned_and_writable():
    buf = cpu_kernels.huge_page_buffer(3 * 4096 + 5)
    assert buf.dtype == torch.uint8 and buf.numel() == 3 * 4096 + 5
    assert buf.data_ptr() % cpu_kernels.HUGE_PAGE == 0
    buf.fill_(7)
    assert int(buf.sum()) == 7 * buf.numel()


@needs_kernels
@pytest.mark.parametrize("make", [lambda w: KernelLinear(w, torch.float16), lambda w: KernelLinear(w, torch.bfloat16),
                                  Q8Linear, lambda w: ColumnKernelLinear(w, torch.float16)])
def test_weights_moved_into_an_arena_give_the_same_bits(make):
    from rwkv_stream.linear import ARENA_ALIGN, pack_in_arena

    gen = torch.Generator().manual_seed(5)
    lins = [make(torch.randn(out, 64, generator=gen)) for out in (3, 64, 17)]
    x = torch.randn(4, 64, generator=gen)
    before = [lin(x) for lin in lins]
    old_ptrs = [lin.weight.data_ptr() for lin in lins]
    arena = pack_in_arena(lins)
    ptrs = [lin.weight.data_ptr() for lin in lins]
    assert ptrs[0] == arena.data_ptr() and all(p % ARENA_ALIGN == 0 for p in ptrs)
    assert ptrs == sorted(ptrs) and set(ptrs).isdisjoint(old_ptrs)  # in the given order, in the new buffer
    assert all(lin.mat.w == p for lin, p in zip(lins, ptrs, strict=True))
    for lin, ref in zip(lins, before, strict=True):
        assert torch.equal(lin(x), ref)


@needs_kernels
@pytest.mark.parametrize("fmt", ["float16", "q8_0"])
def test_a_fused_model_keeps_its_weights_in_one_arena_in_step_order(tiny_pth, fmt):
    model = load(tiny_pth, dtype=fmt)
    lins = [*model.linears(), model.head_linear]
    ptrs = [lin.weight.data_ptr() for lin in lins]
    assert ptrs == sorted(ptrs)  # layer by layer in the order the fused layer reads them, the head last
    assert ptrs[0] == model._arena.data_ptr()
    span = ptrs[-1] + lins[-1].nbytes - ptrs[0]
    assert span <= model._arena.numel()


@needs_kernels
@pytest.mark.parametrize("rows,width", [(1, 768), (37, 200), (20, 13)])
def test_layer_norm_rows_in_place_matches_torch_row_by_row(rows, width):
    """The compiled paths' output norm (``layer_norm_rows_``, in place): torch's layer norm within fp32 rounding,
    each row on its own (a row alone gives the bits it gets among others, also past the threaded row count),
    widths that are not a multiple of its eight lanes; a weight of the wrong width is refused by name."""
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, width, generator=gen) * 3 + 1
    w, b = torch.randn(width, generator=gen), torch.randn(width, generator=gen)
    want = torch.nn.functional.layer_norm(x, (width,), w, b, 1e-5)
    work = x.clone()
    got = cpu_kernels.layer_norm_rows_(work, w, b)
    assert got.data_ptr() == work.data_ptr()
    assert (got - want).abs().max() < 2e-5
    for j in (0, rows - 1):
        assert torch.equal(cpu_kernels.layer_norm_rows_(x[j:j + 1].clone(), w, b)[0], got[j])
    with pytest.raises(ValueError, match=f"{width} columns given a weight of 5"):
        cpu_kernels.layer_norm_rows_(x.clone(), w[:5], b)


@needs_kernels
@NON_NATIVE_BUILDS
def test_layer_norm_rows_gives_the_same_bits_in_every_build(monkeypatch, tmp_path, march):
    """The eight-lane sums run in the same order in vector and plain-C builds."""
    gen = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(5, 771, generator=gen), torch.randn(771, generator=gen), torch.randn(771, generator=gen)
    native = cpu_kernels.layer_norm_rows_(x.clone(), w, b)
    with kernels_built_for(monkeypatch, tmp_path, march, cpu_kernels.reset):
        assert str(tmp_path) in cpu_kernels.load()._name
        assert torch.equal(cpu_kernels.layer_norm_rows_(x.clone(), w, b), native)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("width", [768, 13])
def test_gather_rows_is_the_exact_embedding_lookup(dtype, width):
    """The compiled paths' embedding lookup: ``table[ids]`` widened to fp32 exactly, for any id order and
    repeats, int32 or strided ids; an id outside the table is an IndexError naming it, not a stray read."""
    gen = torch.Generator().manual_seed(width)
    table = (torch.randn(50, width, generator=gen) * 4).to(dtype)
    ids = torch.tensor([7, 0, 49, 7, 3])
    want = table[ids].float()
    assert torch.equal(cpu_kernels.gather_rows(table, ids), want)
    assert torch.equal(cpu_kernels.gather_rows(table, ids.to(torch.int32)), want)
    assert torch.equal(cpu_kernels.gather_rows(table, torch.stack([ids, ids])[:, 0]), table[[7, 7]].float())
    assert cpu_kernels.gather_rows(table, ids[:0]).shape == (0, width)
    assert torch.equal(cpu_kernels.gather_rows(table.t().contiguous().t(), ids), want)  # a strided table
    assert torch.equal(cpu_kernels.gather_rows(table.double(), ids), table.double()[ids].float())  # torch's lookup
    for bad in (50, -1):
        with pytest.raises(IndexError, match=f"token id {bad} out of range for a table of 50 rows"):
            cpu_kernels.gather_rows(table, torch.tensor([1, bad, 2]))


@needs_kernels
@NON_NATIVE_BUILDS
def test_gather_rows_is_exact_in_every_build(monkeypatch, tmp_path, march):
    table = (torch.randn(20, 771) * 3).half()
    ids = torch.tensor([4, 19, 0])
    with kernels_built_for(monkeypatch, tmp_path, march, cpu_kernels.reset):
        assert str(tmp_path) in cpu_kernels.load()._name
        assert torch.equal(cpu_kernels.gather_rows(table, ids), table[ids].float())
