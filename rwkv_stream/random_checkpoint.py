"""Random RWKV-4 checkpoints in the real file formats, for tests and benchmarks (weights can't be downloaded).

Every parameter is randomized, including time_decay/time_first/time_mix, whose default initial patterns can
hide indexing bugs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from .checkpoint import expected_shapes, save_pth
from .config import ModelConfig

__all__ = ["random_tensors", "save_hf", "save_pth", "to_hf_names"]


def random_tensors(config: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Canonical (BlinkDL-named) tensors with every parameter random but in a realistic range."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Tensor] = {}
    for key, shape in expected_shapes(config).items():
        out[key] = _random_param(key, shape, gen).to(dtype)
    return out


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
    config: ModelConfig,
    directory: str | Path,
    *,
    fmt: str = "safetensors",
    shards: int = 1,
) -> Path:
    """Write a Hugging Face model directory: ``config.json`` plus safetensors (optionally sharded) or .bin."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf_config(config), indent=2))
    hf = {k: v.contiguous() for k, v in to_hf_names(tensors).items()}
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
