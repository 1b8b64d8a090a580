"""RWKV-7 CUDA kernels (cuda/rwkv7/wkv7.cu via rwkv_stream.gpu7) against their torch references
(rwkv_stream.kernels_ref7) and the engine's CPU path.

* NVRTC compile check for sm_80/sm_90/sm_100 with the PTX parameter lists against the launchers' (no GPU);
* the same source run on the CPU through the g++ kernel emulator of tests/test_gpu_kernels.py (blocks in
  forward, reversed and shuffled order must give the same bits; block threads run as real threads so
  __syncthreads is exercised), called through gpu7's own launchers;
* the real kernels on a GPU (marked ``gpu``; skipped without CUDA/CuPy, failures under RWKV_REQUIRE_GPU=1);
* the engine: Rwkv7Model's CUDA branch (token shifts and WKV on the pool's slot arena in place, nothing gathered
  or scattered) routed to the emulated kernels, and to the torch references, equals the CPU model; the CPU path
  never calls the kernels; on a GPU the model matches the CPU model in fp32 and fp16 and steps the arena in place.
"""

from __future__ import annotations

import ctypes
import random
import re
from collections.abc import Iterator

import pytest
import torch
from test_cuda_compile import compile_ptx, ptx_entries
from test_gpu_kernels import EMU_RUNTIME, KINDS, build_emulator, emulated_launch, require_gpu, wrapper

from rwkv_stream import gpu7
from rwkv_stream import kernels_ref7 as ref
from rwkv_stream.models import Rwkv7Model
from rwkv_stream.models.rwkv7 import wkv7_chunk
from rwkv_stream.pool import StatePool
from rwkv_stream.random_checkpoint import random_tensors, rwkv7_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ARCHS = ("compute_80", "compute_90", "compute_100")
SIG_KIND = {"ptr": "u64", "i64": "u64", "i32": "i32", "f32": "f32"}
LAYERS = 2
CAPACITY = 7
SLOTS = [4, -1, 0, 6]  # arbitrary order, a stateless row, an empty state (slot 0 stays zero)


# ---------------------------------------------------------------------------------------------------
# NVRTC (no GPU)


@pytest.mark.parametrize("arch", ARCHS)
def test_compiles_with_expected_entry_points(arch: str) -> None:
    entries = ptx_entries(compile_ptx(gpu7.kernel_source(), "wkv7.cu", arch, gpu7.nvrtc_options(arch)))
    assert sorted(entries) == sorted(gpu7.entry_points())
    for name in gpu7.entry_points():
        want = [SIG_KIND[k] for k in gpu7.SIGNATURES[gpu7.family(name)]]
        assert entries[name] == want, f"{name}: PTX params {entries[name]} != launcher {want}"


def test_static_shared_memory_and_registers() -> None:
    """Each kernel's static shared memory (tile + staged vectors) fits the 48 KiB a block may declare, and
    no thread keeps its state row in local memory (the unrolled row lives in registers)."""
    ptx = compile_ptx(gpu7.kernel_source(), "wkv7.cu", "compute_90", gpu7.nvrtc_options("compute_90"))
    per_kernel: dict[tuple[str, str], int] = {}
    for impl, n, size in re.findall(r"\.shared \.align \d+ \.b8 \w*?(step_impl|ragged_impl)ILi(\d+)E\w*\[(\d+)\]", ptx):
        per_kernel[(impl, n)] = per_kernel.get((impl, n), 0) + int(size)
    assert len(per_kernel) == 2 * len(gpu7.HEAD_SIZES), per_kernel
    assert max(per_kernel.values()) <= 48 * 1024, per_kernel
    assert ".local" not in ptx


def test_broken_source_fails_with_log() -> None:
    broken = gpu7.kernel_source().replace("vec[2][i] = k[at];", "vec[2][i] = k[at]", 1)
    assert broken != gpu7.kernel_source()
    with pytest.raises(AssertionError, match=r"wkv7_broken\.cu\(\d+\): error"):
        compile_ptx(broken, "wkv7_broken.cu", "compute_90", gpu7.nvrtc_options("compute_90"))


def test_signature_mismatch_is_detected() -> None:
    src = gpu7.kernel_source().replace("long long ld_y) { \\", "int ld_y) { \\", 1)
    assert src != gpu7.kernel_source()
    entries = ptx_entries(compile_ptx(src, "wkv7_sig.cu", "compute_90", gpu7.nvrtc_options("compute_90")))
    assert entries["wkv7_step_n64"] != [SIG_KIND[k] for k in gpu7.SIGNATURES["wkv7_step"]]


# ---------------------------------------------------------------------------------------------------
# Backends: the emulated kernels on the CPU, the real ones on a GPU


def _emulator_wrappers() -> str:
    KINDS.update({name: gpu7.SIGNATURES[gpu7.family(name)] for name in gpu7.entry_points()})
    return "\n".join([EMU_RUNTIME, *(wrapper(n, KINDS[n]) for n in gpu7.entry_points())])


SYNCING7 = {name for name in gpu7.entry_points() if gpu7.family(name) in gpu7.PER_HEAD_SIZE}  # __syncthreads


@pytest.fixture(scope="session")
def emulator7(tmp_path_factory) -> ctypes.CDLL:
    wrappers = _emulator_wrappers()
    return build_emulator(tmp_path_factory.mktemp("emu7"), {"wkv7.cu": gpu7.kernel_source()}, wrappers)


def _cpu_device(*tensors: torch.Tensor | None) -> torch.device:
    devices = {t.device for t in tensors if t is not None}
    assert devices == {torch.device("cpu")}, devices
    return torch.device("cpu")


@pytest.fixture
def emulated(emulator7, monkeypatch) -> torch.device:
    KINDS.update({name: gpu7.SIGNATURES[gpu7.family(name)] for name in gpu7.entry_points()})
    monkeypatch.setattr(gpu7, "_launch", emulated_launch(emulator7, syncing=SYNCING7, grid_stride={"shift7": 1}))
    monkeypatch.setattr(gpu7, "_device_of", _cpu_device)
    return torch.device("cpu")


@pytest.fixture(params=["emulated", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request) -> Iterator[torch.device]:
    if request.param == "emulated":
        yield request.getfixturevalue("emulated")
        return
    reason = None if torch.cuda.is_available() else "no CUDA device"
    if reason is None:
        try:
            gpu7.load_kernels()
        except Exception as exc:  # noqa: BLE001
            reason = f"RWKV-7 kernels do not load: {exc}"
    if reason:
        (pytest.fail if require_gpu() else pytest.skip)(reason)
    yield torch.device("cuda", torch.cuda.current_device())
    torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------
# Inputs


def vectors(rows: int, c: int, n: int, gen: torch.Generator, device: torch.device,
            strided: bool = False) -> tuple[torch.Tensor, ...]:
    """r, w (log decay), k, v, a = -kk, b = kk * iclr as the engine makes them; ``strided``: column slices
    of one wider buffer (a shared row stride != C)."""
    h = c // n
    kk = torch.nn.functional.normalize(torch.randn(rows, h, n, generator=gen), dim=-1).view(rows, c)
    iclr = torch.rand(rows, c, generator=gen)
    w = -0.6065306597 * torch.rand(rows, c, generator=gen)
    out = [torch.randn(rows, c, generator=gen), w, torch.randn(rows, c, generator=gen) * 0.5,
           torch.randn(rows, c, generator=gen), -kk, kk * iclr]
    if strided:
        wide = torch.zeros(rows, 7 * c)
        for i, t in enumerate(out):
            wide[:, i * c : (i + 1) * c] = t
        wide = wide.to(device)
        return tuple(wide[:, i * c : (i + 1) * c] for i in range(6))
    return tuple(t.to(device) for t in out)


def arena(c: int, n: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    pool = torch.randn(CAPACITY, LAYERS, 2 * c + c * n, generator=gen)
    pool[0] = 0.0
    return pool.to(device)


def int32(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=device)


def offsets_of(lengths: list[int]) -> list[int]:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str, tol: float = 2e-5) -> None:
    got, want = got.float().cpu(), want.float().cpu()
    assert got.shape == want.shape
    assert not torch.isnan(got).any(), f"{what}: NaN (an element the kernel did not write)"
    err = float((got - want).abs().max())
    scale = float(want.abs().max().clamp_min(1e-6))
    assert err <= tol * scale, f"{what}: max abs err {err:.3e} at scale {scale:.3e}"


SHAPES = [(32, 16), (64, 64)]  # (C, N): two heads of 16, one head of 64 (every released model's N)


# ---------------------------------------------------------------------------------------------------
# Kernels against the references


@pytest.mark.parametrize(("c", "n"), SHAPES)
@pytest.mark.parametrize("strided", [False, True])
def test_wkv7_step(device, c, n, strided):
    gen = torch.Generator().manual_seed(c + n + strided)
    vecs = vectors(len(SLOTS), c, n, gen, device, strided)
    pool = arena(c, n, gen, device)
    pool_ref = pool.cpu().clone()
    slots = int32(SLOTS, device)
    out = torch.full((len(SLOTS), c), float("nan"), device=device)
    got = gpu7.wkv7_step(*vecs, pool, slots, 1, out=out)
    want = ref.wkv7_step(*(v.cpu() for v in vecs), pool_ref, slots.cpu(), 1)
    assert got.data_ptr() == out.data_ptr()
    assert_close(got, want, "y")
    assert_close(pool, pool_ref, "arena")
    assert torch.equal(pool.cpu()[:, 0], pool_ref[:, 0]), "another layer's state changed"
    untouched = [s for s in range(CAPACITY) if s not in SLOTS]
    assert torch.equal(pool.cpu()[untouched], pool_ref[untouched]), "a slot outside the batch changed"


@pytest.mark.parametrize(("c", "n"), SHAPES)
@pytest.mark.parametrize("lengths", [[1, 1, 1, 1], [5, 0, 20, 1], [0, 0, 17, 0]])
def test_wkv7_ragged(device, c, n, lengths):
    """Ragged prefill: streams with no tokens, one token, and more than one staged chunk (16 tokens)."""
    gen = torch.Generator().manual_seed(sum(lengths) + c)
    rows = sum(lengths)
    vecs = vectors(rows, c, n, gen, device, strided=True)
    pool = arena(c, n, gen, device)
    pool_ref = pool.cpu().clone()
    slots, offs = int32(SLOTS, device), int32(offsets_of(lengths), device)
    got = gpu7.wkv7_ragged(*vecs, pool, slots, offs, 0, out=torch.full((rows, c), float("nan"), device=device))
    want = ref.wkv7_ragged(*(v.cpu() for v in vecs), pool_ref, slots.cpu(), offs.cpu(), 0)
    assert_close(got, want, "y")
    assert_close(pool, pool_ref, "arena")
    idle = [s for s, m in zip(SLOTS, lengths, strict=True) if m == 0 and s >= 0]
    assert torch.equal(pool.cpu()[idle], pool_ref[idle]), "a stream without tokens changed"


def test_ragged_equals_the_engines_chunked_form(device):
    """40 tokens of one stream through the prefill kernel == the engine's parallel chunked form (torch)."""
    c, n, t = 64, 64, 40
    gen = torch.Generator().manual_seed(40)
    vecs = vectors(t, c, n, gen, device)
    pool = arena(c, n, gen, device)
    s = pool[2, 1, 2 * c :].cpu().clone().view(1, n, n)
    got = gpu7.wkv7_ragged(*vecs, pool, int32([2], device), int32([0, t], device), 1)
    r, w, k, v, a, b = (x.cpu().view(t, 1, n) for x in vecs)
    want = torch.cat([wkv7_chunk(s, r[i : i + 32], w[i : i + 32], k[i : i + 32], v[i : i + 32], a[i : i + 32],
                                 b[i : i + 32]) for i in range(0, t, 32)])
    assert_close(got, want.view(t, c), "y", tol=1e-4)
    assert_close(pool[2, 1, 2 * c :], s.view(-1), "state", tol=1e-4)


def test_step_after_prefill_continues_the_stream(device):
    """Prefill of 9 tokens then 3 one-token steps == 12 tokens prefilled at once (state in the arena)."""
    c, n = 32, 16
    gen = torch.Generator().manual_seed(12)
    vecs = vectors(12, c, n, gen, device)
    pool = arena(c, n, gen, device)
    whole = pool.clone()
    slots = int32([5], device)
    want = gpu7.wkv7_ragged(*vecs, whole, slots, int32([0, 12], device), 0)
    parts = [gpu7.wkv7_ragged(*(x[:9] for x in vecs), pool, slots, int32([0, 9], device), 0)]
    parts += [gpu7.wkv7_step(*(x[i : i + 1] for x in vecs), pool, slots, 0) for i in range(9, 12)]
    assert_close(torch.cat(parts), want, "y", tol=1e-6)
    assert_close(pool, whole, "arena", tol=1e-6)


@pytest.mark.parametrize("lengths", [None, [1, 1, 1, 1], [5, 0, 20, 1], [0, 0, 3, 0]])
@pytest.mark.parametrize(("which", "n_mix"), [(gpu7.ATT_SHIFT, 6), (gpu7.FFN_SHIFT, 1)])
def test_token_shift7(device, lengths, which, n_mix):
    """The token shift on the arena: mixes of each row with its stream's previous row (the slot's shift vector
    for a stream's first row; zero for a stateless row), the stream's last row written back; streams without
    rows, other layers, the other shift vector and every state matrix untouched."""
    c, n = 64, 16
    gen = torch.Generator().manual_seed(7 + which + sum(lengths or []))
    rows = len(SLOTS) if lengths is None else sum(lengths)
    x = torch.randn(rows, c, generator=gen).to(device)
    mix = torch.rand(n_mix, c, generator=gen).to(device)
    pool = arena(c, n, gen, device)
    pool_ref = pool.cpu().clone()
    slots = int32(SLOTS, device)
    offs = None if lengths is None else int32(offsets_of(lengths), device)
    out = torch.full((n_mix, rows, c), float("nan"), device=device)
    got = gpu7.token_shift7(x, mix, pool, slots, offs, 1, which, out=out)
    want = ref.token_shift7(x.cpu(), mix.cpu(), pool_ref, slots.cpu(), None if offs is None else offs.cpu(), 1, which)
    assert got.data_ptr() == out.data_ptr()
    assert_close(got, want, "mixes", tol=1e-6)
    assert torch.equal(pool.cpu(), pool_ref), "the arena differs from the reference's"
    moved = [s for s, m in zip(SLOTS, lengths or [1] * len(SLOTS), strict=True) if m and s >= 0]
    for s in range(CAPACITY):
        want_vec = pool_ref[s, 1, which * c : (which + 1) * c]
        if s in moved:  # the stream's last row
            i = SLOTS.index(s)
            last = i if lengths is None else offsets_of(lengths)[i + 1] - 1
            assert torch.equal(want_vec, x.cpu()[last])


def test_token_shift7_bad_arguments_are_rejected(device):
    c, n = 32, 16
    gen = torch.Generator().manual_seed(1)
    pool = arena(c, n, gen, device)
    x = torch.randn(2, c, generator=gen).to(device)
    mix = torch.rand(6, c, generator=gen).to(device)
    slots = int32([0, 1], device)
    with pytest.raises(ValueError, match="which"):
        gpu7.token_shift7(x, mix, pool, slots, None, 0, 2)
    with pytest.raises(ValueError, match="one slot per stream"):
        gpu7.token_shift7(x, mix, pool, int32([0], device), None, 0, 0)
    with pytest.raises(ValueError, match="layer"):
        gpu7.token_shift7(x, mix, pool, slots, None, LAYERS, 0)
    with pytest.raises(ValueError, match="mix"):
        gpu7.token_shift7(x, mix.t().contiguous().t(), pool, slots, None, 0, 0)
    big = torch.zeros(6, 2, c, device=device)
    with pytest.raises(ValueError, match="overlaps"):
        gpu7.token_shift7(big[0], mix, pool, slots, None, 0, 0, out=big)


def test_bad_arguments_are_rejected(device):
    c, n = 32, 16
    gen = torch.Generator().manual_seed(0)
    vecs = vectors(2, c, n, gen, device)
    pool = arena(c, n, gen, device)
    with pytest.raises(ValueError, match="int32"):
        gpu7.wkv7_step(*vecs, pool, torch.zeros(2, dtype=torch.int64, device=device), 0)
    with pytest.raises(ValueError, match="row stride"):
        gpu7.wkv7_step(*vecs[:5], vecs[5].t().contiguous().t(), pool, int32([0, 1], device), 0)
    with pytest.raises(ValueError, match="layer"):
        gpu7.wkv7_step(*vecs, pool, int32([0, 1], device), LAYERS)
    with pytest.raises(ValueError, match="head size"):
        gpu7.wkv7_step(*vecs, pool[..., :-1], int32([0, 1], device), 0)
    with pytest.raises(ValueError, match="overlaps"):
        gpu7.wkv7_step(*vecs, pool, int32([0, 1], device), 0, out=vecs[0])
    with pytest.raises(ValueError, match="one slot per"):
        gpu7.wkv7_ragged(*vecs, pool, int32([0], device), int32([0, 1, 2], device), 0)


def test_emulator_catches_a_duplicated_slot_race(emulated):
    """Two rows of one call on one slot race (the last writer wins): the block orders disagree."""
    c, n = 32, 16
    gen = torch.Generator().manual_seed(3)
    vecs = vectors(2, c, n, gen, emulated)
    pool = arena(c, n, gen, emulated)
    with pytest.raises(AssertionError, match="block order"):
        gpu7.wkv7_step(*vecs, pool, int32([3, 3], emulated), 0)
    gpu7.wkv7_step(*vecs, pool, int32([3, 4], emulated), 0)


def test_emulator_catches_a_missing_barrier(tmp_path):
    """Without the barrier between staging a chunk's vectors and reading them, threads read stale or
    unwritten shared memory: the emulator (real threads) disagrees with the reference or between orders."""
    src = gpu7.kernel_source()
    marker = "    }\n    __syncthreads();\n    for (int tt = 0; tt < nt; ++tt) {\n      y["
    assert marker in src
    broken = src.replace(marker, "    }\n    for (int tt = 0; tt < nt; ++tt) {\n      y[", 1)
    lib = build_emulator(tmp_path, {"wkv7.cu": broken}, _emulator_wrappers())
    launch = emulated_launch(lib, syncing=SYNCING7, grid_stride={"shift7": 1})
    c, n, t = 32, 16, 20
    gen = torch.Generator().manual_seed(9)
    vecs = vectors(t, c, n, gen, torch.device("cpu"))
    failures = 0
    for trial in range(3):
        pool = arena(c, n, gen, torch.device("cpu"))
        pool_ref = pool.clone()
        out = torch.full((t, c), float("nan"))
        try:
            launch("wkv7_ragged_n16", (c // n, 1, 1), (n, 1, 1),
                   (1, c, int32([0, t], torch.device("cpu")), *vecs, c, int32([trial + 1], torch.device("cpu")), 0,
                    pool, pool.stride(0), pool.stride(1), out, c), torch.device("cpu"))
        except AssertionError:
            failures += 1
            continue
        want = ref.wkv7_ragged(*vecs, pool_ref, int32([trial + 1], torch.device("cpu")),
                               int32([0, t], torch.device("cpu")), 0)
        failures += bool(torch.isnan(out).any() or (out - want).abs().max() > 1e-4)
    assert failures > 0


# ---------------------------------------------------------------------------------------------------
# The engine's CUDA dispatch


CFG = rwkv7_config(2, 64, 53, head_size=16, rank_w=8, rank_a=8, rank_v=4, rank_g=8, ffn_dim=128)


@pytest.fixture(scope="module")
def tensors() -> dict[str, torch.Tensor]:
    return random_tensors(CFG, seed=5)


class _NoGather:
    """Fails a test when the arena of ``pool`` is gathered into a copy or scattered back (index_select /
    index_copy_ on it): the CUDA branch must update the slots in place."""

    def __init__(self, pool: StatePool, monkeypatch) -> None:
        arena_ptr = pool.data.data_ptr()
        real_select, real_copy = torch.Tensor.index_select, torch.Tensor.index_copy_

        def no_gather(self, *args, **kw):
            assert self.data_ptr() != arena_ptr, "the arena was gathered into a copy"
            return real_select(self, *args, **kw)

        def no_scatter(self, *args, **kw):
            assert self.data_ptr() != arena_ptr, "states were scattered back into the arena"
            return real_copy(self, *args, **kw)

        monkeypatch.setattr(torch.Tensor, "index_select", no_gather)
        monkeypatch.setattr(torch.Tensor, "index_copy_", no_scatter)


def _engine_matches_cpu(ops, tensors, monkeypatch, tol: float, dtype: str = "float32") -> None:
    """Rwkv7Model's CUDA branch with ``ops`` for the kernels == the CPU model (same weight format): whole
    forward, ragged steps and one-token steps over a pool (logits and states), the arena stepped in place,
    other slots untouched."""
    cpu = Rwkv7Model(tensors, CFG, dtype=dtype)
    kern = Rwkv7Model(tensors, CFG, dtype=dtype)
    kern._kernels = ops
    rng = random.Random(1)
    ids = [rng.randrange(CFG.vocab_size) for _ in range(21)]
    (want, s_want), (got, s_got) = cpu.forward(ids), kern.forward(ids)
    assert_close(got, want, "forward logits", tol=tol)
    assert_close(s_got.tensor, s_want.tensor, "forward state", tol=tol)
    pools = [m.new_pool(5) for m in (cpu, kern)]
    slots = [[p.alloc() for _ in range(4)] for p in pools]
    assert kern._steps_arena_in_place(pools[1])  # the CPU model may step in place too (compiled kernels)
    arena_ptr = pools[1].data.data_ptr()
    _NoGather(pools[1], monkeypatch)
    for order, lengths in ((None, [4, 0, 19, 2]), ([2, 0, 3, 1], [1, 1, 1, 1]), ([3, 1], [2, 1]),
                           (None, [0, 9, 1, 33])):
        picked = [slots[1][i] for i in (order or range(4))]
        cpu_picked = [slots[0][i] for i in (order or range(4))]
        toks = [[rng.randrange(CFG.vocab_size) for _ in range(m)] for m in lengths]
        before = pools[1].data.clone()
        outs = [cpu.step(pools[0], cpu_picked, toks), kern.step(pools[1], picked, toks)]
        assert pools[1].data.data_ptr() == arena_ptr
        for a, b in zip(outs[1].logits or [], outs[0].logits or [], strict=True):
            if len(b):
                assert_close(a, b, f"step logits {lengths}", tol=tol)
        assert_close(pools[1].data, pools[0].data, f"pool after {lengths}", tol=tol)
        idle = [s for s in range(5) if s not in [p for p, t in zip(picked, toks, strict=True) if t]]
        assert torch.equal(pools[1].data[idle], before[idle]), "a slot without tokens changed"


@pytest.mark.parametrize(("dtype", "tol"), [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_engine_arena_in_place_through_emulated_kernels_equals_the_cpu_model(emulated, tensors, monkeypatch, dtype,
                                                                             tol):
    """bf16 weights: the products' outputs reach the kernels as fp32 (gpu7 refuses anything else); the kernel's
    and the CPU's fp32 roundings differ, and bf16 inputs of the next products turn that into bf16 ulps."""
    _engine_matches_cpu(gpu7, tensors, monkeypatch, tol=tol, dtype=dtype)


def test_engine_arena_in_place_through_the_references_equals_the_cpu_model(tensors, monkeypatch):
    """The same branch with kernels_ref7 as its ops (what bench/gpu_bench.py --cpu-smoke runs)."""
    _engine_matches_cpu(ref, tensors, monkeypatch, tol=1e-5)


def test_batch_invariant_steps_through_the_kernels_keep_cpu_bits_elsewhere(tensors):
    """batch_invariant pads a CPU step with scratch streams: the kernel branch then runs on the gathered
    copy (stream b in row b) and still equals the CPU model."""
    cpu, kern = Rwkv7Model(tensors, CFG), Rwkv7Model(tensors, CFG)
    kern._kernels = ref
    pools = [m.new_pool(3) for m in (cpu, kern)]
    slots = [[p.alloc() for _ in range(2)] for p in pools]
    toks = [[5, 6, 7], [8]]
    outs = [m.step(p, s, toks, batch_invariant=True) for m, p, s in zip((cpu, kern), pools, slots, strict=True)]
    for a, b in zip(outs[1].logits or [], outs[0].logits or [], strict=True):
        assert_close(a, b, "logits", tol=1e-5)
    assert_close(pools[1].data, pools[0].data, "pool", tol=1e-5)


def test_cpu_model_never_calls_the_kernels(tensors, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the CPU path launched a CUDA kernel")

    monkeypatch.setattr(gpu7, "wkv7_step", boom)
    monkeypatch.setattr(gpu7, "wkv7_ragged", boom)
    model = Rwkv7Model(tensors, CFG)
    assert model._kernels is None
    model.forward(list(range(12)))
    pool = model.new_pool(2)
    model.step(pool, [pool.alloc()], [[3]])


@pytest.mark.gpu
def test_engine_on_cuda_uses_the_kernels_and_matches_cpu(tensors):
    """On a GPU: the model loads the kernels and its logits and states match the CPU model's."""
    if not torch.cuda.is_available():
        (pytest.fail if require_gpu() else pytest.skip)("no CUDA device")
    cfg = rwkv7_config(2, 128, 61, head_size=64, rank_w=8, rank_a=8, rank_v=4, rank_g=8)
    t = random_tensors(cfg, seed=6)
    cpu, cuda = Rwkv7Model(t, cfg), Rwkv7Model(t, cfg, device="cuda")
    assert cuda._kernels is gpu7
    ids = list(range(40))
    (want, s_want), (got, s_got) = cpu.forward(ids), cuda.forward(ids)
    assert_close(got, want, "logits", tol=1e-4)
    assert_close(s_got.tensor, s_want.tensor, "state", tol=1e-4)
    pools = [m.new_pool(4) for m in (cpu, cuda)]
    slots = [[p.alloc() for _ in range(3)] for p in pools]
    for lengths in ([7, 0, 33], [1, 1, 1]):
        toks = [[(5 * i + j) % cfg.vocab_size for j in range(m)] for i, m in enumerate(lengths)]
        outs = [m.step(p, s, toks) for m, p, s in zip((cpu, cuda), pools, slots, strict=True)]
        for a, b in zip(outs[1].logits or [], outs[0].logits or [], strict=True):
            if len(b):
                assert_close(a, b, "step logits", tol=1e-4)
        assert_close(pools[1].data, pools[0].data, "pool", tol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize(("dtype", "tol"), [("float32", 1e-4), ("float16", 2e-2)])
def test_gpu_rwkv7_steps_the_arena_in_place_and_matches_cpu(dtype, tol, monkeypatch):
    """On a GPU: Model.step on an RWKV-7 pool runs the kernels on the arena itself (never gathered or scattered),
    ragged prefill then one-token steps in changing batches, against the fp32 CPU model of the same weights
    (fp16: the GPU model's matrices in fp16 against the fp32 CPU model, as RWKV-4's GPU test bounds it)."""
    if not torch.cuda.is_available():
        (pytest.fail if require_gpu() else pytest.skip)("no CUDA device")
    cfg = rwkv7_config(3, 256, 97, head_size=64, rank_w=16, rank_a=16, rank_v=8, rank_g=32)
    t = random_tensors(cfg, seed=8)
    cpu = Rwkv7Model(t, cfg)
    cuda = Rwkv7Model(t, cfg, device="cuda", dtype=dtype)
    assert cuda._kernels is gpu7
    pools = [cpu.new_pool(6), cuda.new_pool(6, growable=False)]
    slots = [[p.alloc() for _ in range(5)] for p in pools]
    assert cuda._steps_arena_in_place(pools[1])
    arena_ptr = pools[1].data.data_ptr()
    _NoGather(pools[1], monkeypatch)
    rng = random.Random(2)
    for order, lengths in ((None, [40, 1, 0, 7, 65]), ([4, 0, 2], [1, 1, 1]), (None, [1, 1, 1, 1, 1]),
                           ([1, 3], [3, 1])):
        idx = list(order or range(5))
        toks = [[rng.randrange(cfg.vocab_size) for _ in range(m)] for m in lengths]
        outs = [m.step(p, [s[i] for i in idx], toks) for m, p, s in zip((cpu, cuda), pools, slots, strict=True)]
        for a, b in zip(outs[1].logits or [], outs[0].logits or [], strict=True):
            if len(b):
                assert_close(a, b, f"{dtype} step logits {lengths}", tol=tol)
        assert pools[1].data.data_ptr() == arena_ptr
    assert_close(pools[1].data, pools[0].data, f"{dtype} pool", tol=max(tol, 1e-4))
