"""The spaCy component and the Kafka engine run an RWKV-7 bundle unchanged (issue 15): heads, zero-shot,
generation, export/import and eviction, each stream equal to itself fed alone."""

from __future__ import annotations

import random

import pytest
import spacy
import torch
from kafka_harness import WORDS
from rwkv_stream.components.kafka.engine import StepItem, StreamEngine
from rwkv_stream.components.kafka.schema import GenerationRequest

from rwkv_stream.bundle import write_bundle
from rwkv_stream.heads import Head, HeadSet
from rwkv_stream.loading import load_source
from rwkv_stream.random_checkpoint import random_tensors, rwkv7_config
from rwkv_stream.sessions import MemoryStore
from rwkv_stream.tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ZERO_SHOT = {"greeting": " hello there", "number": " 42"}


@pytest.fixture(scope="module")
def bundle7(tmp_path_factory):
    tok = load_tokenizer("world")
    cfg = rwkv7_config(2, 64, tok.vocab_size, rank_w=8, rank_a=8, rank_v=4, rank_g=16)
    torch.manual_seed(9)
    heads = HeadSet({"tags": Head("tagger", ["O", "CAP", "PUNCT"], 64),
                     "topic": Head("classifier", ["a", "b", "c"], 64, hidden_dim=8)})
    return write_bundle(tmp_path_factory.mktemp("rwkv7") / "bundle", random_tensors(cfg, seed=31), "world", heads,
                        name="tiny-rwkv7")


def streams_of(seed: int, n: int = 6) -> dict[str, list[str]]:
    rng = random.Random(seed)
    out = {}
    for i in range(n):
        text = " ".join(rng.choice(list(WORDS[:40]) + ["café", "10:30", "🙂"]) for _ in range(rng.randint(3, 14)))
        cuts = sorted(rng.sample(range(1, len(text)), min(3, len(text) - 1)))
        out[f"s{i}"] = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    return out


def make_nlp(bundle, **config) -> spacy.Language:
    nlp = spacy.blank("en")
    nlp.add_pipe("rwkv", config={"model": str(bundle), "zero_shot": ZERO_SHOT, **config})
    return nlp


def docs_for(nlp, sid: str, parts: list[str]) -> list:
    docs = []
    for part in parts:
        doc = nlp.make_doc(part)
        doc._.stream_id = sid
        docs.append(doc)
    return docs


def outputs(doc) -> tuple:
    return [t.tag_ for t in doc], dict(doc.cats), doc._.rwkv_vector


def test_spacy_component_runs_rwkv7_streams_past_max_streams(bundle7):
    streams = streams_of(1)
    solo = make_nlp(bundle7)
    want = {sid: [outputs(d) for d in solo.pipe(docs_for(solo, sid, parts))] for sid, parts in streams.items()}
    nlp = make_nlp(bundle7, max_streams=2)
    docs = [d for i in range(4) for sid, parts in streams.items() if i < len(parts)
            for d in docs_for(nlp, sid, [parts[i]])]
    got: dict[str, list] = {}
    for doc in nlp.pipe(docs, batch_size=5):
        got.setdefault(doc._.stream_id, []).append(outputs(doc))
    assert got == want
    rwkv = nlp.get_pipe("rwkv")
    assert rwkv.sessions.evictions > 0 and set(rwkv.cats_labels) == {"a", "b", "c", *ZERO_SHOT}
    assert isinstance(rwkv.generate(docs[-1], max_new_tokens=4, seed=1), str)


def test_spacy_export_import_of_an_rwkv7_stream(bundle7):
    parts = ["so we will meet on mon", "day at 10:30 café", " okay"]
    whole = make_nlp(bundle7)
    want = [outputs(d) for d in whole.pipe(docs_for(whole, "x", parts))]
    first = make_nlp(bundle7)
    got = [outputs(d) for d in first.pipe(docs_for(first, "x", parts[:1]))]
    data = first.get_pipe("rwkv").export_stream("x")
    fresh = make_nlp(bundle7)
    fresh.get_pipe("rwkv").import_stream("x", data)
    got += [outputs(d) for d in fresh.pipe(docs_for(fresh, "x", parts[1:]))]
    assert got == want


def test_kafka_engine_runs_rwkv7_batched_equal_alone(bundle7):
    loaded = load_source(bundle7)
    streams = streams_of(2)
    alone = {}
    for sid, parts in streams.items():
        engine = StreamEngine(loaded)
        alone[sid] = [engine.step([StepItem((0, sid), p, i == len(parts) - 1, i)])[0]
                      for i, p in enumerate(parts)]
    engine = StreamEngine(loaded, max_streams=2, store=MemoryStore())
    items = [StepItem((0, sid), parts[i], i == len(parts) - 1, i) for i in range(4)
             for sid, parts in streams.items() if i < len(parts)]
    got: dict[str, list] = {}
    for item, res in zip(items, engine.step(items), strict=True):
        got.setdefault(item.key[1], []).append(res)
    for sid in streams:
        assert [[t.to_dict() for t in r.tokens] for r in got[sid]] == [[t.to_dict() for t in r.tokens]
                                                                        for r in alone[sid]]
        assert [r.cats for r in got[sid]] == [r.cats for r in alone[sid]]
    request = GenerationRequest(max_tokens=4, temperature=0.7)
    again = StreamEngine(loaded)
    again.step([StepItem((0, "g"), "hello there ", False, 1)])
    text = again.step([StepItem((0, "g"), "", False, 2, request)])[0].generated
    assert isinstance(text, str) and text
