"""RWKV-4 for training: whole sequences at once ("GPT mode"), BlinkDL checkpoint names.

The parameter names and shapes are those of BlinkDL's RWKV-4 ``.pth`` files, so ``state_dict()`` is a
checkpoint the runtime loads. The WKV over time runs in chunks: inside a chunk of ``chunk_len`` tokens the
decay-weighted sums are one ``[B, L, L, C]`` tensor operation, stabilized in log space by subtracting
per-row maxima; between chunks the stable ``(aa, bb, pp)`` state is carried exactly as the one-token
recurrence carries it, so the loop runs over chunks, never over tokens.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from rwkv_stream.wkv import EMPTY_PP

# time_decay above this gives w = -exp(40) ~ -2.4e17: e^w is 0 in fp32 either way, and the clamp keeps
# (distance * w) finite so the parallel form never computes 0 * inf.
MAX_TIME_DECAY = 40.0

# One layer's recurrent state: (att_x, aa, bb, pp, ffn_x), each [B, C] fp32.
LayerState = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


@dataclass(frozen=True)
class TrainConfig:
    """Shape of a model to train. ``ffn_dim`` defaults to 4 * n_embd."""

    vocab_size: int
    n_embd: int
    n_layer: int
    ffn_dim: int = 0
    chunk_len: int = 16

    def __post_init__(self) -> None:
        if self.ffn_dim <= 0:
            object.__setattr__(self, "ffn_dim", 4 * self.n_embd)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def decay_from_param(time_decay: Tensor) -> Tensor:
    """w = -exp(time_decay) in fp32, with time_decay clamped where e^w is already 0."""
    return -torch.exp(time_decay.float().clamp(max=MAX_TIME_DECAY))


def _logsumexp_weights(logw: Tensor, slog: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """exp(logw - m), exp(slog - m) and m, with m the detached maximum over the last-but-one axis."""
    m = torch.maximum(logw.amax(dim=-2), slog).detach()
    return torch.exp(logw - m.unsqueeze(-2)), torch.exp(slog - m), m


def wkv_chunk(
    w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: tuple[Tensor, Tensor, Tensor]
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """WKV for one chunk. w, u: [C]; k, v: [B, L, C] fp32; state (aa, bb, pp): [B, C].

    Output ``[B, L, C]`` and the state after the chunk, equal to the one-token stable recurrence.
    """
    aa, bb, pp = state
    length = k.shape[1]
    pos = torch.arange(length, device=k.device)
    dist = pos[:, None] - 1 - pos[None, :]  # [t, i]: tokens between i and t, -1 on the diagonal
    past = (dist >= 0)[..., None]
    diag = (dist == -1)[..., None]
    decay = dist.clamp(min=0).to(w.dtype)[..., None] * w  # [L, L, C]
    neg_inf = torch.full((), -math.inf, dtype=w.dtype, device=w.device)
    base = torch.where(past, decay, torch.where(diag, u.expand_as(decay), neg_inf))
    logw = base.unsqueeze(0) + k.unsqueeze(1)  # [B, t, i, C]
    slog = pp.unsqueeze(1) + pos.to(w.dtype)[None, :, None] * w  # [B, t, C]
    e, es, _ = _logsumexp_weights(logw, slog)
    num = (e * v.unsqueeze(1)).sum(dim=2) + es * aa.unsqueeze(1)
    den = e.sum(dim=2) + es * bb.unsqueeze(1)
    return num / den, _chunk_state(w, k, v, aa, bb, pp)


def _chunk_state(w: Tensor, k: Tensor, v: Tensor, aa: Tensor, bb: Tensor, pp: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(aa, bb, pp) after all tokens of the chunk have been folded in."""
    length = k.shape[1]
    back = torch.arange(length - 1, -1, -1, device=k.device).to(w.dtype)[:, None] * w  # [L, C]
    logw = (back + k).unsqueeze(1)  # [B, 1, L, C]: one output row
    slog = (pp + length * w).unsqueeze(1)  # [B, 1, C]
    e, es, m = _logsumexp_weights(logw, slog)
    new_aa = (e * v.unsqueeze(1)).sum(dim=2) + es * aa.unsqueeze(1)
    new_bb = e.sum(dim=2) + es * bb.unsqueeze(1)
    return new_aa.squeeze(1), new_bb.squeeze(1), m.squeeze(1)


def wkv_parallel(
    time_decay: Tensor,
    time_first: Tensor,
    k: Tensor,
    v: Tensor,
    state: tuple[Tensor, Tensor, Tensor] | None = None,
    chunk_len: int = 16,
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """WKV over a whole sequence [B, T, C] in fp32, looping over chunks of ``chunk_len`` tokens only."""
    w = decay_from_param(time_decay)
    u = time_first.float()
    k, v = k.float(), v.float()
    if state is None:
        state = _zero_wkv_state(k.shape[0], k.shape[2], k.device)
    outs = []
    for start in range(0, k.shape[1], chunk_len):
        out, state = wkv_chunk(w, u, k[:, start : start + chunk_len], v[:, start : start + chunk_len], state)
        outs.append(out)
    return torch.cat(outs, dim=1), state


def _zero_wkv_state(batch: int, channels: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    zeros = torch.zeros(batch, channels, device=device)
    return zeros, zeros.clone(), torch.full((batch, channels), EMPTY_PP, device=device)


def _shift(x: Tensor, prev: Tensor | None) -> Tensor:
    """Token shift: the previous token's vector for every position, ``prev`` (or zeros) for the first."""
    first = torch.zeros_like(x[:, :1]) if prev is None else prev.unsqueeze(1).to(x.dtype)
    return torch.cat([first, x[:, :-1]], dim=1)


def _mix(x: Tensor, sx: Tensor, mix: Tensor) -> Tensor:
    return x * mix + sx * (1 - mix)


def _channel_ramp(n: int) -> Tensor:
    return (torch.arange(n, dtype=torch.float32) / n).view(1, 1, n)


class TimeMix(nn.Module):
    """RWKV-4 time mixing (``blocks.i.att``)."""

    def __init__(self, cfg: TrainConfig, layer_id: int) -> None:
        super().__init__()
        c = cfg.n_embd
        self.chunk_len = cfg.chunk_len
        self.time_decay = nn.Parameter(torch.zeros(c))
        self.time_first = nn.Parameter(torch.zeros(c))
        self.time_mix_k = nn.Parameter(torch.zeros(1, 1, c))
        self.time_mix_v = nn.Parameter(torch.zeros(1, 1, c))
        self.time_mix_r = nn.Parameter(torch.zeros(1, 1, c))
        self.key = nn.Linear(c, c, bias=False)
        self.value = nn.Linear(c, c, bias=False)
        self.receptance = nn.Linear(c, c, bias=False)
        self.output = nn.Linear(c, c, bias=False)
        self.reset_time_params(layer_id, cfg.n_layer)

    @torch.no_grad()
    def reset_time_params(self, layer_id: int, n_layer: int) -> None:
        """BlinkDL's RWKV-4 ramps: decay speeds across channels, zigzag bonus, mixes by depth."""
        c = self.time_decay.numel()
        ratio_0_to_1 = layer_id / max(n_layer - 1, 1)
        ratio_1_to_0 = 1.0 - layer_id / n_layer
        h = torch.arange(c, dtype=torch.float32) / max(c - 1, 1)
        self.time_decay.copy_(-5 + 8 * h ** (0.7 + 1.3 * ratio_0_to_1))
        zigzag = torch.tensor([(i + 1) % 3 - 1 for i in range(c)], dtype=torch.float32) * 0.5
        self.time_first.copy_(math.log(0.3) + zigzag)
        ramp = _channel_ramp(c)
        self.time_mix_k.copy_(ramp**ratio_1_to_0)
        self.time_mix_v.copy_(ramp**ratio_1_to_0 + 0.3 * ratio_0_to_1)
        self.time_mix_r.copy_(ramp ** (0.5 * ratio_1_to_0))

    def forward(
        self, x: Tensor, prev_x: Tensor | None, wkv_state: tuple[Tensor, Tensor, Tensor] | None
    ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor]]:
        sx = _shift(x, prev_x)
        k = self.key(_mix(x, sx, self.time_mix_k))
        v = self.value(_mix(x, sx, self.time_mix_v))
        r = torch.sigmoid(self.receptance(_mix(x, sx, self.time_mix_r)))
        wkv, new_state = wkv_parallel(self.time_decay, self.time_first, k, v, wkv_state, self.chunk_len)
        return self.output(r * wkv.to(x.dtype)), x[:, -1], new_state


class ChannelMix(nn.Module):
    """RWKV-4 channel mixing (``blocks.i.ffn``)."""

    def __init__(self, cfg: TrainConfig, layer_id: int) -> None:
        super().__init__()
        c = cfg.n_embd
        self.time_mix_k = nn.Parameter(torch.zeros(1, 1, c))
        self.time_mix_r = nn.Parameter(torch.zeros(1, 1, c))
        self.key = nn.Linear(c, cfg.ffn_dim, bias=False)
        self.receptance = nn.Linear(c, c, bias=False)
        self.value = nn.Linear(cfg.ffn_dim, c, bias=False)
        with torch.no_grad():
            ramp = _channel_ramp(c) ** (1.0 - layer_id / cfg.n_layer)
            self.time_mix_k.copy_(ramp)
            self.time_mix_r.copy_(ramp)

    def forward(self, x: Tensor, prev_x: Tensor | None) -> tuple[Tensor, Tensor]:
        sx = _shift(x, prev_x)
        k = torch.square(torch.relu(self.key(_mix(x, sx, self.time_mix_k))))
        r = torch.sigmoid(self.receptance(_mix(x, sx, self.time_mix_r)))
        return r * self.value(k), x[:, -1]


class Block(nn.Module):
    def __init__(self, cfg: TrainConfig, layer_id: int) -> None:
        super().__init__()
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(cfg.n_embd)
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.att = TimeMix(cfg, layer_id)
        self.ffn = ChannelMix(cfg, layer_id)

    def forward(self, x: Tensor, state: LayerState | None) -> tuple[Tensor, LayerState]:
        if hasattr(self, "ln0"):
            x = self.ln0(x)
        att_x, aa, bb, pp, ffn_x = (None,) * 5 if state is None else state
        wkv_state = None if aa is None else (aa, bb, pp)
        dx, att_last, (aa, bb, pp) = self.att(self.ln1(x), att_x, wkv_state)
        x = x + dx
        dx, ffn_last = self.ffn(self.ln2(x), ffn_x)
        x = x + dx
        return x, (att_last.float(), aa, bb, pp, ffn_last.float())


class CheckpointedLM(nn.Module):
    """What the parallel-mode language models of every family share: the LM loss and BlinkDL-named checkpoints.
    A subclass defines ``forward(tokens) -> logits [B, T, V]`` and names its parameters as BlinkDL does."""

    def loss(self, tokens: Tensor, targets: Tensor) -> Tensor:
        logits = self.forward(tokens)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)

    def checkpoint_state_dict(self) -> dict[str, Tensor]:
        """fp32, contiguous, detached copy of the parameters under BlinkDL's key names."""
        return {k: v.detach().float().contiguous().cpu().clone() for k, v in self.state_dict().items()}

    def save_checkpoint(self, path: str | Path) -> None:
        torch.save(self.checkpoint_state_dict(), Path(path))


class RWKV4(CheckpointedLM):
    """RWKV-4 language model for parallel training; ``state_dict()`` has BlinkDL's key names."""

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)])
        self.ln_out = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.reset_weights()

    @torch.no_grad()
    def reset_weights(self) -> None:
        """BlinkDL's RWKV-4 matrix init: tiny embedding, zero key/receptance/output, orthogonal rest."""
        zero = (".att.key.", ".att.receptance.", ".att.output.", ".ffn.value.", ".ffn.receptance.")
        for name, p in self.named_parameters():
            if p.ndim != 2:
                continue
            if name == "emb.weight":
                nn.init.uniform_(p, -1e-4, 1e-4)
            elif any(z in f".{name}" for z in zero):
                nn.init.zeros_(p)
            elif name == "head.weight":
                gain = math.sqrt(p.shape[0] / p.shape[1]) if p.shape[0] > p.shape[1] else 1.0
                nn.init.orthogonal_(p, gain=0.5 * gain)
            else:
                nn.init.orthogonal_(p, gain=math.sqrt(p.shape[0] / p.shape[1]) if p.shape[0] > p.shape[1] else 1.0)

    def forward_hidden(self, tokens: Tensor, state: list[LayerState] | None = None) -> tuple[Tensor, list[LayerState]]:
        """ln_out of the residual stream, [B, T, C], and the state after the last token."""
        x = self.emb(tokens)
        new_state: list[LayerState] = []
        for i, block in enumerate(self.blocks):
            x, layer_state = block(x, None if state is None else state[i])
            new_state.append(layer_state)
        return self.ln_out(x), new_state

    def forward(self, tokens: Tensor, state: list[LayerState] | None = None) -> Tensor:
        """Logits [B, T, V] for token ids [B, T]."""
        hidden, _ = self.forward_hidden(tokens, state)
        return self.head(hidden)

    @classmethod
    def from_state_dict(cls, sd: dict[str, Tensor], chunk_len: int = 16) -> RWKV4:
        """Rebuild from a BlinkDL RWKV-4 state dict or the engine's canonical tensors (shapes read from them)."""
        cfg = config_from_state_dict(sd, chunk_len)
        model = cls(cfg)
        own = model.state_dict()  # engine-canonical files store time_mix flat: [C], not [1, 1, C]
        model.load_state_dict({k: v.float().reshape(own[k].shape) for k, v in sd.items() if k in own})
        return model


def config_from_state_dict(sd: dict[str, Tensor], chunk_len: int = 16) -> TrainConfig:
    vocab, n_embd = sd["emb.weight"].shape
    n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    ffn_dim = sd["blocks.0.ffn.key.weight"].shape[0]
    return TrainConfig(vocab, n_embd, n_layer, ffn_dim, chunk_len)
