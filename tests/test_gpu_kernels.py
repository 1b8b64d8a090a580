"""Each CUDA kernel against its torch reference (rwkv_stream.kernels_ref), on two backends:

* ``cuda``: the real kernels through CuPy on a GPU (marked ``gpu``; skipped without CUDA/CuPy);
* ``emulated``: the same ``.cu`` sources compiled as C++ for the CPU with a small shim, called through the
  same Python launchers. Each launch runs with its blocks in forward, reversed and shuffled order (and
  grid-stride kernels on a two-block grid) and must give the same bits every time; threads of kernels that
  synchronize run as real threads, with warp-scoped shuffles that fail when lanes disagree. It checks
  indexing, strides, launch geometry, argument packing and races between blocks without a GPU (skipped
  when no C++ compiler is found).

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
#
# Every launch runs several times from the same inputs, and all runs must leave every buffer the kernel can
# reach bit-identical: blocks (and, for kernels that never synchronize, the threads of a block) in forward,
# reversed and shuffled order, and grid-stride kernels once more on a grid of two blocks along their strided
# axis (so their loops stride). A result that depends on the order of blocks is a race between blocks; one
# that depends on the grid is a loop that does not stride. Threads of kernels that synchronize run as real
# threads; a warp shuffle synchronizes only its warp (32 consecutive threads), and the emulator fails the
# launch when the lanes of a warp disagree: a lane named in the mask exited or never arrives, lanes pass
# different masks, call from different places, or read a lane outside the mask. __syncthreads fails the
# same way when threads call it from different places.

EMU_HEADER = r"""
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
#define __restrict__ __restrict
#define __shared__ static
namespace emu { void syncthreads(int site); float shfl_xor(unsigned mask, float v, int lane_xor, int site); }
#define __syncthreads() emu::syncthreads(__LINE__)
#define __shfl_xor_sync(mask, v, o) emu::shfl_xor((mask), (v), (o), __LINE__)
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
#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <functional>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>
thread_local dim3 threadIdx, blockIdx;
dim3 blockDim, gridDim;
namespace emu {
static std::mutex err_mu;
static std::string error;
static bool aborted = false;  // after an error every synchronization returns at once (no deadlock)
static void fail(const std::string& what) {
  std::lock_guard<std::mutex> g(err_mu);
  if (error.empty()) error = what;
  aborted = true;
}

// A group of threads that synchronize together (a warp for shuffles, the block for __syncthreads).
// Exited members stop being waited for; a round completes when every member has arrived or exited.
struct Group {
  std::mutex mu;
  std::condition_variable cv;
  unsigned members = 0, arrived = 0, exited = 0, gen = 0;  // bit masks over lanes (warps); counts (block)
  int site[32] = {}, src[32] = {};
  unsigned mask[32] = {};
  float value[32] = {}, result[32] = {};
};
static std::vector<std::unique_ptr<Group>> warps;
static std::unique_ptr<Group> block_group;  // counts in arrived/exited, members = thread count
static thread_local unsigned tid = 0;

static void finish_warp(Group& w, unsigned warp) {
  const unsigned in = w.arrived;
  unsigned lane0 = __builtin_ctz(in);
  for (unsigned l = 0; l < 32; ++l) {
    if (!(in >> l & 1u)) continue;
    char buf[200];
    if (w.mask[l] != w.mask[lane0] || w.site[l] != w.site[lane0]) {
      std::snprintf(buf, sizeof buf, "warp %u: lanes %u and %u disagree at a shuffle (mask %08x/%08x, line %d/%d)",
                    warp, lane0, l, w.mask[lane0], w.mask[l], w.site[lane0], w.site[l]);
      fail(buf);
    } else if ((w.mask[l] & w.members & ~in) != 0) {
      std::snprintf(buf, sizeof buf, "warp %u: shuffle at line %d names lanes %08x that exited or went elsewhere",
                    warp, w.site[l], w.mask[l] & ~in);
      fail(buf);
    } else if (!(w.mask[l] >> (unsigned)w.src[l] & 1u) || !(in >> (unsigned)w.src[l] & 1u)) {
      std::snprintf(buf, sizeof buf, "warp %u: lane %u reads lane %d outside the shuffle's mask %08x",
                    warp, l, w.src[l], w.mask[l]);
      fail(buf);
    }
    w.result[l] = (in >> ((unsigned)w.src[l] & 31u) & 1u) ? w.value[w.src[l] & 31] : NAN;
  }
  w.arrived = 0;
  ++w.gen;
  w.cv.notify_all();
}

static bool wait_round(Group& g, std::unique_lock<std::mutex>& lk, unsigned gen, const char* what) {
  if (!g.cv.wait_for(lk, std::chrono::seconds(20), [&] { return g.gen != gen || aborted; })) {
    fail(std::string(what) + ": threads never arrived (a deadlock on a GPU)");
  }
  return !aborted;
}

float shfl_xor(unsigned mask, float v, int o, int site) {
  if (aborted) return v;
  if (warps.empty()) { fail("a shuffle in a kernel the emulator ran without threads (add it to SYNCING)"); return v; }
  const unsigned warp = tid / 32, lane = tid % 32;
  Group& w = *warps[warp];
  std::unique_lock<std::mutex> lk(w.mu);
  const unsigned gen = w.gen;
  w.value[lane] = v; w.mask[lane] = mask; w.src[lane] = int(lane ^ unsigned(o)); w.site[lane] = site;
  w.arrived |= 1u << lane;
  if ((w.arrived | w.exited) == w.members) finish_warp(w, warp);
  else if (!wait_round(w, lk, gen, "warp shuffle")) return v;
  return w.result[lane];
}

void syncthreads(int site) {
  if (aborted) return;
  if (!block_group) { fail("__syncthreads in a kernel the emulator ran without threads (add it to SYNCING)"); return; }
  Group& g = *block_group;
  std::unique_lock<std::mutex> lk(g.mu);
  const unsigned gen = g.gen;
  if (g.arrived == 0) g.site[0] = site;
  else if (g.site[0] != site) fail("__syncthreads called from different places (lines " +
                                   std::to_string(g.site[0]) + " and " + std::to_string(site) + ")");
  if (++g.arrived + g.exited == g.members) { g.arrived = 0; ++g.gen; g.cv.notify_all(); }
  else wait_round(g, lk, gen, "__syncthreads");
}

static void thread_exit() {
  const unsigned warp = tid / 32, lane = tid % 32;
  {
    Group& w = *warps[warp];
    std::lock_guard<std::mutex> lk(w.mu);
    w.exited |= 1u << lane;
    if (w.arrived != 0 && (w.arrived | w.exited) == w.members) finish_warp(w, warp);
  }
  Group& g = *block_group;
  std::lock_guard<std::mutex> lk(g.mu);
  ++g.exited;
  if (g.arrived != 0 && g.arrived + g.exited == g.members) { g.arrived = 0; ++g.gen; g.cv.notify_all(); }
}

static std::vector<unsigned> ordered(unsigned n, int order, std::mt19937& rng) {
  std::vector<unsigned> idx(n);
  std::iota(idx.begin(), idx.end(), 0u);
  if (order == 1) std::reverse(idx.begin(), idx.end());
  if (order == 2) std::shuffle(idx.begin(), idx.end(), rng);
  return idx;
}

// order: 0 forward, 1 reversed, 2 shuffled with seed (blocks, and the threads of non-concurrent blocks).
void launch(dim3 g, dim3 b, int concurrent, int order, unsigned seed, const std::function<void()>& body) {
  gridDim = g; blockDim = b;
  { std::lock_guard<std::mutex> lk(err_mu); error.clear(); aborted = false; }
  std::mt19937 rng(seed);
  const unsigned nt = b.x * b.y * b.z, nb = g.x * g.y * g.z;
  for (unsigned blk : ordered(nb, order, rng)) {
    const dim3 bi{blk % g.x, (blk / g.x) % g.y, blk / (g.x * g.y)};
    auto run = [&, bi](unsigned t) {
      tid = t; blockIdx = bi; threadIdx = {t % b.x, (t / b.x) % b.y, t / (b.x * b.y)}; body();
    };
    if (!concurrent) { for (unsigned t : ordered(nt, order, rng)) run(t); continue; }
    warps.clear();
    for (unsigned w = 0; w * 32 < nt; ++w) {
      warps.emplace_back(new Group());
      const unsigned lanes = std::min(32u, nt - w * 32);
      warps.back()->members = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1u;
    }
    block_group.reset(new Group());
    block_group->members = nt;
    std::vector<std::thread> threads;
    for (unsigned t : ordered(nt, order, rng)) threads.emplace_back([&, t] { run(t); thread_exit(); });
    for (auto& th : threads) th.join();
    warps.clear();
    block_group.reset();
    if (aborted) return;
  }
}
}  // namespace emu
extern "C" const char* emu_error() { return emu::error.c_str(); }
"""

CTYPE = {"ptr": "void*", "i64": "long long", "i32": "int", "f32": "float"}
CTYPES = {"ptr": ctypes.c_void_p, "i64": ctypes.c_longlong, "i32": ctypes.c_int, "f32": ctypes.c_float}
SYNCING = {"add_layernorm"}  # kernels that use __syncthreads / shuffles: threads must run concurrently
GRID_STRIDE = {"relu_square": 0, "token_shift": 1}  # kernels documented to accept any grid along this axis
ORDERS = ((0, 0), (1, 0), (2, 12345))  # (order, seed): forward, reversed, shuffled


def wrapper(name: str, kinds: tuple[str, ...]) -> str:
    """C++ for ``emu_<name>``: launches the kernel ``name`` (parameter kinds ``kinds``) in the emulator."""
    params = ", ".join(f"{CTYPE[k]} a{i}" for i, k in enumerate(kinds))
    call = ", ".join(f"a{i}" for i in range(len(kinds)))
    return (f'extern "C" void {name}({params});\n'
            f'extern "C" void emu_{name}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, '
            f"unsigned bz, int concurrent, int order, unsigned seed, {params}) {{ emu::launch({{gx, gy, gz}}, "
            f"{{bx, by, bz}}, concurrent, order, seed, [&] {{ {name}({call}); }}); }}")


def _wrappers() -> str:
    lines = [EMU_RUNTIME]
    for names in gpu.entry_points().values():
        lines.extend(wrapper(name, gpu.SIGNATURES[gpu.family(name)]) for name in names)
    return "\n".join(lines)


def build_emulator(workdir: Path, sources: dict[str, str] | None = None, wrappers: str | None = None) -> ctypes.CDLL:
    """Compile kernel sources (default: the project's, as gpu hands them to NVRTC, with the same -D constants)
    and launch wrappers (default: one per entry point) into a shared library for the CPU."""
    cxx = shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler for the kernel emulator")
    sources = sources if sources is not None else {name: gpu.kernel_source(name) for name in gpu.SOURCES}
    wrappers = wrappers if wrappers is not None else _wrappers()
    defines = [f"-D{d[2:]}" for d in gpu.constant_defines()]
    digest = hashlib.sha256("\0".join([*sources.values(), EMU_HEADER, wrappers, *defines]).encode()).hexdigest()[:16]
    lib_path = workdir / f"rwkv_emu_{digest}.so"
    if not lib_path.exists():
        include = workdir / f"include_{digest}"
        include.mkdir(parents=True, exist_ok=True)
        for header in ("cuda_fp16.h", "cuda_bf16.h"):
            (include / header).write_text("// emulator: types come from emu.h\n")
        (include / "emu.h").write_text(EMU_HEADER)
        files = []
        for name, text in {**sources, "emu_runtime.cu": wrappers}.items():
            path = include / (name + ".cpp")
            path.write_text(text)
            files.append(str(path))
        cmd = [cxx, "-std=c++17", "-O1", "-shared", "-fPIC", "-pthread", f"-I{include}", "-include", "emu.h",
               *defines, *files, "-o", str(lib_path)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise AssertionError(f"emulator build failed:\n{proc.stderr[-4000:]}")
    lib = ctypes.CDLL(str(lib_path))
    lib.emu_error.restype = ctypes.c_char_p
    return lib


class _Buffers:
    """The storages behind a launch's tensor arguments: snapshot, restore, compare bit for bit."""

    def __init__(self, args: Any) -> None:
        seen: dict[int, torch.Tensor] = {}
        for a in args:
            if isinstance(a, torch.Tensor):
                storage = a.untyped_storage()
                seen.setdefault(storage.data_ptr(), torch.empty(0, dtype=torch.uint8).set_(storage))
        self.views = list(seen.values())
        self.initial = [v.clone() for v in self.views]

    def restore(self) -> None:
        for v, s in zip(self.views, self.initial, strict=True):
            v.copy_(s)

    def snapshot(self) -> list[torch.Tensor]:
        return [v.clone() for v in self.views]


def emulated_launch(lib: ctypes.CDLL, syncing: set[str] | None = None,
                    grid_stride: dict[str, int] | None = None) -> Callable[..., None]:
    """A drop-in for ``gpu._launch`` that runs the kernel in the emulator under every block order (and, for
    grid-stride kernels, a two-block grid too) and fails unless all runs leave the same bits everywhere."""
    syncing = SYNCING if syncing is None else syncing
    grid_stride = GRID_STRIDE if grid_stride is None else grid_stride

    def launch(name: str, grid: tuple[int, int, int], block: tuple[int, int, int], args: Any,
               device: torch.device) -> None:
        fam = gpu.family(name) if name in {n for ns in gpu.entry_points().values() for n in ns} else name
        kinds = gpu.SIGNATURES.get(fam) or KINDS[fam]
        assert len(kinds) == len(args), f"{name}: {len(args)} args for {len(kinds)} params"
        assert all(g >= 1 for g in grid) and 1 <= block[0] * block[1] * block[2] <= 1024
        assert grid[1] <= gpu.MAX_GRID_Y and grid[2] <= gpu.MAX_GRID_Y
        values = [CTYPES[k](_raw(a, k)) for k, a in zip(kinds, args, strict=True)]
        fn = getattr(lib, f"emu_{name}")
        variants: list[tuple[str, tuple[int, int, int], int, int]] = [
            (f"block order {o}/seed {s}", grid, o, s) for o, s in ORDERS]
        if fam in grid_stride and grid[grid_stride[fam]] > 2:
            small = list(grid)
            small[grid_stride[fam]] = 2
            variants.append(("a two-block grid (the grid-stride loop must stride)", (small[0], small[1], small[2]),
                             0, 0))
        buffers = _Buffers(args)
        first: list[torch.Tensor] | None = None
        for i, (what, g, order, seed) in enumerate(variants):
            if i:
                buffers.restore()
            fn(*(ctypes.c_uint(v) for v in (*g, *block)), ctypes.c_int(fam in syncing), ctypes.c_int(order),
               ctypes.c_uint(seed), *values)
            error = lib.emu_error().decode()
            if error:
                raise AssertionError(f"{name}: {error}")
            now = buffers.snapshot()
            if first is None:
                first = now
            elif not all(torch.equal(a, b) for a, b in zip(first, now, strict=True)):
                raise AssertionError(f"{name}: results differ under {what} (a race between blocks, or a "
                                     "loop that does not cover its range)")

    return launch


KINDS: dict[str, tuple[str, ...]] = {}  # parameter kinds of test-only kernels (see test_emulator_*)


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


@pytest.mark.parametrize("dtype,out_fp32", [(torch.float32, False), (torch.float16, False), (torch.float16, True),
                                             (torch.bfloat16, False), (torch.bfloat16, True)],
                         ids=["fp32", "fp16", "fp16-out32", "bf16", "bf16-out32"])
@pytest.mark.parametrize("gated", [False, True])
def test_wkv_step(device, dtype, out_fp32, gated):
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
    with pytest.raises(ValueError, match="overlaps"):  # the kernels' pointers are __restrict__
        gpu.wkv_step(k, k, w, w, pool, int32([0, 1], device), 0, out=k)
    with pytest.raises(ValueError, match="overlaps"):
        gpu.add_layernorm(k, w, w, delta=k.clone(), out=k[:, :])
    with pytest.raises(ValueError, match="token_stream"):
        gpu.token_shift_ragged(k, w[None], pool, int32([0], device), int32([0, 2], device), 0, ref.ATT_X,
                               token_stream=int32([0], device))


def test_token_stream_map_is_what_the_kernel_reads(device):
    """The stream of each token comes from the host-side map: a map given by the caller is used as is
    (a wrong one changes the result), and the default is computed from the offsets."""
    lengths = [3, 0, 4, 1, 2]
    offs = int32(offsets_of(lengths), device)
    want_map = [b for b, n in enumerate(lengths) for _ in range(n)]
    assert gpu.stream_of_tokens(offs, sum(lengths)).cpu().tolist() == want_map
    gen = torch.Generator().manual_seed(5)
    xa = rows(sum(lengths), torch.float32, gen, device)
    mixes = torch.rand(2, C, generator=gen).to(device)
    pool = random_pool(gen, device)
    slots = int32([5, -1, 8, 0, 2], device)  # stream 2 on a non-empty state
    runs = []
    # token 3 opens stream 2; mapped to the empty stream 1 (slot -1) it starts from zeros instead of the state
    for stream_map in (None, want_map, [0, 0, 0, 1, 2, 2, 2, 3, 4, 4]):
        p = pool.clone()
        ts = None if stream_map is None else int32(stream_map, device)
        runs.append(gpu.token_shift_ragged(xa, mixes, p, slots, offs, 0, ref.FFN_X, token_stream=ts).cpu())
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


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


# ---------------------------------------------------------------------------------------------------
# The emulator itself must catch what it is there to catch (each of these kernels is broken on a GPU)

BAD_SUM = r"""
#include "rwkv_common.cuh"
// Sums 1 over the block; lanes >= active return first (UB on a GPU when they are named in the mask).
extern "C" __global__ void bad_sum(int active, float* out) {
  __shared__ float shared32[32];
  if ((int)threadIdx.x >= active) return;
  const float s = rwkv::block_sum(1.f, shared32);
  if (threadIdx.x == 0) out[blockIdx.x] = s;
}
// Lane 0 passes a different mask from its warp mates.
extern "C" __global__ void bad_mask(int active, float* out) {
  const unsigned mask = threadIdx.x == 0 ? 0x0000ffffu : 0xffffffffu;
  out[threadIdx.x] = __shfl_xor_sync(mask, (float)threadIdx.x, active);
}
"""


@pytest.fixture(scope="module")
def bad_lib(tmp_path_factory) -> ctypes.CDLL:
    KINDS.update({"bad_sum": ("i32", "ptr"), "bad_mask": ("i32", "ptr")})
    header = gpu.source_dir().joinpath(gpu.COMMON_HEADER).read_text().replace("#pragma once", "")
    src = BAD_SUM.replace('#include "rwkv_common.cuh"', header)
    wrappers = "\n".join([EMU_RUNTIME, wrapper("bad_sum", KINDS["bad_sum"]), wrapper("bad_mask", KINDS["bad_mask"])])
    return build_emulator(tmp_path_factory.mktemp("emu_bad"), {"bad.cu": src}, wrappers)


def test_emulator_runs_whole_warps_and_block_sums(bad_lib):
    launch = emulated_launch(bad_lib, syncing={"bad_sum", "bad_mask"})
    out = torch.zeros(3)
    launch("bad_sum", (3, 1, 1), (96, 1, 1), (96, out), torch.device("cpu"))
    assert out.tolist() == [96.0, 96.0, 96.0]
    launch("bad_sum", (2, 1, 1), (64, 1, 1), (64, out), torch.device("cpu"))
    assert out.tolist() == [64.0, 64.0, 96.0]


def test_emulator_fails_when_lanes_of_a_warp_exit_before_a_shuffle(bad_lib):
    launch = emulated_launch(bad_lib, syncing={"bad_sum"})
    with pytest.raises(AssertionError, match="exited or went elsewhere"):
        launch("bad_sum", (1, 1, 1), (64, 1, 1), (40, torch.zeros(1)), torch.device("cpu"))


def test_emulator_fails_when_lanes_disagree_on_the_mask(bad_lib):
    launch = emulated_launch(bad_lib, syncing={"bad_mask"})
    with pytest.raises(AssertionError, match="disagree"):
        launch("bad_mask", (1, 1, 1), (32, 1, 1), (1, torch.zeros(32)), torch.device("cpu"))


def test_emulator_fails_a_shuffle_run_without_threads(bad_lib):
    launch = emulated_launch(bad_lib, syncing=set())
    with pytest.raises(AssertionError, match="SYNCING"):
        launch("bad_mask", (1, 1, 1), (32, 1, 1), (1, torch.zeros(32)), torch.device("cpu"))


def test_emulator_catches_a_duplicated_slot_race(emulated):
    """The race the stepper's slot check prevents: two rows of one batch on one slot. Run in block order
    the second row simply wins; reversed, the first does: the emulator reports the difference."""
    gen = torch.Generator().manual_seed(1)
    k, v = rows(2, torch.float32, gen, emulated), rows(2, torch.float32, gen, emulated)
    w, u = wkv_params(gen, emulated)
    pool = random_pool(gen, emulated)
    with pytest.raises(AssertionError, match="block order"):
        gpu.wkv_step(k, v, w, u, pool, int32([4, 4], emulated), 0)
    gpu.wkv_step(k, v, w, u, pool, int32([4, 5], emulated), 0)  # distinct slots: fine


def test_emulator_catches_a_loop_that_does_not_stride(tmp_path):
    """relu_square with its grid-stride loop cut to one element per thread is right on a full grid only."""
    src = gpu.kernel_source("fused.cu")
    broken = src.replace("i += step)", "i += n)")
    assert broken != src
    names = gpu.entry_points()["fused.cu"]
    wrappers = "\n".join([EMU_RUNTIME, *(wrapper(n, gpu.SIGNATURES[gpu.family(n)]) for n in names)])
    launch = emulated_launch(build_emulator(tmp_path, {"fused.cu": broken}, wrappers))
    x = torch.randn(40, 100)
    with pytest.raises(AssertionError, match="two-block grid"):
        launch("relu_square_f32", (16, 1, 1), (256, 1, 1), (x.numel(), x, torch.empty_like(x)), torch.device("cpu"))
    good = emulated_launch(build_emulator(tmp_path, {"fused.cu": src}, wrappers))
    out = torch.empty_like(x)
    good("relu_square_f32", (16, 1, 1), (256, 1, 1), (x.numel(), x, out), torch.device("cpu"))
    assert torch.equal(out, torch.relu(x).square())
