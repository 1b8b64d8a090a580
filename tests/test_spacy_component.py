"""The spaCy component ``rwkv``: registration, configs, incremental streams, outputs, lifecycle, serialization.

Everything runs on tiny random checkpoints (2 layers, width 32) with a byte-level BPE tokenizer trained here,
so the model's vocabulary matches the tokenizer, and random heads saved with ``HeadSet``.
"""

from __future__ import annotations

import importlib.metadata
import itertools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import spacy
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rwkv_stream.components.spacy_component import RWKVComponent
from spacy.tokens import Doc, DocBin
from spacy.training import Example
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import rwkv_stream
from rwkv_stream import CheckpointError, ModelConfig
from rwkv_stream.bundle import write_bundle
from rwkv_stream.heads import Head, HeadSet
from rwkv_stream.loading import LoadedModel, load_source
from rwkv_stream.random_checkpoint import random_tensors, save_hf, save_pth
from rwkv_stream.state import State
from rwkv_stream.tokenizer import find_world_vocab

WORDS = [
    "so", "we'll", "meet", "on", "Monday", "at", "10:30", "don't", "okay?!", "the", "quick", "brown", "fox",
    "café", "naïve", "résumé", "—", "Zyxwvut", "U.S.", "e-mail", "Alice", "Bob", "weather", "vote", "goal",
    "it's", "1,234", "(maybe)", "hmm...",
]
CORPUS = [
    "so we'll meet on Monday at 10:30, okay?! don't be late.",
    "the quick brown fox jumps over the lazy dog; don't you think?!",
    "Alice and Bob vote on the weather report — a naïve résumé of the café.",
    "it's 1,234 e-mail messages from the U.S. (maybe) hmm... what a goal!",
] * 40
TAG_LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG"]
TOPICS = ["sports", "politics", "weather"]
ZERO_SHOT = {"greeting": " Hello there.", "question": " Is it?", "number": " 42"}
N_EMBD = 32
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def spacy_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("spacy_rwkv")


@pytest.fixture(scope="session")
def tokenizer_file(spacy_dir) -> Path:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)  # as rwkv-stream train does
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    path = spacy_dir / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="session")
def raw_tokenizer(tokenizer_file) -> Tokenizer:
    return Tokenizer.from_file(str(tokenizer_file))


@pytest.fixture(scope="session")
def tiny_config(raw_tokenizer) -> ModelConfig:
    return ModelConfig(n_layer=2, n_embd=N_EMBD, vocab_size=raw_tokenizer.get_vocab_size(), ffn_dim=64)


@pytest.fixture(scope="session")
def tensors(tiny_config):
    return random_tensors(tiny_config, seed=7)


def random_heads(seed: int = 0) -> HeadSet:
    torch.manual_seed(seed)
    return HeadSet({
        "entities": Head("tagger", TAG_LABELS, N_EMBD),
        "topic": Head("classifier", TOPICS, N_EMBD, hidden_dim=16),
    })


@pytest.fixture(scope="session")
def heads_dir(spacy_dir) -> Path:
    path = spacy_dir / "heads"
    random_heads(1).save(path)
    return path


@pytest.fixture(scope="session")
def bundle(spacy_dir, tensors, tokenizer_file) -> Path:
    return write_bundle(spacy_dir / "bundle", tensors, tokenizer_file, random_heads(0), name="tiny")


@pytest.fixture(scope="session")
def pth(spacy_dir, tensors) -> Path:
    path = spacy_dir / "tiny.pth"
    save_pth(tensors, path)
    return path


@pytest.fixture(scope="session")
def engine(bundle) -> LoadedModel:
    return load_source(bundle)


def make_nlp(model, **config) -> spacy.Language:
    nlp = spacy.blank("en")
    nlp.add_pipe("rwkv", config={"model": str(model), **config})
    return nlp


@pytest.fixture(scope="module")
def nlp(bundle):
    return make_nlp(bundle, zero_shot=ZERO_SHOT)


_ids = itertools.count()


def fresh_id() -> str:
    return f"s{next(_ids)}"


def stream_docs(nlp, parts, sid) -> list[Doc]:
    docs = []
    for part in parts:
        doc = nlp.make_doc(part)
        doc._.stream_id = sid
        docs.append(doc)
    return docs


def outputs(doc: Doc, attr: str = "tag_") -> dict:
    tags = [t._.get(attr[2:]) if attr.startswith("_.") else getattr(t, attr) for t in doc]
    return {"tags": tags, "cats": dict(doc.cats), "vector": doc._.rwkv_vector, "ents": [
        (e.start, e.end, e.label_) for e in doc.ents]}


def cats_close(a: dict, b: dict, tol: float = 1e-5) -> bool:
    return a.keys() == b.keys() and all(abs(a[k] - b[k]) <= tol for k in a)


def model_token_spans(raw_tokenizer, text: str) -> list[tuple[int, int]]:
    """Character spans of the whole-text model tokens, from the tokenizers library itself."""
    return list(raw_tokenizer.encode(text, add_special_tokens=False).offsets)


def reading_token(spans, start: int, end: int, rule: str = "first") -> int:
    """Model token a spaCy token [start, end) reads: the last token containing its last character
    (a split character belongs to several tokens), or the first containing its first."""
    if rule == "last":
        return max(i for i, (s, e) in enumerate(spans) if s <= end - 1 < e)
    return min(i for i, (s, e) in enumerate(spans) if s <= start < e)


# ------------------------------------------------------------------------------------------ registration
def test_factory_is_an_entry_point_and_registered():
    eps = importlib.metadata.entry_points(group="spacy_factories")
    assert eps["rwkv"].value == "rwkv_stream.components.spacy_component:make_rwkv_component"
    assert spacy.Language.has_factory("rwkv")
    for name in ("bundle_loader", "checkpoint_loader", "shipped_loader"):
        assert spacy.registry.misc.get(f"rwkv_stream.{name}.v1")


def test_spacy_package_picks_up_the_dependency(bundle):
    from spacy.cli.package import get_third_party_dependencies

    deps = get_third_party_dependencies(make_nlp(bundle).config)
    assert any(d.startswith("rwkv-stream") for d in deps)


def test_default_config_is_lazy_and_points_at_the_shipped_model():
    nlp = spacy.blank("en")
    rwkv = nlp.add_pipe("rwkv")
    cfg = nlp.config["components"]["rwkv"]
    assert cfg["model"] == "shipped:transcript-tagger"
    assert cfg["stream_id_attr"] == "stream_id" and cfg["tag_attr"] == "tag_" and cfg["max_streams"] == 1024
    assert set(cfg["generation"]) == {"max_new_tokens", "temperature", "top_p", "stop", "seed"}
    assert not rwkv.is_loaded  # nothing is read until initialize or first use
    shipped = Path(rwkv_stream.__file__).parent / "data" / "transcript-tagger"
    if (shipped / "bundle.json").exists():
        assert isinstance(nlp("hello there").cats, dict)
    else:
        with pytest.raises(CheckpointError, match="shipped model 'transcript-tagger' is not installed"):
            nlp("hello there")


CONFIGS = [p for p in sorted((Path(__file__).parent.parent / "configs").glob("*.cfg"))
           if "RWKVListener" not in p.read_text()]  # listener pipelines need training data: test_spacy_training.py


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_configs_load_and_run(path, bundle, pth, tokenizer_file, heads_dir):
    overrides = {
        "paths.rwkv_model": str(bundle),
        "paths.rwkv_checkpoint": str(pth),
        "paths.rwkv_tokenizer": str(tokenizer_file),
        "paths.rwkv_heads": str(heads_dir),
    }
    text = spacy.util.load_config(path).to_str()
    present = {k: v for k, v in overrides.items() if f"\n{k.split('.')[1]} =" in text}
    config = spacy.util.load_config(path, overrides=present)
    nlp = spacy.util.load_model_from_config(config)  # complete configs: no auto-fill needed
    nlp.initialize()
    rwkv = nlp.get_pipe("rwkv")
    assert rwkv.is_loaded
    attr = rwkv.settings.stream_id_attr
    docs = [nlp.make_doc(t) for t in ("Alice called at 10:30, ", "okay?! she said", "goodbye")]
    for doc in docs[:2]:
        doc._.set(attr, "call-1")
    done = list(nlp.pipe(docs))
    assert rwkv.streams == ["call-1"]
    for doc in done:
        assert doc.cats
        if rwkv.settings.tag_attr and rwkv.settings.tag_attr.startswith("_."):
            assert all(t._.get(rwkv.settings.tag_attr[2:]) in TAG_LABELS for t in doc)
        elif rwkv.settings.tag_attr:
            assert all(t.tag_ in TAG_LABELS for t in doc)
    if rwkv.settings.zero_shot:
        assert set(done[0].cats) == {"complaint", "question", "praise"}
        assert isinstance(done[0]._.rwkv_generate(4), str)


def test_model_sources_bundle_checkpoint_hf(bundle, pth, tokenizer_file, heads_dir, spacy_dir, tensors, tiny_config):
    text = "so we'll meet on Monday"
    expected = outputs(make_nlp(bundle)(text))
    # a .pth with the bundle's heads, named by a registered loader resolved at initialize
    nlp = make_nlp("unused")
    heads = spacy_dir / "bundle"  # the bundle folder holds heads.json + heads.safetensors
    loader = spacy.registry.misc.get("rwkv_stream.checkpoint_loader.v1")(str(pth), str(tokenizer_file), str(heads))
    nlp.get_pipe("rwkv").initialize(model=loader)
    assert outputs(nlp(text)) == expected
    # an HF directory with its tokenizer.json inside, plus other heads
    hf = save_hf(tensors, tiny_config, spacy_dir / "hf")
    (hf / "tokenizer.json").write_bytes(tokenizer_file.read_bytes())
    other = make_nlp(hf, heads_path=str(heads_dir))
    assert other(text).cats.keys() == set(TOPICS)
    assert other(text).cats != expected["cats"]  # the heads come from heads_path (other weights)


# ------------------------------------------------------------------------------------------ streams
def test_fragments_continue_one_state_and_anonymous_docs_stand_alone(nlp):
    text = "Alice and Bob vote on the weather report"
    whole = outputs(nlp(text))
    assert outputs(nlp(text)) == whole  # a Doc without stream id carries nothing over
    sid = fresh_id()
    a, b = nlp.pipe(stream_docs(nlp, ["Alice and Bob vote ", "on the weather report"], sid))
    assert [t.tag_ for t in a] + [t.tag_ for t in b] == whole["tags"]
    assert cats_close(b.cats, whole["cats"])
    assert (a._.rwkv_offset, b._.rwkv_offset) == (0, len("Alice and Bob vote "))
    # the same text again continues the stream (different state), unlike the anonymous Doc
    (again,) = nlp.pipe(stream_docs(nlp, [text], sid))
    assert not cats_close(again.cats, whole["cats"])
    nlp.get_pipe("rwkv").end_stream(sid)


TEXT_PARTS = st.lists(
    st.tuples(st.sampled_from(WORDS), st.sampled_from([" ", " ", " ", ", ", ". ", "\n", "-"])),
    min_size=3,
    max_size=14,
)


def split_text(text: str, cuts: list[int]) -> list[str]:
    bounds = [0, *sorted(set(cuts)), len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


def check_equivalence(nlp, raw_spans, text: str, cuts: list[int], rule: str = "first") -> int:
    """Fragments of one stream vs the whole text: same tags for spaCy tokens whose span and whose reading
    model token (whole-text tokenization) are not cut by a split point, same final cats. Returns the number
    of tokens compared."""
    cuts = sorted({c for c in cuts if 0 < c < len(text)})
    whole = nlp(text)
    sid = fresh_id()
    docs = list(nlp.pipe(stream_docs(nlp, split_text(text, cuts), sid), batch_size=3))
    split_tags = {}
    for doc in docs:
        for t in doc:
            start = doc._.rwkv_offset + t.idx
            split_tags[(start, start + len(t.text))] = t.tag_
    compared = 0
    for t in whole:
        span = (t.idx, t.idx + len(t.text))
        model = raw_spans[reading_token(raw_spans, *span, rule=rule)]
        if any(span[0] < c < span[1] or model[0] < c < model[1] for c in cuts) or span not in split_tags:
            continue
        assert split_tags[span] == t.tag_, (text, cuts, span)
        compared += 1
    assert cats_close(docs[-1].cats, whole.cats), (text, cuts)
    assert [d._.rwkv_offset for d in docs] == [0, *cuts]
    nlp.get_pipe("rwkv").end_stream(sid)
    return compared


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=TEXT_PARTS, data=st.data())
def test_incremental_equivalence_random_splits(nlp, raw_tokenizer, parts, data):
    text = "".join(w + s for w, s in parts).rstrip()
    cuts = data.draw(st.lists(st.integers(1, max(1, len(text) - 1)), max_size=6))
    compared = check_equivalence(nlp, model_token_spans(raw_tokenizer, text), text, cuts)
    assert compared >= len(nlp.make_doc(text)) - 3 * len(set(cuts))  # each cut excludes a few tokens at most


def test_incremental_equivalence_every_single_split_point(nlp, raw_tokenizer):
    text = "so we'll meet Alice at 10:30, okay?! don't be late"
    spans = model_token_spans(raw_tokenizer, text)
    n_tokens = len(nlp.make_doc(text))
    for cut in range(1, len(text)):
        assert check_equivalence(nlp, spans, text, [cut]) >= n_tokens - 3


def test_incremental_equivalence_last_character_rule(bundle, raw_tokenizer):
    nlp = make_nlp(bundle, tag_alignment="last")
    text = "don't meet Zyxwvut at 10:30 okay?! résumé"
    spans = model_token_spans(raw_tokenizer, text)
    for cuts in ([5], [3, 17], [9, 20, 31], list(range(2, len(text), 4))):
        check_equivalence(nlp, spans, text, cuts, rule="last")


@pytest.fixture(scope="module")
def world_bundle(spacy_dir):
    try:
        find_world_vocab()
    except FileNotFoundError:
        pytest.skip("no package ships the RWKV World vocabulary")
    config = ModelConfig(n_layer=2, n_embd=N_EMBD, vocab_size=65536, ffn_dim=64)
    return write_bundle(spacy_dir / "world", random_tensors(config, seed=3), "world", random_heads(2))


def test_incremental_equivalence_world_tokenizer_bytes(world_bundle):
    """World tokens can end inside a UTF-8 character (🙂 is two tokens); held-back text is kept as bytes."""
    nlp = make_nlp(world_bundle)
    tok = nlp.get_pipe("rwkv")._ensure_loaded().tokenizer
    text = "Alice🙂 met Bob 🦜 — 日本語 café, okay?! résumé 10:30"
    pieces = [tok.id_to_token_bytes(i) for i in tok.encode(text)]
    assert any(not _utf8_ok(p) for p in pieces)  # the case this test is about
    byte_spans = list(itertools.pairwise([0, *itertools.accumulate(len(p) for p in pieces)]))
    offsets = [len(text[:i].encode()) for i in range(len(text) + 1)]
    spans = [(_char_at(offsets, a), _char_at(offsets, b - 1) + 1) for a, b in byte_spans]
    for cuts in ([6], [7], [3, 8, 19], list(range(1, len(text), 3)), list(range(1, len(text)))):
        check_equivalence(nlp, spans, text, cuts)


def _utf8_ok(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _char_at(offsets: list[int], byte: int) -> int:
    return max(i for i, o in enumerate(offsets[:-1]) if o <= byte)


def test_pipe_interleaved_streams_keeps_order_and_batches_streams(bundle, monkeypatch):
    streams = {
        "a": ["Alice and ", "Bob vote on", " the weather"],
        "b": ["so we'll ", "meet on Monday"],
        "c": ["don't be late", ", okay?!", " hmm...", " goal!"],
    }
    interleaved = [("a", 0), ("b", 0), ("a", 1), ("c", 0), ("c", 1), ("a", 2), ("c", 2), ("b", 1), ("c", 3)]
    reference = {}
    for sid, parts in streams.items():  # each stream alone, one Doc at a time
        solo = make_nlp(bundle)
        reference[sid] = [outputs(solo(d)) for d in stream_docs(solo, parts, sid)]
    nlp = make_nlp(bundle)
    sessions = nlp.get_pipe("rwkv").sessions
    steps = []
    real_round = sessions._round

    def spy(batch, *args, **kw):
        steps.append([key for key, _ in batch])
        return real_round(batch, *args, **kw)

    monkeypatch.setattr(sessions, "_round", spy)
    docs = []
    for sid, i in interleaved:
        docs.extend(stream_docs(nlp, [streams[sid][i]], sid))
    texts_in = [d.text for d in docs]
    done = list(nlp.pipe(docs, batch_size=5))
    assert [d.text for d in done] == texts_in
    for (sid, i), doc in zip(interleaved, done, strict=True):
        got, want = outputs(doc), reference[sid][i]
        assert got["tags"] == want["tags"] and cats_close(got["cats"], want["cats"])
    # batch 1 = a0 b0 a1 c0 c1 -> rounds {a, b, c} then {a, c}; batch 2 = a2 c2 b1 c3 -> {a, c, b} then {c}
    assert steps == [["a", "b", "c"], ["a", "c"], ["a", "c", "b"], ["c"]]


def test_n_process_is_refused(nlp):
    texts = ["Alice and Bob", "so we'll meet", "okay?!", "goal"]
    with pytest.raises(ValueError, match="n_process > 1.* would split a stream's fragments between processes"):
        list(nlp.pipe(texts, n_process=2, batch_size=1))


# ------------------------------------------------------------------------------------------ outputs
def expected_tags(engine, raw_tokenizer, nlp, text: str, rule: str) -> tuple[list[str], list[tuple[int, int]]]:
    ids = raw_tokenizer.encode(text, add_special_tokens=False).ids
    hidden, _ = engine.model.forward_hidden(ids)
    head = engine.heads["entities"]
    tag_ids = head(hidden).argmax(-1).tolist()
    spans = model_token_spans(raw_tokenizer, text)
    doc = nlp.make_doc(text)
    return [head.labels[tag_ids[reading_token(spans, t.idx, t.idx + len(t.text), rule)]] for t in doc], spans


@pytest.mark.parametrize("rule", ["last", "first"])
def test_tags_aligned_from_model_tokens(bundle, engine, raw_tokenizer, rule):
    text = "don't wait, Zyxwvut said at 10:30 okay?!"
    nlp = make_nlp(bundle, tag_alignment=rule)
    want, spans = expected_tags(engine, raw_tokenizer, nlp, text, rule)
    doc = nlp(text)
    assert [t.tag_ for t in doc] == want
    spacy_spans = [(t.idx, t.idx + len(t.text)) for t in doc]
    # both directions occur: a spaCy token over several model tokens ("Zyxwvut", "10:30") ...
    assert any(sum(s < e2 and e > s2 for s, e in spans) > 1 for s2, e2 in spacy_spans)
    # ... and a model token over several spaCy tokens ("don" of do|n't, "?!" of ?|!)
    assert any(sum(s2 < e and e2 > s for s2, e2 in spacy_spans) > 1 for s, e in spans)


def test_tags_to_extension_and_bio_to_ents(bundle):
    from rwkv_stream.components.spacy_align import bio_spans

    nlp = make_nlp(bundle, tag_attr="_.bio", ents_from_tags=True)
    text = " ".join(WORDS)
    doc = nlp(text)
    tags = [t._.bio for t in doc]
    assert set(tags) <= set(TAG_LABELS) and len(set(tags)) > 2
    assert [(e.start, e.end, e.label_) for e in doc.ents] == bio_spans(tags)
    assert doc.ents and all(t.tag_ == "" for t in doc)
    no_attr = make_nlp(bundle, tag_attr=None, ents_from_tags=True)(text)
    assert [(e.start, e.end) for e in no_attr.ents] == [(e.start, e.end) for e in doc.ents]


def test_cats_from_classifier_head_over_stream_so_far(bundle, engine, raw_tokenizer):
    nlp = make_nlp(bundle)
    text = "Alice and Bob vote on the weather"
    doc = nlp(text)
    hidden, _ = engine.model.forward_hidden(raw_tokenizer.encode(text).ids)
    probs = engine.heads["topic"].probabilities(hidden[-1:])[0].tolist()
    assert cats_close(doc.cats, dict(zip(TOPICS, probs, strict=True)), 1e-6)


def test_zero_shot_scores_prompts_on_a_fork(bundle, engine, raw_tokenizer):
    nlp = make_nlp(bundle, zero_shot=ZERO_SHOT, cats_head=None)
    rwkv = nlp.get_pipe("rwkv")
    text = "so we'll meet on Monday"
    sid = fresh_id()
    (doc,) = nlp.pipe(stream_docs(nlp, [text], sid))
    assert set(doc.cats) == set(ZERO_SHOT)
    ids = raw_tokenizer.encode(text).ids
    logits, state = engine.model.forward(ids)
    scores = {}
    for label, prompt in ZERO_SHOT.items():
        p = raw_tokenizer.encode(prompt).ids
        more, _ = engine.model.forward(p, state)
        rows = torch.cat([logits[-1:], more[:-1]]).log_softmax(-1)
        scores[label] = rows.gather(1, torch.tensor(p)[:, None]).mean()
    want = torch.softmax(torch.stack(list(scores.values())).double(), 0).tolist()
    assert cats_close(doc.cats, dict(zip(ZERO_SHOT, want, strict=True)), 1e-5)
    # the prompts ran on forks: the stream holds exactly the text's final tokens
    exported = State.from_bytes(rwkv.export_stream(sid))
    plain = make_nlp(bundle, cats_head=None)
    list(plain.pipe(stream_docs(plain, [text], sid)))
    other = State.from_bytes(plain.get_pipe("rwkv").export_stream(sid))
    assert exported.n_tokens == other.n_tokens < len(ids)  # the last word is still held back
    assert torch.allclose(exported.tensor, other.tensor, atol=1e-6)


def test_prompts_are_encoded_as_continuations(engine):
    from rwkv_stream.tokenizer import encode_continuation

    tok = engine.tokenizer
    assert tok.decode(tok.encode("vote")) == " vote"  # this tokenizer adds a prefix space at a text's start
    assert tok.decode(encode_continuation(tok, "vote")) == "vote"  # a prompt continues the stream as written


def test_a_docs_outputs_do_not_depend_on_its_batch_mates(bundle):
    """Steps run batch-invariant: tags, cats (head and zero-shot) and vectors are bit-identical alone or batched."""
    nlp = make_nlp(bundle, zero_shot=ZERO_SHOT)
    others = ["the quick brown fox jumps over it", "Alice and Bob vote on the weather today"]

    def outputs(doc):
        return [t.tag_ for t in doc], doc.cats, doc._.rwkv_vector

    for text in ("ok", "so we'll meet on Monday"):  # a one-token doc takes other kernels when alone
        alone = outputs(nlp(text))
        for batch in ([text, *others], [*others, text]):
            docs = list(nlp.pipe(batch, batch_size=len(batch)))
            assert outputs(docs[batch.index(text)]) == alone, (text, batch)


def test_vector_extension_is_mean_hidden_of_the_doc(bundle, engine, raw_tokenizer):
    nlp = make_nlp(bundle)
    text = "the quick brown fox"
    hidden, _ = engine.model.forward_hidden(raw_tokenizer.encode(text).ids)
    vector = nlp(text)._.rwkv_vector
    assert isinstance(vector, list) and len(vector) == N_EMBD
    assert torch.allclose(torch.tensor(vector), hidden.mean(0), atol=1e-6)
    assert make_nlp(bundle, vector=False)(text)._.rwkv_vector is None


def test_generation_forks_without_advancing_the_stream(nlp, engine, raw_tokenizer):
    rwkv = nlp.get_pipe("rwkv")
    sid = fresh_id()
    text = "so we'll meet on Mon"
    (doc,) = nlp.pipe(stream_docs(nlp, [text], sid))
    before = rwkv.export_stream(sid)
    first = doc._.rwkv_generate(12, seed=3, temperature=1.0)
    assert first == doc._.rwkv_generate(12, seed=3, temperature=1.0)  # seeded
    assert rwkv.export_stream(sid) == before  # not advanced
    # the same as continuing the whole text (re-read from scratch here, only for the check)
    assert first == nlp(text)._.rwkv_generate(12, seed=3, temperature=1.0)
    # greedy decoding equals a manual greedy loop
    greedy = doc._.rwkv_generate(6, temperature=0.0)
    logits, state = engine.model.forward(raw_tokenizer.encode(text).ids)
    out = []
    for _ in range(6):
        out.append(int(logits[-1].argmax()))
        logits, state = engine.model.forward(out[-1:], state)
    assert greedy == engine.tokenizer.decode_bytes(out).decode("utf-8", "replace")
    # top_p keeps the smallest set of tokens reaching p: a tiny p is greedy whatever the temperature
    assert doc._.rwkv_generate(6, temperature=1.5, top_p=1e-9, seed=9) == greedy
    # stop strings cut the text before the first occurrence
    long = doc._.rwkv_generate(24, seed=5, temperature=1.0)
    stop = long[len(long) // 2 : len(long) // 2 + 2]
    if stop:
        cut = doc._.rwkv_generate(24, seed=5, temperature=1.0, stop=[stop])
        assert cut == long[: long.find(stop)]
    # the next fragment is unaffected by the generations
    (nxt,) = nlp.pipe(stream_docs(nlp, ["day"], sid))
    whole = nlp(text + "day")
    assert cats_close(nxt.cats, whole.cats)
    with pytest.raises(TypeError, match="unknown generation settings"):
        doc._.rwkv_generate(3, beams=4)
    rwkv.end_stream(sid)
    with pytest.raises(KeyError, match="not live"):
        doc._.rwkv_generate(3)


def test_extension_values_survive_docbin_and_doc_bytes(nlp):
    sid = fresh_id()
    docs = list(nlp.pipe(stream_docs(nlp, ["Alice met Bob ", "at 10:30"], sid)))
    docs.append(nlp("anonymous text"))
    docbin = DocBin(store_user_data=True, docs=docs)
    restored = list(DocBin(store_user_data=True).from_bytes(docbin.to_bytes()).get_docs(nlp.vocab))
    for doc in docs:
        again = Doc(nlp.vocab).from_bytes(doc.to_bytes())
        restored.append(again)
    for doc, back in zip(docs + docs, restored, strict=True):
        got = outputs(back)
        assert list(got.pop("vector")) == doc._.rwkv_vector  # msgpack hands lists back as tuples
        want = outputs(doc)
        del want["vector"]
        assert got == want
        assert back._.stream_id == doc._.stream_id and back._.rwkv_offset == doc._.rwkv_offset
    nlp.get_pipe("rwkv").end_stream(sid)


# ------------------------------------------------------------------------------------------ lifecycle
def test_reset_and_end_stream(bundle):
    nlp = make_nlp(bundle)
    rwkv = nlp.get_pipe("rwkv")
    list(nlp.pipe(stream_docs(nlp, ["Alice and Bob vote"], "x")))
    pool = rwkv.sessions.pool
    assert rwkv.streams == ["x"] and pool.live == 1
    assert rwkv.reset_stream("x")
    (doc,) = nlp.pipe(stream_docs(nlp, ["the weather"], "x"))
    alone = nlp("the weather")
    assert [t.tag_ for t in doc] == [t.tag_ for t in alone] and cats_close(doc.cats, alone.cats)
    assert rwkv.end_stream("x") and not rwkv.end_stream("x") and not rwkv.reset_stream("x")
    assert rwkv.streams == [] and pool.live == 0


@pytest.mark.parametrize("on_disk", [False, True])
def test_lru_eviction_to_the_store_and_back_is_transparent(bundle, tmp_path, on_disk):
    nlp = make_nlp(bundle, max_streams=2, state_dir=str(tmp_path / "states") if on_disk else None)
    rwkv = nlp.get_pipe("rwkv")
    list(nlp.pipe(stream_docs(nlp, ["Alice and Bo"], "a") + stream_docs(nlp, ["so we"], "b")))
    list(nlp.pipe(stream_docs(nlp, ["don't"], "c")))
    assert rwkv.streams == ["b", "c"] and rwkv.sessions.evictions == 1
    if on_disk:
        assert len(list((tmp_path / "states").glob("*.session"))) == 1
    (doc,) = nlp.pipe(stream_docs(nlp, ["b vote"], "a"))  # "a" comes back from the store, "b" goes
    assert rwkv.streams == ["c", "a"] and rwkv.sessions.evictions == 2
    solo = make_nlp(bundle)
    want = [outputs(d) for d in solo.pipe(stream_docs(solo, ["Alice and Bo", "b vote"], "a"))][-1]
    got = outputs(doc)
    assert got["tags"] == want["tags"] and got["cats"] == want["cats"] and got["vector"] == want["vector"]


def test_memory_zone_ends_the_streams_it_opened(bundle):
    nlp = make_nlp(bundle)
    rwkv = nlp.get_pipe("rwkv")
    list(nlp.pipe(stream_docs(nlp, ["before the zone"], "old")))
    with nlp.memory_zone():
        list(nlp.pipe(stream_docs(nlp, ["inside", " zone"], "new") + stream_docs(nlp, [" more"], "old")))
        assert set(rwkv.streams) == {"old", "new"}
    assert rwkv.streams == ["old"]
    assert rwkv.sessions.pool.live == 1


def test_export_import_mid_word_into_a_fresh_pipeline(bundle):
    text = "Alice and Bob vote on the weather"
    nlp = make_nlp(bundle, zero_shot=ZERO_SHOT)
    list(nlp.pipe(stream_docs(nlp, ["Alice and B"], "t")))
    data = nlp.get_pipe("rwkv").export_streams()
    meta = State.from_bytes(data["t"]).meta
    assert meta["format"] == "rwkv-stream/session" and meta["chars_in"] == len("Alice and B")
    fresh = make_nlp(bundle, zero_shot=ZERO_SHOT)
    fresh.get_pipe("rwkv").import_streams(data)
    (doc,) = fresh.pipe(stream_docs(fresh, ["ob vote on the weather"], "t"))
    whole = fresh(text)
    assert doc._.rwkv_offset == len("Alice and B")
    assert [t.tag_ for t in doc][1:] == [t.tag_ for t in whole][3:]
    assert cats_close(doc.cats, whole.cats)
    alien = State(exported_tensor(data["t"]), 3, "0123456789abcdef").to_bytes()
    with pytest.raises(ValueError, match="expected model"):
        fresh.get_pipe("rwkv").import_stream("u", alien)


def exported_tensor(data: bytes) -> torch.Tensor:
    return State.from_bytes(data).tensor


# ------------------------------------------------------------------------------------------ serialization
PROBE = """
import json, sys, spacy, torch
from pathlib import Path
torch.set_num_threads(1)

def probe(nlp):
    out = []
    for texts, sid in ((["Alice and B", "ob vote on ", "the weather"], "s"), (["don't be late"], None)):
        docs = [nlp.make_doc(t) for t in texts]
        for d in docs:
            d._.stream_id = sid
        for d in nlp.pipe(docs):
            out.append({"tags": [t.tag_ for t in d], "cats": d.cats, "vector": d._.rwkv_vector,
                        "gen": d._.rwkv_generate(5, seed=1)})
    return out

from_disk = spacy.load(sys.argv[1])
assert from_disk.get_pipe("rwkv").streams == []  # live states are not part of the pipeline files
from_bytes = spacy.blank("en")
from_bytes.add_pipe("rwkv", config={"model": "/does/not/exist", "zero_shot": json.loads(sys.argv[3])})
from_bytes.get_pipe("rwkv").from_bytes(Path(sys.argv[2]).read_bytes())
print(json.dumps([probe(from_disk), probe(from_bytes)]))
"""


def probe_outputs(nlp) -> list[dict]:
    out = []
    for texts, sid in ((["Alice and B", "ob vote on ", "the weather"], "s"), (["don't be late"], None)):
        for d in nlp.pipe(stream_docs(nlp, texts, sid)):
            out.append({"tags": [t.tag_ for t in d], "cats": d.cats, "vector": d._.rwkv_vector,
                        "gen": d._.rwkv_generate(5, seed=1)})
    return json.loads(json.dumps(out))


def run_probe(*args: str) -> list[list[dict]]:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(PROBE), *args], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_to_disk_and_to_bytes_reproduce_outputs_in_a_fresh_process(bundle, tmp_path, pth, tokenizer_file):
    nlp = spacy.blank("en")
    nlp.add_pipe("rwkv", config={"model": str(pth), "tokenizer": str(tokenizer_file),
                                 "heads_path": str(bundle), "zero_shot": ZERO_SHOT})
    nlp.initialize()
    expected = probe_outputs(make_nlp(bundle, zero_shot=ZERO_SHOT))
    assert probe_outputs(nlp) == expected  # leaves a live stream "s" behind, which is not saved
    nlp.to_disk(tmp_path / "pipeline")
    saved = tmp_path / "pipeline" / "rwkv"
    assert {"bundle.json", "model.safetensors", "tokenizer.json", "heads.json", "heads.safetensors",
            "rwkv_component.json"} <= {p.name for p in saved.iterdir()}
    record = json.loads((saved / "rwkv_component.json").read_text())
    assert record["tag_labels"] == TAG_LABELS and record["cats_labels"] == TOPICS + list(ZERO_SHOT)
    (tmp_path / "component.bin").write_bytes(nlp.get_pipe("rwkv").to_bytes())
    assert run_probe(str(tmp_path / "pipeline"), str(tmp_path / "component.bin"), json.dumps(ZERO_SHOT)) == [
        expected, expected]


def test_bytes_round_trip_in_process(nlp, bundle):
    again = make_nlp("/does/not/exist", zero_shot=ZERO_SHOT)
    again.get_pipe("rwkv").from_bytes(nlp.get_pipe("rwkv").to_bytes())
    assert probe_outputs(again) == probe_outputs(make_nlp(bundle, zero_shot=ZERO_SHOT))
    with pytest.raises(ValueError, match="not a serialized rwkv component"):
        again.get_pipe("rwkv").from_bytes(b"\x80")


# ------------------------------------------------------------------------------------------ scoring
def test_score_tags_cats_and_ents(bundle):
    nlp = make_nlp(bundle, ents_from_tags=True, zero_shot={"yes": " yes", "no": " no"})
    texts = ["Alice and Bob vote on the weather", "so we'll meet on Monday at 10:30", "don't be late, okay?!"]
    examples = []
    for doc in nlp.pipe(texts):
        ref = Doc(nlp.vocab, words=[t.text for t in doc], spaces=[bool(t.whitespace_) for t in doc])
        for t, r in zip(doc, ref, strict=True):
            r.tag_ = t.tag_
        ref.set_ents([ref.char_span(e.start_char, e.end_char, label=e.label_) for e in doc.ents])
        best = max(doc.cats, key=doc.cats.get)
        ref.cats = {label: float(label == best) for label in doc.cats}
        examples.append(Example(nlp.make_doc(doc.text), ref))
    scores = nlp.evaluate(examples)
    assert scores["tag_acc"] == 1.0
    assert scores["ents_f"] == 1.0 or not any(ex.reference.ents for ex in examples)
    assert "cats_score" in scores and "cats_micro_f" in scores


# ------------------------------------------------------------------------------------------ errors
def test_error_unknown_head(bundle):
    with pytest.raises(ValueError, match=r"unknown head 'nope' for tag_head; the model has heads \['entities'"):
        make_nlp(bundle, tag_head="nope")("hi")
    with pytest.raises(ValueError, match="head 'topic' is a classifier, but tag_head needs a tagger"):
        make_nlp(bundle, tag_head="topic")("hi")


def test_error_ambiguous_auto_head(bundle, spacy_dir):
    heads = spacy_dir / "two_taggers"
    HeadSet({"a": Head("tagger", ["X"], N_EMBD), "b": Head("tagger", ["Y"], N_EMBD)}).save(heads)
    with pytest.raises(ValueError, match="several tagger heads"):
        make_nlp(bundle, heads_path=str(heads))("hi")


def test_error_missing_checkpoint(tmp_path, pth):
    with pytest.raises(CheckpointError, match="RWKV model not found: .*missing.pth"):
        make_nlp(tmp_path / "missing.pth")("hi")
    with pytest.raises(CheckpointError, match="bare checkpoint: set `tokenizer`"):
        make_nlp(pth)("hi")
    with pytest.raises(CheckpointError, match="shipped model 'nope' is not installed"):
        make_nlp("shipped:nope").initialize()
    loader = spacy.registry.misc.get("rwkv_stream.shipped_loader.v1")("nope")
    with pytest.raises(CheckpointError, match="shipped model 'nope' is not installed"):
        make_nlp("unused").get_pipe("rwkv").initialize(model=loader)
    with pytest.raises(CheckpointError, match="no saved rwkv component"):
        make_nlp("unused").get_pipe("rwkv").from_disk(tmp_path)


def test_error_tag_labels_mismatch(bundle):
    with pytest.raises(ValueError, match=r"tag_labels \['O', 'B-PER'\] do not match head 'entities'"):
        make_nlp(bundle, tag_labels=["O", "B-PER"])("hi")
    make_nlp(bundle, tag_labels=TAG_LABELS, cats_labels=TOPICS)("hi")  # matching labels are fine
    with pytest.raises(ValueError, match="cats_labels are set but the component has no classifier head"):
        make_nlp(bundle, cats_head=None, cats_labels=["x"])("hi")


def test_error_stream_id_of_wrong_type(nlp):
    doc = nlp.make_doc("hello")
    doc._.stream_id = 1.5
    with pytest.raises(TypeError, match=r"doc\._\.stream_id must be a str or an int .* got float: 1\.5"):
        nlp(doc)
    doc._.stream_id = 7  # ints are fine
    nlp(doc)
    nlp.get_pipe("rwkv").end_stream(7)


def test_device_and_weight_dtype_settings(bundle, tmp_path):
    nlp = make_nlp(bundle, dtype="bfloat16", device="cpu")
    doc = nlp("Alice and Bob vote on the weather")
    runner = nlp.get_pipe("rwkv")._ensure_loaded()
    assert runner.model.dtype == torch.bfloat16 and runner.model.device.type == "cpu"
    assert all(t.tag_ in TAG_LABELS for t in doc) and set(doc.cats) == set(TOPICS)
    nlp.get_pipe("rwkv").to_disk(tmp_path / "saved")  # the checkpoint's own fp32 tensors are saved
    assert outputs(make_nlp(tmp_path / "saved")(doc.text)) == outputs(make_nlp(bundle)(doc.text))
    with pytest.raises(ValueError, match="dtype must be one of"):
        make_nlp(bundle, dtype="int4")


def test_error_bad_settings(bundle):
    with pytest.raises(ValueError, match="tag_alignment must be one of"):
        make_nlp(bundle, tag_alignment="middle")
    with pytest.raises(ValueError, match="unknown generation settings"):
        make_nlp(bundle, generation={"beams": 3})
    with pytest.raises(ValueError, match="is not a Token attribute"):
        make_nlp(bundle, tag_attr="nonsense")
    assert isinstance(make_nlp(bundle).get_pipe("rwkv"), RWKVComponent)


# ------------------------------------------------------------------------------------------ pipe, any shape
PIPE_WORDS = " ".join(CORPUS).split(" ")


@st.composite
def pipe_workloads(draw):
    """Up to 20 streams of random text (non-ASCII included) cut into Docs anywhere, interleaved at random
    (each stream's Docs in order), with random max_streams and batch_size."""
    n = draw(st.integers(1, 20))
    streams = {}
    for i in range(n):
        text = " ".join(draw(st.lists(st.sampled_from(PIPE_WORDS), min_size=1, max_size=10)))
        cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(text) - 1)), max_size=4))))
        streams[f"p{i}"] = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True) if b > a]
    order = draw(st.permutations([k for k, parts in streams.items() for _ in parts]))
    return streams, order, draw(st.integers(1, 25)), draw(st.integers(1, 40))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(work=pipe_workloads())
def test_pipe_any_interleaving_max_streams_and_batch_size_equals_each_stream_alone(bundle, work):
    """The bug of issue 13: past max_streams, nlp.pipe evicted streams with Docs pending and tags changed."""
    streams, order, max_streams, batch_size = work
    solo = make_nlp(bundle, zero_shot=ZERO_SHOT)
    want = {sid: [outputs(d) for d in solo.pipe(stream_docs(solo, parts, sid), batch_size=1)]
            for sid, parts in streams.items()}
    whole = {sid: solo("".join(parts)) for sid, parts in streams.items()}
    nlp = make_nlp(bundle, zero_shot=ZERO_SHOT, max_streams=max_streams)
    pos = dict.fromkeys(streams, 0)
    docs = []
    for sid in order:
        docs += stream_docs(nlp, [streams[sid][pos[sid]]], sid)
        pos[sid] += 1
    got: dict[str, list] = {sid: [] for sid in streams}
    for doc in nlp.pipe(docs, batch_size=batch_size):
        got[doc._.stream_id].append(outputs(doc))
    assert got == want
    for sid in streams:  # the stream's final cats equal its whole text as one Doc
        assert cats_close(got[sid][-1]["cats"], dict(whole[sid].cats), tol=1e-6)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(work=pipe_workloads(), cut=st.floats(0, 1))
def test_export_at_any_point_and_import_into_a_fresh_pipeline_changes_nothing(bundle, work, cut):
    """The bug of issue 13: the old export re-pushed held-back text, so a restored stream could tokenize its next
    Doc differently. Now the tokenizer's carry travels as it is."""
    streams, order, max_streams, batch_size = work
    docs_of = {sid: list(parts) for sid, parts in streams.items()}

    def run(nlp, sids):
        return [outputs(d) for d in nlp.pipe([stream_docs(nlp, [docs_of[s].pop(0)], s)[0] for s in sids],
                                             batch_size=batch_size)]

    want = run(make_nlp(bundle, zero_shot=ZERO_SHOT, max_streams=max_streams), order)
    docs_of = {sid: list(parts) for sid, parts in streams.items()}
    at = int(cut * len(order))
    first = make_nlp(bundle, zero_shot=ZERO_SHOT, max_streams=max_streams)
    got = run(first, order[:at])
    exported = {sid: first.get_pipe("rwkv").export_stream(sid) for sid in set(order[:at])}
    fresh = make_nlp(bundle, zero_shot=ZERO_SHOT, max_streams=max_streams)
    fresh.get_pipe("rwkv").import_streams(exported)
    got += run(fresh, order[at:])
    assert got == want
