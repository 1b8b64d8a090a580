"""The training loop: LM + tagging head + classification head, checkpoints that resume, tqdm progress."""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm import tqdm

from rwkv_stream.heads import Head, HeadSet
from rwkv_stream.train.data import IGNORE, Batch, Dataset, sample_batches
from rwkv_stream.train.model import RWKV4
from rwkv_stream.train.model7 import RWKV7

STATE_FILE = "last.pt"
TrainModel = RWKV4 | RWKV7  # the families `rwkv-stream train` builds (same forward_hidden/head interface)


@dataclass
class LoopConfig:
    steps: int = 1000
    batch_size: int = 16
    ctx: int = 128
    lr: float = 2e-3
    lr_final: float = 1e-4
    warmup: int = 100
    weight_decay: float = 0.0
    lm_weight: float = 1.0
    tag_weight: float = 1.0
    cat_weight: float = 0.3
    freeze_model: bool = False
    checkpoint_every: int = 200
    max_minutes: float = 0.0  # stop (and checkpoint) after this much wall-clock time; 0 = no limit
    seed: int = 0
    grad_clip: float = 1.0


class Trainable(nn.Module):
    """The model (RWKV-4 or RWKV-7) and its heads, trained together (or the heads alone on a frozen model)."""

    def __init__(self, model: TrainModel, heads: dict[str, Head]) -> None:
        super().__init__()
        self.model = model
        self.heads = nn.ModuleDict(heads)

    def head_modules(self) -> dict[str, Head]:
        """The heads, typed (``self.heads`` is a ModuleDict)."""
        return {name: head for name, head in self.heads.items() if isinstance(head, Head)}

    def losses(self, batch: Batch, cfg: LoopConfig) -> dict[str, Tensor]:
        if cfg.freeze_model:
            with torch.no_grad():
                hidden, _ = self.model.forward_hidden(batch.ids)
        else:
            hidden, _ = self.model.forward_hidden(batch.ids)
        out: dict[str, Tensor] = {}
        if not cfg.freeze_model and cfg.lm_weight > 0:
            out["lm"] = _ce(self.model.head(hidden), batch.lm)
        if "tagger" in self.heads and bool((batch.tags != IGNORE).any()):
            out["tag"] = _ce(self.heads["tagger"](hidden), batch.tags)
        if "classifier" in self.heads and bool((batch.cats != IGNORE).any()):
            out["cat"] = _ce(self.heads["classifier"](hidden), batch.cats)
        if batch.ahead is not None:
            ahead = [_ce(self.heads[lookahead_head(k)](hidden), batch.ahead[:, k - 1])
                     for k in range(1, batch.ahead.shape[1] + 1)
                     if lookahead_head(k) in self.heads and bool((batch.ahead[:, k - 1] != IGNORE).any())]
            if ahead:
                out["ahead"] = cast(Tensor, sum(ahead)) / len(ahead)
        return out


def lookahead_head(k: int) -> str:
    """Name of the tagging head whose decision for a word waits for ``k`` more words (k = 0: ``tagger``)."""
    return "tagger" if k == 0 else f"tagger+{k}"


def _ce(scores: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(scores.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)


def make_heads(data: Dataset, n_embd: int, hidden_dim: int = 0) -> dict[str, Head]:
    heads = {}
    if data.tag_labels:
        heads["tagger"] = Head("tagger", data.tag_labels, n_embd, hidden_dim)
    if data.cat_labels:
        heads["classifier"] = Head("classifier", data.cat_labels, n_embd, hidden_dim)
    for k in range(1, data.lookahead + 1):
        heads[lookahead_head(k)] = Head("tagger", data.tag_labels, n_embd, hidden_dim)
    return heads


def head_set(net: Trainable, fingerprint: str | None = None, names: dict[str, str] | None = None) -> HeadSet:
    """The trained heads as a :class:`HeadSet`; ``names`` renames the roles the loop trains (``tagger``,
    ``classifier``; lookahead heads ``tagger+k`` follow the tagger's name)."""
    heads = {}
    for name, head in net.head_modules().items():
        copy = Head(**head.spec())
        copy.load_state_dict({k: v.detach().float().cpu() for k, v in head.state_dict().items()})
        heads[output_name(name, names or {})] = copy.eval()
    return HeadSet(heads, fingerprint)


def output_name(role: str, names: dict[str, str]) -> str:
    """A head's name in the output: ``names[role]``, and ``NAME+k`` for lookahead head ``tagger+k``."""
    base, plus, k = role.partition("+")
    return names.get(base, base) + plus + k


def lr_at(step: int, cfg: LoopConfig, seconds: float = 0.0) -> float:
    """Linear warmup, then cosine decay from ``lr`` to ``lr_final`` over the steps or, when the wall-clock
    budget ``max_minutes`` runs out first, over that time."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = min((step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1), 1.0)
    if cfg.max_minutes > 0:
        t = max(t, min(seconds / (60 * cfg.max_minutes), 1.0))
    return cfg.lr_final + 0.5 * (cfg.lr - cfg.lr_final) * (1 + math.cos(math.pi * t))


def make_optimizer(net: Trainable, cfg: LoopConfig) -> torch.optim.Optimizer:
    if cfg.freeze_model:
        for p in net.model.parameters():
            p.requires_grad_(False)
    params = [p for p in net.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), eps=1e-8, weight_decay=cfg.weight_decay)


def save_state(
    out: Path, net: Trainable, opt: torch.optim.Optimizer, step: int, cfg: LoopConfig, elapsed: float
) -> None:
    state = {"net": net.state_dict(), "opt": opt.state_dict(), "step": step, "cfg": asdict(cfg),
             "elapsed": elapsed, "rng": torch.get_rng_state()}
    tmp = out / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    tmp.replace(out / STATE_FILE)


def load_state(out: Path, net: Trainable, opt: torch.optim.Optimizer) -> tuple[int, float]:
    state = torch.load(out / STATE_FILE, map_location="cpu", weights_only=False)
    net.load_state_dict(state["net"])
    opt.load_state_dict(state["opt"])
    torch.set_rng_state(state["rng"])
    return int(state["step"]), float(state.get("elapsed", 0.0))


def train(net: Trainable, data: Dataset, cfg: LoopConfig, out: Path, device: torch.device, resume: bool) -> dict:
    """Run (or resume) the loop; returns a summary. Checkpoints go to ``out/last.pt``."""
    out.mkdir(parents=True, exist_ok=True)
    net.to(device)
    opt = make_optimizer(net, cfg)
    step, elapsed = load_state(out, net, opt) if resume and (out / STATE_FILE).exists() else (0, 0.0)
    batches = sample_batches(data, cfg.batch_size, cfg.ctx, cfg.seed + step)
    random.seed(cfg.seed + step)
    net.train()
    start, avg = time.time() - elapsed, dict[str, float]()
    bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    while step < cfg.steps and not (cfg.max_minutes > 0 and time.time() - start > 60 * cfg.max_minutes):
        lr = lr_at(step, cfg, time.time() - start)
        avg = _train_step(net, opt, next(batches).to(device), cfg, lr, avg)
        step += 1
        bar.update(1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in avg.items()})
        over = cfg.max_minutes > 0 and time.time() - start > 60 * cfg.max_minutes
        if step % cfg.checkpoint_every == 0 or step == cfg.steps or over:
            save_state(out, net, opt, step, cfg, time.time() - start)
            _log(out, step, avg, time.time() - start)
        if over:
            break
    bar.close()
    minutes = (time.time() - start) / 60 if avg else elapsed / 60
    return {"steps": step, "minutes": round(minutes, 1), "losses": avg or _last_logged(out)}


def _last_logged(out: Path) -> dict[str, float]:
    """Losses of the last checkpoint (a resumed run that had nothing left to do)."""
    log = out / "log.jsonl"
    lines = log.read_text().splitlines() if log.exists() else []
    return {k: v for k, v in json.loads(lines[-1]).items() if k not in ("step", "seconds")} if lines else {}


def _train_step(net: Trainable, opt: torch.optim.Optimizer, batch: Batch, cfg: LoopConfig, lr: float,
                avg: dict[str, float]) -> dict[str, float]:
    for group in opt.param_groups:
        group["lr"] = lr
    losses = net.losses(batch, cfg)
    weights = {"lm": cfg.lm_weight, "tag": cfg.tag_weight, "cat": cfg.cat_weight, "ahead": cfg.tag_weight}
    total = cast(Tensor, sum(weights[k] * v for k, v in losses.items()))  # at least one loss: a Tensor
    opt.zero_grad(set_to_none=True)
    total.backward()
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.grad_clip)
    opt.step()
    return {k: 0.98 * avg.get(k, v.item()) + 0.02 * v.item() for k, v in losses.items()}


def _log(out: Path, step: int, avg: dict[str, float], seconds: float) -> None:
    with (out / "log.jsonl").open("a") as fh:
        fh.write(json.dumps({"step": step, "seconds": round(seconds, 1), **avg}) + "\n")
