"""Reading RWKV-4 and RWKV-7 checkpoints (BlinkDL ``.pth`` and Hugging Face directories) into canonical tensors.

Canonical names are BlinkDL's (``emb.weight``, ``blocks.3.att.key.weight`` ...); vectors stored as
``[1, 1, C]`` (RWKV-4 ``time_mix_*``, RWKV-7 ``x_r``, ``w0``, ``k_k`` ...) are flattened to ``[C]``; RWKV-7's
low-rank matrices keep BlinkDL's row-vector orientation (``w1`` ``[C, rank]``, ``w2`` ``[rank, C]``).
The family is detected from the names (:func:`detect_version`) or a Hugging Face ``config.json``'s
``model_type``; shapes are inferred from the tensors and every tensor is checked, so a bad checkpoint fails
here with the key and both shapes rather than deep inside a matmul. RWKV-7 files with tensors this engine
does not know (DeepEmbed ``ffn.s_emb``, experimental variants) are refused rather than half-run.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch

from .config import AnyConfig, ModelConfig, Rwkv7Config


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
_HF_LATER_TYPES = {"rwkv5": 5, "rwkv6": 6}  # Hugging Face model types of generations not supported yet
SUPPORTED_VERSIONS = (4, 7)


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
    model_type = _check_hf_config(path)
    tensors = _read_hf_weights(path)
    if model_type == "rwkv7" and not any(k.startswith("model.layers.") for k in tensors):
        raise CheckpointError(f"{path}/config.json says model_type 'rwkv7' but the tensors do not have "
                              "RWKV7ForCausalLM names (model.layers.N...)")
    return tensors


def _read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
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


def _check_hf_config(path: Path) -> str | None:
    """The ``model_type`` of a Hugging Face directory's config.json (None without one); refuses the RWKV
    generations that do not load yet."""
    config_file = path / "config.json"
    if not config_file.exists():
        return None
    model_type = str(json.loads(config_file.read_text()).get("model_type", "rwkv"))
    if model_type in _HF_LATER_TYPES:
        raise CheckpointError(f"RWKV version {_HF_LATER_TYPES[model_type]} not supported yet ({path})")
    return model_type


def canonical_names(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map Hugging Face names to BlinkDL names (BlinkDL names pass through unchanged)."""
    if any(k.startswith(("model.layers.", "model.embeddings.")) for k in raw):
        return _rwkv7_from_hf(raw)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in raw.items():
        if key.endswith(".att.x_rwkvag"):  # rwkv.cpp's fused RWKV-7 lerps [6, 1, C]
            out.update(zip((key[: -len("rwkvag")] + m for m in "rwkvag"), tensor.reshape(6, -1), strict=True))
            continue
        for old, new in _HF_RENAMES:
            key = key.replace(old, new)
        out[key] = tensor
    return out


# RWKV-7 Hugging Face / flash-linear-attention names (RWKV7ForCausalLM) -> BlinkDL names
_HF7_TOP = {"model.embeddings.weight": "emb.weight", "model.norm.weight": "ln_out.weight",
            "model.norm.bias": "ln_out.bias", "lm_head.weight": "head.weight"}
_HF7_PARTS = {"pre_norm": "ln0", "attn_norm": "ln1", "ffn_norm": "ln2", "attn": "att", "ffn": "ffn"}
_HF7_ATT = {"r_proj.weight": "receptance.weight", "k_proj.weight": "key.weight", "v_proj.weight": "value.weight",
            "o_proj.weight": "output.weight", "g_norm.weight": "ln_x.weight", "g_norm.bias": "ln_x.bias"}
_HF7_LORA = re.compile(r"([wavg])_lora\.lora\.(0\.weight|2\.weight|2\.bias)$")


def _rwkv7_from_hf(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, tensor in raw.items():
        m = re.match(r"model\.layers\.(\d+)\.(\w+)\.(.+)$", key)
        if key in _HF7_TOP:
            out[_HF7_TOP[key]] = tensor
        elif m is None or m.group(2) not in _HF7_PARTS:
            out[key] = tensor  # unknown: validation names it
        else:
            prefix, rest = f"blocks.{m.group(1)}.{_HF7_PARTS[m.group(2)]}.", m.group(3)
            lora = _HF7_LORA.match(rest)
            if m.group(2) == "attn" and rest == "x_x":  # older fla: the six lerps fused [6, C]
                out.update(zip((prefix + "x_" + n for n in "rwkvag"), tensor.reshape(6, -1), strict=True))
            elif m.group(2) == "attn" and lora:
                which, part = lora.groups()
                name = {"0.weight": "1", "2.weight": "2", "2.bias": "0"}[part]
                out[prefix + which + name] = tensor.t() if tensor.dim() == 2 else tensor
            else:
                out[prefix + (_HF7_ATT.get(rest, rest) if m.group(2) == "attn" else rest)] = tensor
    return out


def detect_version(names: Iterable[str]) -> int:
    names = list(names)
    for version, pattern in _VERSION_MARKERS:
        if any(pattern.search(n) for n in names):
            return version
    return 4


def infer_config(tensors: dict[str, torch.Tensor]) -> AnyConfig:
    version = detect_version(tensors)
    if version == 7:
        return _infer_rwkv7(tensors)
    if version != 4:
        raise CheckpointError(f"RWKV version {version} not supported yet (RWKV-4 and RWKV-7 checkpoints load)")
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


_RWKV7_REFUSED = ((re.compile(r"\.ffn\.(s_emb|s_emb_x|s0|s1|s2)\b"), "DeepEmbed (ffn.s_emb) RWKV-7 variants"),
                  (re.compile(r"\.att\.(time_maa|time_aaaaa|time_faaaa)"), "pre-release RWKV-7 (x070 rc) files"))


def _infer_rwkv7(tensors: dict[str, torch.Tensor]) -> Rwkv7Config:
    for pattern, what in _RWKV7_REFUSED:
        bad = sorted(k for k in tensors if pattern.search(k))
        if bad:
            raise CheckpointError(f"{what} are not supported (tensor {bad[0]!r})")
    for key in ("emb.weight", "blocks.0.att.r_k", "blocks.0.ffn.key.weight", "blocks.0.att.w1",
                "blocks.0.att.a1", "blocks.0.att.g1"):
        if key not in tensors:
            raise CheckpointError(f"missing tensor {key!r}: not an RWKV-7 (x070) checkpoint")
    emb, r_k = tensors["emb.weight"], tensors["blocks.0.att.r_k"]
    if emb.dim() != 2:
        raise CheckpointError(f"tensor 'emb.weight' has shape {list(emb.shape)}, expected [vocab, n_embd]")
    if r_k.dim() != 2 or r_k.numel() != emb.shape[1]:
        raise CheckpointError(f"tensor 'blocks.0.att.r_k' has shape {list(r_k.shape)}, expected [heads, head_size] "
                              f"with heads * head_size = {emb.shape[1]}")
    layers = {int(m.group(1)) for k in tensors if (m := re.match(r"blocks\.(\d+)\.", k))}
    v1 = tensors.get("blocks.1.att.v1")
    return Rwkv7Config(
        n_layer=max(layers) + 1,
        n_embd=emb.shape[1],
        vocab_size=emb.shape[0],
        ffn_dim=tensors["blocks.0.ffn.key.weight"].shape[0],
        head_size=r_k.shape[1],
        rank_w=tensors["blocks.0.att.w1"].shape[-1],
        rank_a=tensors["blocks.0.att.a1"].shape[-1],
        rank_v=0 if v1 is None else v1.shape[-1],
        rank_g=tensors["blocks.0.att.g1"].shape[-1],
    )


def _expected_shapes_rwkv7(cfg: Rwkv7Config) -> dict[str, tuple[int, ...]]:
    C, V, F = cfg.n_embd, cfg.vocab_size, cfg.ffn_dim
    shapes: dict[str, tuple[int, ...]] = {
        "emb.weight": (V, C), "head.weight": (V, C), "ln_out.weight": (C,), "ln_out.bias": (C,),
        "blocks.0.ln0.weight": (C,), "blocks.0.ln0.bias": (C,),
    }
    ranks = {"w": cfg.rank_w, "a": cfg.rank_a, "v": cfg.rank_v, "g": cfg.rank_g}
    for i in range(cfg.n_layer):
        p = f"blocks.{i}."
        for name in ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias", "ffn.x_k", "att.w0", "att.a0",
                     "att.k_k", "att.k_a", "att.ln_x.weight", "att.ln_x.bias", *(f"att.x_{m}" for m in "rwkvag")):
            shapes[p + name] = (C,)
        if i:
            shapes[p + "att.v0"] = (C,)
        for which, rank in ranks.items():
            if which != "v" or i:
                shapes[f"{p}att.{which}1"] = (C, rank)
                shapes[f"{p}att.{which}2"] = (rank, C)
        shapes[p + "att.r_k"] = (cfg.n_head, cfg.head_size)
        for name in ("receptance", "key", "value", "output"):
            shapes[p + f"att.{name}.weight"] = (C, C)
        shapes[p + "ffn.key.weight"] = (F, C)
        shapes[p + "ffn.value.weight"] = (C, F)
    return shapes


# layer 0's value-residual LoRA may be present in converted files but is never used
_RWKV7_UNUSED = re.compile(r"^blocks\.0\.att\.v[012]$")


def expected_shapes(cfg: AnyConfig) -> dict[str, tuple[int, ...]]:
    if isinstance(cfg, Rwkv7Config):
        return _expected_shapes_rwkv7(cfg)
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


def validate(tensors: dict[str, torch.Tensor], cfg: AnyConfig) -> dict[str, torch.Tensor]:
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
    if isinstance(cfg, Rwkv7Config):
        unknown = [k for k in extra if not _RWKV7_UNUSED.match(k)]
        if unknown:
            raise CheckpointError(f"unexpected tensor {unknown[0]!r} in an RWKV-7 checkpoint "
                                  f"({len(unknown)} unknown in all): not a plain x070 model")
    elif extra:
        warnings.warn(f"ignoring {len(extra)} unexpected tensors, e.g. {extra[:3]}", stacklevel=3)
    return out


def load_canonical(path: str | Path) -> tuple[dict[str, torch.Tensor], AnyConfig]:
    tensors = canonical_names(read_checkpoint(path))
    cfg = infer_config(tensors)
    return validate(tensors, cfg), cfg


_BLINKDL_3D = re.compile(r"\.time_mix_|\.att\.(x_[rwkvag]|w0|a0|v0|k_k|k_a)$|\.ffn\.x_k$")


def save_pth(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write canonical tensors as a BlinkDL-style ``.pth`` (time_mix and RWKV-7's lerp/bias vectors back to
    ``[1, 1, C]``, as BlinkDL's files hold them)."""
    out = {}
    for key, tensor in tensors.items():
        out[key] = tensor.reshape(1, 1, -1) if _BLINKDL_3D.search(key) else tensor
    torch.save({k: v.contiguous() for k, v in out.items()}, str(path))
