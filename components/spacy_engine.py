"""Engine side of the spaCy component: model sources, per-stream bookkeeping and batched runs.

Nothing here imports spaCy. :class:`StreamRunner` turns jobs ``(stream key, text)`` into per-model-token
outputs; the component aligns them with spaCy tokens.

Per stream, the text of each Doc is pushed into a :class:`~rwkv_stream.tokenizer.StreamingEncoder`. The ids it
returns are final (appended text cannot change them): they advance the stream's real state, all streams of a
batch in one :meth:`StreamTable.step`. The tail the encoder holds back (at most a couple of words) is
encoded as if the stream ended here and run on a *fork* of the state, which gives hidden vectors (tags,
cats, zero-shot scores) for the Doc's last tokens without advancing the stream. The next Doc re-encodes that
tail together with its own text. Because the model and the heads are causal and the streaming encoder
reproduces whole-text tokenization, a transcript split into Docs gives the same outputs as the whole text
(for tokens whose model token is not cut by a split point) and the same final cats.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import rwkv_stream
from rwkv_stream.bundle import read_manifest, verify_files, write_bundle
from rwkv_stream.checkpoint import CheckpointError, load_canonical
from rwkv_stream.generate import SamplingConfig, decode_until_stop, generate_ids
from rwkv_stream.heads import Head, HeadSet
from rwkv_stream.model import Model
from rwkv_stream.state import State, StateError
from rwkv_stream.streams import StreamTable
from rwkv_stream.tokenizer import StreamingEncoder, WorldTokenizer, load_tokenizer

from .spacy_align import overlapping, token_ends

SHIPPED_DEFAULT = "transcript-tagger"
STREAM_META_FORMAT = "rwkv-stream/spacy-stream"
STREAM_META_VERSION = 1
WORLD = "world"


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


# ------------------------------------------------------------------------------------------ streams
def fork_encoder(encoder: StreamingEncoder, tokenizer: Any) -> StreamingEncoder:
    """An independent copy of a streaming encoder (sharing the tokenizer)."""
    return copy.deepcopy(encoder, {id(tokenizer): tokenizer})


class StreamBook:
    """Bookkeeping of one live stream next to its state: encoder, held-back text, character offset."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.encoder = StreamingEncoder(tokenizer)
        self.pending = b""  # UTF-8 of the text pushed but not yet final ids (start of the next region)
        self.chars = 0  # characters of text the stream has received
        self.last_hidden: Tensor | None = None  # hidden vector at the stream's latest token

    def push(self, data: str | bytes) -> list[int]:
        """Push text; returns the ids that became final and updates ``pending``."""
        ids = self.encoder.push(data)
        held = self.encoder.held_back
        if self.encoder.holdback_unit == "bytes":
            buf = self.pending + (data.encode("utf-8") if isinstance(data, str) else data)
            self.pending = buf[len(buf) - held :]
        else:
            text = self.pending.decode("utf-8") + (data if isinstance(data, str) else data.decode("utf-8"))
            self.pending = text[len(text) - held :].encode("utf-8")
        return ids

    def tail(self) -> list[int]:
        """Ids of the held-back text, encoded as if the stream ended now (the encoder is not changed)."""
        return fork_encoder(self.encoder, self.tokenizer).flush()

    def meta(self) -> dict[str, Any]:
        return {
            "format": STREAM_META_FORMAT,
            "version": STREAM_META_VERSION,
            "pending": self.pending,
            "chars": self.chars,
        }


@dataclass
class Job:
    key: Hashable | None  # None: a one-off text on a fresh state
    text: str


@dataclass
class JobResult:
    ends: list[int]  # byte end of each model token of the region (held-back text + this text)
    doc_start: int  # byte offset of this text in the region
    offset: int  # character offset of this text in its stream
    tag_ids: list[int] | None  # per model token
    cats: dict[str, float]
    vector: list[float] | None


@dataclass
class RunnerSettings:
    tagger: Head | None = None
    classifier: Head | None = None
    zero_shot: dict[str, str] = field(default_factory=dict)  # label -> prompt
    vector: bool = True


@dataclass
class _Prepared:
    job: Job
    final: list[int]
    tail: list[int]
    doc_start: int
    offset: int


class StreamRunner:
    """Live streams of one model: a :class:`StreamTable` plus a :class:`StreamBook` per stream."""

    def __init__(
        self,
        loaded: LoadedModel,
        settings: RunnerSettings,
        max_streams: int,
        on_evict: Callable[[Hashable, State], None] | None = None,
    ) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.settings = settings
        self.on_evict = on_evict
        self.books: dict[Hashable, StreamBook] = {}
        self.table: StreamTable[Hashable] = StreamTable(self.model, max_streams, on_evict=self._evicted)
        self._prompts = {label: encode_continuation(self.tokenizer, p) for label, p in settings.zero_shot.items()}
        for head in (settings.tagger, settings.classifier):
            if head is not None:
                head.to(self.model.device)

    # -------------------------------------------------------------- lifecycle
    def keys(self) -> list[Hashable]:
        return self.table.keys()

    def reset(self, key: Hashable) -> bool:
        if key not in self.table:
            return False
        self.table.reset(key)
        self.books[key] = StreamBook(self.tokenizer)
        return True

    def end(self, key: Hashable) -> bool:
        self.books.pop(key, None)
        return self.table.end(key)

    def export(self, key: Hashable) -> State:
        if key not in self.table:
            raise KeyError(f"stream {key!r} is not live")
        state = self.table.state(key)
        state.meta = self.books[key].meta()
        return state

    def restore(self, key: Hashable, state: State) -> None:
        """Install an exported state; the held-back text it carries is pushed again."""
        self.model.check_state(state)
        meta = state.meta or {}
        if meta and meta.get("format") != STREAM_META_FORMAT:
            raise StateError(f"state meta is not from the rwkv spaCy component: {meta.get('format')!r}")
        if meta.get("version", STREAM_META_VERSION) != STREAM_META_VERSION:
            raise StateError(f"stream meta version {meta.get('version')} not supported")
        book = StreamBook(self.tokenizer)
        self.books[key] = book
        self.table.put(key, state)
        book.chars = int(meta.get("chars", 0))
        ids = book.push(bytes(meta.get("pending", b"")))
        if ids:
            out = self.table.step([key], [ids], logits="none", batch_invariant=True)
            book.last_hidden = out.hidden[0][-1]

    def _evicted(self, key: Hashable, state: State) -> None:
        book = self.books.pop(key, None)
        if book is not None:
            state.meta = book.meta()
        if self.on_evict is not None:
            self.on_evict(key, state)

    # -------------------------------------------------------------- processing
    @torch.no_grad()
    def run(self, jobs: Sequence[Job]) -> list[JobResult]:
        """Process texts; keyed jobs must have distinct keys (one fragment per stream)."""
        keyed = [j for j in jobs if j.key is not None]
        if len({j.key for j in keyed}) != len(keyed):
            raise ValueError("a stream appears twice in one run")
        prepared = [self._prepare(j) for j in jobs]
        by_key = {p.job.key: p for p in prepared if p.job.key is not None}
        step = self.table.step(list(by_key), [p.final for p in by_key.values()], logits="none",
                               batch_invariant=True)
        final_hidden = dict(zip(by_key, step.hidden, strict=True))
        pool, forks = self.table.pool, []
        try:
            for p in prepared:
                key = p.job.key
                forks.append(pool.alloc() if key is None else pool.fork(self.table.slot(key)))
            tails = self.model.step(pool, forks, [p.tail for p in prepared], logits="none", batch_invariant=True).hidden
            hidden = [self._joined(final_hidden.get(p.job.key), t) for p, t in zip(prepared, tails, strict=True)]
            lasts = [self._last_hidden(p, h) for p, h in zip(prepared, hidden, strict=True)]
            zero_shot = self._zero_shot(forks, lasts) if self._prompts else [{} for _ in prepared]
        finally:
            for slot in forks:
                pool.free(slot)
        return [self._result(*args) for args in zip(prepared, hidden, lasts, zero_shot, strict=True)]

    def _prepare(self, job: Job) -> _Prepared:
        if job.key is None:
            return _Prepared(job, [], self.tokenizer.encode(job.text), 0, 0)
        book = self.books.get(job.key)
        if book is None:
            book = self.books[job.key] = StreamBook(self.tokenizer)
        doc_start, offset = len(book.pending), book.chars
        final = book.push(job.text)
        book.chars += len(job.text)
        return _Prepared(job, final, book.tail(), doc_start, offset)

    def _joined(self, final: Tensor | None, tail: Tensor) -> Tensor:
        parts = [h for h in (final, tail) if h is not None and len(h)]
        return torch.cat(parts) if parts else torch.empty(0, self.model.config.n_embd, device=self.model.device)

    def _last_hidden(self, p: _Prepared, hidden: Tensor) -> Tensor | None:
        book = self.books.get(p.job.key) if p.job.key is not None else None
        if len(hidden):
            if book is not None:
                book.last_hidden = hidden[-1]
            return hidden[-1]
        return None if book is None else book.last_hidden

    def _zero_shot(self, forks: list[int], lasts: list[Tensor | None]) -> list[dict[str, float]]:
        """Each label's prompt scored on a fork of each job's state (mean log-probability per token)."""
        labels = list(self._prompts)
        pool, slots, tokens = self.table.pool, [], []
        try:
            for fork in forks:
                for label in labels:
                    slots.append(pool.fork(fork))
                    tokens.append(self._prompts[label])
            logits = self.model.step(pool, slots, tokens, logits="all", batch_invariant=True).logits or []
        finally:
            for slot in slots:
                pool.free(slot)
        out = []
        for j, last in enumerate(lasts):
            first = None if last is None else self.model.head(last[None])
            rows = logits[j * len(labels) : (j + 1) * len(labels)]
            scores = {lab: _prompt_score(self._prompts[lab], first, r) for lab, r in zip(labels, rows, strict=True)}
            out.append(_softmax(scores))
        return out

    def _result(self, p: _Prepared, hidden: Tensor, last: Tensor | None, zero_shot: dict[str, float]) -> JobResult:
        ends = self._token_ends(p)
        s = self.settings
        tag_ids = None
        if s.tagger is not None and len(hidden):
            tag_ids = s.tagger(hidden).argmax(dim=-1).tolist()
        cats: dict[str, float] = {}
        if s.classifier is not None and last is not None:
            probs = s.classifier.probabilities(last[None])[0].tolist()
            cats.update(zip(s.classifier.labels, probs, strict=True))
        cats.update(zero_shot)
        vector = None
        if s.vector:
            rows = overlapping(ends, p.doc_start, p.doc_start + len(p.job.text.encode("utf-8")))
            if rows:
                vector = hidden[rows].float().mean(dim=0).tolist()
        return JobResult(ends, p.doc_start, p.offset, tag_ids, cats, vector)

    def _token_ends(self, p: _Prepared) -> list[int]:
        """Byte ends of the region's model tokens in text coordinates. Token bytes are the text's bytes,
        except that a tokenizer may add a prefix space at the start of a stream (ByteLevel
        ``add_prefix_space``): whatever the tokens hold beyond the text sits at the start of the region."""
        ends = token_ends([len(self.tokenizer.id_to_token_bytes(i)) for i in p.final + p.tail])
        extra = (ends[-1] if ends else 0) - p.doc_start - len(p.job.text.encode("utf-8"))
        return [max(0, e - extra) for e in ends] if extra > 0 else ends

    # -------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, key: Hashable | None, text: str, cfg: SamplingConfig) -> str:
        """Continue a live stream (or, with ``key=None``, ``text`` alone) on a fork of its state."""
        state, last = self._generation_start(key, text)
        return "".join(decode_until_stop(self.tokenizer, generate_ids(self.model, state, last, cfg), cfg.stop))

    def _generation_start(self, key: Hashable | None, text: str) -> tuple[State, Tensor]:
        if key is None:
            ids = self.tokenizer.encode(text)
            if not ids:
                raise ValueError("cannot generate from an empty Doc")
            logits, state = self.model.forward(ids)
            return state, logits[-1]
        if key not in self.table:
            raise KeyError(f"stream {key!r} is not live (ended, evicted, or never processed)")
        state, book = self.table.state(key), self.books[key]
        tail = book.tail()
        if tail:
            logits, state = self.model.forward(tail, state)
            return state, logits[-1]
        if book.last_hidden is None:
            raise ValueError(f"stream {key!r} has no text to continue")
        return state, self.model.head(book.last_hidden[None])[0]


def encode_continuation(tokenizer: Any, text: str) -> list[int]:
    """Ids of ``text`` appended to a stream: without start-of-input effects such as a prefix space."""
    if hasattr(tokenizer, "encode_words"):  # HFTokenizer
        return list(tokenizer.encode_words(text, bare=True).ids)
    return tokenizer.encode(text)


def _prompt_score(prompt: list[int], first: Tensor | None, logits: Tensor) -> float:
    """Mean log-probability of the prompt's tokens; ``first`` holds the logits before its first token."""
    if not prompt:
        return 0.0
    rows = logits[:-1] if first is None else torch.cat([first.to(logits.device), logits[:-1]])
    targets = torch.tensor(prompt[1:] if first is None else prompt, device=logits.device)
    if len(targets) == 0:
        return 0.0
    logp = torch.log_softmax(rows.float(), dim=-1).gather(1, targets[:, None])
    return float(logp.mean())


def _softmax(scores: dict[str, float]) -> dict[str, float]:
    if not scores:
        return {}
    probs = torch.softmax(torch.tensor(list(scores.values()), dtype=torch.float64), dim=0).tolist()
    return dict(zip(scores, probs, strict=True))
