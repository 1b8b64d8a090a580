"""RWKV-7 ("x070", Goose) as an RNN over ragged batches of streams (torch; on CUDA the WKV runs as CuPy kernels).

Per layer, on the residual stream ``x`` (equations in ``shared/notes/rwkv7-facts.md``; BlinkDL
``RWKV-v7/rwkv_v7_numpy.py`` is the readable reference):

* time mix on ``xa = ln1(x)`` with the previous token's ``xa``: six lerps (r, w, k, v, a, g); ``r, k, v`` by
  ``C x C`` matrices; decay ``exp(-e^-1/2 * sigmoid(w0 + tanh(x_w W1) W2))``; in-context rate
  ``a = sigmoid(a0 + x_a A1 A2)``; gate ``g = sigmoid(x_g G1) G2``; ``kk = normalize_per_head(k * k_k)``;
  ``k *= 1 + (a - 1) * k_a``; value residual from layer 0's ``v``; per head ``S <- S diag(decay) +
  (S (-kk)) (kk * a)^T + v k^T`` and ``y = S r``; GroupNorm per head (eps ``N * 1e-5``, 64e-5 for N = 64);
  bonus ``(sum_head r * k * r_k) v``; output ``W_o (y * g)``;
* channel mix on ``xf = ln2(x)``: ``W_v relu(W_k lerp(xf, prev, x_k))^2``.

State per stream: one fp32 tensor ``[n_layer, 2C + H*N*N]``, per layer ``[att shift | ffn shift | S]`` with
``S`` as ``[H, N(value), N(key)]``: BlinkDL's orientation (the ``rwkv`` package's ``att_kv``), the transpose
of fla / Hugging Face's ``[H, K, V]``. The empty state is all zeros.

Matrix products see all tokens of all streams at once; only the matrix state walks time. Two forms of that
walk, equal within fp32 rounding:

* sequential (:func:`wkv7_step` per token, streams batched time-major): a stream's bits depend only on its
  own tokens, however they are grouped into calls; ``step(batch_invariant=True)`` always uses it;
* chunked (:func:`wkv7_chunk`, for streams bringing at least ``CHUNK_MIN`` tokens otherwise): inside a chunk
  the diagonal-plus-low-rank recurrence is solved in parallel: with ``Γ`` the running product of the decays,
  ``S_t = S_0 Γ_t + Σ_{s≤t} (sa_s b_s^T + v_s k_s^T) diag(Γ_t / Γ_s)`` where ``sa_t = S_{t-1} a_t`` solves a
  unit lower-triangular T x T system per head. The decay is at least ``exp(-e^-1/2) = 0.545`` per token, so
  ``Γ`` over a chunk of 64 stays above 1e-17: plain fp32 ratios, no rescaling needed.

On a CUDA device (with CuPy) the kernels of :mod:`rwkv_stream.gpu7` run the token shifts and the matrix-state
walk (one-token step and ragged prefill, token by token with the state in registers) directly on the pool's
slot arena: ``step`` updates the streams' states in place, as RWKV-4 does (``_run_arena``).
``RWKV_STREAM_KERNELS=0`` keeps the torch forms above (states gathered per step). The CPU path never touches
the CUDA kernels.

On the CPU, ``float16``, ``bfloat16`` and ``q8_0`` run all layers in one compiled C call where a C compiler is present
(:mod:`rwkv_stream.cpu_kernels_rwkv7`: all products, low-rank paths and element-wise work, the matrix state
walked token by token, so always the sequential form; steps update the pool's states in place). Without a
compiler, or with ``RWKV_STREAM_CPU_KERNELS=0``, they run the torch forms above, the reference. ``float32`` stays
on torch (MKL) either way, so the default format's bits do not depend on the machine having a compiler.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import cpu_kernels, cpu_kernels_rwkv7
from ..config import Rwkv7Config
from ..linear import KernelLinear, Linear, make_linear, pack_in_arena, project
from ..pool import StatePool
from ..state import register_empty_state
from .base import LN_EPS, Ragged, RecurrentModel, token_shift

DECAY_SCALE = math.exp(-0.5)  # decay = exp(-DECAY_SCALE * sigmoid(z)); the `rwkv` package rounds it to 0.606531
CHUNK = 32  # tokens per chunk of the parallel form
CHUNK_MIN = 8  # a stream bringing fewer tokens runs them sequentially
LORA_ALIGN = 32  # low-rank sizes are padded to this (two AVX-512 fp32 vectors; see _prepare)

# formats whose CPU steps run all layers in one compiled call (rwkv_stream.cpu_kernels_rwkv7) where a compiler is
# present; float32 stays on the torch path (MKL), as for RWKV-4
FUSED_FORMATS = ("float16", "bfloat16", "q8_0")

register_empty_state("rwkv7", None)  # all zeros


@dataclass
class _Layer:
    ln1: tuple[Tensor, Tensor]
    ln2: tuple[Tensor, Tensor]
    mix: Tensor  # [6, 1, C]: r, w, k, v, a, g
    w0: Tensor
    a0: Tensor
    v0: Tensor | None  # layers >= 1
    k_k: Tensor
    k_a: Tensor
    r_k: Tensor  # [C] (= [H, N] flattened)
    lora_w: tuple[Linear, Linear]  # x_w -> rank -> C
    lora_a: tuple[Linear, Linear]
    lora_v: tuple[Linear, Linear] | None
    lora_g: tuple[Linear, Linear]
    receptance: Linear
    key: Linear
    value: Linear
    output: Linear
    ln_x: tuple[Tensor, Tensor]
    ffn_x_k: Tensor
    ffn_key: Linear
    ffn_value: Linear


class Rwkv7Model(RecurrentModel):
    """An RWKV-7 ("x070") language model that runs as an RNN. Create it with :func:`rwkv_stream.load`.

    Weight formats as for RWKV-4 (the low-rank matrices of ``int8``/``w8a8`` stay bf16; ``q8_0`` keeps them, the
    embedding, ``W_r`` and ``W_k`` in fp16: see ``_prepare``); state, decay, norms
    and accumulation are always fp32. ``chunk`` is the parallel prefill's chunk length (0: always sequential).
    """

    family = "rwkv7"
    config: Rwkv7Config

    def __init__(
        self,
        tensors: dict[str, Tensor],
        config: Rwkv7Config,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        *,
        chunk: int = CHUNK,
    ) -> None:
        super().__init__(tensors, config, device, dtype)
        self.chunk = chunk
        self._kernels = _load_cuda_kernels(self.device, config.head_size)

    # ----------------------------------------------------------------- weights
    def _prepare(self, t: dict[str, Tensor]) -> None:
        cfg, dev, dt = self.config, self.device, self.dtype
        self.n_head, self.head_size = cfg.n_head, cfg.head_size
        self.gn_eps = cfg.head_size * 1e-5
        fused = (dev.type == "cpu" and self.weight_format in FUSED_FORMATS
                 and cpu_kernels_rwkv7.ready(cfg.n_embd, cfg.ffn_dim))
        self._lib = cpu_kernels_rwkv7.load() if fused else None
        # with the kernels, steps read and write the streams' states in the pool (no gather and scatter of the
        # 2.4 MB states of the 0.1B shape: 16-stream steps 76 vs 108 ms, q8_0, one thread); False: on a copy
        self.cpu_steps_in_place = True

        def vec(key: str) -> Tensor:
            return t[key].to(dev, torch.float32).reshape(-1).contiguous()

        def mat(key: str) -> Linear:
            return make_linear(t[key].to(dev, torch.float32), dt, self.quantized, kernels=fused)

        # q8_0 keeps what is not a block matrix (low-rank matrices, embedding) in fp16, as rwkv.cpp's Q8_0 files
        # do (fp16 has 3 more mantissa bits than bf16 at equal bytes; these values are far from its range limits)
        small_dt = torch.float16 if self.weight_format == "q8_0" else dt

        def fp16_in_q8(key: str) -> Linear:
            # q8_0 keeps W_r and W_k in fp16 too (+9% bytes per token at the 0.1B shape): at a stream's first
            # token y = v (k . r) per head, and the per-head GroupNorm makes the output hinge on the sign and size
            # of k . r, which their int8 rounding moves most (random 0.1B shape, 16 tokens, error vs fp32: 0.24 ->
            # 0.04 on the bench's sequence, mean of six 0.128 -> 0.093; rwkv.cpp Q8_0: 0.119, 0.156); and the
            # head, as rwkv.cpp's Q8_0 files and RWKV-4's q8_0 do (rwkv.cpp's trained tiny x070 model, error vs
            # fp32: int8 head 3.05e-3, fp16 head 4.6e-4, rwkv.cpp Q8_0 1.23e-3)
            if self.weight_format != "q8_0":
                return mat(key)
            return make_linear(t[key].to(dev, torch.float32), torch.float16, kernels=fused)

        def lora(prefix: str, name: str) -> tuple[Linear, Linear]:
            # BlinkDL stores the row-vector form (x @ w1 @ w2): as [out, in] matrices they are transposed.
            # The rank is padded with zeros to a multiple of LORA_ALIGN (exact: tanh(0) and the zero weights
            # add nothing), so the element-wise op between the two products never has a vector-loop tail,
            # whose scalar code would give a row other bits depending on the row count (batch invariance).
            w1 = t[f"{prefix}{name}1"].to(dev, torch.float32).t()
            w2 = t[f"{prefix}{name}2"].to(dev, torch.float32).t()
            pad = -w1.shape[0] % LORA_ALIGN
            w1, w2 = F.pad(w1, (0, 0, 0, pad)), F.pad(w2, (0, pad))
            return make_linear(w1, small_dt, kernels=fused), make_linear(w2, small_dt, kernels=fused)

        emb = t["emb.weight"].to(dev, torch.float32)
        emb = F.layer_norm(emb, (cfg.n_embd,), vec("blocks.0.ln0.weight"), vec("blocks.0.ln0.bias"), LN_EPS)
        self.emb = emb if small_dt == torch.float32 else emb.to(small_dt)
        self.layers: list[_Layer] = []
        for i in range(cfg.n_layer):
            p, a = f"blocks.{i}.", f"blocks.{i}.att."
            self.layers.append(_Layer(
                ln1=(vec(p + "ln1.weight"), vec(p + "ln1.bias")),
                ln2=(vec(p + "ln2.weight"), vec(p + "ln2.bias")),
                mix=torch.stack([vec(a + "x_" + n).reshape(1, -1) for n in "rwkvag"]),
                w0=vec(a + "w0"), a0=vec(a + "a0"), v0=vec(a + "v0") if i else None,
                k_k=vec(a + "k_k"), k_a=vec(a + "k_a"), r_k=vec(a + "r_k"),
                lora_w=lora(a, "w"), lora_a=lora(a, "a"), lora_v=lora(a, "v") if i else None,
                lora_g=lora(a, "g"),
                receptance=fp16_in_q8(a + "receptance.weight"), key=fp16_in_q8(a + "key.weight"),
                value=mat(a + "value.weight"), output=mat(a + "output.weight"),
                ln_x=(vec(a + "ln_x.weight"), vec(a + "ln_x.bias")),
                ffn_x_k=vec(p + "ffn.x_k"), ffn_key=mat(p + "ffn.key.weight"), ffn_value=mat(p + "ffn.value.weight"),
            ))
        self.ln_out = (vec("ln_out.weight"), vec("ln_out.bias"))
        self.head_linear = fp16_in_q8("head.weight")
        self._fused_layers: cpu_kernels_rwkv7.LayerTable | None = None
        if fused:  # in the order a step reads them, in huge pages (the layer table copies the pointers)
            order = [lin for layer in self.layers for lin in _step_order(layer)] + [self.head_linear]
            assert all(isinstance(lin, KernelLinear) for lin in order)
            self._arena = pack_in_arena(order)  # type: ignore[arg-type]
            self._fused_layers = cpu_kernels_rwkv7.LayerTable([self._layer_args(layer) for layer in self.layers])

    def _layer_args(self, layer: _Layer) -> cpu_kernels_rwkv7.LayerArgs:
        """The compiled layer's constant arguments (:mod:`rwkv_stream.cpu_kernels_rwkv7`)."""
        lora_v = layer.lora_v or layer.lora_a  # layer 0: a stand-in the kernel never reads (has_v = 0)
        mats = (layer.receptance, layer.key, layer.value, layer.lora_w[0], layer.lora_a[0], layer.lora_g[0],
                lora_v[0], layer.lora_w[1], layer.lora_a[1], layer.lora_g[1], lora_v[1], layer.output,
                layer.ffn_key, layer.ffn_value)
        assert all(isinstance(m, KernelLinear) for m in mats)
        v0 = layer.v0 if layer.v0 is not None else layer.a0
        vectors = [*layer.ln1, *layer.ln2, layer.mix.reshape(-1).contiguous(), layer.w0, layer.a0, v0, layer.k_k,
                   layer.k_a, layer.r_k, *layer.ln_x, layer.ffn_x_k]
        return cpu_kernels_rwkv7.LayerArgs(vectors, [m.mat for m in mats],  # type: ignore[union-attr]
                                           layer.lora_v is not None)

    def linears(self) -> list[Linear]:
        out: list[Linear] = []
        for layer in self.layers:
            out += [layer.receptance, layer.key, layer.value, layer.output, layer.ffn_key, layer.ffn_value]
            for pair in (layer.lora_w, layer.lora_a, layer.lora_v, layer.lora_g):
                out += list(pair or ())
        return out

    # ----------------------------------------------------------------- the network
    def _run(self, ids: Tensor, states: Tensor, rag: Ragged, *, sequential: bool = False) -> Tensor:
        """Hidden vectors for flat token ids; ``states`` ``[B, L, 2C + H*N*N]`` is advanced in place."""
        if self._kernels is not None:  # CUDA: the kernels address states by slot (here 0 .. B-1)
            return self._run_arena(ids, states, rag.slots_i32, rag)
        if self._lib is not None:
            return self._run_fused(ids, states, rag)
        x = self.emb[ids].float()
        v_first: Tensor | None = None
        c, h, n = self.config.n_embd, self.n_head, self.head_size
        for i, layer in enumerate(self.layers):
            st = states[:, i]
            xa = F.layer_norm(x, x.shape[-1:], *layer.ln1, LN_EPS)
            xs = torch.addcmul(xa, token_shift(xa, st[:, :c], rag) - xa, layer.mix)  # [6, rows, C]
            s = st[:, 2 * c :].view(-1, h, n, n)

            def wkv(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, s: Tensor = s) -> Tensor:
                return self._wkv(s, r, w, k, v, a, b, rag, sequential)

            dx, v_first = self._time_mix(layer, xs, v_first, wkv)
            x = x + dx
            xf = F.layer_norm(x, x.shape[-1:], *layer.ln2, LN_EPS)
            x = x + self._channel_mix(layer, torch.addcmul(xf, token_shift(xf, st[:, c : 2 * c], rag) - xf,
                                                           layer.ffn_x_k))
        return self._norm_out(x)

    def _run_from(self, ids: Tensor, source: Tensor, rag: Ragged) -> tuple[Tensor, Tensor]:
        if self._lib is None or not (source.is_contiguous() and source.dtype == torch.float32):
            return super()._run_from(ids, source, rag)
        work = torch.empty_like(source)  # only written: the kernels read ``source`` (no copy of 2.4 MB a step)
        return self._run_fused(ids, work, rag, source=source), work

    def _run_fused(self, ids: Tensor, states: Tensor, rag: Ragged, slots: Tensor | None = None,
                   source: Tensor | None = None) -> Tensor:
        """The CPU network in one compiled call (:func:`rwkv_stream.cpu_kernels_rwkv7.run_layers`):
        every row on its own except the matrix-state walk, token by token within each stream, so a stream's
        bits depend neither on its batch mates nor on how its tokens are split into steps. ``slots``: ``states``
        is the pool's arena, stream ``b`` in row ``slots[b]`` (updated in place, nothing gathered). ``source``:
        start from these states (fp32, contiguous, laid out as ``states``) and write ``states`` only."""
        assert self._lib is not None and self._fused_layers is not None
        x = cpu_kernels.gather_rows(self.emb, ids)
        if slots is not None:
            slots = slots.to(torch.int32).contiguous()
        work = states if states.is_contiguous() and states.dtype == torch.float32 else states.float().contiguous()
        assert (slots is None and source is None) or work is states
        cpu_kernels_rwkv7.run_layers(self._lib, x, work, rag.lengths, self._fused_layers, self.n_head, self.head_size,
                                     self.config.ffn_dim, self.gn_eps, slots, source)
        if work is not states:
            states.copy_(work)
        return self._norm_out_compiled_(x)

    def _time_mix(
        self, layer: _Layer, xs: Tensor, v_first: Tensor | None, wkv: Callable[..., Tensor],
    ) -> tuple[Tensor, Tensor]:
        """The time mix of the token-shift mixes ``xs`` ``[6, rows, C]`` (r, w, k, v, a, g); ``wkv(r, log_decay,
        k, v, a, b)`` runs the matrix-state walk and returns ``y`` ``[rows, C]``."""
        n_rows, c = xs.shape[1:]
        h, n = self.n_head, self.head_size
        r, k, v = project((layer.receptance, layer.key, layer.value), xs[[0, 2, 3]])
        w1, w2 = layer.lora_w
        log_decay = torch.sigmoid(layer.w0 + w2(torch.tanh(w1(xs[1])))) * -DECAY_SCALE
        a1, a2 = layer.lora_a
        a = torch.sigmoid(layer.a0 + a2(a1(xs[4])))
        g1, g2 = layer.lora_g
        g = g2(torch.sigmoid(g1(xs[5])))
        kk = F.normalize((k * layer.k_k).view(n_rows, h, n), dim=-1).view(n_rows, c)
        k = k * (1 + (a - 1) * layer.k_a)
        if v_first is None or layer.lora_v is None or layer.v0 is None:
            v_first = v
        else:
            v1, v2 = layer.lora_v
            v = v + (v_first - v) * torch.sigmoid(layer.v0 + v2(v1(xs[3])))
        y = wkv(r, log_decay, k, v, -kk, kk * a)
        y = F.group_norm(y, h, *layer.ln_x, eps=self.gn_eps)
        bonus = (r * k * layer.r_k).view(n_rows, h, n).sum(-1, keepdim=True) * v.view(n_rows, h, n)
        y = y + bonus.view(n_rows, c)
        return layer.output(y * g), v_first

    def _channel_mix(self, layer: _Layer, kx: Tensor) -> Tensor:
        return layer.ffn_value(torch.relu(layer.ffn_key(kx)).square())

    # ----------------------------------------------------------------- CUDA: the slot arena in place
    def _steps_arena_in_place(self, pool: StatePool) -> bool:
        if self._kernels is not None:
            return pool.data.device == self.device
        if self._lib is not None and self.cpu_steps_in_place:  # a stream's state read and written in the pool
            data = pool.data
            return data.device.type == "cpu" and data.dtype == torch.float32 and data.is_contiguous()
        return False

    def _run_arena(self, ids: Tensor, arena: Tensor, slots: Tensor, rag: Ragged) -> Tensor:
        """The network with the CUDA kernels (:mod:`rwkv_stream.gpu7`): token shifts and the matrix-state walk
        read and update the arena's rows of ``slots`` in place (``[capacity, L, 2C + H*N*N]``, nothing gathered
        or scattered); matrix products, low-rank paths and norms are torch's. With the CPU kernels: the same
        in place through :meth:`_run_fused`."""
        ops = self._kernels
        if ops is None and self._lib is not None:
            return self._run_fused(ids, arena, rag, slots)
        assert ops is not None
        offsets = None if rag.single_token else rag.offsets_i32
        token_stream = None if offsets is None else ops.stream_of_tokens(offsets, len(ids))
        x = self.emb[ids].float()
        v_first: Tensor | None = None
        for i, layer in enumerate(self.layers):
            xa = F.layer_norm(x, x.shape[-1:], *layer.ln1, LN_EPS)
            xs = ops.token_shift7(xa, layer.mix.view(6, -1), arena, slots, offsets, i, ops.ATT_SHIFT,
                                  token_stream=token_stream)

            def wkv(*vecs: Tensor, i: int = i) -> Tensor:
                vecs = tuple(t.contiguous() for t in vecs)
                if offsets is None:
                    return ops.wkv7_step(*vecs, arena, slots, i)
                return ops.wkv7_ragged(*vecs, arena, slots, offsets, i)

            dx, v_first = self._time_mix(layer, xs, v_first, wkv)
            x = x + dx
            xf = F.layer_norm(x, x.shape[-1:], *layer.ln2, LN_EPS)
            kx = ops.token_shift7(xf, layer.ffn_x_k.view(1, -1), arena, slots, offsets, i, ops.FFN_SHIFT,
                                  token_stream=token_stream)[0]
            x = x + self._channel_mix(layer, kx)
        return self._norm_out(x)

    def _wkv(
        self, s: Tensor, r: Tensor, log_decay: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
        rag: Ragged, sequential: bool,
    ) -> Tensor:
        """``y`` ``[rows, C]`` of the matrix-state recurrence; ``s`` ``[B, H, N, N]`` advanced in place."""
        h, n = self.n_head, self.head_size
        r, log_decay, k, v, a, b = (t.view(-1, h, n) for t in (r, log_decay, k, v, a, b))
        if rag.single_token:
            return wkv7_step(s, r, log_decay.exp(), k, v, a, b).view(-1, h * n)
        y = torch.empty_like(r)
        chunked = [] if sequential or self.chunk <= 0 else [i for i, m in enumerate(rag.lengths) if m >= CHUNK_MIN]
        starts = rag.starts.tolist()
        for i in chunked:
            for c0 in range(starts[i], starts[i] + rag.lengths[i], self.chunk):
                rows = slice(c0, min(c0 + self.chunk, starts[i] + rag.lengths[i]))
                y[rows] = wkv7_chunk(s[i], r[rows], log_decay[rows], k[rows], v[rows], a[rows], b[rows])
        rest = [i for i in range(len(rag.lengths)) if i not in set(chunked)]
        if rest:
            _sequential(s, (r, log_decay.exp(), k, v, a, b), y, rest, [starts[i] for i in rest],
                        [rag.lengths[i] for i in rest])
        return y.view(-1, h * n)


def _step_order(layer: _Layer) -> list[Linear]:
    """A layer's matrices in the order the compiled layer reads them."""
    lora_v = list(layer.lora_v or ())
    return [layer.receptance, layer.key, layer.value, layer.lora_w[0], layer.lora_a[0], layer.lora_g[0],
            *lora_v[:1], layer.lora_w[1], layer.lora_a[1], layer.lora_g[1], *lora_v[1:], layer.output,
            layer.ffn_key, layer.ffn_value]


def _load_cuda_kernels(device: torch.device, head_size: int) -> ModuleType | None:
    """:mod:`rwkv_stream.gpu7` on CUDA devices when it can run this head size (compiled once); else None."""
    if device.type != "cuda" or os.environ.get("RWKV_STREAM_KERNELS", "1") == "0":
        return None
    from .. import gpu7

    return gpu7 if head_size in gpu7.HEAD_SIZES and gpu7.available(device) else None


def wkv7_step(s: Tensor, r: Tensor, decay: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """One token for a batch of streams: ``s`` ``[B, H, N, N]`` (value, key) is updated in place, the
    vectors are ``[B, H, N]``; returns ``y = S_new r`` ``[B, H, N]``. ``a = -kk``, ``b = kk * a_iclr``."""
    # products as multiply + sum over the contiguous key axis, not matmul: a batched matmul picks its kernel by
    # the batch shape (B * H = 1 goes to gemv), which would change a stream's bits with its batch mates
    sa = (s * a.unsqueeze(-2)).sum(-1, keepdim=True)  # [B, H, N, 1]: S_old a
    s.mul_(decay.unsqueeze(-2)).addcmul_(sa, b.unsqueeze(-2)).addcmul_(v.unsqueeze(-1), k.unsqueeze(-2))
    return (s * r.unsqueeze(-2)).sum(-1)


def _sequential(
    s: Tensor, vecs: tuple[Tensor, ...], y: Tensor, streams: list[int], starts: list[int], lengths: list[int]
) -> None:
    """Token by token, the given streams batched time-major (stream ``streams[j]``'s rows start at
    ``starts[j]``); writes their rows of ``y``."""
    whole = streams == list(range(s.shape[0]))
    for t in range(max(lengths)):
        active = [j for j, m in enumerate(lengths) if m > t]
        if len(active) == 1:
            j = active[0]
            rows: slice | Tensor = slice(starts[j] + t, starts[j] + t + 1)
            st = s[streams[j] : streams[j] + 1]  # a view: updated in place
            y[rows] = wkv7_step(st, *(x[rows] for x in vecs))
            continue
        rows = torch.tensor([starts[j] + t for j in active], device=s.device)
        if whole and len(active) == len(streams):
            y[rows] = wkv7_step(s, *(x[rows] for x in vecs))
            continue
        index = torch.tensor([streams[j] for j in active], device=s.device)
        st = s.index_select(0, index)
        y[rows] = wkv7_step(st, *(x[rows] for x in vecs))
        s.index_copy_(0, index, st)


def wkv7_chunk(s: Tensor, r: Tensor, log_decay: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``T`` tokens of one stream at once: ``s`` ``[H, N, N]`` (value, key) is updated in place, the vectors
    are ``[T, H, N]`` (``log_decay`` the log of the decay); returns ``y`` ``[T, H, N]``. Equal to ``T`` calls
    of :func:`wkv7_step` within fp32 rounding (see the module docstring for the algebra)."""
    r, k, v, a, b = (x.transpose(0, 1) for x in (r, k, v, a, b))  # [H, T, N]
    cum = log_decay.transpose(0, 1).double().cumsum(1)  # log Γ_t (inclusive), in fp64: exact enough to exp
    gamma = cum.exp().float()  # Γ_t
    gamma_before = (cum - log_decay.transpose(0, 1).double()).exp().float()  # Γ_{t-1}
    inv_gamma = (-cum).exp().float()  # 1 / Γ_s
    to_end = (cum[:, -1:] - cum).exp().float()  # Γ_T / Γ_s
    a_hat, r_hat = a * gamma_before, r * gamma
    b_til, k_til = b * inv_gamma, k * inv_gamma
    s_t = s.transpose(-1, -2)  # [H, key, value]
    lower_b = (a_hat @ b_til.transpose(-1, -2)).tril_(-1)  # [H, T, T]: strictly lower
    lower_k = (a_hat @ k_til.transpose(-1, -2)).tril_(-1)
    rhs = a_hat @ s_t + lower_k @ v  # S_0 Γ_{t-1} a_t + Σ_{s<t} v_s (k_s Γ_{t-1}/Γ_s) a_t
    eye = torch.eye(r.shape[1], dtype=r.dtype, device=r.device)
    sa = torch.linalg.solve_triangular(eye - lower_b, rhs, upper=False, unitriangular=True)  # [H, T, value]
    y = r_hat @ s_t + (r_hat @ b_til.transpose(-1, -2)).tril_() @ sa + (r_hat @ k_til.transpose(-1, -2)).tril_() @ v
    new = s * gamma[:, -1:, :] + sa.transpose(-1, -2) @ (b * to_end) + v.transpose(-1, -2) @ (k * to_end)
    s.copy_(new)
    return y.transpose(0, 1)
