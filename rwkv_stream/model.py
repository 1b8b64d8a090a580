"""The RWKV-4 model as an RNN over ragged batches of streams (torch; the CPU path and the GPU fallback).

One routine, :meth:`Model._run`, does all the work: it takes the new tokens of ``B`` streams laid out flat
(stream ``b`` owns a contiguous run of rows) and their states, and returns the final normalized hidden vector
of every token. Matrix products see all tokens of all streams at once; only the WKV recurrence walks time.
``forward`` is the one-stream case, ``step`` the pool-backed many-stream case.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from types import ModuleType
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import FP16_RESCALE_EVERY, QUANTIZED_FORMATS, ModelConfig, parse_dtype
from .linear import Linear, invariant_call, invariant_rows, make_linear, project
from .pool import StatePool
from .state import State, StateError, empty_state_tensor
from .wkv import TimeMajor, wkv_ragged

LogitsMode = Literal["all", "last", "none"]
LN_EPS = 1e-5


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


@dataclass
class Ragged:
    """Layout of a flat batch: stream ``b`` owns rows ``starts[b] .. starts[b] + lengths[b] - 1``."""

    lengths: list[int]
    starts: Tensor
    last: Tensor
    shift_index: Tensor  # row of cat([previous vectors of the B streams, rows]) that precedes each row
    single_token: bool  # every stream brings exactly one token

    @classmethod
    def from_lengths(cls, lengths: Sequence[int], device: torch.device) -> Ragged:
        lengths = [int(n) for n in lengths]
        n_streams = len(lengths)
        starts, shift, pos = [], [], 0
        for b, n in enumerate(lengths):
            starts.append(pos)
            shift.append(b)
            shift.extend(range(n_streams + pos, n_streams + pos + n - 1))
            pos += n
        starts_t = torch.tensor(starts, dtype=torch.long, device=device)
        lengths_t = torch.tensor(lengths, dtype=torch.long, device=device)
        shift_t = torch.tensor(shift, dtype=torch.long, device=device)
        return cls(lengths, starts_t, starts_t + lengths_t - 1, shift_t, all(n == 1 for n in lengths))

    @cached_property  # read by every layer's kernel launch: built once per step
    def offsets_i32(self) -> Tensor:
        ends = torch.tensor(self.lengths, dtype=torch.int32, device=self.starts.device).cumsum(0, dtype=torch.int32)
        return torch.cat((torch.zeros(1, dtype=torch.int32, device=ends.device), ends))

    @cached_property  # the CPU WKV loop's layout, shared by all layers
    def time_major(self) -> TimeMajor:
        return TimeMajor.of(self.starts, self.lengths)

    @cached_property
    def slots_i32(self) -> Tensor:
        return torch.arange(len(self.lengths), dtype=torch.int32, device=self.starts.device)


@dataclass
class StepOutput:
    """Per-stream results of :meth:`Model.step`, in the order of the request."""

    hidden: list[Tensor]  # [n_i, C] fp32: ln_out of the last layer, what heads read
    logits: list[Tensor] | None  # [n_i, V] ("all") or [1, V] ("last") fp32; None for "none"


class Model:
    """An RWKV-4 language model that runs as an RNN. Create it with :func:`load`.

    ``dtype`` is the weight format: ``float32``, ``bfloat16``, ``float16``, ``int8`` (CPU, weight-only) or
    ``w8a8`` (CPU, int8 weights and per-row int8 activations; see :mod:`rwkv_stream.linear`). State, decay,
    bonus, layer norms and accumulation are always fp32.
    """

    def __init__(
        self,
        tensors: dict[str, Tensor],
        config: ModelConfig,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
    ) -> None:
        self.config = config
        self.device = torch.device(device)
        self.quantized = dtype if isinstance(dtype, str) and dtype in QUANTIZED_FORMATS else None
        self.weight_format = self.quantized or str(parse_dtype(dtype)).removeprefix("torch.")
        self.dtype = torch.bfloat16 if self.quantized else parse_dtype(dtype)
        self.fingerprint = weights_fingerprint(tensors, config)
        self._rescale = self.dtype == torch.float16
        self._prepare(tensors)
        self._kernels = _load_cuda_kernels(self.device)

    # ----------------------------------------------------------------- weights
    def _prepare(self, t: dict[str, Tensor]) -> None:
        dev, dt = self.device, self.dtype

        def vec(key: str) -> Tensor:
            return t[key].to(dev, torch.float32).contiguous()

        def mat(key: str, scale: float = 1.0) -> Linear:
            m = t[key].to(dev, torch.float32)
            return make_linear(m / scale if scale != 1.0 else m, dt, self.quantized)

        def mixes(prefix: str, names: str) -> Tensor:
            return torch.stack([vec(prefix + n).reshape(1, -1) for n in names])

        emb = t["emb.weight"].to(dev, torch.float32)
        emb = F.layer_norm(emb, (self.config.n_embd,), vec("blocks.0.ln0.weight"), vec("blocks.0.ln0.bias"), LN_EPS)
        self.emb = emb if dt == torch.float32 else emb.to(dt)
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
        self.head_linear = mat("head.weight")

    # ----------------------------------------------------------------- public API
    def new_state(self) -> State:
        return State(empty_state_tensor(self.config, self.device), 0, self.fingerprint)

    def new_pool(self, capacity: int = 64, *, growable: bool = True) -> StatePool:
        return StatePool(self.config, self.fingerprint, capacity, device=self.device, growable=growable)

    def forward(self, tokens: Sequence[int] | Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """Logits ``[len(tokens), vocab]`` (fp32) and the state after the tokens. ``state`` is not mutated."""
        hidden, new_state = self.forward_hidden(tokens, state)
        return self.head(hidden), new_state

    def forward_hidden(
        self, tokens: Sequence[int] | Tensor, state: State | None = None
    ) -> tuple[Tensor, State]:
        """Final normalized hidden vectors ``[len(tokens), C]`` without the LM head (what heads read)."""
        state = self.new_state() if state is None else state
        self.check_state(state)
        ids = self._token_tensor(tokens)
        work = state.tensor.to(self.device).unsqueeze(0).clone()
        if len(ids) == 0:
            return torch.empty(0, self.config.n_embd), state.copy()
        hidden = self._run(ids, work, Ragged.from_lengths([len(ids)], self.device))
        return hidden, State(work[0], state.n_tokens + len(ids), self.fingerprint, dict(state.meta))

    def head(self, hidden: Tensor) -> Tensor:
        """LM logits (fp32) for hidden vectors from :meth:`forward_hidden` or :meth:`step`."""
        return self.head_linear(hidden.to(self.device, torch.float32))

    def linears(self) -> list[Linear]:
        """Every matrix of the body (not the LM head)."""
        return [lin for layer in self.layers for lin in (
            layer.att_key, layer.att_value, layer.att_receptance, layer.att_output,
            layer.ffn_key, layer.ffn_receptance, layer.ffn_value)]

    @cached_property
    def invariant_rows(self) -> int | None:
        """Rows a step's matrix products need so that each stream's results are bit-identical whatever other
        streams share the step (probed once per weight shape, see :func:`rwkv_stream.linear.invariant_rows`);
        None where nothing can be promised (CUDA)."""
        counts = [invariant_rows(lin, lin.in_features, lin.kernel_key, self.device) for lin in self.linears()]
        known = [n for n in counts if n is not None]
        if len(known) == len(counts):
            return max(known)
        if self.device.type == "cpu":
            warnings.warn(f"{self.weight_format} products on this CPU depend on the row count beyond "
                          "the probed range: batch_invariant steps cannot promise bit-identical results", stacklevel=2)
        return None

    def step(
        self,
        pool: StatePool,
        slots: Sequence[int],
        tokens: Sequence[Sequence[int]],
        *,
        logits: LogitsMode = "all",
        batch_invariant: bool = False,
    ) -> StepOutput:
        """Advance many streams at once: ``tokens[i]`` are the new tokens of the stream in ``slots[i]``.

        Streams may bring different numbers of tokens (ragged); a stream with none is left unchanged.
        States are read from and written back to ``pool``. A stream's results do not depend on which other
        streams share the batch up to fp32 rounding of differently sized matrix products; with
        ``batch_invariant`` (CPU) they do not depend on it at all, bit for bit: small steps are padded with
        scratch one-token streams up to :attr:`invariant_rows` rows (a replay batched differently after a
        crash then gives the same bits). On CUDA the flag changes nothing and promises nothing.
        """
        if pool.fingerprint != self.fingerprint:
            raise StateError(f"pool belongs to model {pool.fingerprint}, not {self.fingerprint}")
        if len(slots) != len(tokens):
            raise ValueError(f"{len(slots)} slots but {len(tokens)} token lists")
        if len(set(slots)) != len(slots):
            raise ValueError("a slot appears twice in one step; feed a stream's tokens as one list")
        for slot in slots:
            pool.check_live(slot)
        busy = [i for i, t in enumerate(tokens) if len(t) > 0]
        hidden: list[Tensor] = [torch.empty(0, self.config.n_embd, device=self.device) for _ in slots]
        if busy:
            busy_slots = [slots[i] for i in busy]
            ids = self._token_tensor([tok for i in busy for tok in tokens[i]])
            rag = Ragged.from_lengths([len(tokens[i]) for i in busy], self.device)
            index = torch.tensor(busy_slots, dtype=torch.long, device=pool.device)
            work = pool.data.index_select(0, index).to(self.device)
            pad = self._padding(len(ids)) if batch_invariant else 0
            if pad:  # scratch one-token streams: rows for the products, no extra WKV time steps
                scratch = empty_state_tensor(self.config, self.device).expand(pad, -1, -1, -1)
                work = torch.cat((work, scratch))
                ids = torch.cat((ids, ids.new_zeros(pad)))
                rag = Ragged.from_lengths([*rag.lengths, *[1] * pad], self.device)
            flat = self._run(ids, work, rag)
            pool.data.index_copy_(0, index, work[: len(busy)].to(pool.device))
            for i, rows in zip(busy, flat.split(rag.lengths), strict=False):  # scratch streams come last
                hidden[i] = rows
            for slot, n in zip(busy_slots, rag.lengths, strict=False):
                pool.n_tokens[slot] += n
        return StepOutput(hidden, self._step_logits(hidden, logits, batch_invariant))

    def _padding(self, rows: int) -> int:
        need = self.invariant_rows
        return 0 if need is None else max(0, need - rows)

    def _step_logits(
        self, hidden: list[Tensor], mode: LogitsMode, batch_invariant: bool = False
    ) -> list[Tensor] | None:
        if mode == "none":
            return None
        if mode not in ("all", "last"):
            raise ValueError(f"logits must be 'all', 'last' or 'none', not {mode!r}")
        rows = hidden if mode == "all" else [h[-1:] for h in hidden]
        counts = [len(r) for r in rows]
        if sum(counts) == 0:
            return [torch.empty(0, self.config.vocab_size) for _ in rows]
        x = torch.cat(rows)
        logits = invariant_call(self.head, x, self.head_linear.kernel_key) if batch_invariant else self.head(x)
        return list(logits.split(counts))

    def check_state(self, state: State) -> None:
        if state.fingerprint != self.fingerprint:
            raise StateError(
                f"state was made by model {state.fingerprint}, this model is {self.fingerprint}"
            )
        expected = (self.config.n_layer, 5, self.config.n_embd)
        if tuple(state.tensor.shape) != expected:
            raise StateError(f"state has shape {list(state.tensor.shape)}, expected {list(expected)}")

    def _token_tensor(self, tokens: Sequence[int] | Tensor) -> Tensor:
        ids = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            bad = ids[(ids < 0) | (ids >= self.config.vocab_size)][0]
            raise ValueError(f"token id {int(bad)} out of range for vocabulary of {self.config.vocab_size}")
        return ids.to(self.device)

    # ----------------------------------------------------------------- the network
    def _run(self, ids: Tensor, states: Tensor, rag: Ragged) -> Tensor:
        """Hidden vectors for flat token ids; ``states`` ``[B, L, 5, C]`` is advanced in place."""
        x = self.emb[ids].float()
        for i, layer in enumerate(self.layers):
            st = states[:, i]
            xa = F.layer_norm(x, x.shape[-1:], *layer.ln1, LN_EPS)
            x = x + self._time_mix(layer, xa, st, rag, (states, i))
            x = x + self._channel_mix(layer, F.layer_norm(x, x.shape[-1:], *layer.ln2, LN_EPS), st, rag)
            if self._rescale and (i + 1) % FP16_RESCALE_EVERY == 0:
                x = x / 2
        return F.layer_norm(x, x.shape[-1:], *self.ln_out, LN_EPS)

    def _shift(self, xa: Tensor, st: Tensor, row: int, rag: Ragged) -> Tensor:
        """Previous-token vectors for every row; the last row of each stream becomes its new state row."""
        if rag.single_token:  # one row per stream: the previous vectors are the state rows themselves
            prev = st[:, row].clone()
            st[:, row] = xa
            return prev
        prev = torch.cat((st[:, row], xa)).index_select(0, rag.shift_index)
        st[:, row] = xa.index_select(0, rag.last)
        return prev

    def _time_mix(self, layer: _Layer, xa: Tensor, st: Tensor, rag: Ragged, where: tuple[Tensor, int]) -> Tensor:
        sx = self._shift(xa, st, 0, rag)
        k, v, r = project((layer.att_key, layer.att_value, layer.att_receptance), torch.lerp(sx, xa, layer.att_mix))
        r = torch.sigmoid(r)
        if self._kernels is not None:  # CUDA: one kernel over all streams and tokens, state updated in place
            states, index = where
            wkv = self._kernels.wkv_ragged(k, v, layer.w, layer.u, states, rag.slots_i32, rag.offsets_i32, index)
        else:
            wkv = wkv_ragged(k, v, layer.w, layer.u, st[:, 1:4], rag.starts, rag.lengths, rag.time_major)
        return layer.att_output(r * wkv)

    def _channel_mix(self, layer: _Layer, xf: Tensor, st: Tensor, rag: Ragged) -> Tensor:
        sx = self._shift(xf, st, 4, rag)
        k, r = project((layer.ffn_key, layer.ffn_receptance), torch.lerp(sx, xf, layer.ffn_mix))
        return torch.sigmoid(r) * layer.ffn_value(torch.relu(k).square())


def _load_cuda_kernels(device: torch.device) -> ModuleType | None:
    """The CuPy kernels (:mod:`rwkv_stream.gpu`) on CUDA devices, compiled and warmed once; None elsewhere.

    Set ``RWKV_STREAM_KERNELS=0`` to run the plain torch reference on the GPU instead.
    """
    if device.type != "cuda" or os.environ.get("RWKV_STREAM_KERNELS", "1") == "0":
        return None
    try:
        from . import gpu

        gpu.load_kernels(device)
        return gpu
    except Exception as exc:  # no cupy, or NVRTC missing: the torch path is correct, only slower
        warnings.warn(f"CUDA kernels unavailable ({exc}); using the torch reference path", stacklevel=3)
        return None


def weights_fingerprint(tensors: dict[str, Tensor], config: ModelConfig) -> str:
    """A short stable hash of the config and the weights as stored (independent of the run dtype)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(json.dumps(config.to_dict(), sort_keys=True).encode())
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{list(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()

