"""The one way in for models: resolve a source, load it, save it back as a bundle.

A *source* is one of

- ``"shipped"`` or ``"shipped:NAME"``: a bundle installed with the package (``rwkv_stream/data/NAME``;
  ``"shipped"`` alone is :data:`SHIPPED_DEFAULT`),
- a bundle directory (holding ``bundle.json``, see :mod:`rwkv_stream.bundle`),
- a checkpoint file (BlinkDL ``.pth``, ``.pt``, ``.bin`` or ``.safetensors``),
- a Hugging Face model directory (``config.json`` + safetensors or ``pytorch_model.bin``).

:func:`resolve_source` turns a source into a path, or raises a one-line :class:`CheckpointError` naming the
bad value and listing the installed shipped models. :func:`load_source` loads everything a source holds into
a :class:`LoadedModel` (model, canonical tensors, tokenizer, heads, manifest); :func:`load` only the model.
:func:`save_bundle` writes a :class:`LoadedModel` back as a bundle, bit for bit the same weights.

Every entry point of the engine (``rwkv_stream.load``, the CLI, the integrations) goes through here.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .bundle import read_manifest, verify_files, write_bundle
from .checkpoint import CheckpointError, load_canonical
from .config import AnyConfig
from .heads import HeadSet
from .models import RecurrentModel, build_model

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

SHIPPED = "shipped"
SHIPPED_DEFAULT = "transcript-tagger"
WORLD = "world"
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
SOURCE_KINDS = (
    "'shipped', 'shipped:NAME', a bundle directory, a .pth/.safetensors checkpoint or a Hugging Face model directory"
)


@dataclass
class LoadedModel:
    """Everything a source holds. ``tensors`` are the canonical weights as stored (whatever the run dtype),
    kept so :func:`save_bundle` writes them back exactly; ``tokenizer_json`` is the text of the tokenizer
    file (None for the built-in World tokenizer, or when there is no tokenizer)."""

    model: RecurrentModel  # the family's class (RWKV-4 or RWKV-7), detected from the tensors
    tensors: dict[str, Tensor]
    tokenizer: Tokenizer | None
    tokenizer_json: str | None
    heads: HeadSet
    manifest: dict[str, Any] = field(default_factory=dict)

    def need_tokenizer(self) -> Tokenizer:
        """The tokenizer; a :class:`CheckpointError` when the source was loaded without one."""
        if self.tokenizer is None:
            raise CheckpointError(f"{self.manifest.get('name', 'the model')!r} was loaded without a tokenizer")
        return self.tokenizer


# ------------------------------------------------------------------------------------------ resolving
def shipped_root() -> Path:
    return Path(__file__).parent / "data"


def shipped_dir(name: str = SHIPPED_DEFAULT) -> Path:
    """Where the shipped bundle ``name`` is (or would be) installed."""
    return shipped_root() / name


def shipped_models() -> list[str]:
    """Names of the installed shipped bundles."""
    return sorted(p.parent.name for p in shipped_root().glob("*/bundle.json"))


def is_bundle(path: Path) -> bool:
    return (path / "bundle.json").is_file()


def resolve_source(source: str | Path) -> Path:
    """The bundle directory, checkpoint file or Hugging Face directory that ``source`` names."""
    text = str(source)
    if text == SHIPPED or text.startswith(SHIPPED + ":"):
        return _resolve_shipped(text.partition(":")[2] or SHIPPED_DEFAULT)
    path = Path(text).expanduser()
    if not path.exists():
        raise CheckpointError(f"RWKV model not found: {text!r} (expected {SOURCE_KINDS}; {_installed()})")
    if path.is_file() and path.suffix not in CHECKPOINT_SUFFIXES:
        raise CheckpointError(
            f"not an RWKV checkpoint: {text!r} (a file must end in {', '.join(CHECKPOINT_SUFFIXES)}; "
            f"expected {SOURCE_KINDS})"
        )
    return path


def _resolve_shipped(name: str) -> Path:
    path = shipped_dir(name)
    if Path(name).name != name or name == ".." or not is_bundle(path):  # a plain name, never a path
        raise CheckpointError(f"shipped model {name!r} is not installed (no bundle at {path}); {_installed()}")
    return path


def _installed() -> str:
    return f"installed shipped models: {', '.join(shipped_models()) or 'none'}"


# ------------------------------------------------------------------------------------------ loading
def load(
    source: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32"
) -> RecurrentModel:
    """Only the model of a source (a bundle's checksums are verified); the family (RWKV-4 or RWKV-7) comes
    from the tensors."""
    path = resolve_source(source)
    weights = _bundle_weights(path, read_manifest(path), verify=True) if is_bundle(path) else path
    return _build_model(*load_canonical(weights), weights, device, dtype)


def load_source(
    source: str | Path,
    *,
    tokenizer: str | Path | None = None,
    heads: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    verify: bool = True,
    require_tokenizer: bool = True,
    byte_level: bool = False,
    replace_heads: bool = False,
) -> LoadedModel:
    """Load a source. ``tokenizer`` ('world' or a tokenizer.json) is for checkpoints (a bundle has its own; a
    Hugging Face directory's tokenizer.json is used when not given); ``heads``: a directory of extra heads
    (``heads.json`` + ``heads.safetensors``), added to the source's: a name the source already has is a
    ``ValueError`` unless the two heads are the same (spec and weights) or ``replace_heads`` is True (the extra
    head replaces the source's); ``verify``: check a bundle's files against its checksums.
    Without a tokenizer a bare checkpoint is an error unless ``require_tokenizer`` is False; ``byte_level``:
    refuse a tokenizer that is not byte-level (see :func:`check_compatible`)."""
    path = resolve_source(source)
    if is_bundle(path):
        loaded = _load_bundle(path, device, dtype, verify)
    else:
        loaded = _load_checkpoint(path, tokenizer, device, dtype, require_tokenizer)
    if heads is not None:
        extra = HeadSet.load(heads)
        base = HeadSet(loaded.heads.heads, loaded.model.fingerprint)
        loaded.heads = base.merged(extra, replace=replace_heads, where=f"heads {str(heads)!r}")
    check_compatible(loaded, byte_level=byte_level)
    return loaded


def _bundle_weights(path: Path, manifest: dict[str, Any], verify: bool) -> Path:
    if verify:
        verify_files(path, manifest)
    return path / str(manifest["weights"])


def _build_model(
    tensors: dict[str, Tensor], config: AnyConfig, where: Path, device: str | torch.device,
    dtype: str | torch.dtype,
) -> RecurrentModel:
    try:
        return build_model(tensors, config, device=device, dtype=dtype)
    except RuntimeError as exc:
        raise CheckpointError(f"cannot place {where} on {device} as {dtype}: {exc}") from exc


def _load_bundle(path: Path, device: str | torch.device, dtype: str | torch.dtype, verify: bool) -> LoadedModel:
    manifest = read_manifest(path)
    weights = _bundle_weights(path, manifest, verify)
    tensors, config = load_canonical(weights)
    model = _build_model(tensors, config, weights, device, dtype)
    spec = str(manifest["tokenizer"])
    tok_file = None if spec == WORLD else path / spec
    heads = HeadSet.load(path) if (path / "heads.json").is_file() else HeadSet({}, model.fingerprint)
    return LoadedModel(model, tensors, _tokenizer(tok_file), _read_text(tok_file), heads, manifest)


def _load_checkpoint(
    path: Path, tokenizer: str | Path | None, device: str | torch.device, dtype: str | torch.dtype,
    require_tokenizer: bool,
) -> LoadedModel:
    if tokenizer is None and path.is_dir() and (path / "tokenizer.json").is_file():
        tokenizer = path / "tokenizer.json"
    if tokenizer is None and require_tokenizer:
        raise CheckpointError(
            f"{str(path)!r} is a bare checkpoint: set `tokenizer` to 'world' or the path of a tokenizer.json"
        )
    tensors, config = load_canonical(path)
    model = _build_model(tensors, config, path, device, dtype)
    tok_file = None if tokenizer is None or str(tokenizer) == WORLD else _tokenizer_file(Path(tokenizer))
    tok = None if tokenizer is None else _tokenizer(tok_file)
    manifest = {"name": path.stem, "model_version": "0", "info": {"source": str(path)}}
    return LoadedModel(model, tensors, tok, _read_text(tok_file), HeadSet({}, model.fingerprint), manifest)


def _tokenizer_file(path: Path) -> Path:
    return path / "tokenizer.json" if path.is_dir() else path


def _tokenizer(tok_file: Path | None) -> Tokenizer:
    from .tokenizer import load_tokenizer

    return load_tokenizer(WORLD if tok_file is None else tok_file)


def _read_text(tok_file: Path | None) -> str | None:
    """The tokenizer.json text kept for re-saving (None for World and for World vocab .txt files)."""
    if tok_file is None or tok_file.suffix != ".json" or not tok_file.is_file():
        return None
    return tok_file.read_text(encoding="utf-8")


def check_compatible(loaded: LoadedModel, *, byte_level: bool = False) -> None:
    """Tokenizer and heads fit the model (``byte_level``: the tokenizer must also be byte-level)."""
    config, tok = loaded.model.config, loaded.tokenizer
    if tok is not None and byte_level and not tok.is_byte_level:
        raise ValueError("this needs a byte-level tokenizer (RWKV World or byte-level BPE)")
    if tok is not None and tok.vocab_size > config.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} ids but the model only {config.vocab_size}")
    for name, head in loaded.heads.heads.items():
        if head.n_embd != config.n_embd:
            raise ValueError(f"head {name!r} reads vectors of size {head.n_embd}, the model makes {config.n_embd}")


# ------------------------------------------------------------------------------------------ saving
def save_bundle(loaded: LoadedModel, path: str | Path) -> Path:
    """Write ``loaded`` as a bundle directory (its stored weights, tokenizer, heads and manifest)."""
    manifest = loaded.manifest
    with tempfile.TemporaryDirectory() as tmp:
        return write_bundle(
            path,
            loaded.tensors,
            _tokenizer_spec(loaded, Path(tmp)),
            loaded.heads if loaded.heads.heads else None,
            name=str(manifest.get("name", "model")),
            model_version=str(manifest.get("model_version", "0")),
            info=dict(manifest.get("info", {})),
        )


def _tokenizer_spec(loaded: LoadedModel, tmp: Path) -> str | Path:
    from .tokenizer import WorldTokenizer

    if loaded.tokenizer_json is not None:
        file = tmp / "tokenizer.json"
        file.write_text(loaded.tokenizer_json, encoding="utf-8")
        return file
    if not isinstance(loaded.tokenizer, WorldTokenizer):
        raise ValueError("cannot save this tokenizer: only 'world' and tokenizer.json tokenizers are saved")
    return WORLD
