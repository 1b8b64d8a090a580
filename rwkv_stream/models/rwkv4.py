"""RWKV-4 as an RNN over ragged batches of streams (torch; the CPU path and the GPU fallback).

One routine, :meth:`Rwkv4Model._run`, does all the work: it takes the new tokens of ``B`` streams laid out
flat (stream ``b`` owns a contiguous run of rows) and their states, and returns the final normalized hidden
vector of every token. Matrix products see all tokens of all streams at once; only the WKV recurrence walks
time. State per stream: ``[n_layer, 5, C]`` (rows ``att_x, aa, bb, pp, ffn_x``; empty ``pp`` is EMPTY_PP).
"""

from __future__ import annotations

import ctypes
import os
import warnings
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import cpu_kernels, w8a8_cpu
from ..config import FP16_RESCALE_EVERY, AnyConfig
from ..linear import KernelLinear, Linear, Q8Linear, make_linear, pack_in_arena, project
from ..pool import StatePool
from ..state import ROWS
from ..wkv import wkv_ragged
from .base import LN_EPS, Ragged, RecurrentModel, token_shift

ATT_X, FFN_X = ROWS.index("att_x"), ROWS.index("ffn_x")  # state rows the token shifts keep
# formats whose CPU steps run all layers in one compiled call (rwkv_stream.cpu_kernels) where a compiler is
# present. float32, the default, stays on the torch path (MKL): the kernels compute a product 1-4 rows at a time, which
# made prefill and the batch-invariant steps of sessions (spaCy nlp.pipe, Kafka batches) about 4x slower
# (nlp.pipe 1,783 vs 7,277 words per CPU-second), and the default format's bits would then depend on whether
# the machine has a compiler.
FUSED_FORMATS = ("float16", "bfloat16", "q8_0")


@dataclass
class _Layer:
    ln1: tuple[Tensor, Tensor]
    ln2: tuple[Tensor, Tensor]
    att_mix: Tensor  # [3, 1, C]: k, v, r
    w: Tensor  # -exp(time_decay), fp32
    u: Tensor  # time_first, fp32
    att_key: Linear
    att_value: Linear
    att_receptance: Linear
    att_output: Linear
    ffn_mix: Tensor  # [2, 1, C]: k, r
    ffn_key: Linear
    ffn_receptance: Linear
    ffn_value: Linear


class Rwkv4Model(RecurrentModel):
    """An RWKV-4 language model that runs as an RNN. Create it with :func:`rwkv_stream.load`.

    ``float16`` halves the residual stream every 6 layers (as the references do); state, decay, bonus, layer
    norms and accumulation are always fp32.
    """

    family = "rwkv4"

    def __init__(
        self,
        tensors: dict[str, Tensor],
        config: AnyConfig,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
    ) -> None:
        super().__init__(tensors, config, device, dtype)
        self._kernels = _load_cuda_kernels(self.device)

    # ----------------------------------------------------------------- weights
    def _prepare(self, t: dict[str, Tensor]) -> None:
        dev, dt = self.device, self.dtype
        cfg = self.config
        fused = (dev.type == "cpu" and self.weight_format in FUSED_FORMATS
                 and cpu_kernels.rwkv4_layer_ready(cfg.n_embd, cfg.ffn_dim))
        self._lib = cpu_kernels.load() if fused else None
        # fp16 activations of the torch path overflow without halving; the kernels keep activations in fp32 but
        # halve alike, so that a model's weights and numbers are the same on either path (and for the GPU stepper)
        self._rescale = dt == torch.float16

        def vec(key: str) -> Tensor:
            return t[key].to(dev, torch.float32).contiguous()

        def mat(key: str, scale: float = 1.0) -> Linear:
            m = t[key].to(dev, torch.float32)
            return make_linear(m / scale if scale != 1.0 else m, dt, self.quantized, kernels=fused)

        def mixes(prefix: str, names: str) -> Tensor:
            return torch.stack([vec(prefix + n).reshape(1, -1) for n in names])

        emb = t["emb.weight"].to(dev, torch.float32)
        emb = F.layer_norm(emb, (self.config.n_embd,), vec("blocks.0.ln0.weight"), vec("blocks.0.ln0.bias"), LN_EPS)
        emb_dt = torch.float16 if self.weight_format == "q8_0" else dt  # one row read per token: fp16 is cheap
        self.emb = emb if emb_dt == torch.float32 else emb.to(emb_dt)
        self.layers: list[_Layer] = []
        for i in range(self.config.n_layer):
            p = f"blocks.{i}."
            scale = float(2 ** (i // FP16_RESCALE_EVERY)) if self._rescale else 1.0
            self.layers.append(
                _Layer(
                    ln1=(vec(p + "ln1.weight"), vec(p + "ln1.bias")),
                    ln2=(vec(p + "ln2.weight"), vec(p + "ln2.bias")),
                    att_mix=mixes(p + "att.time_mix_", "kvr"),
                    w=-torch.exp(vec(p + "att.time_decay")),
                    u=vec(p + "att.time_first"),
                    att_key=mat(p + "att.key.weight"),
                    att_value=mat(p + "att.value.weight"),
                    att_receptance=mat(p + "att.receptance.weight"),
                    att_output=mat(p + "att.output.weight", scale),
                    ffn_mix=mixes(p + "ffn.time_mix_", "kr"),
                    ffn_key=mat(p + "ffn.key.weight"),
                    ffn_receptance=mat(p + "ffn.receptance.weight"),
                    ffn_value=mat(p + "ffn.value.weight", scale),
                )
            )
        self.ln_out = (vec("ln_out.weight"), vec("ln_out.bias"))
        if self.weight_format == "q8_0":  # the head stays fp16, as in rwkv.cpp's Q8_0 files (see BENCHMARKS.md)
            self.head_linear = make_linear(t["head.weight"].to(dev, torch.float32), torch.float16, kernels=fused)
        else:
            self.head_linear = mat("head.weight")
        if fused:  # in the order a step reads them, in huge pages (the params below copy the pointers)
            self._arena = pack_in_arena([*self.linears(), self.head_linear])  # type: ignore[list-item]
        self._fused_layers = self._layer_table() if fused else None
        w8_lib = w8a8_cpu.load() if dev.type == "cpu" and self.weight_format == "w8a8" and self.layers else None
        self._w8 = None if w8_lib is None else w8a8_cpu.W8A8Layers(w8_lib, self.layers, cfg.n_embd, cfg.ffn_dim,
                                                                    self.ln_out)

    def _layer_table(self) -> cpu_kernels.LayerTable:
        vectors, mats, scales = [], [], []
        for i, layer in enumerate(self.layers):
            lins = (layer.att_key, layer.att_value, layer.att_receptance, layer.att_output,
                    layer.ffn_key, layer.ffn_receptance, layer.ffn_value)
            assert all(isinstance(m, KernelLinear) for m in lins)
            vectors.append([*layer.ln1, *layer.ln2, layer.att_mix, layer.w, layer.u, layer.ffn_mix])
            mats.append([m.mat for m in lins])  # type: ignore[union-attr]
            scales.append(0.5 if self._rescale and (i + 1) % FP16_RESCALE_EVERY == 0 else 1.0)
        return cpu_kernels.rwkv4_layer_table(vectors, mats, scales)

    def linears(self) -> list[Linear]:
        return [lin for layer in self.layers for lin in (
            layer.att_key, layer.att_value, layer.att_receptance, layer.att_output,
            layer.ffn_key, layer.ffn_receptance, layer.ffn_value)]

    # ----------------------------------------------------------------- the network
    def _run(self, ids: Tensor, states: Tensor, rag: Ragged, *, sequential: bool = False) -> Tensor:
        """Hidden vectors for flat token ids; ``states`` ``[B, L, 5, C]`` is advanced in place (the WKV
        recurrence is always token by token, so ``sequential`` changes nothing)."""
        if self._kernels is not None:  # CUDA: the kernels address states by slot (here 0 .. B-1)
            return self._run_arena(ids, states, rag.slots_i32, rag)
        if self._lib is not None:
            return self._run_fused(ids, states, rag)
        if self._w8 is not None:  # w8a8 on the CPU: compiled element-wise parts around torch's int8 products
            work = states if states.is_contiguous() and states.dtype == torch.float32 else states.float().contiguous()
            hidden = self._w8.run(self.emb[ids].float(), work, rag.lengths)  # the output layer norm included
            if work is not states:
                states.copy_(work)
            return hidden
        x = self.emb[ids].float()
        for i, layer in enumerate(self.layers):
            st = states[:, i]
            xa = F.layer_norm(x, x.shape[-1:], *layer.ln1, LN_EPS)
            x = x + self._time_mix(layer, xa, st, rag)
            x = x + self._channel_mix(layer, F.layer_norm(x, x.shape[-1:], *layer.ln2, LN_EPS), st, rag)
            if self._rescale and (i + 1) % FP16_RESCALE_EVERY == 0:
                x = x / 2
        return self._norm_out(x)

    def _run_fused(self, ids: Tensor, states: Tensor, rag: Ragged) -> Tensor:
        """The CPU network in one compiled call (:func:`rwkv_stream.cpu_kernels.rwkv4_layers`): every row on its
        own except the WKV recurrence, token by token within each stream, so a stream's bits depend neither on
        its batch mates nor on how its tokens are split into steps."""
        assert self._lib is not None and self._fused_layers is not None
        x = cpu_kernels.gather_rows(self.emb, ids)
        work = states if states.is_contiguous() and states.dtype == torch.float32 else states.float().contiguous()
        starts, pos = [], 0
        for n in rag.lengths:
            starts.append(pos)
            pos += n
        c_starts = (ctypes.c_int * len(starts))(*starts)
        c_lens = (ctypes.c_int * len(starts))(*rag.lengths)
        cpu_kernels.rwkv4_layers(self._lib, x, work, c_starts, c_lens, self._fused_layers, self.config.ffn_dim)
        if work is not states:
            states.copy_(work)
        return self._norm_out_compiled_(x)

    def _time_mix(self, layer: _Layer, xa: Tensor, st: Tensor, rag: Ragged) -> Tensor:
        sx = token_shift(xa, st[:, 0], rag)
        k, v, r = _project((layer.att_key, layer.att_value, layer.att_receptance), torch.lerp(sx, xa, layer.att_mix))
        r = torch.sigmoid(r)
        wkv = wkv_ragged(k, v, layer.w, layer.u, st[:, 1:4], rag.starts, rag.lengths, rag.time_major)
        return _apply(layer.att_output, r * wkv)

    def _channel_mix(self, layer: _Layer, xf: Tensor, st: Tensor, rag: Ragged) -> Tensor:
        sx = token_shift(xf, st[:, 4], rag)
        k, r = _project((layer.ffn_key, layer.ffn_receptance), torch.lerp(sx, xf, layer.ffn_mix))
        return torch.sigmoid(r) * _apply(layer.ffn_value, torch.relu(k).square())

    # ----------------------------------------------------------------- CUDA: the slot arena in place
    def _steps_arena_in_place(self, pool: StatePool) -> bool:
        return self._kernels is not None and pool.data.device == self.device

    def _run_arena(self, ids: Tensor, arena: Tensor, slots: Tensor, rag: Ragged) -> Tensor:
        """The network with the CUDA kernels (:mod:`rwkv_stream.gpu`): token shift and WKV read and update the
        arena's rows of ``slots`` in place; matrix products and layer norms are torch's."""
        ops = self._kernels
        assert ops is not None
        offsets = None if rag.single_token else rag.offsets_i32
        token_stream = None if offsets is None else ops.stream_of_tokens(offsets, len(ids))
        x = self.emb[ids].float()
        for i, layer in enumerate(self.layers):
            xa = F.layer_norm(x, x.shape[-1:], *layer.ln1, LN_EPS)
            mixed = ops.token_shift_ragged(xa, layer.att_mix.reshape(3, -1), arena, slots, offsets, i, ATT_X,
                                           token_stream=token_stream)
            k, v, r = project((layer.att_key, layer.att_value, layer.att_receptance), mixed)
            if offsets is None:  # gate sigmoid(r) fused into the kernel
                wkv = ops.wkv_step(k, v, layer.w, layer.u, arena, slots, i, r=r)
            else:
                wkv = ops.wkv_ragged(k, v, layer.w, layer.u, arena, slots, offsets, i, r=r)
            x = x + layer.att_output(wkv)
            xf = F.layer_norm(x, x.shape[-1:], *layer.ln2, LN_EPS)
            mixed = ops.token_shift_ragged(xf, layer.ffn_mix.reshape(2, -1), arena, slots, offsets, i, FFN_X,
                                           token_stream=token_stream)
            k, r = project((layer.ffn_key, layer.ffn_receptance), mixed)
            x = x + torch.sigmoid(r) * layer.ffn_value(torch.relu(k).square())
            if self._rescale and (i + 1) % FP16_RESCALE_EVERY == 0:
                x = x / 2
        return self._norm_out(x)


def _apply(lin: Linear, x: Tensor) -> Tensor:
    """``lin(x)``; kernel-packed float weights through torch's GEMM (the torch path of a many-row step)."""
    return lin.gemm(x) if isinstance(lin, KernelLinear) and not isinstance(lin, Q8Linear) else lin(x)


def _project(linears: tuple[Linear, ...], xs: Tensor) -> list[Tensor]:
    if isinstance(linears[0], KernelLinear) and not isinstance(linears[0], Q8Linear):
        return [_apply(lin, x) for lin, x in zip(linears, xs, strict=True)]
    return project(linears, xs)


def _load_cuda_kernels(device: torch.device) -> ModuleType | None:
    """The CuPy kernels (:mod:`rwkv_stream.gpu`) on CUDA devices, compiled and warmed once; None elsewhere.

    Set ``RWKV_STREAM_KERNELS=0`` to run the plain torch reference on the GPU instead.
    """
    if device.type != "cuda" or os.environ.get("RWKV_STREAM_KERNELS", "1") == "0":
        return None
    try:
        from .. import gpu

        gpu.load_kernels(device)
        return gpu
    except Exception as exc:  # no cupy, or NVRTC missing: the torch path is correct, only slower
        warnings.warn(f"CUDA kernels unavailable ({exc}); using the torch reference path", stacklevel=3)
        return None
