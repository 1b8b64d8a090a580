"""The processor's engine wrapper: batch invariance (bitwise), snapshots that continue exactly, tokenizer state."""

from __future__ import annotations

import random

import pytest
import torch
from kafka_harness import WORDS
from rwkv_stream.components.kafka.engine import StepItem, StreamEngine, restore_encoder
from rwkv_stream.components.kafka.schema import GenerationRequest

from rwkv_stream.bundle import Bundle
from rwkv_stream.tokenizer import StreamingEncoder

SEED = 20261129
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bundle(tiny_bundle_dir) -> Bundle:
    return Bundle.load(tiny_bundle_dir)


def _fragments(rng: random.Random, n: int) -> list[str]:
    text = " ".join(rng.choice(WORDS) for _ in range(3 * n))
    cuts = sorted(rng.sample(range(1, len(text)), n - 1))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


def _alone(bundle: Bundle, streams: dict[str, list[str]]) -> dict[str, list]:
    engine = StreamEngine(bundle, max_streams=4)
    out = {}
    for name, frags in streams.items():
        engine.open((0, name))
        out[name] = [engine.step([StepItem((0, name), f, i == len(frags) - 1)])[0] for i, f in enumerate(frags)]
        engine.drop((0, name))
    return out


def test_batched_equals_alone_bitwise(bundle):
    print("seed", SEED)
    rng = random.Random(SEED)
    streams = {f"s{i}": _fragments(rng, rng.randint(2, 9)) for i in range(12)}
    expected = _alone(bundle, streams)
    engine = StreamEngine(bundle, max_streams=32)
    pos = dict.fromkeys(streams, 0)
    got: dict[str, list] = {s: [] for s in streams}
    while any(pos[s] < len(f) for s, f in streams.items()):
        chosen = [s for s in streams if pos[s] < len(streams[s]) and rng.random() < 0.6]
        for s in chosen:
            if (0, s) not in engine:
                engine.open((0, s))
        items = [StepItem((0, s), streams[s][pos[s]], pos[s] == len(streams[s]) - 1) for s in chosen]
        for s, res in zip(chosen, engine.step(items), strict=True):
            got[s].append(res)
            pos[s] += 1
    for s in streams:
        assert [[t.to_dict() for t in r.tokens] for r in got[s]] == [[t.to_dict() for t in r.tokens]
                                                                      for r in expected[s]]
        assert [r.cats for r in got[s]] == [r.cats for r in expected[s]]  # exact floats


def test_tokens_cover_the_text_and_flush_at_end(bundle):
    engine = StreamEngine(bundle)
    engine.open((0, "a"))
    frags = ["Hello wor", "ld, caf", "é 🙂 and", " so"]
    results = [engine.step([StepItem((0, "a"), f, i == 3)])[0] for i, f in enumerate(frags)]
    tokens = [t for r in results for t in r.tokens]
    assert "".join(t.text for t in tokens) == "".join(frags)
    assert all(t.start <= t.end for t in tokens) and tokens[-1].end == len("".join(frags))
    assert results[-1].held_back == 0 and results[0].held_back > 0
    ids = [t.id for t in tokens]
    assert ids == bundle.tokenizer.encode("".join(frags))
    assert all(set(t.tags) == {"tags"} for t in tokens) and set(results[-1].cats) == {"intent"}


def test_snapshot_restore_continues_exactly(bundle):
    rng = random.Random(SEED + 1)
    frags = _fragments(rng, 10)
    expected = _alone(bundle, {"s": frags})["s"]
    first = StreamEngine(bundle)
    first.open((3, "s"))
    got = [first.step([StepItem((3, "s"), f)])[0] for f in frags[:5]]
    first.ctx((3, "s")).applied = 41
    data = first.snapshot((3, "s"))
    second = StreamEngine(bundle)
    second.load((3, "s"), data)
    assert second.ctx((3, "s")).applied == 41
    got += [second.step([StepItem((3, "s"), f, i == 4)])[0] for i, f in enumerate(frags[5:])]
    assert [[t.to_dict() for t in r.tokens] for r in got] == [[t.to_dict() for t in r.tokens] for r in expected]
    assert [r.cats for r in got] == [r.cats for r in expected]


def test_encoder_state_round_trip(bundle):
    enc = StreamingEncoder(bundle.tokenizer)
    ids = enc.push("well you kno")
    copy = restore_encoder(bundle.tokenizer, enc.export_state())
    assert copy.held_back == enc.held_back > 0
    assert ids + copy.push("w the order") + copy.flush() == bundle.tokenizer.encode("well you know the order")


def test_generation_is_deterministic_and_does_not_advance(bundle):
    engine = StreamEngine(bundle)
    engine.open((0, "g"))
    engine.step([StepItem((0, "g"), "thank you very much for ")])
    before = engine.table.state((0, "g")).tensor.clone()
    request = GenerationRequest(max_tokens=6, temperature=0.9, top_p=0.9)
    text = engine.generate((0, "g"), request, offset=17)
    assert text == engine.generate((0, "g"), request, offset=17)
    assert torch.equal(before, engine.table.state((0, "g")).tensor)


def test_lru_victims_protect_the_batch(bundle):
    engine = StreamEngine(bundle, max_streams=3)
    for name in "abc":
        engine.open((0, name))
    engine.step([StepItem((0, "a"), "x")])
    assert engine.lru_victims(2, {(0, "b")}) == [(0, "c"), (0, "a")]
    with pytest.raises(ValueError):
        engine.lru_victims(3, {(0, "a"), (0, "b"), (0, "c")})
