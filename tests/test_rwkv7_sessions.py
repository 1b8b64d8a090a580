"""The session layer runs an RWKV-7 model unchanged: interleaved fragments of many streams, evicted to a
MemoryStore past max_streams, give each stream the bits it gets fed alone; export/restore continues exactly."""

from __future__ import annotations

import random
from collections.abc import Hashable

import pytest
import torch
from kafka_harness import WORDS

from rwkv_stream.heads import Head
from rwkv_stream.models import Rwkv7Model
from rwkv_stream.random_checkpoint import random_tensors, rwkv7_config
from rwkv_stream.sessions import Fragment, FragmentResult, MemoryStore, SessionTable
from rwkv_stream.state import StateError
from rwkv_stream.tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")
EXTRA = ["café", "naïve", "🙂", "10:30", "日本語", "—", "\n"]


@pytest.fixture(scope="module")
def setup():
    tok = load_tokenizer("world")
    cfg = rwkv7_config(2, 64, tok.vocab_size, rank_w=8, rank_a=8, rank_v=4, rank_g=16)
    model = Rwkv7Model(random_tensors(cfg, seed=21), cfg)
    torch.manual_seed(4)
    heads = {"tags": Head("tagger", ["O", "A", "B"], 64), "kind": Head("classifier", ["x", "y"], 64, hidden_dim=8)}
    return model, tok, heads


def table(setup, **kw) -> SessionTable:
    model, tok, heads = setup
    return SessionTable(model, tok, heads=heads, **kw)


def workload(seed: int) -> tuple[dict[str, str], list[Fragment]]:
    rng = random.Random(seed)
    streams = {f"s{i}": " ".join(rng.choice(list(WORDS[:40]) + EXTRA) for _ in range(rng.randrange(1, 30)))
               for i in range(7)}
    queues = {}
    for k, text in streams.items():
        data: str | bytes = text.encode("utf-8") if rng.random() < 0.5 else text  # bytes: mid-UTF-8 cuts too
        cuts = sorted(rng.sample(range(len(data) + 1), min(len(data), rng.randrange(0, 7))))
        queues[k] = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    order = [k for k, q in queues.items() for _ in q]
    rng.shuffle(order)
    pos = dict.fromkeys(queues, 0)
    frags = []
    for k in order:
        frags.append(Fragment(k, queues[k][pos[k]], end=pos[k] == len(queues[k]) - 1))
        pos[k] += 1
    return streams, frags


def per_stream(results: list[FragmentResult]) -> dict[Hashable, dict]:
    got: dict[Hashable, dict] = {}
    for r in results:
        s = got.setdefault(r.key, {"ids": [], "tags": [], "cats": None})
        s["ids"] += r.token_ids
        s["tags"] += r.tags.get("tags", [])[: len(r.tokens)]
        s["cats"] = r.cats
    return got


@pytest.mark.parametrize("seed,max_streams,calls", [(1, 2, 3), (2, 3, 4), (3, 1, 5), (4, 7, 1)])
def test_interleaved_streams_with_eviction_equal_each_stream_alone(setup, seed, max_streams, calls):
    streams, frags = workload(seed)
    alone = table(setup)
    want = per_stream([alone.feed([Fragment(k, t, end=True)])[0] for k, t in streams.items()])
    store = MemoryStore()
    t = table(setup, max_streams=max_streams, store=store)
    size = -(-len(frags) // calls)
    results = []
    for at in range(0, len(frags), size):
        results += t.feed(frags[at : at + size])
    got = per_stream(results)
    assert got.keys() == want.keys()
    for k in want:  # bit for bit: ids, tagger labels and the classifier's exact floats
        assert got[k] == want[k], k
    assert t.evictions > 0 or max_streams >= len(streams)
    assert len(t) == 0 and t.pool.live == 0


def test_export_and_restore_continue_exactly(setup):
    model, tok, heads = setup
    text = "so the meeting is on Monday at 10:30, café naïve 🙂 and then we vote"
    pieces = [text[:17], text[17:40], text[40:51], text[51:]]
    ref = table(setup)
    want = ref.feed([Fragment("s", p, end=i == 3) for i, p in enumerate(pieces)])
    first = table(setup)
    first.feed([Fragment("s", pieces[0])])
    data = first.export("s")
    assert first.state_nbytes == model.state_bytes  # one slot: L * (2C + H*N*N) fp32
    second = table(setup)
    second.restore("s", data)
    got = second.feed([Fragment("s", p, end=i == 2) for i, p in enumerate(pieces[1:])])
    assert [(r.token_ids, r.tags, r.cats) for r in got] == [(r.token_ids, r.tags, r.cats) for r in want[1:]]


def test_a_session_of_an_rwkv4_model_is_refused(setup, tiny_bundle_dir):
    from rwkv_stream.loading import load_source

    bundle = load_source(tiny_bundle_dir)
    other = SessionTable(bundle.model, bundle.tokenizer)
    other.feed([Fragment("a", "hello there")])
    with pytest.raises(StateError, match="expected model"):
        table(setup).restore("a", other.export("a"))
