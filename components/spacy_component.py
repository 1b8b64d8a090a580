"""spaCy component ``rwkv``: an RWKV-4 model as a live, per-stream tagger, classifier and generator.

One line puts it into a pipeline (the model is loaded at ``nlp.initialize()`` or on first use)::

    nlp.add_pipe("rwkv", config={"model": "path/to/bundle"})
    doc = nlp.make_doc("so the meeting is"); doc._.stream_id = "call-42"; nlp(doc)

Docs with the same ``doc._.stream_id`` continue one stream, in the order they are processed; a Doc without one
is processed alone. Streams live in the engine's session layer (:mod:`rwkv_stream.sessions`); this module keeps
only what is spaCy's: settings, Doc extensions, alignment (:mod:`rwkv_stream.components.spacy_align`) and
serialization. Each Doc is fed as a *provisional* fragment: the ids that became final advance the stream's
state, and the tail the streaming tokenizer holds back (at most a couple of words) is run on a fork as if the
stream ended there, so the Doc gets tags, cats and a vector for all its text while the stream does not advance.
Each fragment costs only its own tokens: history is never re-read. Because the model and heads are causal and
the streaming encoder reproduces whole-text tokenization, a transcript split into Docs gives the same outputs
as the whole text (for tokens whose model token is not cut by a split point) and the same final cats, and
``nlp.pipe`` gives each stream the results it gets alone whatever the batch and ``max_streams``.

Config (``[components.rwkv]``):

* ``model``: ``"shipped:NAME"`` (a bundle installed under ``rwkv_stream/data``), a path (bundle directory,
  ``.pth``/``.safetensors`` checkpoint, Hugging Face directory), or a registered loader such as
  ``{"@misc": "rwkv_stream.bundle_loader.v1", "path": ...}``; ``nlp.initialize`` also takes ``model`` from
  ``[initialize.components.rwkv]``. ``tokenizer`` (``"world"`` or a ``tokenizer.json``) is for bare
  checkpoints; ``heads_path`` adds heads (``heads.json`` + ``heads.safetensors``) to those of the source.
* ``device``, ``dtype`` (``float32``/``bfloat16``/``float16``, or ``int8``/``w8a8`` on the CPU),
  ``max_streams`` (resident states; past it the least recently used stream is evicted to the session store and
  comes back transparently when its id does), ``state_dir`` (evicted streams as files in this directory, so
  memory stays bounded; ``null``: kept in memory), ``ttl_s`` (evict streams idle this long; ``null``: never),
  ``stream_id_attr`` (the Doc extension holding the stream id).
* ``tag_head`` / ``cats_head``: a head name, ``"auto"`` (the model's only head of that kind, if any) or
  ``null``. ``tag_labels`` / ``cats_labels`` optionally pin the labels the heads must have.
  ``tag_attr``: where tags go (``"tag_"``, another token attribute, ``"_.name"`` or ``null``);
  ``tag_alignment``: ``"first"`` (a spaCy token reads the model token holding its first character) or
  ``"last"`` (its last character); ``ents_from_tags``: read BIO/BILUO/IO tags into ``doc.ents``.
* ``zero_shot``: ``{label: prompt}``: each prompt is scored on a fork of the stream (mean log-probability
  of its tokens) and the softmax over labels goes into ``doc.cats``.
* ``vector``: store the mean hidden vector of the Doc's tokens in ``doc._.rwkv_vector``.
* ``[generation]``: ``max_new_tokens``, ``temperature``, ``top_p``, ``stop``, ``seed`` for
  ``doc._.rwkv_generate(...)`` / :meth:`RWKVComponent.generate`.
* Training (``nlp.update`` / ``spacy train``, see :mod:`rwkv_stream.components.spacy_training`):
  ``freeze_weights`` (only the heads learn; listeners get the engine's features), ``weights_learn_rate`` (the
  RWKV weights' learning rate as a multiple of the optimizer's), ``window`` (model tokens per training window;
  the state is carried between windows, so memory is bounded for long Docs).

Every processed Doc gets ``doc.tensor`` (``[len(doc), n_embd]``: each spaCy token's hidden vector, read at the
model token the alignment rule picks), which ``rwkv_stream.RWKVListener.v1`` layers
(:mod:`rwkv_stream.components.spacy_listener`) feed to spaCy's own components. With transcript labels
(``PUNCT-case``) the tags also give word-level results: ``doc._.rwkv_restored`` and per-token decisions
(:mod:`rwkv_stream.components.spacy_restore`). Training replaces the engine's weights: streams opened before an
update are dropped when the engine is rebuilt (their states belong to the old weights).
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
import uuid
import weakref
from collections.abc import Callable, Hashable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from numbers import Integral
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import srsly
import torch
from spacy.attrs import TAG
from spacy.language import Language
from spacy.pipeline import TrainablePipe
from spacy.scorer import Scorer, get_ner_prf
from spacy.tokens import Doc, Span, Token
from spacy.training import Example
from spacy.util import minibatch, registry
from thinc.api import Config, Model

from rwkv_stream.config import WEIGHT_FORMATS

from .spacy_align import ALIGNMENTS, align_indices, bio_spans
from .spacy_interim import INTERIM_ATTR, feed_docs
from .spacy_interim import register_extensions as register_interim_extensions
from .spacy_listener import RWKVListener
from .spacy_restore import DocLayout, is_transcript_labels, set_restored
from .spacy_restore import register_extensions as register_restore_extensions

if TYPE_CHECKING:
    from thinc.api import Optimizer

    from .spacy_training import PendingBackward, TrainNet

if TYPE_CHECKING:
    from rwkv_stream.heads import Head
    from rwkv_stream.loading import LoadedModel
    from rwkv_stream.sessions import FragmentResult, SessionTable

    from .spacy_align import DocResult

COMPONENT_FILE = "rwkv_component.json"
BYTES_FORMAT = "rwkv-stream/spacy-component"

GENERATION_KEYS = ("max_new_tokens", "temperature", "top_p", "stop", "seed")
N_PROCESS_ERROR = (
    "the rwkv component keeps each stream's recurrent state in this process: nlp.pipe(n_process > 1) would "
    "split a stream's fragments between processes. Use n_process=1; streams of a batch are already stepped "
    "together (batch_size)."
)

DEFAULT_CONFIG_STR = """
[rwkv]
model = "shipped:transcript-tagger"
tokenizer = null
heads_path = null
device = "cpu"
dtype = "float32"
stream_id_attr = "stream_id"
max_streams = 1024
state_dir = null
ttl_s = null
tag_head = "auto"
tag_attr = "tag_"
tag_labels = null
tag_alignment = "first"
ents_from_tags = false
cats_head = "auto"
cats_labels = null
zero_shot = {}
vector = true
freeze_weights = false
weights_learn_rate = 1.0
window = 512

[rwkv.generation]
max_new_tokens = 32
temperature = 1.0
top_p = 1.0
stop = []
seed = null
"""
DEFAULT_CONFIG = Config().from_str(DEFAULT_CONFIG_STR)["rwkv"]

_LIVE: weakref.WeakValueDictionary[str, RWKVComponent] = weakref.WeakValueDictionary()


# ------------------------------------------------------------------------------------------ loaders
@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from; what registered loaders return when they are called at initialize."""

    path: str
    tokenizer: str | None = None
    heads_path: str | None = None


@registry.misc("rwkv_stream.bundle_loader.v1")
def bundle_loader(path: str) -> Callable[[], ModelSource]:
    """A bundle directory (weights, tokenizer, heads)."""
    return lambda: ModelSource(str(path))


@registry.misc("rwkv_stream.checkpoint_loader.v1")
def checkpoint_loader(path: str, tokenizer: str, heads_path: str | None = None) -> Callable[[], ModelSource]:
    """A ``.pth``/``.safetensors`` checkpoint or HF directory, a tokenizer spec, and optionally heads."""
    return lambda: ModelSource(str(path), tokenizer, heads_path)


@registry.misc("rwkv_stream.shipped_loader.v1")
def shipped_loader(name: str = "transcript-tagger") -> Callable[[], ModelSource]:
    """A bundle shipped inside the package (``rwkv_stream/data/NAME``)."""
    return lambda: ModelSource(f"shipped:{name}")


# ------------------------------------------------------------------------------------------ settings
@dataclass
class Settings:
    model: str | Callable[[], Any]
    tokenizer: str | None = None
    heads_path: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    stream_id_attr: str = "stream_id"
    max_streams: int = 1024
    state_dir: str | None = None
    ttl_s: float | None = None
    tag_head: str | None = "auto"
    tag_attr: str | None = "tag_"
    tag_labels: list[str] | None = None
    tag_alignment: str = "first"
    ents_from_tags: bool = False
    cats_head: str | None = "auto"
    cats_labels: list[str] | None = None
    zero_shot: dict[str, str] = field(default_factory=dict)
    vector: bool = True
    generation: dict[str, Any] = field(default_factory=dict)
    freeze_weights: bool = False
    weights_learn_rate: float = 1.0
    window: int = 512

    def validate(self) -> None:
        if self.dtype not in WEIGHT_FORMATS:
            raise ValueError(f"rwkv: dtype must be one of {WEIGHT_FORMATS}, got {self.dtype!r}")
        if self.max_streams < 1:
            raise ValueError(f"rwkv: max_streams must be at least 1, got {self.max_streams}")
        if self.ttl_s is not None and self.ttl_s <= 0:
            raise ValueError(f"rwkv: ttl_s must be positive or null, got {self.ttl_s}")
        if self.tag_alignment not in ALIGNMENTS:
            raise ValueError(f"rwkv: tag_alignment must be one of {ALIGNMENTS}, got {self.tag_alignment!r}")
        if not self.stream_id_attr.isidentifier():
            raise ValueError(f"rwkv: stream_id_attr must be an extension name, got {self.stream_id_attr!r}")
        attr = self.tag_attr
        if attr is not None and not attr.startswith("_.") and not hasattr(Token, attr):
            raise ValueError(f"rwkv: tag_attr {attr!r} is not a Token attribute (use e.g. 'tag_' or '_.name')")
        if self.window < 1 or self.weights_learn_rate < 0:
            raise ValueError(f"rwkv: window must be >= 1 and weights_learn_rate >= 0, got {self.window}, "
                             f"{self.weights_learn_rate}")
        if self.tag_head not in (None, "auto") and self.tag_head == self.cats_head:
            raise ValueError(f"rwkv: tag_head and cats_head both name head {self.tag_head!r}")
        unknown = set(self.generation) - set(GENERATION_KEYS)
        if unknown:
            raise ValueError(f"rwkv: unknown generation settings {sorted(unknown)}; known: {list(GENERATION_KEYS)}")


@Language.factory(
    "rwkv",
    default_config=DEFAULT_CONFIG,
    assigns=["token.tag", "doc.cats", "doc.ents", "doc.tensor"],
)
def make_rwkv_component(
    nlp: Language,
    name: str,
    model: str | Callable[[], Any],
    tokenizer: str | None,
    heads_path: str | None,
    device: str,
    dtype: str,
    stream_id_attr: str,
    max_streams: int,
    state_dir: str | None,
    ttl_s: float | None,
    tag_head: str | None,
    tag_attr: str | None,
    tag_labels: list[str] | None,
    tag_alignment: str,
    ents_from_tags: bool,
    cats_head: str | None,
    cats_labels: list[str] | None,
    zero_shot: dict[str, str],
    vector: bool,
    generation: dict[str, Any],
    freeze_weights: bool = False,
    weights_learn_rate: float = 1.0,
    window: int = 512,
) -> RWKVComponent:
    settings = Settings(
        model, tokenizer, heads_path, device, dtype, stream_id_attr, max_streams, state_dir, ttl_s, tag_head, tag_attr,
        tag_labels, tag_alignment, ents_from_tags, cats_head, cats_labels, dict(zero_shot), vector,
        {**DEFAULT_CONFIG["generation"], **generation}, freeze_weights, weights_learn_rate, window,
    )
    return RWKVComponent(nlp, name, settings)


# ------------------------------------------------------------------------------------------ extensions
def _register_extensions(settings: Settings) -> None:
    for attr in (settings.stream_id_attr, "rwkv_vector", "rwkv_offset", "rwkv_pipe"):
        if not Doc.has_extension(attr):
            Doc.set_extension(attr, default=None)
    if not Doc.has_extension("rwkv_generate"):
        Doc.set_extension("rwkv_generate", method=_doc_generate)
    register_restore_extensions()
    register_interim_extensions()
    if settings.tag_attr and settings.tag_attr.startswith("_.") and not Token.has_extension(settings.tag_attr[2:]):
        Token.set_extension(settings.tag_attr[2:], default=None)


def _doc_generate(doc: Doc, max_new_tokens: int | None = None, **overrides: Any) -> str:
    """``doc._.rwkv_generate(max_new_tokens, temperature=, top_p=, stop=, seed=)``: see ``generate``."""
    return component_for(doc).generate(doc, max_new_tokens=max_new_tokens, **overrides)


def component_for(doc: Doc) -> RWKVComponent:
    """The live rwkv component that processed ``doc`` (or the only live one)."""
    found = _LIVE.get(doc._.get("rwkv_pipe") or "")
    if found is not None:
        return found
    live = list(_LIVE.values())
    if len(live) == 1:
        return live[0]
    raise ValueError(
        "cannot tell which rwkv component this Doc belongs to; call nlp.get_pipe(name).generate(doc) instead"
    )


# ------------------------------------------------------------------------------------------ component
class RWKVComponent(TrainablePipe):
    """Per-stream incremental tagging, classification, zero-shot scoring and generation with an RWKV model;
    trainable with ``nlp.update`` / ``spacy train`` (its heads and, unless frozen, the RWKV weights), and the
    upstream of :mod:`~rwkv_stream.components.spacy_listener` listeners."""

    def __init__(self, nlp: Language, name: str, settings: Settings) -> None:
        settings.validate()
        self.name = name
        self.vocab = nlp.vocab
        self.cfg: dict[str, Any] = {}
        self.model: Model = Model("rwkv", _no_forward)  # spaCy's handle; the weights are torch modules (see _trainable)
        self.settings = settings
        self.listener_map: dict[str, list[Model]] = {}
        self._net: TrainNet | None = None
        self._pending: list[PendingBackward] = []
        self._dirty = False  # trained since the engine was last rebuilt
        self._learn = {"tagger": False, "classifier": False}  # heads that learn from gold in update
        self._sessions: SessionTable | None = None
        self._loaded: LoadedModel | None = None
        self._tagger: Head | None = None
        self._classifier: Head | None = None
        self._transcript_labels = False  # the tagger's labels are PUNCT-case (restoration applies)
        self._zone: set[Hashable] | None = None  # streams fed inside an open memory zone
        self._heads: dict[str, str | None] = {"tagger": None, "classifier": None}
        self._pid = os.getpid()
        self.uid = uuid.uuid4().hex
        _LIVE[self.uid] = self
        _register_extensions(settings)

    # -------------------------------------------------------------- loading
    @property
    def is_loaded(self) -> bool:
        return self._sessions is not None

    def initialize(
        self, get_examples: Callable[[], Iterable[Example]] | None = None, *, nlp: Language | None = None,
        model: str | Callable[[], Any] | None = None,
    ) -> None:
        """Load the model now (else it loads on first use); ``model`` overrides the configured source.

        With ``get_examples`` (``spacy train``), the heads learn what the gold data has: a tag head over the
        ``tag_attr`` values (unless ``tag_head`` is null) and a classifier over ``doc.cats`` (unless
        ``cats_head`` is null), keeping the loaded head's weights for the labels it shares with the data."""
        if model is not None:
            self.settings.model = model
            self._sessions = None
        loaded = self._loaded if self._sessions is not None else self._load_configured()
        assert loaded is not None
        self._net, self._pending, self._dirty = None, [], False
        if get_examples is not None:
            self._init_heads(loaded, list(get_examples()))
        self._install(loaded)
        self._check_listeners()

    def _ensure_loaded(self) -> SessionTable:
        if self._sessions is None:
            self._install(self._load_configured())
        assert self._sessions is not None
        return self._sessions

    @property
    def sessions(self) -> SessionTable:
        """The engine's session table behind this component (the model loads on first access)."""
        return self._engine()

    def _load_configured(self) -> LoadedModel:
        from rwkv_stream.loading import load_source

        s = self.settings
        source = s.model() if callable(s.model) else s.model
        if not isinstance(source, ModelSource):
            source = ModelSource(str(source), s.tokenizer, s.heads_path)
        loaded = load_source(source.path, tokenizer=source.tokenizer, device=s.device, dtype=s.dtype,
                             byte_level=True)
        if source.heads_path is not None:
            add_heads(loaded, source.heads_path)
        return loaded

    def _install(self, loaded: LoadedModel) -> None:
        from rwkv_stream.sessions import DirectoryStore, MemoryStore, SessionStore, SessionTable

        from .spacy_align import CLASSIFIER, TAGGER

        s = self.settings
        tagger = self._pick_head(loaded, s.tag_head, "tagger", s.tag_labels, "tag")
        classifier = self._pick_head(loaded, s.cats_head, "classifier", s.cats_labels, "cats")
        clash = set(s.zero_shot) & set(classifier.labels if classifier else [])
        if clash:
            raise ValueError(f"rwkv: zero-shot labels {sorted(clash)} clash with the classifier head's labels")
        self._tagger, self._classifier, self._loaded = tagger, classifier, loaded
        self._transcript_labels = tagger is not None and is_transcript_labels(tagger.labels)
        heads = {role: h for role, h in ((TAGGER, tagger), (CLASSIFIER, classifier)) if h is not None}
        store: SessionStore = DirectoryStore(s.state_dir) if s.state_dir else MemoryStore()
        self._sessions = SessionTable(loaded.model, loaded.need_tokenizer(), heads=heads, probes=s.zero_shot,
                                      max_streams=s.max_streams, store=store, ttl_s=s.ttl_s)

    def _pick_head(
        self, loaded: LoadedModel, want: str | None, kind: str, labels: list[str] | None, what: str
    ) -> Head | None:
        heads = loaded.heads.heads
        if want == "auto":
            found = [n for n, h in heads.items() if h.kind == kind]
            if len(found) > 1:
                raise ValueError(f"rwkv: the model has several {kind} heads {found}; set {what}_head to one")
            want = found[0] if found else None
        self._heads[kind] = want
        if want is None:
            if labels is not None:
                raise ValueError(f"rwkv: {what}_labels are set but the component has no {kind} head")
            return None
        if want not in heads:
            raise ValueError(f"rwkv: unknown head {want!r} for {what}_head; the model has heads {sorted(heads)}")
        head = heads[want]
        if head.kind != kind:
            raise ValueError(f"rwkv: head {want!r} is a {head.kind}, but {what}_head needs a {kind}")
        if labels is not None and list(labels) != head.labels:
            raise ValueError(f"rwkv: {what}_labels {list(labels)} do not match head {want!r} labels {head.labels}")
        return head

    @property
    def labels(self) -> tuple[str, ...]:
        if self._sessions is None:
            return ()
        heads = [h for h in (self._tagger, self._classifier) if h is not None]
        return tuple(dict.fromkeys([lab for h in heads for lab in h.labels] + list(self.settings.zero_shot)))

    @property
    def cats_labels(self) -> list[str]:
        if self._sessions is None:
            return []
        return (self._classifier.labels if self._classifier else []) + list(self.settings.zero_shot)

    # -------------------------------------------------------------- processing
    def __call__(self, doc: Doc) -> Doc:
        return self._process([doc])[0]

    def predict(self, docs: Iterable[Doc]) -> list[FragmentResult]:
        """Feed the Docs to their streams (each as a provisional fragment); one session result per Doc."""
        docs = list(docs)
        return self._predict(docs, [DocLayout.of(doc).text for doc in docs])

    def _predict(self, docs: list[Doc], texts: list[str]) -> list[FragmentResult]:
        from rwkv_stream.sessions import Fragment

        self._refuse_other_process()
        sessions = self._engine()
        keys = [self.stream_key(doc) for doc in docs]
        if self._zone is not None:
            self._zone.update(k for k in set(keys) if k is not None and not sessions.exists(k))
        if not any(doc._.get(INTERIM_ATTR) for doc in docs):
            return sessions.feed([Fragment(k, t) for k, t in zip(keys, texts, strict=True)], provisional=True)
        return feed_docs(sessions, keys, docs)  # interim ASR hypotheses run on forks (spacy_interim)

    def set_annotations(self, docs: Iterable[Doc], results: list[FragmentResult]) -> None:
        docs = list(docs)
        self._set_annotations(docs, results, [DocLayout.of(doc) for doc in docs])

    def _set_annotations(self, docs: list[Doc], results: list[FragmentResult], layouts: list[DocLayout]) -> None:
        from .spacy_align import doc_result

        tokenizer = self._engine().tokenizer
        for doc, res, layout in zip(docs, results, layouts, strict=True):
            self._annotate(doc, doc_result(tokenizer, res, layout.text, self.settings.vector), layout)

    def pipe(self, stream: Iterable[Doc], *, batch_size: int = 128) -> Iterator[Doc]:
        """Steps all streams of each batch together; fragments of one stream keep their order."""
        handler = self.get_error_handler()
        for batch in minibatch(stream, size=batch_size):
            docs = list(batch)
            try:
                done = self._process(docs)
            except Exception as exc:
                handler(self.name, self, docs, exc)
                continue
            yield from done

    def _process(self, docs: list[Doc]) -> list[Doc]:
        """All Docs of a batch in one session-layer call: each stream's Docs in order, streams batched
        (in waves when they outnumber ``max_streams``: no stream with Docs pending is evicted)."""
        layouts = [DocLayout.of(doc) for doc in docs]  # each Doc's text and tokens, read once
        self._set_annotations(docs, self._predict(docs, [lay.text for lay in layouts]), layouts)
        return docs

    def _refuse_other_process(self) -> None:
        if os.getpid() != self._pid and multiprocessing.parent_process() is not None:
            raise RuntimeError(N_PROCESS_ERROR)

    def stream_key(self, doc: Doc) -> Hashable | None:
        """The Doc's stream id (``None``: process it alone); raises ``TypeError`` for a wrong type."""
        return check_stream_id(doc._.get(self.settings.stream_id_attr), self.settings.stream_id_attr)

    def _annotate(self, doc: Doc, result: DocResult, layout: DocLayout) -> None:
        """Tags, restoration, ``doc.tensor``, cats and extensions of one Doc (no Token objects on the common
        paths: the token layout comes from ``doc.to_array``)."""
        starts = np.array(layout.starts, dtype=np.int64)
        stops = starts + np.array([len(w) for w in layout.words], dtype=np.int64)
        index = align_indices(starts, stops, layout.text, result.ends, result.doc_start,
                              self.settings.tag_alignment)  # type: ignore[arg-type]
        doc.tensor = self._doc_tensor(index, result)
        if self._tagger is not None and result.tag_ids is not None:
            labels = self._tagger.labels
            tag_ids = np.asarray(result.tag_ids, dtype=np.int64)
            found = index >= 0
            label_ids = np.full(len(index), -1, dtype=np.int64)
            label_ids[found] = tag_ids[index[found]]
            tags = [None if i < 0 else labels[i] for i in label_ids.tolist()]
            self._write_tags(doc, tags, label_ids)
            if self._transcript_labels:
                set_restored(doc, tags, layout)
        doc.cats.update(result.cats)
        doc._.set("rwkv_vector", result.vector)
        doc._.set("rwkv_offset", result.offset)
        doc._.set("rwkv_pipe", self.uid)

    def _doc_tensor(self, index: np.ndarray, result: DocResult) -> np.ndarray:
        """``[len(doc), n_embd]``: each spaCy token's vector is the hidden vector of the model token it reads."""
        width = self._engine().model.config.n_embd
        out = np.zeros((len(index), width), dtype="float32")
        if result.hidden is not None:
            found = index >= 0
            out[found] = result.hidden.float().cpu().numpy()[index[found]]
        return out

    def _write_tags(self, doc: Doc, tags: list[str | None], label_ids: np.ndarray) -> None:
        attr = self.settings.tag_attr
        if attr == "tag_":  # spaCy's TAG column at once (what token.tag_ = tag does, token by token)
            strings = doc.vocab.strings  # added per Doc: a loaded vocab may have replaced the store's contents
            hashes = np.array([strings.add(label) for label in self._tagger.labels], dtype=np.uint64)  # type: ignore[union-attr]
            column = doc.to_array([TAG]).reshape(-1)
            found = label_ids >= 0
            column[found] = hashes[label_ids[found]]
            doc.from_array([TAG], column)
        elif attr is not None:
            for token, tag in zip(doc, tags, strict=True):
                if tag is None:
                    continue
                if attr.startswith("_."):
                    token._.set(attr[2:], tag)
                else:
                    setattr(token, attr, tag)
        if self.settings.ents_from_tags:
            doc.ents = [Span(doc, start, end, label=label) for start, end, label in bio_spans(tags)]

    # -------------------------------------------------------------- listeners (spaCy's ListenedToComponent)
    @property
    def listeners(self) -> list[Model]:
        return [m for c in self.listening_components for m in self.listener_map[c]]

    @property
    def listening_components(self) -> list[str]:
        return list(self.listener_map.keys())

    def add_listener(self, listener: Model, component_name: str) -> None:
        found = self.listener_map.setdefault(component_name, [])
        if listener not in found:
            found.append(listener)

    def remove_listener(self, listener: Model, component_name: str) -> bool:
        found = self.listener_map.get(component_name, [])
        if listener not in found:
            return False
        found.remove(listener)
        if not found:
            del self.listener_map[component_name]
        return True

    def find_listeners(self, component: Any) -> None:
        """Register the :class:`RWKVListener` layers of a later component whose upstream is this one (or *)."""
        model = getattr(component, "model", None)
        if isinstance(model, Model):
            for node in model.walk():
                if isinstance(node, RWKVListener) and node.upstream_name in ("*", self.name):
                    self.add_listener(node, component.name)

    def _check_listeners(self) -> None:
        width = self._ensure_loaded().model.config.n_embd
        for component, found in self.listener_map.items():
            for listener in found:
                if listener.has_dim("nO") is None:
                    listener.set_dim("nO", width)
                if listener.get_dim("nO") != width:
                    raise ValueError(f"rwkv: the listener in {component!r} has width {listener.get_dim('nO')}, "
                                     f"the RWKV model makes vectors of {width}: set its width to {width}")

    # -------------------------------------------------------------- training
    def update(
        self, examples: Iterable[Example], *, drop: float = 0.0, sgd: Optimizer | None = None,
        losses: dict[str, float] | None = None,
    ) -> dict[str, float]:
        """One batch: the RWKV forward (parallel mode), the heads' losses, vectors for every listener. The
        backward runs once the listeners have sent their gradients (at ``finish_update``)."""
        from .spacy_training import BatchPass, PendingBackward, encode_docs, token_vectors

        losses = {} if losses is None else losses
        losses.setdefault(self.name, 0.0)
        self._flush()
        examples = list(examples)
        self._ensure_loaded()
        if not self.listeners and not any(self._learn.values()):
            return losses  # nothing learns from this component's outputs
        docs = [eg.predicted for eg in examples]
        sessions, net = self._ensure_loaded(), self._trainable()
        self._check_listeners()
        batch = encode_docs(sessions.tokenizer, docs, self.settings.tag_alignment)
        forward = None if net.rwkv is None else BatchPass(net.rwkv, batch, self.settings.window)
        hidden = self._engine_hidden(docs, batch.max_len) if forward is None else forward.hidden
        pending = PendingBackward(batch, forward, torch.zeros_like(hidden))
        losses[self.name] += self._head_losses(net, hidden, pending, examples)
        self._pending.append(pending)
        vectors = token_vectors(hidden, batch)

        def backprop(d_vectors: list[Any]) -> list[Doc]:
            before = pending.listener_loss
            pending.add_rows(d_vectors)
            losses[self.name] += pending.listener_loss - before
            return []

        batch_id = RWKVListener.get_batch_id(docs)
        for listener in self.listeners:
            listener.receive(batch_id, vectors, backprop)  # type: ignore[attr-defined]
        if sgd is not None:
            self.finish_update(sgd)
        return losses

    def finish_update(self, sgd: Optimizer) -> None:
        """Backpropagate the gathered gradients and let spaCy's optimizer update the weights and heads."""
        from .spacy_training import apply_optimizer

        self._flush()
        if self._net is not None and apply_optimizer(self._net, sgd, self.model.id, self.settings.weights_learn_rate):
            self._dirty = True

    def get_loss(self, examples: Iterable[Example], scores: Any) -> tuple[float, Any]:
        raise NotImplementedError("rwkv computes its losses in update()")

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        for job in pending:
            job.run()

    def _head_losses(self, net: TrainNet, hidden: torch.Tensor, pending: PendingBackward,
                     examples: list[Example]) -> float:
        """Losses of the heads that learn (their gradient reaches the hidden vectors unless frozen)."""
        from .spacy_training import cats_loss, gold_tags, tag_loss

        leaf = hidden.detach().requires_grad_(pending.forward is not None)
        terms = []
        if self._learn["tagger"] and self._tagger is not None and self.settings.tag_attr is not None:
            gold = [gold_tags(eg, self.settings.tag_attr) for eg in examples]
            terms.append(tag_loss(net.head(self._head_name("tagger")), leaf, pending.batch, gold))
        if self._learn["classifier"] and self._classifier is not None:
            gold_cats = [dict(eg.reference.cats) for eg in examples]
            terms.append(cats_loss(net.head(self._head_name("classifier")), leaf, pending.batch, gold_cats))
        present = [t for t in terms if t is not None]
        if not present:
            return 0.0
        total = torch.stack(present).sum()
        total.backward()
        if leaf.grad is not None:
            pending.d_hidden += leaf.grad
        return float(total.detach())

    def _head_name(self, kind: str) -> str:
        name = self._heads[kind]
        assert name is not None
        return name

    def _engine_hidden(self, docs: list[Doc], length: int) -> torch.Tensor:
        """Frozen weights: the hidden vectors straight from the streaming engine, ``[B, T, C]``."""
        from rwkv_stream.sessions import Fragment

        sessions = self._ensure_loaded()
        results = sessions.feed([Fragment(None, d.text) for d in docs], provisional=True)
        out = torch.zeros(len(docs), max(length, 1), sessions.model.config.n_embd)
        for b, res in enumerate(results):
            parts = [h for h in (res.hidden, res.tail_hidden) if h is not None and len(h)]
            if parts:
                rows = torch.cat(parts).float().cpu()
                out[b, : len(rows)] = rows[:length]
        return out

    def _trainable(self) -> TrainNet:
        """The torch modules ``nlp.update`` trains, built from the loaded weights on first use."""
        from .spacy_training import TrainNet, rwkv_from_tensors

        if self._net is None:
            loaded = self._loaded
            assert loaded is not None
            rwkv = None
            if not self.settings.freeze_weights:
                family = getattr(loaded.model, "family", "rwkv4")
                if family != "rwkv4":
                    raise ValueError(f"rwkv: fine-tuning runs RWKV-4 models only (this is {family}); "
                                     "set freeze_weights = true to train heads and listeners on frozen features")
                rwkv = rwkv_from_tensors(loaded.tensors)
                rwkv.train()
            heads = {n: loaded.heads.heads[n] for k, n in self._heads.items() if n and self._learn[k]}
            self._net = TrainNet(rwkv, heads)
        return self._net

    def _init_heads(self, loaded: LoadedModel, examples: list[Example]) -> None:
        """Heads over the labels the gold data has (see :meth:`initialize`); the caller installs them."""
        from .spacy_training import adapt_head, data_labels

        s = self.settings
        tag_attr = s.tag_attr if s.tag_head is not None else None
        tag_labels, cat_labels, multi = data_labels(examples, tag_attr)
        heads = dict(loaded.heads.heads)
        n_embd = loaded.model.config.n_embd
        plan = (("tagger", "tag", s.tag_labels or tag_labels, False),
                ("classifier", "cats", s.cats_labels or cat_labels, multi))
        for kind, what, labels, multi_label in plan:
            want = getattr(s, f"{what}_head")
            if want is None or not labels:
                continue
            name = want if want != "auto" else _auto_head_name(heads, kind, what)
            old = heads.get(name)
            if old is not None and old.kind != kind:
                raise ValueError(f"rwkv: the model's head {name!r} is a {old.kind}; name the new {kind} head "
                                 f"with {what}_head")
            heads[name] = adapt_head(old, kind, labels, n_embd, multi_label)
            setattr(s, f"{what}_head", name)
            self._learn[kind] = True
        loaded.heads = type(loaded.heads)(heads, loaded.model.fingerprint)

    def _engine(self) -> SessionTable:
        """The session table, rebuilt from the trained weights when training changed them (live streams of
        the old weights are dropped: their states belong to other weights)."""
        sessions = self._ensure_loaded()
        if not self._dirty:
            return sessions
        from .spacy_training import canonical_tensors

        loaded, net = self._loaded, self._net
        assert loaded is not None and net is not None
        if net.rwkv is not None:
            loaded.tensors = canonical_tensors(net.rwkv, loaded.tensors)
            loaded.model = type(loaded.model)(loaded.tensors, loaded.model.config, device=self.settings.device,
                                              dtype=self.settings.dtype)
            loaded.heads.model_fingerprint = loaded.model.fingerprint
        self._dirty = False
        self._install(loaded)
        return self._ensure_loaded()

    # -------------------------------------------------------------- generation
    def generate(self, doc: Doc, max_new_tokens: int | None = None, **overrides: Any) -> str:
        """Continue the Doc's stream (its latest state) on a fork: the stream is not advanced or re-read.

        A Doc without a stream id is continued from its own text. Keyword overrides: ``temperature``,
        ``top_p``, ``stop`` (strings that end the text, not included), ``seed``.
        """
        from rwkv_stream.generate import SamplingConfig

        unknown = set(overrides) - set(GENERATION_KEYS)
        if unknown:
            raise TypeError(f"unknown generation settings {sorted(unknown)}; known: {list(GENERATION_KEYS)}")
        cfg = {**self.settings.generation, **{k: v for k, v in overrides.items() if v is not None}}
        if max_new_tokens is not None:
            cfg["max_new_tokens"] = max_new_tokens
        sampling = SamplingConfig(
            int(cfg["max_new_tokens"]), float(cfg["temperature"]), float(cfg["top_p"]), cfg["seed"],
            tuple(cfg["stop"] or ()),
        )
        sessions, key = self._engine(), self.stream_key(doc)
        if key is None:
            return sessions.generate_from(doc.text, sampling)
        if not sessions.exists(key):
            raise KeyError(f"stream {key!r} is not live (ended, or never processed)")
        return sessions.generate(key, sampling)

    # -------------------------------------------------------------- stream lifecycle
    @property
    def streams(self) -> list[Hashable]:
        """Ids of the resident streams, least recently used first (evicted ones wait in the store)."""
        return [] if self._sessions is None else self._sessions.keys()

    def reset_stream(self, stream_id: Hashable) -> bool:
        """Back to an empty state (the id stays live). Returns whether the stream was live."""
        key = self._key(stream_id)
        if self._sessions is None or not self._sessions.exists(key):
            return False
        self._sessions.reset(key)
        return True

    def end_stream(self, stream_id: Hashable) -> bool:
        """Forget the stream (resident or evicted) and free its slot. Returns whether it was live."""
        key = self._key(stream_id)
        if self._sessions is None or not self._sessions.exists(key):
            return False
        self._sessions.end(key)
        return True

    def export_stream(self, stream_id: Hashable) -> bytes:
        """The stream's complete session as bytes (model state, tokenizer carry, counters; versioned,
        checksummed, tied to the model): :meth:`import_stream` continues it exactly, in any process."""
        sessions, key = self._engine(), self._key(stream_id)
        if not sessions.exists(key):
            raise KeyError(f"stream {key!r} is not live (ended, or never processed)")
        return sessions.export(key)

    def import_stream(self, stream_id: Hashable, data: bytes) -> None:
        """Continue a stream from :meth:`export_stream` bytes (replacing a live stream of that id)."""
        self._engine().restore(self._key(stream_id), data)

    def export_streams(self) -> dict[Hashable, bytes]:
        """Every resident stream's :meth:`export_stream` bytes."""
        return {key: self.export_stream(key) for key in self.streams}

    def import_streams(self, states: dict[Hashable, bytes]) -> None:
        for key, data in states.items():
            self.import_stream(key, data)

    def _key(self, stream_id: Hashable) -> Hashable:
        key = check_stream_id(stream_id, self.settings.stream_id_attr)
        if key is None:
            raise TypeError("a stream id is needed, not None")
        return key

    @contextmanager
    def memory_zone(self, mem: Any = None) -> Iterator[Any]:
        """spaCy's ``nlp.memory_zone()`` hook: streams opened inside the zone are ended when it closes."""
        outer, self._zone = self._zone, set()
        try:
            yield mem
        finally:
            opened, self._zone = self._zone, outer
            for key in opened:
                self.end_stream(key)

    # -------------------------------------------------------------- scoring
    def score(self, examples: Iterable[Example], **kwargs: Any) -> dict[str, Any]:
        """Token-attribute accuracy for tags, spaCy's cats scores, and NER P/R/F for ``ents_from_tags``."""
        examples = list(examples)
        self._ensure_loaded()
        scores: dict[str, Any] = {}
        attr = self.settings.tag_attr
        if self._tagger is not None and attr is not None:
            if attr.startswith("_."):
                scores.update(Scorer.score_token_attr(examples, attr[2:], getter=lambda t, a: t._.get(a), **kwargs))
            else:
                scores.update(Scorer.score_token_attr(examples, attr.rstrip("_"), **kwargs))
        labels = self.cats_labels
        if labels:
            classifier = self._classifier
            multi = bool(classifier and (classifier.multi_label or self.settings.zero_shot))
            scores.update(Scorer.score_cats(examples, "cats", labels=labels, multi_label=multi, **kwargs))
        if self.settings.ents_from_tags:
            scores.update(get_ner_prf(examples))
        return scores

    # -------------------------------------------------------------- serialization
    def to_disk(self, path: str | Path, *, exclude: Iterable[str] = ()) -> None:
        """A bundle directory (safetensors weights, tokenizer, heads, manifest) plus the resolved settings.
        ``exclude``: ``"model"`` skips the bundle, ``"cfg"`` the settings record."""
        from rwkv_stream.loading import save_bundle

        self._engine()  # the trained weights, if any
        assert self._loaded is not None
        path, skip = Path(path), _fields(exclude)
        if "model" not in skip:
            save_bundle(self._loaded, path)
        if "cfg" not in skip:
            path.mkdir(parents=True, exist_ok=True)
            srsly.write_json(path / COMPONENT_FILE, self._record())

    def from_disk(self, path: str | Path, *, exclude: Iterable[str] = ()) -> RWKVComponent:
        from rwkv_stream.checkpoint import CheckpointError
        from rwkv_stream.loading import load_source

        path, skip = Path(path), _fields(exclude)
        if "model" in skip:
            self._ensure_loaded()
        elif not (path / "bundle.json").is_file():
            raise CheckpointError(f"{path} holds no saved rwkv component (no bundle.json)")
        else:
            self._install(load_source(path, device=self.settings.device, dtype=self.settings.dtype, byte_level=True))
            self._net, self._pending, self._dirty = None, [], False
        record_file = path / COMPONENT_FILE
        if "cfg" not in skip and record_file.is_file():
            self._check_record(srsly.read_json(record_file))
        return self

    def to_bytes(self, *, exclude: Iterable[str] = ()) -> bytes:
        with tempfile.TemporaryDirectory() as tmp:
            self.to_disk(Path(tmp) / "rwkv", exclude=exclude)
            files = read_dir_files(Path(tmp) / "rwkv")
        return srsly.msgpack_dumps({"format": BYTES_FORMAT, "files": files})

    def from_bytes(self, bytes_data: bytes, *, exclude: Iterable[str] = ()) -> RWKVComponent:
        obj = srsly.msgpack_loads(bytes_data)
        if not isinstance(obj, dict) or obj.get("format") != BYTES_FORMAT:
            raise ValueError("bytes are not a serialized rwkv component")
        with tempfile.TemporaryDirectory() as tmp:
            write_dir_files(Path(tmp) / "rwkv", obj["files"])
            return self.from_disk(Path(tmp) / "rwkv", exclude=exclude)

    def _record(self) -> dict[str, Any]:
        sessions = self._engine()
        settings = asdict(self.settings)
        settings["model"] = settings["model"] if isinstance(settings["model"], str) else repr(settings["model"])
        return {
            "version": 1,
            "fingerprint": sessions.fingerprint,
            "tag_head": self._heads["tagger"],
            "tag_labels": self._tagger.labels if self._tagger else None,
            "cats_head": self._heads["classifier"],
            "cats_labels": self.cats_labels,
            "learn": dict(self._learn),
            "settings": settings,
        }

    def _check_record(self, record: dict[str, Any]) -> None:
        if record.get("fingerprint") not in (None, self._ensure_loaded().fingerprint):
            raise ValueError("rwkv: the saved component record belongs to other weights than the saved bundle")
        self._learn.update({k: bool(v) for k, v in record.get("learn", {}).items() if k in self._learn})


# ------------------------------------------------------------------------------------------ helpers
SERIALIZATION_FIELDS = ("model", "cfg")


def _auto_head_name(heads: dict[str, Head], kind: str, what: str) -> str:
    """The model's only head of ``kind`` (else ``kind`` itself, the name of a new one)."""
    found = [n for n, h in heads.items() if h.kind == kind]
    if len(found) > 1:
        raise ValueError(f"rwkv: the model has several {kind} heads {found}; set {what}_head to one")
    return found[0] if found else kind


def _no_forward(model: Model, docs: Any, is_train: bool) -> Any:
    raise NotImplementedError("the rwkv component runs its model itself: call the component or nlp.update")


def add_heads(loaded: LoadedModel, heads_path: str) -> None:
    """Add the heads saved in ``heads_path`` to the model's; a name the model already has is an error."""
    from rwkv_stream.heads import HeadSet

    extra = HeadSet.load(heads_path)
    clash = sorted(set(extra.heads) & set(loaded.heads.heads))
    if clash:
        raise ValueError(f"rwkv: heads_path {heads_path!r} has heads named {clash}, which the model already has; "
                         "give them other names")
    loaded.heads = HeadSet({**loaded.heads.heads, **extra.heads}, loaded.model.fingerprint)


def _fields(exclude: Iterable[str]) -> set[str]:
    """The component's fields named in ``exclude`` (spaCy passes other components' names too)."""
    return set(exclude) & set(SERIALIZATION_FIELDS)


def check_stream_id(value: Any, attr: str = "stream_id") -> Hashable | None:
    """A valid stream key (``str`` or ``int``) or ``None``; anything else is a ``TypeError``."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Integral) and not isinstance(value, bool):
        return int(value)
    raise TypeError(
        f"doc._.{attr} must be a str or an int (or None to process the Doc alone), "
        f"got {type(value).__name__}: {value!r}"
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
