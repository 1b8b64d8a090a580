"""Reading RWKV-4 checkpoints (BlinkDL ``.pth`` and Hugging Face directories) into canonical tensors.

Canonical names are BlinkDL's (``emb.weight``, ``blocks.3.att.key.weight`` ...); ``time_mix_*`` vectors are
flattened from ``[1, 1, C]`` to ``[C]``. Shapes are inferred from the tensors and every tensor is checked, so a
bad checkpoint fails here with the key and both shapes rather than deep inside a matmul.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch

from .config import ModelConfig


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing file, wrong tensor, unsupported version."""


_HF_RENAMES = (
    ("rwkv.embeddings.", "emb."),
    ("rwkv.ln_out.", "ln_out."),
    ("rwkv.blocks.", "blocks."),
    (".pre_ln.", ".ln0."),
    (".attention.", ".att."),
    (".feed_forward.", ".ffn."),
    (".time_mix_key", ".time_mix_k"),
    (".time_mix_value", ".time_mix_v"),
    (".time_mix_receptance", ".time_mix_r"),
)

# Markers of later RWKV generations, as used by the reference `rwkv` package.
_VERSION_MARKERS = ((7, re.compile(r"\.att\.(r_k|w0)$")), (6, re.compile(r"\.time_maa")), (5, re.compile(r"\.ln_x\.")))
_HF_LATER_TYPES = {"rwkv5": 5, "rwkv6": 6, "rwkv7": 7}


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read raw tensors from a ``.pth``/``.bin`` file or a Hugging Face model directory."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        return _read_hf_dir(path)
    if path.suffix == ".safetensors":
        return _read_safetensors([path])
    return _torch_load(path)


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = _load_weights_only(path)
    except Exception as exc:  # torch raises several types for corrupt/unsafe pickles
        raise CheckpointError(f"cannot read {path} as a torch checkpoint (weights_only=True): {exc}") from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a flat dict of tensors")
    return dict(obj)


def _load_weights_only(path: Path) -> object:
    try:  # memory-mapped: a large checkpoint is not read twice into RAM
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-zip) format


def _read_safetensors(files: Iterable[Path]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.exists():
            raise CheckpointError(f"checkpoint shard not found: {file}")
        tensors.update(load_file(str(file)))
    return tensors


def _read_hf_dir(path: Path) -> dict[str, torch.Tensor]:
    _check_hf_config(path)
    for index_name, reader in (
        ("model.safetensors.index.json", _read_safetensors),
        ("pytorch_model.bin.index.json", lambda files: _merge(_torch_load(f) for f in files)),
    ):
        index = path / index_name
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            return reader(sorted({path / shard for shard in weight_map.values()}))
    if (path / "model.safetensors").exists():
        return _read_safetensors([path / "model.safetensors"])
    if (path / "pytorch_model.bin").exists():
        return _torch_load(path / "pytorch_model.bin")
    raise CheckpointError(
        f"{path} has no model.safetensors, sharded safetensors index or pytorch_model.bin"
    )


def _merge(dicts: Iterable[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    merged: dict[str, torch.Tensor] = {}
    for d in dicts:
        merged.update(d)
    return merged


def _check_hf_config(path: Path) -> None:
    config_file = path / "config.json"
    if not config_file.exists():
        return
    model_type = json.loads(config_file.read_text()).get("model_type", "rwkv")
    if model_type in _HF_LATER_TYPES:
        raise CheckpointError(f"RWKV version {_HF_LATER_TYPES[model_type]} not supported yet ({path})")


def canonical_names(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map Hugging Face names to BlinkDL names (BlinkDL names pass through unchanged)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in raw.items():
        for old, new in _HF_RENAMES:
            key = key.replace(old, new)
        out[key] = tensor
    return out


def detect_version(names: Iterable[str]) -> int:
    names = list(names)
    for version, pattern in _VERSION_MARKERS:
        if any(pattern.search(n) for n in names):
            return version
    return 4


def infer_config(tensors: dict[str, torch.Tensor]) -> ModelConfig:
    version = detect_version(tensors)
    if version != 4:
        raise CheckpointError(f"RWKV version {version} not supported yet (only RWKV-4 checkpoints load)")
    for key in ("emb.weight", "blocks.0.ffn.key.weight"):
        if key not in tensors:
            raise CheckpointError(f"missing tensor {key!r}: not an RWKV-4 checkpoint")
    emb = tensors["emb.weight"]
    if emb.dim() != 2:
        raise CheckpointError(f"tensor 'emb.weight' has shape {list(emb.shape)}, expected [vocab, n_embd]")
    layers = {int(m.group(1)) for k in tensors if (m := re.match(r"blocks\.(\d+)\.", k))}
    return ModelConfig(
        n_layer=max(layers) + 1,
        n_embd=emb.shape[1],
        vocab_size=emb.shape[0],
        ffn_dim=tensors["blocks.0.ffn.key.weight"].shape[0],
    )


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    C, V, F = cfg.n_embd, cfg.vocab_size, cfg.ffn_dim
    shapes: dict[str, tuple[int, ...]] = {
        "emb.weight": (V, C),
        "head.weight": (V, C),
        "ln_out.weight": (C,),
        "ln_out.bias": (C,),
        "blocks.0.ln0.weight": (C,),
        "blocks.0.ln0.bias": (C,),
    }
    for i in range(cfg.n_layer):
        p = f"blocks.{i}."
        for name in ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias", "att.time_decay", "att.time_first"):
            shapes[p + name] = (C,)
        for name in ("att.time_mix_k", "att.time_mix_v", "att.time_mix_r", "ffn.time_mix_k", "ffn.time_mix_r"):
            shapes[p + name] = (C,)
        for name in ("att.key", "att.value", "att.receptance", "att.output", "ffn.receptance"):
            shapes[p + name + ".weight"] = (C, C)
        shapes[p + "ffn.key.weight"] = (F, C)
        shapes[p + "ffn.value.weight"] = (C, F)
    return shapes


def validate(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Check every tensor against the inferred shapes; return the canonical set (vectors flattened)."""
    expected = expected_shapes(cfg)
    out: dict[str, torch.Tensor] = {}
    for key, shape in expected.items():
        if key not in tensors:
            raise CheckpointError(f"missing tensor {key!r} (expected shape {list(shape)})")
        tensor = tensors[key]
        if len(shape) == 1 and tensor.numel() == shape[0] and tensor.shape[-1] == shape[0]:
            tensor = tensor.reshape(shape)  # time_mix is stored as [1, 1, C]
        if tuple(tensor.shape) != shape:
            raise CheckpointError(
                f"tensor {key!r} has shape {list(tensor.shape)}, expected {list(shape)}"
            )
        if not tensor.is_floating_point():
            raise CheckpointError(f"tensor {key!r} has dtype {tensor.dtype}, expected a floating point type")
        out[key] = tensor
    extra = sorted(set(tensors) - set(expected))
    if extra:
        warnings.warn(f"ignoring {len(extra)} unexpected tensors, e.g. {extra[:3]}", stacklevel=3)
    return out


def load_canonical(path: str | Path) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    tensors = canonical_names(read_checkpoint(path))
    cfg = infer_config(tensors)
    return validate(tensors, cfg), cfg


def save_pth(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write canonical tensors as a BlinkDL-style ``.pth`` (time_mix back to ``[1, 1, C]``)."""
    out = {}
    for key, tensor in tensors.items():
        out[key] = tensor.reshape(1, 1, -1) if ".time_mix_" in key else tensor
    torch.save({k: v.contiguous() for k, v in out.items()}, str(path))
