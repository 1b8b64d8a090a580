"""Engine side of the spaCy component: model sources and the Doc view of session results.

Nothing here imports spaCy. Streams live in :class:`rwkv_stream.sessions.SessionTable` (the engine's one
session layer). Each Doc is fed as a *provisional* fragment: the ids that became final advance the stream's
real state, and the tail the streaming tokenizer holds back (at most a couple of words) is run on a fork as
if the stream ended there, so the Doc gets tags, cats and a vector for all of its text without the stream
advancing. The next Doc re-encodes that tail with its own text. Because the model and the heads are causal
and the streaming encoder reproduces whole-text tokenization, a transcript split into Docs gives the same
outputs as the whole text (for tokens whose model token is not cut by a split point) and the same final cats.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import rwkv_stream
from rwkv_stream.bundle import read_manifest, verify_files, write_bundle
from rwkv_stream.checkpoint import CheckpointError, load_canonical
from rwkv_stream.heads import HeadSet
from rwkv_stream.model import Model
from rwkv_stream.sessions import FragmentResult
from rwkv_stream.tokenizer import WorldTokenizer, load_tokenizer

from .spacy_align import overlapping, token_ends

SHIPPED_DEFAULT = "transcript-tagger"
WORLD = "world"
TAGGER, CLASSIFIER = "tagger", "classifier"  # the component's head roles in its session table


# ------------------------------------------------------------------------------------------ model sources
@dataclass
class LoadedModel:
    """Everything the component runs and saves: the canonical tensors are kept so ``to_disk`` is exact."""

    model: Model
    tensors: dict[str, Tensor]
    tokenizer: Any
    tokenizer_json: str | None  # None for the built-in World tokenizer
    heads: HeadSet
    manifest: dict[str, Any] = field(default_factory=dict)


def shipped_dir(name: str) -> Path:
    return Path(rwkv_stream.__file__).parent / "data" / name


def resolve_source(source: str | Path) -> Path:
    """A bundle directory, checkpoint file or HF directory for ``source`` (``"shipped[:NAME]"`` or a path)."""
    text = str(source)
    if text == "shipped" or text.startswith("shipped:"):
        name = text.partition(":")[2] or SHIPPED_DEFAULT
        path = shipped_dir(name)
        if not (path / "bundle.json").is_file():
            found = sorted(p.parent.name for p in path.parent.glob("*/bundle.json"))
            raise CheckpointError(
                f"shipped model {name!r} is not installed (no bundle at {path}); shipped models: {found or 'none'}"
            )
        return path
    path = Path(text).expanduser()
    if not path.exists():
        raise CheckpointError(
            f"RWKV model not found: {path} (expected a bundle directory, a .pth/.safetensors checkpoint "
            "or a Hugging Face model directory)"
        )
    return path


def load_source(
    source: str | Path,
    tokenizer: str | None = None,
    heads_path: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
) -> LoadedModel:
    path = resolve_source(source)
    if (path / "bundle.json").is_file():
        loaded = _load_bundle(path, device, dtype)
    else:
        loaded = _load_checkpoint(path, tokenizer, device, dtype)
    if heads_path is not None:
        extra = HeadSet.load(heads_path)
        loaded.heads = HeadSet({**loaded.heads.heads, **extra.heads}, loaded.model.fingerprint)
    check_compatible(loaded)
    return loaded


def _load_bundle(path: Path, device: str, dtype: str) -> LoadedModel:
    manifest = read_manifest(path)
    verify_files(path, manifest)
    tensors, config = load_canonical(path / manifest["weights"])
    model = Model(tensors, config, device=device, dtype=dtype)
    spec = manifest["tokenizer"]
    tok_json = None if spec == WORLD else (path / spec).read_text(encoding="utf-8")
    tokenizer = load_tokenizer(WORLD if spec == WORLD else path / spec)
    heads = HeadSet.load(path) if (path / "heads.json").is_file() else HeadSet({}, model.fingerprint)
    return LoadedModel(model, tensors, tokenizer, tok_json, heads, manifest)


def _load_checkpoint(path: Path, tokenizer: str | None, device: str, dtype: str) -> LoadedModel:
    if tokenizer is None and path.is_dir() and (path / "tokenizer.json").is_file():
        tokenizer = str(path / "tokenizer.json")
    if tokenizer is None:
        raise CheckpointError(
            f"{path} is a bare checkpoint: set `tokenizer` to 'world' or the path of a tokenizer.json"
        )
    tensors, config = load_canonical(path)
    model = Model(tensors, config, device=device, dtype=dtype)
    tok_file = None if tokenizer == WORLD else Path(tokenizer)
    if tok_file is not None and tok_file.is_dir():
        tok_file = tok_file / "tokenizer.json"
    tok_json = None if tok_file is None else tok_file.read_text(encoding="utf-8") if tok_file.is_file() else None
    tok = load_tokenizer(WORLD if tok_file is None else tok_file)
    manifest = {"name": path.stem, "model_version": "0", "info": {"source": str(path)}}
    return LoadedModel(model, tensors, tok, tok_json, HeadSet({}, model.fingerprint), manifest)


def check_compatible(loaded: LoadedModel) -> None:
    config, tok = loaded.model.config, loaded.tokenizer
    if not tok.is_byte_level:
        raise ValueError("the rwkv component needs a byte-level tokenizer (RWKV World or byte-level BPE)")
    if tok.vocab_size > config.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} ids but the model only {config.vocab_size}")
    for name, head in loaded.heads.heads.items():
        if head.n_embd != config.n_embd:
            raise ValueError(f"head {name!r} reads vectors of size {head.n_embd}, the model makes {config.n_embd}")


def save_bundle(loaded: LoadedModel, path: str | Path) -> Path:
    """Write ``loaded`` as a bundle directory (safetensors weights, tokenizer, heads, manifest)."""
    manifest = loaded.manifest
    with tempfile.TemporaryDirectory() as tmp:
        tok: str | Path = WORLD
        if loaded.tokenizer_json is not None:
            tok = Path(tmp) / "tokenizer.json"
            tok.write_text(loaded.tokenizer_json, encoding="utf-8")
        elif not isinstance(loaded.tokenizer, WorldTokenizer):
            raise ValueError("cannot save this tokenizer: only 'world' and tokenizer.json tokenizers are saved")
        heads = loaded.heads if loaded.heads.heads else None
        return write_bundle(
            path,
            loaded.tensors,
            tok,
            heads,
            name=str(manifest.get("name", "model")),
            model_version=str(manifest.get("model_version", "0")),
            info=dict(manifest.get("info", {})),
        )


def read_dir_files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def write_dir_files(path: Path, files: dict[str, bytes]) -> None:
    if path.exists():
        shutil.rmtree(path)
    for name, data in files.items():
        target = path / name
        if ".." in Path(name).parts:
            raise ValueError(f"bad file name in serialized component: {name!r}")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


# ------------------------------------------------------------------------------------------ doc results
@dataclass
class DocResult:
    """A Doc's share of a session result, in the terms the component annotates with."""

    ends: list[int]  # byte end of each model token of the region (held-back text + this text)
    doc_start: int  # byte offset of this text in the region
    offset: int  # character offset of this text in its stream
    tag_ids: list[int] | None  # per model token
    cats: dict[str, float]
    vector: list[float] | None


def doc_result(tokenizer: Any, res: FragmentResult, text: str, want_vector: bool) -> DocResult:
    """Turn a provisional :class:`~rwkv_stream.sessions.FragmentResult` into per-model-token outputs of the
    Doc's region (the final tokens, then the held-back tail run on a fork)."""
    ids = res.token_ids + res.tail_ids
    doc_start, n_text = len(res.carry), len(text.encode("utf-8"))
    ends = region_token_ends(tokenizer, ids, doc_start + n_text)
    parts = [h for h in (res.hidden, res.tail_hidden) if h is not None and len(h)]
    hidden = torch.cat(parts) if parts else None
    vector = None
    if want_vector and hidden is not None:
        rows = overlapping(ends, doc_start, doc_start + n_text)
        if rows:
            vector = hidden[rows].float().mean(dim=0).tolist()
    cats = {**res.cats.get(CLASSIFIER, {}), **res.probes}
    return DocResult(ends, doc_start, res.text_start, res.tags.get(TAGGER), cats, vector)


def region_token_ends(tokenizer: Any, ids: list[int], region_bytes: int) -> list[int]:
    """Byte ends of a region's model tokens in text coordinates. Token bytes are the text's bytes, except
    that a tokenizer may add a prefix space at the start of a stream (ByteLevel ``add_prefix_space``):
    whatever the tokens hold beyond the text sits at the start of the region."""
    ends = token_ends([len(tokenizer.id_to_token_bytes(i)) for i in ids])
    extra = (ends[-1] if ends else 0) - region_bytes
    return [max(0, e - extra) for e in ends] if extra > 0 else ends
