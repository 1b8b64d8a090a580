"""Training the ``rwkv`` component inside spaCy: its own heads, and spaCy's built-in components listening to it.

A tiny random RWKV-4 (2 layers, width 32) with a byte-level BPE trained here; the data is the seeded synthetic
transcript corpus of ``rwkv_stream.components.spacy_corpus`` (gold ``token.tag_`` and exclusive cats).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import spacy
import torch
from rwkv_stream.components.spacy_corpus import TOPICS, synthetic_paragraphs, transcript_doc
from rwkv_stream.components.spacy_listener import RWKVListener
from rwkv_stream.components.spacy_training import (
    BatchPass,
    WindowedPass,
    encode_docs,
    length_groups,
    rwkv_from_tensors,
)
from spacy.tokens import Doc, Span, SpanGroup
from spacy.training import Example
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from rwkv_stream import ModelConfig
from rwkv_stream.bundle import write_bundle
from rwkv_stream.heads import Head, HeadSet
from rwkv_stream.random_checkpoint import random_tensors

N_EMBD = 32
LISTENER = {"@architectures": "rwkv_stream.RWKVListener.v1", "width": N_EMBD}
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def paragraphs() -> list[tuple[str, str]]:
    return synthetic_paragraphs(48, seed=5)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, paragraphs) -> Path:
    tmp = tmp_path_factory.mktemp("rwkv_training")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([p.lower() for p, _ in paragraphs], trainer)
    tok.save(str(tmp / "tokenizer.json"))
    config = ModelConfig(n_layer=2, n_embd=N_EMBD, vocab_size=tok.get_vocab_size(), ffn_dim=64)
    torch.manual_seed(0)
    heads = HeadSet({"tagger": Head("tagger", ["O-lower", "O-Cap", "X"], N_EMBD),
                     "classifier": Head("classifier", ["fortune", "other"], N_EMBD)})
    return write_bundle(tmp / "bundle", random_tensors(config, seed=3), tmp / "tokenizer.json", heads, name="tiny")


def examples_for(nlp: spacy.Language, paragraphs) -> list[Example]:
    labels = sorted(TOPICS)
    out = []
    for prose, topic in paragraphs:
        ref = transcript_doc(nlp, prose, topic, labels)
        out.append(Example(nlp.make_doc(ref.text), ref))
    return out


def train(nlp: spacy.Language, examples: list[Example], steps: int, **update) -> list[dict[str, float]]:
    """``steps`` updates on one batch of 8 (the losses must fall as it is learned)."""
    spacy.util.fix_random_seed(0)
    optimizer = nlp.initialize(lambda: examples)
    return [nlp.update(examples[:8], sgd=optimizer, **update) for _ in range(steps)]


def weights(nlp: spacy.Language) -> dict[str, torch.Tensor]:
    rwkv = nlp.get_pipe("rwkv")
    rwkv.sessions  # noqa: B018  (loads the model, and rebuilds the engine from trained weights)
    return {k: v.clone() for k, v in rwkv._loaded.tensors.items()}


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(before[k].float(), after[k].float()) for k in before)


# ------------------------------------------------------------------------------------------ forward
def test_parallel_training_forward_equals_the_streaming_engine(bundle, paragraphs):
    nlp = spacy.blank("en")
    rwkv = nlp.add_pipe("rwkv", config={"model": str(bundle)})
    docs = [nlp(p.lower()) for p, _ in paragraphs[:4]]
    batch = encode_docs(rwkv.sessions.tokenizer, docs, "first")
    net = rwkv_from_tensors(rwkv._loaded.tensors)
    for window in (4096, 7):  # one window, and windows with the state carried between them
        hidden = WindowedPass(net, batch.padded(), window).hidden
        for b, doc in enumerate(docs):
            rows = np.stack([hidden[b, j].numpy() for j in batch.index[b]])
            assert np.abs(rows - doc.tensor).max() < 1e-4
    assert all(doc.tensor.shape == (len(doc), N_EMBD) for doc in docs)
    grouped = BatchPass(net, batch, 7, slack=1.0)  # docs of different lengths run in separate groups
    assert len(grouped.parts) > 1
    for b, ids in enumerate(batch.ids):
        assert torch.allclose(grouped.hidden[b, : len(ids)], hidden[b, : len(ids)], atol=1e-5)


def test_length_groups_bound_the_padding():
    lengths = [3, 50, 4, 48, 5, 200]
    groups = length_groups(lengths, 1.3)
    assert sorted(b for g in groups for b in g) == list(range(6))
    for g in groups:
        assert len(g) * max(lengths[b] for b in g) <= 1.3 * sum(lengths[b] for b in g)


def test_windowed_backward_keeps_one_window_and_gives_gradients(bundle, paragraphs):
    nlp = spacy.blank("en")
    rwkv = nlp.add_pipe("rwkv", config={"model": str(bundle)})
    docs = [nlp.make_doc(p.lower()) for p, _ in paragraphs[:2]]
    batch = encode_docs(rwkv.sessions.tokenizer, docs, "first")
    net = rwkv_from_tensors(rwkv._loaded.tensors)
    run = WindowedPass(net, batch.padded(), 5)
    assert len(run.starts) == -(-batch.max_len // 5) and run.hidden.requires_grad is False
    run.backward(torch.ones_like(run.hidden))
    assert net.blocks[0].att.key.weight.grad is not None and bool(net.blocks[0].att.key.weight.grad.any())


# ------------------------------------------------------------------------------------------ own heads
def test_own_heads_learn_the_data_labels_and_weights_are_fine_tuned(bundle, paragraphs):
    nlp = spacy.blank("en")
    nlp.add_pipe("rwkv", config={"model": str(bundle), "window": 16})
    examples = examples_for(nlp, paragraphs)
    before = weights(nlp)
    history = train(nlp, examples, 12)
    rwkv = nlp.get_pipe("rwkv")
    gold_tags = {t.tag_ for eg in examples for t in eg.reference}
    assert set(rwkv._tagger.labels) == gold_tags
    assert rwkv._classifier.labels == sorted(TOPICS)
    assert rwkv._heads == {"tagger": "tagger", "classifier": "classifier"}
    assert history[-1]["rwkv"] < history[0]["rwkv"]
    assert changed(before, weights(nlp))
    doc = nlp(examples[0].reference.text)
    assert all(t.tag_ in gold_tags for t in doc) and set(doc.cats) == set(TOPICS)
    scores = nlp.evaluate(examples[:10])
    assert 0 <= scores["tag_acc"] <= 1 and "cats_score" in scores


def test_freeze_weights_trains_heads_only(bundle, paragraphs):
    nlp = spacy.blank("en")
    nlp.add_pipe("rwkv", config={"model": str(bundle), "freeze_weights": True})
    examples = examples_for(nlp, paragraphs)
    before = weights(nlp)
    history = train(nlp, examples, 6)
    assert not changed(before, weights(nlp))
    assert history[-1]["rwkv"] < history[0]["rwkv"]


def test_user_named_heads_are_added_beside_the_models_heads(bundle, paragraphs, tmp_path):
    nlp = spacy.blank("en")
    nlp.add_pipe("rwkv", config={"model": str(bundle), "tag_head": "punct_case", "cats_head": "topic"})
    examples = examples_for(nlp, paragraphs)
    train(nlp, examples, 2)
    nlp.to_disk(tmp_path / "pipe")
    heads = HeadSet.load(tmp_path / "pipe" / "rwkv").heads
    assert set(heads) == {"tagger", "classifier", "punct_case", "topic"}
    assert heads["tagger"].labels == ["O-lower", "O-Cap", "X"]  # the model's own heads are untouched
    loaded = spacy.load(tmp_path / "pipe")
    assert loaded.get_pipe("rwkv")._heads == {"tagger": "punct_case", "classifier": "topic"}


def test_head_name_clashes_are_errors(bundle, tmp_path):
    with pytest.raises(ValueError, match="both name head 'x'"):
        spacy.blank("en").add_pipe("rwkv", config={"model": str(bundle), "tag_head": "x", "cats_head": "x"})
    HeadSet({"tagger": Head("tagger", ["A", "B"], N_EMBD)}).save(tmp_path / "heads")
    nlp = spacy.blank("en")
    nlp.add_pipe("rwkv", config={"model": str(bundle), "heads_path": str(tmp_path / "heads")})
    with pytest.raises(ValueError, match=r"heads named \['tagger'\], which the model already has"):
        nlp.initialize()
    nlp = spacy.blank("en")
    nlp.add_pipe("rwkv", config={"model": str(bundle), "tag_head": "classifier", "cats_head": None})
    with pytest.raises(ValueError, match="is a classifier, but tag_head needs a tagger"):
        nlp.initialize()


# ------------------------------------------------------------------------------------------ listeners
def listener_pipeline(bundle: Path, **rwkv) -> spacy.Language:
    nlp = spacy.blank("en")
    nlp.add_pipe("rwkv", config={"model": str(bundle), "tag_head": None, "cats_head": None, **rwkv})
    nlp.add_pipe("tagger", config={"model": {"@architectures": "spacy.Tagger.v2", "tok2vec": LISTENER}})
    reduce = {"@architectures": "spacy.TextCatReduce.v1", "use_reduce_first": False, "use_reduce_last": True,
              "use_reduce_max": False, "use_reduce_mean": True, "tok2vec": LISTENER}
    nlp.add_pipe("textcat", config={"model": {**reduce, "exclusive_classes": True}})
    nlp.add_pipe("textcat_multilabel", config={"model": {**reduce, "exclusive_classes": False}})
    nlp.add_pipe("ner", config={"model": {"@architectures": "spacy.TransitionBasedParser.v2", "state_type": "ner",
                                          "extra_state_tokens": False, "hidden_width": 16, "maxout_pieces": 2,
                                          "use_upper": True, "tok2vec": LISTENER}})
    nlp.add_pipe("spancat", config={"spans_key": "sc", "model": {
        "@architectures": "spacy.SpanCategorizer.v1", "tok2vec": LISTENER,
        "reducer": {"@layers": "spacy.mean_max_reducer.v1", "hidden_size": 16},
        "scorer": {"@layers": "spacy.LinearLogistic.v1"}}})
    return nlp


def rich_examples(nlp: spacy.Language, paragraphs) -> list[Example]:
    """Tags and exclusive cats (textcat_multilabel learns them too), entities and spans: capitalized words
    after the first are names."""
    out = []
    for eg in examples_for(nlp, paragraphs):
        ref = eg.reference
        names = [Span(ref, t.i, t.i + 1, label="NAME") for t in ref if t.tag_.endswith("Cap") and t.i > 0]
        ref.ents = names
        ref.spans["sc"] = SpanGroup(ref, name="sc", spans=list(names))
        out.append(Example(nlp.make_doc(ref.text), ref))
    return out


def test_builtin_components_listen_and_fine_tune_rwkv(bundle, paragraphs):
    nlp = listener_pipeline(bundle, window=16)
    rwkv = nlp.get_pipe("rwkv")
    assert set(rwkv.listening_components) == {"tagger", "textcat", "textcat_multilabel", "ner", "spancat"}
    assert all(isinstance(m, RWKVListener) for m in rwkv.listeners)
    examples = rich_examples(nlp, paragraphs)
    before = weights(nlp)
    history = train(nlp, examples, 10)
    assert changed(before, weights(nlp))
    for name in ("tagger", "textcat", "textcat_multilabel", "ner", "spancat"):  # (ner's first loss is odd)
        assert history[-1][name] < history[1][name], (name, history[1][name], history[-1][name])
    assert history[-1]["rwkv"] > 0  # the listeners' gradients reached rwkv
    doc = nlp(examples[0].reference.text)
    assert doc.tensor.shape == (len(doc), N_EMBD)
    assert all(t.tag_ for t in doc) and doc.cats
    scores = nlp.evaluate(examples[:12])
    for key in ("tag_acc", "cats_score", "ents_f", "spans_sc_f"):
        assert key in scores


def test_frozen_and_annotating_rwkv_feeds_listeners_from_doc_tensor(bundle, paragraphs):
    nlp = listener_pipeline(bundle)
    examples = rich_examples(nlp, paragraphs)
    before = weights(nlp)
    optimizer = nlp.initialize(lambda: examples)
    first = last = None
    for step in range(8):
        losses = nlp.update(examples[step * 4 : step * 4 + 8], sgd=optimizer, exclude=["rwkv"], annotates=["rwkv"])
        first = first or losses
        last = losses
    assert not changed(before, weights(nlp))
    assert "rwkv" not in last and last["tagger"] < first["tagger"]
    nlp2 = listener_pipeline(bundle)
    nlp2.initialize(lambda: examples)
    with pytest.raises(ValueError, match="annotating_components"):
        nlp2.update(examples[:4], exclude=["rwkv"])


def test_listener_width_must_match_the_model(bundle):
    nlp = spacy.blank("en")
    nlp.add_pipe("rwkv", config={"model": str(bundle), "tag_head": None, "cats_head": None})
    nlp.add_pipe("tagger", config={"model": {"@architectures": "spacy.Tagger.v2", "tok2vec": {**LISTENER,
                                                                                             "width": 8}}})
    doc = Doc(nlp.vocab, words=["a", "b"], tags=["X", "Y"])
    with pytest.raises(ValueError, match="has width 8, the RWKV model makes vectors of 32"):
        nlp.initialize(lambda: [Example(nlp.make_doc("a b"), doc)])


def test_trained_listener_pipeline_streams_like_the_whole_text(bundle, paragraphs, tmp_path):
    nlp = listener_pipeline(bundle)
    examples = rich_examples(nlp, paragraphs)
    train(nlp, examples, 3)
    nlp.to_disk(tmp_path / "pipe")
    loaded = spacy.load(tmp_path / "pipe")
    text = examples[1].reference.text
    whole = loaded(text)
    assert [t.tag_ for t in whole] == [t.tag_ for t in nlp(text)]
    cut = text.index(" ", len(text) // 2)
    tags = {}
    for sid_part in (text[:cut], text[cut:]):
        doc = loaded.make_doc(sid_part)
        doc._.stream_id = "s"
        doc = loaded(doc)
        tags.update({(doc._.rwkv_offset + t.idx, len(t)): t.tag_ for t in doc if not t.is_space})
        assert doc.tensor.shape == (len(doc), N_EMBD)
    assert tags == {(t.idx, len(t)): t.tag_ for t in whole}


def test_listener_architecture_is_an_entry_point():
    import importlib.metadata

    eps = importlib.metadata.entry_points(group="spacy_architectures")
    assert eps["rwkv_stream.RWKVListener.v1"].value == "rwkv_stream.components.spacy_listener:rwkv_listener"
    assert spacy.registry.architectures.get("rwkv_stream.RWKVListener.v1")(width=8).get_dim("nO") == 8


def test_listeners_config_trains_and_predicts(bundle, paragraphs):
    path = Path(__file__).resolve().parents[1] / "configs" / "rwkv_listeners.cfg"
    config = spacy.util.load_config(path, overrides={"paths.rwkv_model": str(bundle)})
    nlp = spacy.util.load_model_from_config(config)
    examples = rich_examples(nlp, paragraphs)
    history = train(nlp, examples, 6)
    assert nlp.get_pipe("tagger").model.get_ref("tok2vec").get_dim("nO") == N_EMBD  # width set by rwkv
    assert history[-1]["tagger"] < history[1]["tagger"] and history[-1]["rwkv"] > 0
    doc = nlp(examples[2].reference.text)
    assert all(t.tag_ for t in doc) and set(doc.cats) == set(TOPICS)
    scores = nlp.evaluate(examples[:8])
    assert {"tag_acc", "cats_score", "ents_f"} <= set(scores)


def test_textcat_config_trains_tags_with_rwkv_and_cats_with_a_listening_ensemble(bundle, paragraphs):
    """configs/rwkv_textcat.cfg (the benchmark's pipeline): rwkv's own tag head writes the tags, spaCy's
    textcat (TextCatEnsemble.v2: rwkv listener + bag of words) writes doc.cats, and its gradient reaches the
    RWKV weights."""
    path = Path(__file__).resolve().parents[1] / "configs" / "rwkv_textcat.cfg"
    config = spacy.util.load_config(path, overrides={"paths.rwkv_model": str(bundle),
                                                      "components.rwkv.dtype": "float32"})
    config["training"]["optimizer"]["learn_rate"] = 0.002  # no warmup: train() steps no schedules
    nlp = spacy.util.load_model_from_config(config)
    assert nlp.pipe_names == ["rwkv", "textcat"]
    examples = examples_for(nlp, paragraphs)
    before = weights(nlp)
    history = train(nlp, examples, 6)
    rwkv = nlp.get_pipe("rwkv")
    assert rwkv.cats_labels == [] and rwkv.listening_components == ["textcat"]
    assert nlp.get_pipe("textcat").model.get_ref("tok2vec").get_dim("nO") == N_EMBD
    assert history[-1]["textcat"] < history[1]["textcat"] and history[-1]["rwkv"] > 0
    assert changed(before, weights(nlp))
    doc = nlp(examples[2].reference.text)
    assert all(t.tag_ for t in doc) and set(doc.cats) == set(TOPICS)
    assert abs(sum(doc.cats.values()) - 1.0) < 1e-4
    scores = nlp.evaluate(examples[:8])
    assert {"tag_acc", "cats_score", "cats_macro_f"} <= set(scores)
