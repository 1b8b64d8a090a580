"""The processor's ``restored`` output field and interim hypotheses (``is_final: false``), engine side.

Properties, for any fragmentation (inside words and tokens too) and any eviction: the restored texts of a stream's
outputs joined are the restored text of the stream fed whole; interims never change a stream (a final after any
sequence of interims gives, bit for bit, what it gives alone, and leaves the same session bytes)."""

from __future__ import annotations

import random

import pytest
from kafka_harness import WORDS
from rwkv_stream.components.kafka.engine import StepItem, StreamEngine
from rwkv_stream.components.kafka.schema import BadInput, encode_input, parse_input

from rwkv_stream.loading import LoadedModel, load_source
from rwkv_stream.restore import TokenRestorer
from rwkv_stream.sessions import MemoryStore

SEED = 20261203
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shipped() -> LoadedModel:
    return load_source("shipped:transcript-tagger")


def _split(rng: random.Random, text: str, n: int) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), n - 1))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


def _text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words)) + " \n"


def _outputs(results) -> list:
    return [([t.to_dict() for t in r.tokens], r.cats, r.restored, r.final, r.skipped) for r in results]


def test_token_restorer_puts_marks_after_words_and_carries_over_calls():
    tokens = [("well", "O-Cap"), (" i", "COMMA-UPPER"), (" think", "O-lower"), (" so", "O-lower"),
              (" nasa", "PERIOD-UPPER"), (" agrees", "O-lower"), ("\n", "QUESTION-lower")]
    whole = TokenRestorer().feed(tokens, end=True)
    assert whole == "Well, I think so. NASA agrees?\n"
    for seed in range(50):  # any split of the token list, the state through its dict form
        rng, state, parts, i = random.Random(seed), None, [], 0
        while i < len(tokens):
            n = rng.randint(1, 3)
            restorer = TokenRestorer.from_state(state)
            parts.append(restorer.feed(tokens[i:i + n], end=i + n >= len(tokens)))
            state, i = restorer.state(), i + n
        assert "".join(parts) == whole
    assert TokenRestorer().feed([("hi", "nonsense"), (" there", None)]) == "hi there"


@pytest.mark.parametrize("max_streams", [64, 1])
def test_restored_texts_of_a_stream_join_to_the_whole(shipped, max_streams):
    rng = random.Random(SEED + max_streams)
    texts = {f"s{i}": _text(rng, 24) for i in range(3)}
    whole = {name: StreamEngine(shipped).step([StepItem((0, name), text, True, 0)])[0].restored
             for name, text in texts.items()}
    def bare(t: str) -> list[str]:
        return t.lower().translate(str.maketrans("", "", ",.?")).split()

    for name, text in texts.items():  # the words intact, in order; only marks and case added
        assert bare(whole[name]) == bare(text)
    engine = StreamEngine(shipped, max_streams=max_streams, store=MemoryStore())
    pieces = {name: _split(rng, text, 9) for name, text in texts.items()}
    got: dict[str, list[str]] = {name: [] for name in texts}
    for r in range(9):  # the three streams interleaved, one fragment each per step
        items = [StepItem((0, name), frags[r], r == 8, r) for name, frags in pieces.items()]
        for item, res in zip(items, engine.step(items), strict=True):
            got[item.key[1]].append(res.restored)
    assert {name: "".join(parts) for name, parts in got.items()} == whole


def test_no_restored_text_without_a_transcript_tagger(tiny_bundle_dir):
    engine = StreamEngine(load_source(tiny_bundle_dir))
    assert engine.restore_head is None
    assert engine.step([StepItem((0, "s"), "hello there ", False, 0)])[0].restored is None


@pytest.mark.parametrize("max_streams", [64, 1])
def test_interims_never_change_the_stream(shipped, max_streams):
    """Finals interleaved with random interim revisions == the finals alone: outputs and session bytes."""
    rng = random.Random(SEED * 7 + max_streams)
    finals = {f"s{i}": _split(rng, _text(rng, 20), 6) for i in range(2)}
    alone = StreamEngine(shipped, max_streams=max_streams, store=MemoryStore())
    with_interims = StreamEngine(shipped, max_streams=max_streams, store=MemoryStore())
    offset = 0
    for r in range(6):
        final_items, mixed = [], []
        for name, frags in finals.items():
            for _ in range(rng.randint(0, 3)):  # hypotheses: prefixes of the final, or other words
                guess = frags[r][: rng.randint(0, len(frags[r]))] if rng.random() < 0.5 else _text(rng, 2)
                mixed.append(StepItem((0, name), guess, False, offset, final=False))
                offset += 1
            item = StepItem((0, name), frags[r], r == 5, offset)
            final_items.append(item)
            mixed.append(item)
            offset += 1
        rng.shuffle(mixed)  # another stream's items may come between; each stream's own order is kept
        mixed.sort(key=lambda i: (i.key, i.offset))
        want = alone.step(final_items)
        got = with_interims.step(mixed)
        interims = [res for item, res in zip(mixed, got, strict=True) if not item.final]
        assert all(not res.final and not res.skipped for res in interims)
        assert _outputs([res for item, res in zip(mixed, got, strict=True) if item.final]) == _outputs(want)
        for name in finals:
            if r < 5:
                assert with_interims.snapshot((0, name)) == alone.snapshot((0, name))


def test_an_interim_covers_the_held_back_tail_and_a_replayed_one_is_skipped(shipped):
    engine = StreamEngine(shipped)
    engine.step([StepItem((0, "s"), "so what do you ", False, 10)])
    before = engine.snapshot((0, "s"))
    list(engine.sessions.dirty())  # a checkpoint saw the stream
    interim = engine.step([StepItem((0, "s"), "think about th", False, 11, final=False)])[0]
    assert not engine.sessions.has_changes()  # an interim writes no snapshot
    text = "".join(t.text for t in interim.tokens)
    assert text.endswith("think about th") and not interim.final
    assert interim.restored is not None and interim.restored.rstrip().lower().endswith("think about th")
    assert engine.snapshot((0, "s")) == before
    engine.step([StepItem((0, "s"), "that ", False, 12)])
    assert engine.step([StepItem((0, "s"), "think ", False, 11, final=False)])[0].skipped


def test_interim_on_a_new_stream_keeps_nothing(shipped):
    engine = StreamEngine(shipped)
    res = engine.step([StepItem((0, "new"), "hello wor", False, 0, final=False)])[0]
    assert "".join(t.text for t in res.tokens).strip() == "hello wor"
    assert len(engine) == 0


def test_is_final_in_the_input_schema():
    limits = {"max_fragment_chars": 1000, "max_generate_tokens": 10}
    assert parse_input(b"k", encode_input("hi", is_final=False), **limits).final is False
    assert parse_input(b"k", encode_input("hi"), **limits).final is True
    for bad in (encode_input("hi", is_final=False, end=True),
                encode_input("hi", is_final=False, generate={"max_tokens": 2}),
                b'{"v": 1, "text": "hi", "is_final": "no"}'):
        with pytest.raises(BadInput) as info:
            parse_input(b"k", bad, **limits)
        assert info.value.reason == "bad_schema"
