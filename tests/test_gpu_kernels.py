"""Each CUDA kernel against its torch reference (rwkv_stream.kernels_ref), on two backends:

* ``cuda``: the real kernels through CuPy on a GPU (marked ``gpu``; skipped without CUDA/CuPy);
* ``emulated``: the same ``.cu`` sources compiled as C++ for the CPU with a small shim (blocks run one
  after another, the threads of a block as real threads when the kernel synchronizes), called through
  the same Python launchers. It checks indexing, strides, launch geometry and argument packing
  without a GPU (skipped when no C++20 compiler is found).

Outputs are NaN-poisoned before each launch, so an element the kernel fails to write shows up.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from rwkv_stream import gpu
from rwkv_stream import kernels_ref as ref

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_IDS = ["fp32", "fp16", "bf16"]
C = 200          # not a multiple of the block size: exercises the bounds checks
LAYERS = 3
CAPACITY = 9

# ---------------------------------------------------------------------------------------------------
# CPU emulation of the kernels

EMU_HEADER = r"""
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <math.h>
struct dim3 { unsigned x = 1, y = 1, z = 1; };
extern thread_local dim3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
namespace emu { void syncthreads(); float exchange(float v, int lane_xor); }
inline void __syncthreads() { emu::syncthreads(); }
inline float __shfl_xor_sync(unsigned, float v, int o) { return emu::exchange(v, o); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
struct __half { uint16_t bits; };
struct __nv_bfloat16 { uint16_t bits; };
inline float __half2float(__half h) {
  uint32_t sign = uint32_t(h.bits & 0x8000u) << 16, e = (h.bits >> 10) & 0x1fu, m = h.bits & 0x3ffu, x;
  if (e == 0) { float f = std::ldexp(float(m), -24); return sign ? -f : f; }
  x = sign | (e == 31 ? 0x7f800000u | (m << 13) : ((e + 112u) << 23) | (m << 13));
  float f; std::memcpy(&f, &x, 4); return f;
}
inline __half __float2half_rn(float f) {
  uint32_t x; std::memcpy(&x, &f, 4);
  uint16_t sign = uint16_t((x >> 16) & 0x8000u); uint32_t a = x & 0x7fffffffu;
  if (a >= 0x7f800000u) return {uint16_t(sign | (a > 0x7f800000u ? 0x7e00u : 0x7c00u))};
  if (a >= 0x477ff000u) return {uint16_t(sign | 0x7c00u)};
  if (a < 0x38800000u) {  // subnormal half: round a * 2^24 to an integer (exact scaling, RN-even)
    float af; std::memcpy(&af, &a, 4);
    return {uint16_t(sign | uint32_t(std::nearbyint(af * 16777216.0f)))};
  }
  uint32_t h = ((((a >> 23) - 112u)) << 10) | ((a & 0x7fffffu) >> 13), rem = a & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return {uint16_t(sign | h)};
}
inline float __bfloat162float(__nv_bfloat16 b) {
  uint32_t x = uint32_t(b.bits) << 16; float f; std::memcpy(&f, &x, 4); return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t x; std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return {uint16_t((x >> 16) | 0x40u)};
  return {uint16_t((x + 0x7fffu + ((x >> 16) & 1u)) >> 16)};
}
"""

EMU_RUNTIME = r"""
#include <functional>
#include <thread>
#include <vector>
thread_local dim3 threadIdx, blockIdx;
dim3 blockDim, gridDim;
namespace emu {
static std::barrier<>* bar = nullptr;
static float xbuf[1024];
void syncthreads() { if (bar) bar->arrive_and_wait(); }
float exchange(float v, int o) {
  xbuf[threadIdx.x] = v; syncthreads();
  float r = xbuf[threadIdx.x ^ o]; syncthreads();
  return r;
}
void launch(dim3 g, dim3 b, int concurrent, const std::function<void()>& body) {
  gridDim = g; blockDim = b;
  const unsigned nt = b.x * b.y * b.z;
  for (unsigned bz = 0; bz < g.z; ++bz) for (unsigned by = 0; by < g.y; ++by) for (unsigned bx = 0; bx < g.x; ++bx) {
    auto run = [&, bx, by, bz](unsigned t) {
      blockIdx = {bx, by, bz}; threadIdx = {t % b.x, (t / b.x) % b.y, t / (b.x * b.y)}; body();
    };
    if (!concurrent) { for (unsigned t = 0; t < nt; ++t) run(t); continue; }
    std::barrier<> block_barrier(nt); bar = &block_barrier;
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < nt; ++t) threads.emplace_back(run, t);
    for (auto& th : threads) th.join();
    bar = nullptr;
  }
}
}  // namespace emu
"""

CTYPE = {"ptr": "void*", "i64": "long long", "i32": "int", "f32": "float"}
CTYPES = {"ptr": ctypes.c_void_p, "i64": ctypes.c_longlong, "i32": ctypes.c_int, "f32": ctypes.c_float}
SYNCING = {"add_layernorm"}  # kernels that use __syncthreads / shuffles: threads must run concurrently


def _wrappers() -> str:
    lines = [EMU_RUNTIME]
    for names in gpu.entry_points().values():
        for name in names:
            kinds = gpu.SIGNATURES[gpu.family(name)]
            params = ", ".join(f"{CTYPE[k]} a{i}" for i, k in enumerate(kinds))
            call = ", ".join(f"a{i}" for i in range(len(kinds)))
            lines.append(f'extern "C" void {name}({params});')
            lines.append(
                f'extern "C" void emu_{name}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, '
                f"unsigned bz, int concurrent, {params}) {{ emu::launch({{gx, gy, gz}}, {{bx, by, bz}}, "
                f"concurrent, [&] {{ {name}({call}); }}); }}"
            )
    return "\n".join(lines)


def build_emulator(workdir: Path) -> ctypes.CDLL:
    """Compile the kernel sources + launch wrappers into a shared library for the CPU."""
    cxx = shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler for the kernel emulator")
    sources = {name: gpu.kernel_source(name) for name in gpu.SOURCES}
    digest = hashlib.sha256(("".join(sources.values()) + EMU_HEADER + _wrappers()).encode()).hexdigest()[:16]
    lib_path = workdir / f"rwkv_emu_{digest}.so"
    if not lib_path.exists():
        include = workdir / "include"
        include.mkdir(parents=True, exist_ok=True)
        for header in ("cuda_fp16.h", "cuda_bf16.h"):
            (include / header).write_text("// emulator: types come from emu.h\n")
        (include / "emu.h").write_text(EMU_HEADER)
        files = []
        for name, text in {**sources, "emu_runtime.cu": _wrappers()}.items():
            path = workdir / (name + ".cpp")
            path.write_text(text)
            files.append(str(path))
        cmd = [cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", f"-I{include}", "-include", "emu.h",
               *files, "-o", str(lib_path)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            if "barrier" in proc.stderr and "No such file" in proc.stderr:
                pytest.skip(f"{cxx} lacks C++20 <barrier>")
            raise AssertionError(f"emulator build failed:\n{proc.stderr[-4000:]}")
    return ctypes.CDLL(str(lib_path))


def emulated_launch(lib: ctypes.CDLL) -> Callable[..., None]:
    def launch(name: str, grid: tuple[int, int, int], block: tuple[int, int, int], args: Any,
               device: torch.device) -> None:
        kinds = gpu.SIGNATURES[gpu.family(name)]
        assert len(kinds) == len(args), f"{name}: {len(args)} args for {len(kinds)} params"
        assert all(g >= 1 for g in grid) and 1 <= block[0] * block[1] * block[2] <= 1024
        assert grid[1] <= gpu.MAX_GRID_Y and grid[2] <= gpu.MAX_GRID_Y
        values = [CTYPES[k](_raw(a, k)) for k, a in zip(kinds, args, strict=True)]
        fn = getattr(lib, f"emu_{name}")
        fn(*(ctypes.c_uint(v) for v in (*grid, *block)), ctypes.c_int(gpu.family(name) in SYNCING), *values)

    return launch


def _raw(value: Any, kind: str) -> Any:
    if kind == "ptr":
        return None if value is None else value.data_ptr()
    return float(value) if kind == "f32" else int(value)


def _cpu_device(*tensors: torch.Tensor | None) -> torch.device:
    devices = {t.device for t in tensors if t is not None}
    assert len(devices) == 1, devices
    return next(iter(devices))


@pytest.fixture(scope="session")
def emulator_lib(tmp_path_factory) -> ctypes.CDLL:
    return build_emulator(tmp_path_factory.mktemp("emu"))


@pytest.fixture
def emulated(emulator_lib, monkeypatch) -> torch.device:
    """Route rwkv_stream.gpu's launches to the CPU emulator; returns the device to allocate on."""
    monkeypatch.setattr(gpu, "_launch", emulated_launch(emulator_lib))
    monkeypatch.setattr(gpu, "_check_cuda", _cpu_device)
    return torch.device("cpu")


def _cuda_ready() -> str | None:
    """Why the real kernels cannot run here (None: they can)."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        import cupy  # noqa: F401
    except ImportError as exc:
        return f"cupy is not importable: {exc}"
    return None


def require_gpu() -> bool:
    """bench/gpu_check.sh sets RWKV_REQUIRE_GPU=1: there a missing GPU/CuPy is a failure, not a skip."""
    return os.environ.get("RWKV_REQUIRE_GPU") == "1"


@pytest.fixture(params=["emulated", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request) -> Iterator[torch.device]:
    """The device the ops run on: the CPU emulator, or the GPU (real kernels)."""
    if request.param == "emulated":
        yield request.getfixturevalue("emulated")
        return
    reason = _cuda_ready()
    if reason:
        (pytest.fail if require_gpu() else pytest.skip)(reason)
    gpu.load_kernels(torch.device("cuda", torch.cuda.current_device()))
    yield torch.device("cuda", torch.cuda.current_device())
    torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------
# Inputs, comparison


def tolerance(dtype: torch.dtype) -> float:
    """fp32: 1e-5 relative; fp16: 2e-3; bf16: one unit in the last place (2^-7), since kernel and
    reference may round an fp32 result that sits on a rounding boundary differently."""
    if dtype == torch.float32:
        return 1e-5
    return max(2e-3, torch.finfo(dtype).eps)


def assert_matches(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Elementwise |got - want| <= tol * |want| + tol * max|want| / 20, and no NaN anywhere."""
    got_f, want_f = got.float().cpu(), want.float().cpu()
    assert got_f.shape == want_f.shape, f"{what}: shape {tuple(got_f.shape)} != {tuple(want_f.shape)}"
    assert not torch.isnan(got_f).any(), f"{what}: NaN (unwritten element?)"
    tol = tolerance(dtype)
    scale = float(want_f.abs().max().clamp_min(1e-6))
    excess = (got_f - want_f).abs() - tol * want_f.abs() - tol * scale / 20
    assert float(excess.max()) <= 0, (
        f"{what}: max abs err {float((got_f - want_f).abs().max()):.3e} (scale {scale:.3e}, tol {tol:.1e})"
    )


def assert_state_matches(pool: torch.Tensor, pool_ref: torch.Tensor) -> None:
    """Each state row kind on its own scale; empty pp (wkv.EMPTY_PP) must stay exactly that."""
    got, want = pool.cpu(), pool_ref.cpu()
    empty = want[:, :, ref.PP] <= -1e29
    assert torch.equal(got[:, :, ref.PP][empty], want[:, :, ref.PP][empty]), "state: empty pp changed"
    got_pp, want_pp = got[:, :, ref.PP].clone(), want[:, :, ref.PP].clone()
    got_pp[empty], want_pp[empty] = 0.0, 0.0
    assert_matches(got_pp, want_pp, torch.float32, "state pp")
    for row, name in ((ref.ATT_X, "att_x"), (ref.AA, "aa"), (ref.BB, "bb"), (ref.FFN_X, "ffn_x")):
        assert_matches(got[:, :, row], want[:, :, row], torch.float32, f"state {name}")


def poisoned(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def random_pool(gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """Non-empty states, one of them empty (slot 0), magnitudes like a long-running stream in places."""
    pool = torch.randn(CAPACITY, LAYERS, 5, C, generator=gen)
    pool[:, :, ref.BB] = torch.rand(CAPACITY, LAYERS, C, generator=gen) * 50 + 0.01
    pool[:, :, ref.AA] = pool[:, :, ref.BB] * torch.randn(CAPACITY, LAYERS, C, generator=gen)
    pool[:, :, ref.PP] = torch.randn(CAPACITY, LAYERS, C, generator=gen) * 5
    ref.reset_slots(pool, [0])
    return pool.to(device)


def int32(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=device)


def offsets_of(lengths: list[int]) -> list[int]:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


def wkv_params(gen: torch.Generator, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    w = -torch.exp(torch.rand(C, generator=gen) * 8 - 5)
    u = torch.randn(C, generator=gen)
    return w.to(device), u.to(device)


def rows(n: int, dtype: torch.dtype, gen: torch.Generator, device: torch.device, scale: float = 1.0,
         strided: bool = False) -> torch.Tensor:
    """[n, C] input; ``strided``: a column slice of a wider buffer (row stride != C)."""
    base = torch.randn(n, 2 * C if strided else C, generator=gen) * scale
    t = base.to(device=device, dtype=dtype)
    return t[:, C // 2: C // 2 + C] if strided else t


# ---------------------------------------------------------------------------------------------------
# Tests

SLOTS = [5, -1, 0, 8, 2]  # a stateless padding row, an empty state, arbitrary order


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("out_fp32", [False, True])
@pytest.mark.parametrize("gated", [False, True])
def test_wkv_step(device, dtype, out_fp32, gated):
    if out_fp32 and dtype == torch.float32:
        pytest.skip("same as out_fp32=False")
    gen = torch.Generator().manual_seed(11)
    b = len(SLOTS)
    k = rows(b, dtype, gen, device, scale=3.0, strided=True)
    v, r = rows(b, dtype, gen, device), rows(b, dtype, gen, device) if gated else None
    w, u = wkv_params(gen, device)
    pool = random_pool(gen, device)
    pool_ref = pool.cpu().clone()
    slots = int32(SLOTS, device)
    out = poisoned((b, C), torch.float32 if out_fp32 else dtype, device)
    got = gpu.wkv_step(k, v, w, u, pool, slots, 1, r=r, out=out)
    want = ref.wkv_step(k.cpu(), v.cpu(), w.cpu(), u.cpu(), pool_ref, slots.cpu(), 1,
                        r=None if r is None else r.cpu(), out=torch.empty(b, C, dtype=out.dtype))
    assert got.data_ptr() == out.data_ptr()
    assert_matches(got, want, dtype if not out_fp32 else torch.float32, "wkv")
    assert_state_matches(pool, pool_ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("lengths", [[1, 1, 1, 1, 1], [4, 0, 7, 1, 3], [0, 0, 9, 0, 0]])
def test_wkv_ragged(device, dtype, lengths):
    gen = torch.Generator().manual_seed(sum(lengths))
    n = sum(lengths)
    k, v = rows(n, dtype, gen, device, scale=3.0), rows(n, dtype, gen, device, strided=True)
    r = rows(n, dtype, gen, device)
    w, u = wkv_params(gen, device)
    pool = random_pool(gen, device)
    pool_ref = pool.cpu().clone()
    slots, offs = int32(SLOTS, device), int32(offsets_of(lengths), device)
    got = gpu.wkv_ragged(k, v, w, u, pool, slots, offs, 2, r=r, out=poisoned((n, C), dtype, device))
    want = ref.wkv_ragged(k.cpu(), v.cpu(), w.cpu(), u.cpu(), pool_ref, slots.cpu(), offs.cpu(), 2, r=r.cpu())
    assert_matches(got, want, dtype, "wkv")
    assert_state_matches(pool, pool_ref)


def test_wkv_long_stream_states_stay_finite(device):
    """States of a stream a million tokens in (pp large, bb ~ 1/(1 - e^w)) give finite outputs."""
    gen = torch.Generator().manual_seed(3)
    w, u = wkv_params(gen, device)
    pool = random_pool(gen, device)
    bb = 1.0 / (1.0 - torch.exp(w))                       # the limit of a long stream
    pool[:, :, ref.BB] = bb
    pool[:, :, ref.AA] = bb * 0.3
    pool[:, :, ref.PP] = 8.0
    pool_ref = pool.cpu().clone()
    k, v = rows(5, torch.float16, gen, device, scale=4.0), rows(5, torch.float16, gen, device)
    slots = int32([1, 2, 3, 4, 5], device)
    got = gpu.wkv_step(k, v, w, u, pool, slots, 0, out=poisoned((5, C), torch.float16, device))
    want = ref.wkv_step(k.cpu(), v.cpu(), w.cpu(), u.cpu(), pool_ref, slots.cpu(), 0)
    assert torch.isfinite(got.float()).all() and torch.isfinite(pool).all()
    assert_matches(got, want, torch.float16, "wkv")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("lengths", [None, [3, 0, 1, 6, 2], [12, 1, 1, 1, 1]])
@pytest.mark.parametrize("row", [ref.ATT_X, ref.FFN_X])
def test_token_shift_ragged(device, dtype, lengths, row):
    gen = torch.Generator().manual_seed(7 + row)
    n = len(SLOTS) if lengths is None else sum(lengths)
    xa = rows(n, dtype, gen, device, strided=True)
    n_mix = 3 if row == ref.ATT_X else 2
    mixes = torch.rand(n_mix, C, generator=gen).to(device)
    pool = random_pool(gen, device)
    pool_ref = pool.cpu().clone()
    slots = int32(SLOTS, device)
    offs = None if lengths is None else int32(offsets_of(lengths), device)
    got = gpu.token_shift_ragged(xa, mixes, pool, slots, offs, 1, row, out=poisoned((n_mix, n, C), dtype, device))
    want = ref.token_shift_ragged(xa.cpu(), mixes.cpu(), pool_ref, slots.cpu(),
                                  None if offs is None else offs.cpu(), 1, row)
    assert_matches(got, want, dtype, "mixes")
    assert_state_matches(pool, pool_ref)


def test_token_shift_many_tokens_grid_stride(device):
    """More tokens than one launch's y-dimension would cover if the kernel did not stride (emulated: small)."""
    gen = torch.Generator().manual_seed(8)
    lengths = [40, 25]
    xa = rows(sum(lengths), torch.float32, gen, device)
    mixes = torch.rand(1, C, generator=gen).to(device)
    pool = random_pool(gen, device)
    pool_ref = pool.cpu().clone()
    slots, offs = int32([3, 4], device), int32(offsets_of(lengths), device)
    got = gpu.token_shift_ragged(xa, mixes, pool, slots, offs, 0, ref.ATT_X)
    want = ref.token_shift_ragged(xa.cpu(), mixes.cpu(), pool_ref, slots.cpu(), offs.cpu(), 0, ref.ATT_X)
    assert_matches(got, want, torch.float32, "mixes")
    assert_state_matches(pool, pool_ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_relu_square(device, dtype):
    gen = torch.Generator().manual_seed(9)
    x = rows(33, dtype, gen, device, scale=3.0)
    got = gpu.relu_square(x, out=poisoned(tuple(x.shape), dtype, device))
    assert_matches(got, ref.relu_square(x.cpu()), dtype, "relu^2")
    inplace = x.clone()
    gpu.relu_square(inplace, out=inplace)
    assert_matches(inplace, ref.relu_square(x.cpu()), dtype, "relu^2 in place")
    if dtype == torch.float16:
        big = torch.tensor([300.0, -2.0, 1.5], dtype=dtype, device=device)
        assert gpu.relu_square(big).tolist() == [65504.0, 0.0, 2.25]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("mode", ["plain", "delta", "gated"])
@pytest.mark.parametrize("width", [C, 2048 + 64])
def test_add_layernorm(device, dtype, mode, width):
    gen = torch.Generator().manual_seed(width)
    n = 3 if device.type == "cpu" else 17
    x = (torch.randn(n, width, generator=gen) * 4 + 1).to(device)
    delta = torch.randn(n, width, generator=gen).to(device, dtype) if mode != "plain" else None
    gate = torch.randn(n, width, generator=gen).to(device, dtype) if mode == "gated" else None
    wt, bias = torch.randn(width, generator=gen).to(device), torch.randn(width, generator=gen).to(device)
    x_ref = x.cpu().clone()
    scale = 0.5 if mode == "gated" else 1.0
    got = gpu.add_layernorm(x, wt, bias, delta=delta, gate=gate, scale=scale,
                            out=poisoned((n, width), dtype, device))
    want = ref.add_layernorm(x_ref, wt.cpu(), bias.cpu(), delta=None if delta is None else delta.cpu(),
                             gate=None if gate is None else gate.cpu(), scale=scale, out_dtype=dtype)
    assert_matches(x, x_ref, torch.float32, "residual")
    assert_matches(got, want, dtype, "layernorm")


def test_empty_batches_launch_nothing(device):
    pool = random_pool(torch.Generator().manual_seed(0), device)
    w = torch.zeros(C, device=device)
    empty = torch.empty(0, C, device=device)
    slots = torch.empty(0, dtype=torch.int32, device=device)
    assert gpu.wkv_step(empty, empty, w, w, pool, slots, 0).shape == (0, C)
    assert gpu.token_shift_ragged(empty, w[None], pool, slots, None, 0, ref.ATT_X).shape == (1, 0, C)


def test_bad_arguments_are_rejected(device):
    pool = random_pool(torch.Generator().manual_seed(0), device)
    w = torch.zeros(C, device=device)
    k = torch.zeros(2, C, device=device)
    with pytest.raises(ValueError, match="int32"):
        gpu.wkv_step(k, k, w, w, pool, torch.zeros(2, dtype=torch.int64, device=device), 0)
    with pytest.raises(ValueError, match="channel stride"):
        gpu.wkv_step(k.t().contiguous().t(), k, w, w, pool, int32([0, 1], device), 0)
    with pytest.raises(ValueError, match="layer"):
        gpu.wkv_step(k, k, w, w, pool, int32([0, 1], device), LAYERS)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_conversions_bit_exact_over_every_finite_value(device, dtype):
    """Every finite fp16/bf16 value through the kernels' load/convert/store path (token shift with no
    previous state: out = x * mix exactly once rounded) matches torch's rounding bit for bit.

    CuPy compiles with -ftz=true (fp32 denormals flush to zero), so bf16 values whose products would be
    fp32 denormals are left out; every fp16 value is in (fp16 subnormals are normal fp32 numbers)."""
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    as_f32 = bits.float()
    values = bits[torch.isfinite(as_f32) & ((as_f32.abs() > 1e-34) | (as_f32 == 0))]
    width = 256
    xa = values[: values.numel() // width * width].reshape(-1, width).to(device)
    mixes = torch.tensor([1.0, 0.5, 0.3, 1e-3], device=device)[:, None].expand(4, width).contiguous()
    pool = torch.zeros(1, 1, 5, width, device=device)
    slots = torch.full((xa.shape[0],), -1, dtype=torch.int32, device=device)
    got = gpu.token_shift_ragged(xa, mixes, pool, slots, None, 0, ref.ATT_X)
    want = ref.token_shift_ragged(xa.cpu(), mixes.cpu(), pool.cpu(), slots.cpu(), None, 0, ref.ATT_X)
    assert torch.equal(got.cpu().view(torch.int16), want.view(torch.int16))
