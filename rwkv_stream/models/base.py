"""What every model family shares: ragged batch layout, the public API, batched steps over a slot pool.

A family is one module (``rwkv4.py``, ``rwkv7.py``) with a subclass of :class:`RecurrentModel` that prepares
its weights (``_prepare``), lists its matrices (``linears``) and runs its network over a flat ragged batch
(``_run``). Everything the rest of the engine calls (``forward``, ``forward_hidden``, ``head``, ``step``,
``new_state``, ``new_pool``, ``check_state``, ``invariant_rows``, ``fingerprint``) is defined once, here.
A stream's state is one fp32 tensor of ``config.state_shape`` (see :mod:`rwkv_stream.state`).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import cpu_kernels
from ..config import QUANTIZED_FORMATS, AnyConfig, parse_dtype, resolve_device
from ..linear import Linear, invariant_call, invariant_rows
from ..pool import StatePool
from ..state import State, StateError, empty_state_tensor
from ..wkv import TimeMajor

LogitsMode = Literal["all", "last", "none"]
LN_EPS = 1e-5


@dataclass
class Ragged:
    """Layout of a flat batch: stream ``b`` owns rows ``starts[b] .. starts[b] + lengths[b] - 1``. The index
    tensors are built on first use (the compiled CPU layers read only ``lengths``)."""

    lengths: list[int]
    device: torch.device
    single_token: bool  # every stream brings exactly one token

    @classmethod
    def from_lengths(cls, lengths: Sequence[int], device: torch.device) -> Ragged:
        lengths = [int(n) for n in lengths]
        return cls(lengths, device, all(n == 1 for n in lengths))

    @cached_property
    def starts(self) -> Tensor:
        starts, pos = [], 0
        for n in self.lengths:
            starts.append(pos)
            pos += n
        return torch.tensor(starts, dtype=torch.long, device=self.device)

    @cached_property
    def last(self) -> Tensor:
        return self.starts + torch.tensor(self.lengths, dtype=torch.long, device=self.device) - 1

    @cached_property
    def shift_index(self) -> Tensor:
        """Row of ``cat([previous vectors of the B streams, rows])`` that precedes each row."""
        n_streams, shift, pos = len(self.lengths), [], 0
        for b, n in enumerate(self.lengths):
            shift.append(b)
            shift.extend(range(n_streams + pos, n_streams + pos + n - 1))
            pos += n
        return torch.tensor(shift, dtype=torch.long, device=self.device)

    @cached_property  # read by every layer's kernel launch: built once per step
    def offsets_i32(self) -> Tensor:
        ends = torch.tensor(self.lengths, dtype=torch.int32, device=self.device).cumsum(0, dtype=torch.int32)
        return torch.cat((torch.zeros(1, dtype=torch.int32, device=ends.device), ends))

    @cached_property  # the CPU WKV loop's layout, shared by all layers
    def time_major(self) -> TimeMajor:
        return TimeMajor.of(self.starts, self.lengths)

    @cached_property
    def slots_i32(self) -> Tensor:
        return torch.arange(len(self.lengths), dtype=torch.int32, device=self.device)


def token_shift(x: Tensor, prev: Tensor, rag: Ragged) -> Tensor:
    """Previous-token vectors of every row of ``x``; ``prev`` ``[B, C]`` (a view into the states) holds each
    stream's last vector before the step and is overwritten with its last row."""
    if rag.single_token:  # one row per stream: the previous vectors are the state rows themselves
        out = prev.clone()
        prev.copy_(x)
        return out
    out = torch.cat((prev, x)).index_select(0, rag.shift_index)
    prev.copy_(x.index_select(0, rag.last))
    return out


@dataclass
class StepOutput:
    """Per-stream results of :meth:`RecurrentModel.step`, in the order of the request."""

    hidden: list[Tensor]  # [n_i, C] fp32: ln_out of the last layer, what heads read
    logits: list[Tensor] | None  # [n_i, V] ("all") or [1, V] ("last") fp32; None for "none"


class RecurrentModel:
    """An RWKV language model that runs as an RNN (one subclass per family). Create it with
    :func:`rwkv_stream.load`.

    ``dtype`` is the weight format: ``float32``, ``bfloat16``, ``float16``, ``int8`` (CPU, weight-only) or
    ``w8a8`` (CPU, int8 weights and per-row int8 activations; see :mod:`rwkv_stream.linear`). State and
    accumulation are always fp32.
    """

    family = ""
    config: AnyConfig
    head_linear: Linear
    ln_out: tuple[Tensor, Tensor]

    def __init__(
        self,
        tensors: dict[str, Tensor],
        config: AnyConfig,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
    ) -> None:
        if config.family != self.family:
            raise ValueError(f"{type(self).__name__} runs {self.family} models, not {config.family}")
        self.config = config
        self.device = resolve_device(device)
        self.quantized = dtype if isinstance(dtype, str) and dtype in QUANTIZED_FORMATS else None
        self.weight_format = self.quantized or str(parse_dtype(dtype)).removeprefix("torch.")
        self.dtype = torch.bfloat16 if self.quantized else parse_dtype(dtype)
        self.fingerprint = weights_fingerprint(tensors, config)
        self._prepare(tensors)

    # ----------------------------------------------------------------- what a family provides
    def _prepare(self, tensors: dict[str, Tensor]) -> None:
        raise NotImplementedError

    def linears(self) -> list[Linear]:
        """Every matrix of the body (not the LM head)."""
        raise NotImplementedError

    def _run(self, ids: Tensor, states: Tensor, rag: Ragged, *, sequential: bool = False) -> Tensor:
        """Final normalized hidden vectors of flat token ids; ``states`` ``[B, *state_shape]`` is advanced in
        place. ``sequential``: every token's state update on its own (bits independent of how a stream's
        tokens are grouped into calls); otherwise a family may use a faster parallel form."""
        raise NotImplementedError

    def _run_from(self, ids: Tensor, source: Tensor, rag: Ragged) -> tuple[Tensor, Tensor]:
        """:meth:`_run` starting from ``source`` ``[B, *state_shape]``, which is left as it is: the hidden vectors
        and the advanced states (here :meth:`_run` on a copy; a family whose kernels read one buffer and write
        another overrides it)."""
        work = source.clone()
        return self._run(ids, work, rag), work

    def _steps_arena_in_place(self, pool: StatePool) -> bool:
        """Whether :meth:`step` runs :meth:`_run_arena` on ``pool.data`` directly (a family with kernels that
        address the arena by slot, on the pool's device) instead of gathering the streams' states into a copy
        and scattering them back."""
        return False

    def _run_arena(self, ids: Tensor, arena: Tensor, slots: Tensor, rag: Ragged) -> Tensor:
        """:meth:`_run` over the arena ``[capacity, *state_shape]`` in place: stream ``b`` of ``rag`` is slot
        ``slots[b]`` (int32 on the device, distinct)."""
        raise NotImplementedError

    # ----------------------------------------------------------------- public API
    def new_state(self) -> State:
        return State(empty_state_tensor(self.config, self.device), 0, self.fingerprint, family=self.family)

    def new_pool(self, capacity: int = 64, *, growable: bool = True) -> StatePool:
        return StatePool(self.config, self.fingerprint, capacity, device=self.device, growable=growable)

    @property
    def state_bytes(self) -> int:
        """Bytes of one stream's state (fp32)."""
        return self.config.state_floats * 4

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
        if len(ids) == 0:
            return torch.empty(0, self.config.n_embd), state.copy()
        source = state.tensor.to(self.device).unsqueeze(0)
        hidden, work = self._run_from(ids, source, Ragged.from_lengths([len(ids)], self.device))
        return hidden, State(work[0], state.n_tokens + len(ids), self.fingerprint, dict(state.meta), self.family)

    def head(self, hidden: Tensor) -> Tensor:
        """LM logits (fp32) for hidden vectors from :meth:`forward_hidden` or :meth:`step`."""
        return self.head_linear(hidden.to(self.device, torch.float32))

    def _norm_out(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, x.shape[-1:], *self.ln_out, LN_EPS)

    def _norm_out_compiled_(self, x: Tensor) -> Tensor:
        """The output norm on the compiled CPU path, in place on the layers' output rows (fp32, contiguous):
        one C call (:func:`rwkv_stream.cpu_kernels.layer_norm_rows_`, the kernels' layer norm: its sums differ
        from torch's, outputs within 2e-6 of ``F.layer_norm``'s at unit scale)."""
        return cpu_kernels.layer_norm_rows_(x, *self.ln_out)

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
        crash then gives the same bits), and every state update runs token by token, so how a stream's
        tokens are split into steps does not change its bits either. On CUDA the flag promises nothing.
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
            pad = self._padding(len(ids)) if batch_invariant else 0
            if not pad and self._steps_arena_in_place(pool):  # CUDA kernels: the arena's slots, no copies
                arena_slots = torch.tensor(busy_slots, dtype=torch.int32, device=self.device)
                flat = self._run_arena(ids, pool.data, arena_slots, rag)
            else:
                index = torch.tensor(busy_slots, dtype=torch.long, device=pool.device)
                work = pool.data.index_select(0, index).to(self.device)
                if pad:  # scratch one-token streams: rows for the products, no extra state time steps
                    scratch = empty_state_tensor(self.config, self.device, batch=pad)
                    work = torch.cat((work, scratch))
                    ids = torch.cat((ids, ids.new_zeros(pad)))
                    rag = Ragged.from_lengths([*rag.lengths, *[1] * pad], self.device)
                flat = self._run(ids, work, rag, sequential=batch_invariant)
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
        if state.family != self.family:
            raise StateError(f"state is an {state.family} state (model {state.fingerprint}); this model is "
                             f"{self.family} ({self.fingerprint})")
        if state.fingerprint != self.fingerprint:
            raise StateError(
                f"state was made by model {state.fingerprint}, this model is {self.fingerprint}"
            )
        expected = tuple(self.config.state_shape)
        if tuple(state.tensor.shape) != expected:
            raise StateError(f"state has shape {list(state.tensor.shape)}, expected {list(expected)}")

    def _token_tensor(self, tokens: Sequence[int] | Tensor) -> Tensor:
        vocab = self.config.vocab_size
        if isinstance(tokens, (list, tuple)) and all(isinstance(t, int) for t in tokens):
            # checked in Python: the tensor check's reductions cost ~150 us of a batch-1 step, cold
            ids = torch.tensor(tokens, dtype=torch.long)
            outside = [t for t in tokens if not 0 <= t < vocab]
        else:
            ids = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
            in_range = len(ids) == 0 or (int(ids.min()) >= 0 and int(ids.max()) < vocab)
            outside = [] if in_range else ids[(ids < 0) | (ids >= vocab)].tolist()
        if outside:
            raise ValueError(f"token id {int(outside[0])} out of range for vocabulary of {vocab}")
        return ids.to(self.device)


def weights_fingerprint(tensors: dict[str, Tensor], config: AnyConfig) -> str:
    """A short stable hash of the config (family and version included) and the weights as stored
    (independent of the run dtype)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(json.dumps(config.to_dict(), sort_keys=True).encode())
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{list(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()
