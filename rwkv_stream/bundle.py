"""A model bundle: weights + tokenizer + heads in one directory with a manifest of versions and checksums.

Layout::

    bundle.json         {"format": "rwkv-stream-bundle", "version": 1, "name", "model_version",
                         "weights": "model.safetensors", "tokenizer": "tokenizer.json" | "world",
                         "files": {file name: sha256}, "fingerprint", "info": {...}}
    model.safetensors   canonical (BlinkDL-named) RWKV-4 tensors
    tokenizer.json      a Hugging Face tokenizers file (absent for the built-in "world" tokenizer)
    heads.json, heads.safetensors   optional task heads

The shipped demo model, the spaCy component's ``to_disk`` and the Kafka consumer all use this format.
This module is the format (manifest, checksums, writing); :mod:`rwkv_stream.loading` loads bundles.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .checkpoint import CheckpointError, canonical_names, infer_config, load_canonical, validate
from .heads import HeadSet
from .model import weights_fingerprint

BUNDLE_FORMAT = "rwkv-stream-bundle"
BUNDLE_VERSION = 1


def read_manifest(path: Path) -> dict[str, Any]:
    manifest_file = path / "bundle.json"
    if not manifest_file.exists():
        raise CheckpointError(f"{path} is not an rwkv-stream bundle (no bundle.json)")
    manifest = json.loads(manifest_file.read_text())
    if manifest.get("format") != BUNDLE_FORMAT or manifest.get("version") != BUNDLE_VERSION:
        raise CheckpointError(
            f"{manifest_file}: unsupported bundle format {manifest.get('format')!r} v{manifest.get('version')}"
        )
    return manifest


def verify_files(path: Path, manifest: dict[str, Any]) -> None:
    for name, digest in manifest.get("files", {}).items():
        file = path / name
        if not file.exists():
            raise CheckpointError(f"bundle file missing: {file}")
        if sha256_file(file) != digest:
            raise CheckpointError(f"bundle file {file} does not match its checksum in bundle.json")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_bundle(
    path: str | Path,
    weights: str | Path | dict[str, Tensor],
    tokenizer: str | Path,
    heads: HeadSet | None = None,
    *,
    name: str = "model",
    model_version: str = "0",
    weights_dtype: torch.dtype | None = None,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write a bundle. ``weights``: canonical tensors or any checkpoint path; ``tokenizer``: "world" or a
    ``tokenizer.json`` path; ``weights_dtype`` casts matrices for a smaller file (vectors stay fp32)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if isinstance(weights, dict):  # flatten [1, 1, C] vectors and check shapes, as loading would
        raw = canonical_names(weights)
        tensors = validate(raw, infer_config(raw))
    else:
        tensors = load_canonical(weights)[0]
    tensors = {k: _cast(k, v, weights_dtype).contiguous() for k, v in tensors.items()}
    save_file(tensors, str(path / "model.safetensors"))
    files = ["model.safetensors"]
    if str(tokenizer) != "world":
        shutil.copyfile(tokenizer, path / "tokenizer.json")
        files.append("tokenizer.json")
    if heads is not None and heads.heads:
        heads.save(path)
        files += ["heads.json", "heads.safetensors"]
    manifest = {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "name": name,
        "model_version": model_version,
        "weights": "model.safetensors",
        "tokenizer": "world" if str(tokenizer) == "world" else "tokenizer.json",
        "fingerprint": weights_fingerprint(tensors, infer_config(tensors)),
        "files": {f: sha256_file(path / f) for f in files},
        "info": info or {},
    }
    (path / "bundle.json").write_text(json.dumps(manifest, indent=2))
    return path


def _cast(key: str, tensor: Tensor, dtype: torch.dtype | None) -> Tensor:
    if dtype is None or tensor.dim() < 2:
        return tensor
    return tensor.to(dtype)
