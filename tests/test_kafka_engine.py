"""The processor's engine wrapper: batch invariance (bitwise), snapshots that continue exactly, tokenizer state."""

from __future__ import annotations

import random

import pytest
import torch
from kafka_harness import WORDS
from rwkv_stream.components.kafka.engine import StepItem, StreamEngine
from rwkv_stream.components.kafka.schema import GenerationRequest

from rwkv_stream.loading import LoadedModel, load_source
from rwkv_stream.sessions import MemoryStore

SEED = 20261129
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bundle(tiny_bundle_dir) -> LoadedModel:
    return load_source(tiny_bundle_dir)


@pytest.fixture(scope="module", params=["float32", "w8a8"])
def any_format(request, tiny_bundle_dir) -> LoadedModel:
    """The formats the processor is run in (configs/consumer.toml: w8a8, compiled kernels where a compiler is)."""
    return load_source(tiny_bundle_dir, dtype=request.param)


def _fragments(rng: random.Random, n: int) -> list[str]:
    text = " ".join(rng.choice(WORDS) for _ in range(3 * n))
    cuts = sorted(rng.sample(range(1, len(text)), n - 1))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


def _alone(bundle: LoadedModel, streams: dict[str, list[str]]) -> dict[str, list]:
    engine = StreamEngine(bundle, max_streams=4)
    return {name: [engine.step([StepItem((0, name), f, i == len(frags) - 1)])[0] for i, f in enumerate(frags)]
            for name, frags in streams.items()}


def _same(got: list, want: list) -> None:
    assert [[t.to_dict() for t in r.tokens] for r in got] == [[t.to_dict() for t in r.tokens] for r in want]
    assert [r.cats for r in got] == [r.cats for r in want]  # exact floats


@pytest.mark.parametrize("max_streams", [32, 3])
def test_batched_equals_alone_bitwise(any_format, max_streams):
    bundle = any_format
    print("seed", SEED)
    rng = random.Random(SEED)
    streams = {f"s{i}": _fragments(rng, rng.randint(2, 9)) for i in range(12)}
    expected = _alone(bundle, streams)
    engine = StreamEngine(bundle, max_streams=max_streams, store=MemoryStore())
    pos = dict.fromkeys(streams, 0)
    got: dict[str, list] = {s: [] for s in streams}
    while any(pos[s] < len(f) for s, f in streams.items()):
        chosen = [s for s in streams if pos[s] < len(streams[s]) for _ in range(rng.choice([0, 0, 1, 2]))
                  if pos[s] < len(streams[s])]
        items = []
        for s in chosen:
            if pos[s] < len(streams[s]):
                items.append(StepItem((0, s), streams[s][pos[s]], pos[s] == len(streams[s]) - 1))
                pos[s] += 1
        for item, res in zip(items, engine.step(items), strict=True):
            got[item.key[1]].append(res)
    for s in streams:
        _same(got[s], expected[s])
    if max_streams == 3:
        assert engine.sessions.evictions > 0


def test_tokens_cover_the_text_and_flush_at_end(bundle):
    engine = StreamEngine(bundle)
    frags = ["Hello wor", "ld, caf", "é 🙂 and", " so"]
    results = [engine.step([StepItem((0, "a"), f, i == 3)])[0] for i, f in enumerate(frags)]
    tokens = [t for r in results for t in r.tokens]
    assert "".join(t.text for t in tokens) == "".join(frags)
    assert all(t.start <= t.end for t in tokens) and tokens[-1].end == len("".join(frags))
    assert results[-1].held_back == 0 and results[0].held_back > 0
    ids = [t.id for t in tokens]
    assert ids == bundle.tokenizer.encode("".join(frags))
    assert all(set(t.tags) == {"tags"} for t in tokens) and set(results[-1].cats) == {"intent"}
    assert (0, "a") not in engine


def test_end_and_reopen_in_one_step_starts_a_fresh_stream(bundle):
    """The crash loop of issue 14: a stream ends and a new one opens under the same key in one batch."""
    engine = StreamEngine(bundle, store=MemoryStore())
    items = [StepItem((0, "k"), "first call ", False, 10), StepItem((0, "k"), "ends here", True, 11),
             StepItem((0, "k"), "second call", False, 12), StepItem((0, "k"), " goes on", True, 13)]
    got = engine.step(items)
    fresh = StreamEngine(bundle)
    want = fresh.step(items[:2]) + StreamEngine(bundle).step(items[2:])
    _same(got, want)
    again = engine.step(items)  # a replay after a crash: every offset is covered, nothing is applied twice
    assert all(r.skipped for r in again)


def test_replayed_offsets_are_skipped(bundle):
    engine = StreamEngine(bundle)
    first = engine.step([StepItem((0, "s"), "hello there ", False, 5)])[0]
    replay = engine.step([StepItem((0, "s"), "hello there ", False, 5), StepItem((0, "s"), "friend", False, 6)])
    assert not first.skipped and replay[0].skipped and not replay[1].skipped
    assert replay[0].tokens == [] and replay[1].n_tokens >= 0


def test_snapshot_restore_continues_exactly(bundle):
    rng = random.Random(SEED + 1)
    frags = _fragments(rng, 10)
    expected = _alone(bundle, {"s": frags})["s"]
    first = StreamEngine(bundle)
    got = [first.step([StepItem((3, "s"), f, False, 37 + i)])[0] for i, f in enumerate(frags[:5])]
    data = first.snapshot((3, "s"))
    second = StreamEngine(bundle)
    second.load((3, "s"), data)
    assert second.sessions.position((3, "s")) == 41
    got += [second.step([StepItem((3, "s"), f, i == 4)])[0] for i, f in enumerate(frags[5:])]
    _same(got, expected)


def test_generation_is_deterministic_and_does_not_advance(bundle):
    request = GenerationRequest(max_tokens=6, temperature=0.9, top_p=0.9)
    texts, states = [], []
    for _ in range(2):  # a replay in another process: the same seed from the stream and offset
        engine = StreamEngine(bundle)
        engine.step([StepItem((0, "g"), "thank you very much for ", False, 16)])
        before = engine.sessions.pool.read(engine.sessions._session((0, "g")).slot).tensor.clone()
        texts.append(engine.step([StepItem((0, "g"), "", False, 17, request)])[0].generated)
        after = engine.sessions.pool.read(engine.sessions._session((0, "g")).slot).tensor
        assert torch.equal(before, after)
        states.append(engine.sessions.n_tokens((0, "g")))
    assert texts[0] and texts[0] == texts[1] and states[0] == states[1]


def test_unknown_heads_are_refused_by_name(bundle):
    with pytest.raises(ValueError, match="unknown heads \\['nope'\\]"):
        StreamEngine(bundle, heads=["nope"])
