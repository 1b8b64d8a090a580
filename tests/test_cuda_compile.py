"""Compile every CUDA source with NVRTC (no GPU needed) and check the kernels' parameter lists.

The sources are compiled exactly as :mod:`rwkv_stream.gpu` hands them to CuPy (shared header inlined,
same options), for sm_80 (A100), sm_90 (H100/H200) and sm_100 (B200). The PTX entry points must match the argument
kinds the Python launchers pack, so an argument added on one side only fails here, not on a GPU.
"""

from __future__ import annotations

import ctypes
import os
import re
import struct
from pathlib import Path

import pytest

from rwkv_stream import gpu
from rwkv_stream.state import ROWS
from rwkv_stream.wkv import EMPTY_PP

ARCHS = ("compute_80", "compute_90", "compute_100")
PTX_KIND = {"u32": "i32", "s32": "i32", "b32": "i32", "f32": "f32", "u64": "u64", "s64": "u64", "b64": "u64"}
SIG_KIND = {"ptr": "u64", "i64": "u64", "i32": "i32", "f32": "f32"}


def _preload_nvrtc_from_wheels() -> None:
    """Load libnvrtc from the pip CUDA wheels when the system has none on the library path."""
    try:
        import nvidia
    except ImportError:
        return
    for base in nvidia.__path__:
        for lib in sorted(Path(base).glob("*/lib/libnvrtc.so*"), reverse=True):
            try:
                ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
                return
            except OSError:
                continue


def _unavailable(reason: str) -> None:
    """Skip, or fail where bench/gpu_check.sh demands the GPU toolchain (RWKV_REQUIRE_GPU=1)."""
    (pytest.fail if os.environ.get("RWKV_REQUIRE_GPU") == "1" else pytest.skip)(reason)


def _nvrtc():
    try:
        from cupy_backends.cuda.libs import nvrtc
    except ImportError as exc:  # cupy not installed
        _unavailable(f"cupy (NVRTC bindings) is not installed: {exc}")
    try:
        nvrtc.getVersion()
    except Exception:  # noqa: BLE001 - library not found: try the wheel's copy once
        _preload_nvrtc_from_wheels()
        try:
            nvrtc.getVersion()
        except Exception as exc:  # noqa: BLE001
            _unavailable(f"NVRTC library not loadable: {exc}")
    return nvrtc


def compile_ptx(source: str, name: str, arch: str, options: tuple[str, ...] | None = None) -> str:
    """PTX of ``source`` (with ``options``, default gpu's); fails the test with NVRTC's log on a compile error."""
    nvrtc = _nvrtc()
    prog = nvrtc.createProgram(source, name, [], [])
    try:
        try:
            nvrtc.compileProgram(prog, list(gpu.nvrtc_options(arch) if options is None else options))
        except nvrtc.NVRTCError as exc:
            raise AssertionError(f"NVRTC failed for {name} ({arch}): {exc}\n{nvrtc.getProgramLog(prog)}") from None
        ptx = nvrtc.getPTX(prog)
    finally:
        nvrtc.destroyProgram(prog)
    return ptx.decode() if isinstance(ptx, bytes) else ptx


def ptx_entries(ptx: str) -> dict[str, list[str]]:
    """Entry-point name -> parameter kinds (i32 / f32 / u64) from PTX text."""
    entries = {}
    for match in re.finditer(r"\.entry\s+(\w+)\s*\((.*?)\)", ptx, re.S):
        kinds = re.findall(r"\.param\s+\.(\w+)", match.group(2))
        entries[match.group(1)] = [PTX_KIND.get(k, k) for k in kinds]
    return entries


def test_every_source_is_listed():
    on_disk = sorted(p.name for p in Path(str(gpu.source_dir())).glob("*.cu"))
    assert on_disk == sorted(gpu.SOURCES) == sorted(gpu.entry_points())


def test_cuda_headers_found():
    _nvrtc()
    assert gpu.cuda_include_dir(gpu.nvrtc_major()), "no directory with cuda_fp16.h/cuda_bf16.h found"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", gpu.SOURCES)
def test_source_compiles_with_expected_entry_points(source: str, arch: str):
    entries = ptx_entries(compile_ptx(gpu.kernel_source(source), source, arch))
    expected = gpu.entry_points()[source]
    assert sorted(entries) == sorted(expected)
    for name in expected:
        want = [SIG_KIND[k] for k in gpu.SIGNATURES[gpu.family(name)]]
        assert entries[name] == want, f"{name}: PTX params {entries[name]} != launcher {want}"


def test_raw_file_compiles_with_package_include():
    """The packaged layout (header next to the sources, found with -I) compiles too."""
    root = Path(str(gpu.source_dir()))
    nvrtc = _nvrtc()
    prog = nvrtc.createProgram((root / "wkv4.cu").read_text(), "wkv4.cu", [], [])
    try:
        nvrtc.compileProgram(prog, [*gpu.nvrtc_options("compute_90"), f"-I{root}"])
    finally:
        nvrtc.destroyProgram(prog)


def test_broken_source_fails_with_log():
    """The check can fail: a kernel with a syntax error is reported with NVRTC's file(line) log."""
    broken = gpu.kernel_source("wkv4.cu").replace("s.pp = q;", "s.pp = q", 1)
    assert broken != gpu.kernel_source("wkv4.cu")
    with pytest.raises(AssertionError, match=r"wkv4_broken\.cu\(\d+\): error"):
        compile_ptx(broken, "wkv4_broken.cu", "compute_90")


def test_signature_mismatch_is_detected():
    """Dropping a kernel parameter changes the PTX entry the signature test compares against."""
    src = gpu.kernel_source("fused.cu").replace("(long long n, const T* x, T* y)", "(const T* x, T* y)")
    src = src.replace("relu_square_impl<T>(n, x, y)", "relu_square_impl<T>(1, x, y)")
    entries = ptx_entries(compile_ptx(src, "fused_sig.cu", "compute_90"))
    want = [SIG_KIND[k] for k in gpu.SIGNATURES["relu_square"]]
    assert entries["relu_square_f32"] != want


def _ptx_float(value: float) -> str:
    """How PTX writes an fp32 immediate, e.g. ``0fF149F2CA``."""
    return "0f" + struct.pack(">f", value).hex().upper()


def test_shared_constants_are_injected_not_written_in_the_sources():
    """pp of an empty state and the state rows are defined once in Python and passed as -D options."""
    defines = dict(opt[2:].split("=", 1) for opt in gpu.constant_defines())
    assert float.fromhex(defines["RWKV_EMPTY_PP"].strip("()").removesuffix("f")) == struct.unpack(
        "f", struct.pack("f", EMPTY_PP))[0]
    assert [int(defines[f"RWKV_ROW_{name.upper()}"]) for name in ROWS] == list(range(len(ROWS)))
    assert set(gpu.constant_defines()) <= set(gpu.nvrtc_options())
    root = Path(str(gpu.source_dir()))
    for file in [*gpu.SOURCES, gpu.COMMON_HEADER]:
        assert not re.search(r"1e\+?(30|38)", (root / file).read_text()), f"{file} spells a pp constant itself"


def test_empty_pp_reaches_the_kernels():
    """The stateless rows of wkv4.cu start from the injected EMPTY_PP: change the define, the PTX follows."""
    ptx = compile_ptx(gpu.kernel_source("wkv4.cu"), "wkv4.cu", "compute_90")
    assert _ptx_float(EMPTY_PP) in ptx
    other = tuple("-DRWKV_EMPTY_PP=(-1e20f)" if o.startswith("-DRWKV_EMPTY_PP=") else o
                  for o in gpu.nvrtc_options("compute_90"))
    ptx_other = compile_ptx(gpu.kernel_source("wkv4.cu"), "wkv4_other.cu", "compute_90", other)
    assert _ptx_float(-1e20) in ptx_other and _ptx_float(EMPTY_PP) not in ptx_other


def test_sources_refuse_to_compile_without_the_constants():
    bare = tuple(o for o in gpu.nvrtc_options("compute_90") if o not in gpu.constant_defines())
    with pytest.raises(AssertionError, match="RWKV_EMPTY_PP"):
        compile_ptx(gpu.kernel_source("wkv4.cu"), "wkv4_bare.cu", "compute_90", bare)
