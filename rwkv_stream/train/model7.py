"""RWKV-7 ("x070") for training: whole sequences at once, BlinkDL checkpoint names.

``state_dict()`` holds BlinkDL's x070 names and shapes (``blocks.i.att.x_r`` ``[1, 1, C]``, ``w1`` ``[C, R]``,
``r_k`` ``[H, N]``, no value-residual LoRA in layer 0 ...), so :meth:`RWKV7.checkpoint_state_dict` is a file the
engine loads as an :class:`rwkv_stream.models.Rwkv7Model`. The equations are the engine's (see
:mod:`rwkv_stream.models.rwkv7`); the matrix-state walk runs in the chunked parallel form, batched over
streams and heads and differentiable end to end (:func:`wkv7_chunk_batched`): inside a chunk of ``chunk_len``
tokens it is a few ``T x T`` and ``T x N`` products and one unit-triangular solve per head, so the Python loop
runs over chunks, never over tokens.

The initialisation follows the spirit of BlinkDL's x070 training code (ramps of the lerp coefficients and
decay speeds by channel and depth, zero LoRA down-projections and output matrices), written here from the
published equations; it is meant for small models trained on a CPU.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from rwkv_stream.models.rwkv7 import DECAY_SCALE

from .model import CheckpointedLM

# One layer's recurrent state: (att shift [B, C], S [B, H, N(value), N(key)], ffn shift [B, C]), fp32.
LayerState7 = tuple[Tensor, Tensor, Tensor]


def _lora_rank(c: int, factor: float, power: float = 0.5) -> int:
    return max(8, int(round(factor * c**power / 8)) * 8)


@dataclass(frozen=True)
class Train7Config:
    """Shape of an RWKV-7 to train. Zero sizes take defaults: ``ffn_dim`` 4C; low-rank sizes about
    1.8 sqrt(C) (decay, in-context rate), 1.3 sqrt(C) (value residual), 0.6 C^0.8 (gate), rounded to multiples
    of 8 (at C = 768: 48, 48, 40, 120; the released 0.1B model has 64, 64, 32, 128)."""

    vocab_size: int
    n_embd: int
    n_layer: int
    head_size: int = 64
    ffn_dim: int = 0
    rank_w: int = 0
    rank_a: int = 0
    rank_v: int = 0
    rank_g: int = 0
    chunk_len: int = 16

    def __post_init__(self) -> None:
        if self.head_size < 1 or self.n_embd % self.head_size:
            raise ValueError(f"n_embd {self.n_embd} is not a multiple of head_size {self.head_size}")
        c = self.n_embd
        defaults = {"ffn_dim": 4 * c, "rank_w": _lora_rank(c, 1.8), "rank_a": _lora_rank(c, 1.8),
                    "rank_v": _lora_rank(c, 1.3), "rank_g": _lora_rank(c, 0.6, 0.8)}
        for name, value in defaults.items():
            if getattr(self, name) <= 0:
                object.__setattr__(self, name, value)

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def wkv7_chunk_batched(s: Tensor, r: Tensor, log_decay: Tensor, k: Tensor, v: Tensor, a: Tensor,
                       b: Tensor) -> tuple[Tensor, Tensor]:
    """One chunk of ``T`` tokens for a batch of streams and heads, differentiable, without in-place updates.

    ``s`` ``[B, H, N(value), N(key)]``; vectors ``[B, H, T, N]`` (``log_decay`` the log of the decay,
    ``a = -kk``, ``b = kk * iclr``). Returns ``y`` ``[B, H, T, N]`` and the state after the chunk, equal to T
    one-token updates ``S <- S diag(decay) + (S a) b^T + v k^T``, ``y = S r`` within fp32 rounding (the algebra
    is in :mod:`rwkv_stream.models.rwkv7`)."""
    t = r.shape[-2]
    cum = log_decay.double().cumsum(-2)  # log of the running decay product, inclusive
    gamma = cum.exp().float()
    gamma_before = (cum - log_decay.double()).exp().float()
    inv_gamma = (-cum).exp().float()
    to_end = (cum[..., -1:, :] - cum).exp().float()
    a_hat, r_hat = a * gamma_before, r * gamma
    b_til, k_til = b * inv_gamma, k * inv_gamma
    strict = torch.ones(t, t, dtype=torch.bool, device=r.device).tril(-1)
    incl = torch.ones(t, t, dtype=torch.bool, device=r.device).tril()
    zero = r.new_zeros(())
    s_t = s.transpose(-1, -2)  # [B, H, key, value]
    lower_b = torch.where(strict, a_hat @ b_til.transpose(-1, -2), zero)
    lower_k = torch.where(strict, a_hat @ k_til.transpose(-1, -2), zero)
    rhs = a_hat @ s_t + lower_k @ v
    eye = torch.eye(t, dtype=r.dtype, device=r.device)
    sa = torch.linalg.solve_triangular(eye - lower_b, rhs, upper=False, unitriangular=True)  # [B, H, T, value]
    y = (r_hat @ s_t + torch.where(incl, r_hat @ b_til.transpose(-1, -2), zero) @ sa
         + torch.where(incl, r_hat @ k_til.transpose(-1, -2), zero) @ v)
    new = s * gamma[..., -1:, :] + sa.transpose(-1, -2) @ (b * to_end) + v.transpose(-1, -2) @ (k * to_end)
    return y, new


def wkv7_parallel(s: Tensor, r: Tensor, log_decay: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
                  chunk_len: int) -> tuple[Tensor, Tensor]:
    """A whole sequence ``[B, H, T, N]`` in chunks of ``chunk_len`` tokens; returns ``y`` and the final state."""
    ys = []
    for c0 in range(0, r.shape[-2], chunk_len):
        part = slice(c0, c0 + chunk_len)
        y, s = wkv7_chunk_batched(s, r[..., part, :], log_decay[..., part, :], k[..., part, :], v[..., part, :],
                                  a[..., part, :], b[..., part, :])
        ys.append(y)
    return torch.cat(ys, dim=-2), s


def _shift(x: Tensor, prev: Tensor | None) -> Tensor:
    first = torch.zeros_like(x[:, :1]) if prev is None else prev.unsqueeze(1).to(x.dtype)
    return torch.cat([first, x[:, :-1]], dim=1)


def _orthogonal(rows: int, cols: int, gain: float) -> Tensor:
    w = torch.empty(rows, cols)
    nn.init.orthogonal_(w, gain=gain)
    return w


class TimeMix7(nn.Module):
    """RWKV-7 time mixing (``blocks.i.att``)."""

    def __init__(self, cfg: Train7Config, layer_id: int) -> None:
        super().__init__()
        c, h, n = cfg.n_embd, cfg.n_head, cfg.head_size
        self.n_head, self.head_size, self.chunk_len, self.layer_id = h, n, cfg.chunk_len, layer_id
        ratio_0_to_1 = layer_id / max(cfg.n_layer - 1, 1)
        ratio_1_to_0 = 1.0 - layer_id / cfg.n_layer
        ramp = (torch.arange(c, dtype=torch.float32) / c).view(1, 1, c)
        # lerp coefficients: x_m = xa + (prev - xa) * coef (more of the previous token in early layers)
        for name, power in (("r", 0.2), ("w", 0.9), ("k", 0.7), ("v", 0.7), ("a", 0.9), ("g", 0.2)):
            setattr(self, f"x_{name}", nn.Parameter(1.0 - ramp ** (power * ratio_1_to_0)))
        speed = torch.arange(c, dtype=torch.float32) / max(c - 1, 1)
        w0 = -6.0 + 5.0 * speed ** (0.7 + 1.3 * ratio_0_to_1) + 0.5  # slow to fast decay across channels
        self.w0 = nn.Parameter(w0.view(1, 1, c))
        self.w1 = nn.Parameter(torch.zeros(c, cfg.rank_w))
        self.w2 = nn.Parameter(_orthogonal(cfg.rank_w, c, 0.1))
        self.a0 = nn.Parameter(torch.zeros(1, 1, c))
        self.a1 = nn.Parameter(torch.zeros(c, cfg.rank_a))
        self.a2 = nn.Parameter(_orthogonal(cfg.rank_a, c, 0.1))
        if layer_id > 0:
            self.v0 = nn.Parameter(torch.ones(1, 1, c))
            self.v1 = nn.Parameter(torch.zeros(c, cfg.rank_v))
            self.v2 = nn.Parameter(_orthogonal(cfg.rank_v, c, 0.1))
        self.g1 = nn.Parameter(torch.zeros(c, cfg.rank_g))
        self.g2 = nn.Parameter(_orthogonal(cfg.rank_g, c, 0.1))
        self.k_k = nn.Parameter(torch.full((1, 1, c), 0.85))
        self.k_a = nn.Parameter(torch.ones(1, 1, c))
        self.r_k = nn.Parameter(torch.zeros(h, n))
        self.receptance = nn.Linear(c, c, bias=False)
        self.key = nn.Linear(c, c, bias=False)
        self.value = nn.Linear(c, c, bias=False)
        self.output = nn.Linear(c, c, bias=False)
        self.ln_x = nn.GroupNorm(h, c, eps=n * 1e-5)
        with torch.no_grad():
            bound = 0.5 / math.sqrt(c)
            for lin in (self.receptance, self.key, self.value):
                lin.weight.uniform_(-bound, bound)
            self.output.weight.zero_()
            self.ln_x.weight.fill_(((1 + layer_id) / cfg.n_layer) ** 0.7)

    def _param(self, name: str) -> Tensor:
        p = getattr(self, name)
        assert isinstance(p, Tensor)
        return p

    def forward(self, xa: Tensor, prev: Tensor | None, s: Tensor | None, v_first: Tensor | None
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``xa`` ``[B, T, C]`` (after ln1); returns the output, the last ``xa``, the new state and ``v_first``."""
        bsz, t, c = xa.shape
        h, n = self.n_head, self.head_size
        d = _shift(xa, prev) - xa
        xr, xw, xk, xv, xa_, xg = (xa + d * self._param(f"x_{m}") for m in "rwkvag")
        r, k, v = self.receptance(xr), self.key(xk), self.value(xv)
        log_decay = torch.sigmoid(self.w0 + torch.tanh(xw @ self.w1) @ self.w2) * -DECAY_SCALE
        a = torch.sigmoid(self.a0 + (xa_ @ self.a1) @ self.a2)
        g = torch.sigmoid(xg @ self.g1) @ self.g2
        kk = F.normalize((k * self.k_k).view(bsz, t, h, n), dim=-1).view(bsz, t, c)
        k = k * (1 + (a - 1) * self.k_a)
        if self.layer_id == 0 or v_first is None:
            v_first = v
        else:
            v0, v1, v2 = (self._param(name) for name in ("v0", "v1", "v2"))
            v = v + (v_first - v) * torch.sigmoid(v0 + (xv @ v1) @ v2)
        if s is None:
            s = xa.new_zeros(bsz, h, n, n)

        def heads(x: Tensor) -> Tensor:
            return x.view(bsz, t, h, n).transpose(1, 2)

        y, s = wkv7_parallel(s, heads(r), heads(log_decay), heads(k), heads(v), heads(-kk), heads(kk * a),
                             self.chunk_len)
        y = self.ln_x(y.transpose(1, 2).reshape(bsz * t, c)).view(bsz, t, c)
        bonus = (r * k * self.r_k.view(1, 1, c)).view(bsz, t, h, n).sum(-1, keepdim=True) * v.view(bsz, t, h, n)
        y = y + bonus.view(bsz, t, c)
        return self.output(y * g), xa[:, -1], s, v_first


class ChannelMix7(nn.Module):
    """RWKV-7 channel mixing (``blocks.i.ffn``): ``value(relu(key(lerp))^2)``."""

    def __init__(self, cfg: Train7Config, layer_id: int) -> None:
        super().__init__()
        c = cfg.n_embd
        ramp = (torch.arange(c, dtype=torch.float32) / c).view(1, 1, c)
        self.x_k = nn.Parameter(1.0 - ramp ** ((1.0 - layer_id / cfg.n_layer) ** 4))
        self.key = nn.Linear(c, cfg.ffn_dim, bias=False)
        self.value = nn.Linear(cfg.ffn_dim, c, bias=False)
        with torch.no_grad():
            bound = 0.5 / math.sqrt(c)
            self.key.weight.uniform_(-bound, bound)
            self.value.weight.zero_()

    def forward(self, xf: Tensor, prev: Tensor | None) -> tuple[Tensor, Tensor]:
        kx = xf + (_shift(xf, prev) - xf) * self.x_k
        return self.value(torch.relu(self.key(kx)).square()), xf[:, -1]


class Block7(nn.Module):
    def __init__(self, cfg: Train7Config, layer_id: int) -> None:
        super().__init__()
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(cfg.n_embd)
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.att = TimeMix7(cfg, layer_id)
        self.ffn = ChannelMix7(cfg, layer_id)

    def forward(self, x: Tensor, state: LayerState7 | None, v_first: Tensor | None
                ) -> tuple[Tensor, LayerState7, Tensor]:
        if hasattr(self, "ln0"):
            x = self.ln0(x)
        att_x, s, ffn_x = (None, None, None) if state is None else state
        dx, att_last, s_new, v_first = self.att(self.ln1(x), att_x, s, v_first)
        x = x + dx
        dx, ffn_last = self.ffn(self.ln2(x), ffn_x)
        return x + dx, (att_last.float(), s_new, ffn_last.float()), v_first


class RWKV7(CheckpointedLM):
    """RWKV-7 language model for parallel training; ``state_dict()`` has BlinkDL's x070 key names."""

    def __init__(self, cfg: Train7Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList([Block7(cfg, i) for i in range(cfg.n_layer)])
        self.ln_out = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        with torch.no_grad():
            nn.init.uniform_(self.emb.weight, -1e-4, 1e-4)
            v, c = cfg.vocab_size, cfg.n_embd
            nn.init.orthogonal_(self.head.weight, gain=0.5 * (math.sqrt(v / c) if v > c else 1.0))

    def forward_hidden(self, tokens: Tensor, state: list[LayerState7] | None = None
                       ) -> tuple[Tensor, list[LayerState7]]:
        """ln_out of the residual stream ``[B, T, C]`` and the state after the last token."""
        x = self.emb(tokens)
        v_first: Tensor | None = None
        new_state: list[LayerState7] = []
        for i, block in enumerate(self.blocks):
            x, layer_state, v_first = block(x, None if state is None else state[i], v_first)
            new_state.append(layer_state)
        return self.ln_out(x), new_state

    def forward(self, tokens: Tensor, state: list[LayerState7] | None = None) -> Tensor:
        """Logits ``[B, T, V]`` for token ids ``[B, T]``."""
        return self.head(self.forward_hidden(tokens, state)[0])

    @classmethod
    def from_state_dict(cls, sd: dict[str, Tensor], chunk_len: int = 16) -> RWKV7:
        """Rebuild from a BlinkDL x070 state dict or the engine's canonical tensors (shapes read from them)."""
        model = cls(config_from_state_dict(sd, chunk_len))
        own = model.state_dict()
        model.load_state_dict({k: v.float().reshape(own[k].shape) for k, v in sd.items() if k in own})
        return model


def config_from_state_dict(sd: dict[str, Tensor], chunk_len: int = 16) -> Train7Config:
    vocab, n_embd = sd["emb.weight"].shape
    n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    rank_v = sd["blocks.1.att.v1"].shape[1] if n_layer > 1 else 0
    return Train7Config(vocab, n_embd, n_layer, head_size=sd["blocks.0.att.r_k"].shape[1],
                        ffn_dim=sd["blocks.0.ffn.key.weight"].shape[0], rank_w=sd["blocks.0.att.w1"].shape[1],
                        rank_a=sd["blocks.0.att.a1"].shape[1], rank_v=rank_v, rank_g=sd["blocks.0.att.g1"].shape[1],
                        chunk_len=chunk_len)
