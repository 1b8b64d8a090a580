"""Random RWKV-4 and RWKV-7 (x070) checkpoints in the real file formats, for tests and benchmarks (weights
can't be downloaded).

Every parameter is randomized, including time_decay/time_first/time_mix (RWKV-4) and the lerps, decay
biases, ``k_k``/``k_a``/``r_k`` (RWKV-7), whose default initial patterns can hide indexing bugs. The family
follows the config: :class:`~rwkv_stream.config.ModelConfig` (RWKV-4) or
:class:`~rwkv_stream.config.Rwkv7Config`; :func:`rwkv7_config` builds the latter from a few numbers.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from .checkpoint import expected_shapes, save_pth
from .config import AnyConfig, ModelConfig, Rwkv7Config

__all__ = ["random_tensors", "rwkv7_config", "save_hf", "save_pth", "to_hf_names"]


def random_tensors(config: AnyConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Canonical (BlinkDL-named) tensors with every parameter random but in a realistic range."""
    gen = torch.Generator().manual_seed(seed)
    param = _random_param7 if isinstance(config, Rwkv7Config) else _random_param
    out: dict[str, Tensor] = {}
    for key, shape in expected_shapes(config).items():
        out[key] = param(key, shape, gen).to(dtype)
    return out


def rwkv7_config(
    n_layer: int, n_embd: int, vocab_size: int, *, head_size: int = 64, ffn_dim: int | None = None,
    rank_w: int = 16, rank_a: int = 16, rank_v: int = 8, rank_g: int = 32,
) -> Rwkv7Config:
    """An RWKV-7 config (``ffn_dim`` defaults to 4C as in the released models)."""
    return Rwkv7Config(n_layer=n_layer, n_embd=n_embd, vocab_size=vocab_size, ffn_dim=ffn_dim or 4 * n_embd,
                       head_size=head_size, rank_w=rank_w, rank_a=rank_a, rank_v=rank_v, rank_g=rank_g)


def _random_param7(key: str, shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    name = key.rsplit(".", 1)[-1] if ".att." in key or ".ffn.x_k" in key else key

    def uniform(lo: float, hi: float) -> Tensor:
        return lo + (hi - lo) * torch.rand(shape, generator=gen)

    if name.startswith("x_"):  # the six lerps and ffn.x_k
        return uniform(0, 1)
    if name == "w0":  # decay from ~exp(-0.6 * 0.02) (slow) to ~exp(-0.6) (fast)
        return uniform(-4, 3)
    if name in ("a0", "v0"):
        return 0.7 * torch.randn(shape, generator=gen)
    if name == "k_k":
        return uniform(0.3, 1.5)
    if name == "k_a":
        return uniform(0, 1.5)
    if name == "r_k":
        return 0.5 * torch.randn(shape, generator=gen)
    if len(name) == 2 and name[0] in "wavg" and name[1] in "12":  # low-rank: row-vector form [in, out]
        return torch.randn(shape, generator=gen) * (1.5 / shape[0] ** 0.5)
    return _random_param(key, shape, gen)


def _random_param(key: str, shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    if key.endswith("time_decay"):
        return torch.rand(shape, generator=gen) * 6 - 4  # decays from ~exp(-0.02) to ~exp(-7.4) per token
    if key.endswith("time_first"):
        return torch.randn(shape, generator=gen)
    if ".time_mix_" in key:
        return torch.rand(shape, generator=gen)
    if ".ln" in key or key.startswith("ln_out"):
        if key.endswith("weight"):
            return 1 + 0.2 * torch.randn(shape, generator=gen)
        return 0.1 * torch.randn(shape, generator=gen)
    if key == "emb.weight":
        return torch.randn(shape, generator=gen)
    fan_in = shape[1]
    return torch.randn(shape, generator=gen) / fan_in**0.5


_HF_NAMES = (
    (".time_mix_k", ".time_mix_key"),
    (".time_mix_v", ".time_mix_value"),
    (".time_mix_r", ".time_mix_receptance"),
    (".att.", ".attention."),
    (".ffn.", ".feed_forward."),
    (".ln0.", ".pre_ln."),
)


def to_hf_names(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, tensor in tensors.items():
        if key == "head.weight":
            out[key] = tensor
            continue
        name = key.replace("emb.", "embeddings.", 1) if key.startswith("emb.") else key
        for old, new in _HF_NAMES:
            name = name.replace(old, new)
        out["rwkv." + name] = tensor.reshape(1, 1, -1) if ".time_mix_" in key else tensor
    return out


def to_hf_names_rwkv7(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Canonical RWKV-7 tensors under Hugging Face / fla ``RWKV7ForCausalLM`` names and shapes (low-rank
    matrices as nn.Linear ``[out, in]``; ``w0/a0/v0`` as the second linear's bias; lerps ``[1, 1, C]``)."""
    top = {"emb.weight": "model.embeddings.weight", "ln_out.weight": "model.norm.weight",
           "ln_out.bias": "model.norm.bias", "head.weight": "lm_head.weight"}
    parts = {"ln0": "pre_norm", "ln1": "attn_norm", "ln2": "ffn_norm", "att": "attn", "ffn": "ffn"}
    att = {"receptance.weight": "r_proj.weight", "key.weight": "k_proj.weight", "value.weight": "v_proj.weight",
           "output.weight": "o_proj.weight", "ln_x.weight": "g_norm.weight", "ln_x.bias": "g_norm.bias"}
    out: dict[str, Tensor] = {}
    for key, tensor in tensors.items():
        if key in top:
            out[top[key]] = tensor
            continue
        _, layer, part, rest = key.split(".", 3)
        prefix = f"model.layers.{layer}.{parts[part]}."
        if part == "att" and len(rest) == 2 and rest[0] in "wavg" and rest[1] in "012":
            which, n = rest[0], rest[1]
            lora = {"1": "lora.0.weight", "2": "lora.2.weight", "0": "lora.2.bias"}[n]
            out[f"{prefix}{which}_lora.{lora}"] = tensor.t() if n != "0" else tensor.reshape(-1)
        elif part == "att" and rest.startswith("x_"):
            out[prefix + rest] = tensor.reshape(1, 1, -1)
        else:
            out[prefix + (att.get(rest, rest) if part == "att" else rest)] = tensor
    return {k: v.contiguous() for k, v in out.items()}


def hf_config_rwkv7(config: Rwkv7Config) -> dict:
    """``config.json`` of an RWKV-7 Hugging Face directory (fla / rwkv7-hf keys)."""
    return {
        "architectures": ["RWKV7ForCausalLM"],
        "model_type": "rwkv7",
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "num_hidden_layers": config.n_layer,
        "head_dim": config.head_size,
        "num_heads": config.n_head,
        "intermediate_size": config.ffn_dim,
        "hidden_ratio": config.ffn_dim / config.n_embd,
        "decay_low_rank_dim": config.rank_w,
        "a_low_rank_dim": config.rank_a,
        "v_low_rank_dim": config.rank_v,
        "gate_low_rank_dim": config.rank_g,
        "value_dim": [config.n_embd] * config.n_layer,
        "norm_eps": 1e-5,
        "norm_bias": True,
        "tie_word_embeddings": False,
        "use_cache": True,
    }


def hf_config(config: ModelConfig, rescale_every: int = 0) -> dict:
    return {
        "architectures": ["RwkvForCausalLM"],
        "model_type": "rwkv",
        "vocab_size": config.vocab_size,
        "context_length": 1024,
        "hidden_size": config.n_embd,
        "num_hidden_layers": config.n_layer,
        "attention_hidden_size": config.n_embd,
        "intermediate_size": config.ffn_dim,
        "layer_norm_epsilon": 1e-5,
        "rescale_every": rescale_every,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "use_cache": True,
    }


def save_hf(
    tensors: dict[str, Tensor],
    config: AnyConfig,
    directory: str | Path,
    *,
    fmt: str = "safetensors",
    shards: int = 1,
) -> Path:
    """Write a Hugging Face model directory: ``config.json`` plus safetensors (optionally sharded) or .bin."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if isinstance(config, Rwkv7Config):
        meta, hf = hf_config_rwkv7(config), to_hf_names_rwkv7(tensors)
    else:
        meta, hf = hf_config(config), {k: v.contiguous() for k, v in to_hf_names(tensors).items()}
    (directory / "config.json").write_text(json.dumps(meta, indent=2))
    if fmt == "bin":
        torch.save(hf, directory / "pytorch_model.bin")
    elif shards <= 1:
        save_file(hf, str(directory / "model.safetensors"), metadata={"format": "pt"})
    else:
        _save_sharded(hf, directory, shards, save_file)
    return directory


def _save_sharded(hf: dict[str, Tensor], directory: Path, shards: int, save_file: Callable[..., None]) -> None:
    keys = sorted(hf)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: hf[k] for k in keys[i::shards]}
        save_file(part, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
