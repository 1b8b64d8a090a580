"""The session layer (rwkv_stream/sessions.py): any fragmentation, interleaving, max_streams and batch size gives
each stream exactly its own results; eviction, export and restore (in another process too) change nothing."""

from __future__ import annotations

import multiprocessing
import random
from collections.abc import Hashable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kafka_harness import WORDS

from rwkv_stream.config import ModelConfig
from rwkv_stream.generate import SamplingConfig
from rwkv_stream.heads import Head
from rwkv_stream.loading import LoadedModel, load_source
from rwkv_stream.model import Model
from rwkv_stream.random_checkpoint import random_tensors
from rwkv_stream.sessions import (
    DirectoryStore,
    DiscardStore,
    Ended,
    Fragment,
    FragmentResult,
    MemoryStore,
    SessionTable,
)
from rwkv_stream.state import State, StateError
from rwkv_stream.tokenizer import StreamingEncoder, load_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")
EXTRA = ["café", "naïve", "🙂", "10:30", "e-mail", "日本語", "—", "'re", "Ünïcödé", "\n"]
PROBES = {"weather": " the weather", "vote": " a vote"}


@pytest.fixture(scope="module")
def bpe(tiny_bundle_dir) -> LoadedModel:
    return load_source(tiny_bundle_dir)


@pytest.fixture(scope="module")
def world() -> tuple[Model, object, dict[str, Head]]:
    """A random model over the RWKV World tokenizer (byte-level, bytes held back)."""
    tok = load_tokenizer("world")
    cfg = ModelConfig(n_layer=2, n_embd=32, vocab_size=tok.vocab_size, ffn_dim=64)
    torch.manual_seed(3)
    heads = {"tags": Head("tagger", ["O", "A", "B"], 32), "kind": Head("classifier", ["x", "y"], 32, hidden_dim=8)}
    return Model(random_tensors(cfg, seed=3), cfg), tok, heads


def table_for(which: str, bpe: LoadedModel, world: tuple, **kw) -> SessionTable:
    if which == "bpe":
        return SessionTable(bpe.model, bpe.tokenizer, heads=dict(bpe.heads.heads), probes=PROBES, **kw)
    model, tok, heads = world
    return SessionTable(model, tok, heads=heads, probes=PROBES, **kw)


# ------------------------------------------------------------------------------------------ strategies
texts = st.lists(st.sampled_from(list(WORDS[:40]) + EXTRA), min_size=0, max_size=14).map(" ".join)


@st.composite
def fragmentation(draw: st.DrawFn, text: str) -> list[str | bytes]:
    """Cuts anywhere: as str between characters, or as bytes anywhere (mid-UTF-8 character too)."""
    as_bytes = draw(st.booleans())
    data: str | bytes = text.encode("utf-8") if as_bytes else text
    n = draw(st.integers(0, min(6, len(data))))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), min_size=n, max_size=n)))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    return pieces or [data]


@st.composite
def workloads(draw: st.DrawFn) -> tuple[dict[str, str], list[Fragment], list[int], int]:
    """Up to 20 streams, each cut into fragments and ended; a random interleaving that keeps each stream's
    order; the calls it is fed in (batch sizes); max_streams."""
    n = draw(st.integers(1, 20))
    streams = {f"s{i}": draw(texts) for i in range(n)}
    queues = {k: draw(fragmentation(t)) for k, t in streams.items()}
    order = draw(st.permutations([k for k, q in queues.items() for _ in q]))
    pos = dict.fromkeys(queues, 0)
    frags = []
    for k in order:
        frags.append(Fragment(k, queues[k][pos[k]], end=pos[k] == len(queues[k]) - 1))
        pos[k] += 1
    sizes, left = [], len(frags)
    while left:
        sizes.append(draw(st.integers(1, left)))
        left -= sizes[-1]
    return streams, frags, sizes, draw(st.integers(1, 25))


# ------------------------------------------------------------------------------------------ helpers
def feed_in_calls(table: SessionTable, frags: list[Fragment], sizes: list[int], **kw) -> list[FragmentResult]:
    out, at = [], 0
    for size in sizes:
        out += table.feed(frags[at : at + size], **kw)
        at += size
    return out


def per_stream(results: list[FragmentResult]) -> dict[Hashable, dict]:
    """What a stream produced over all its fragments, and its outputs after the last one."""
    got: dict[Hashable, dict] = {}
    for r in results:
        s = got.setdefault(r.key, {"ids": [], "texts": [], "tags": {}, "last": None})
        s["ids"] += r.token_ids
        s["texts"] += [(t.text, t.start, t.end) for t in r.tokens]
        for name, labels in r.tags.items():
            s["tags"].setdefault(name, []).extend(labels[: len(r.tokens)])
        s["last"] = r
    return got


def alone(table_factory, streams: dict[str, str]) -> dict[Hashable, dict]:
    table = table_factory()
    return per_stream([table.feed([Fragment(k, t, end=True)])[0] for k, t in streams.items()])


def assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        g, w = got[k], want[k]
        assert g["ids"] == w["ids"], k
        assert g["texts"] == w["texts"], k
        assert g["tags"] == w["tags"], k
        assert g["last"].cats == w["last"].cats, k  # exact floats: batch-invariant steps and heads


# ------------------------------------------------------------------------------------------ properties
@pytest.mark.parametrize("which", ["bpe", "world"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(work=workloads())
def test_any_interleaving_equals_each_stream_alone_in_one_piece(which, bpe, world, work):
    streams, frags, sizes, max_streams = work
    want = alone(lambda: table_for(which, bpe, world), streams)
    table = table_for(which, bpe, world, max_streams=max_streams, store=MemoryStore())
    got = per_stream(feed_in_calls(table, frags, sizes))
    assert_same(got, want)
    for k, t in streams.items():
        assert "".join(x[0] for x in got[k]["texts"]) == t
    assert len(table) == 0 and table.pool.live == 0  # every stream ended, every fork freed


@pytest.mark.parametrize("which", ["bpe", "world"])
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(work=workloads(), cut=st.floats(0, 1))
def test_export_and_restore_anywhere_changes_nothing(which, bpe, world, work, cut):
    """Provisional results (tails on forks, probes) too; the export goes through a brand-new table."""
    streams, frags, sizes, max_streams = work
    reference = feed_in_calls(table_for(which, bpe, world, max_streams=max_streams, store=MemoryStore()),
                              frags, [len(frags)], provisional=True)
    at = int(cut * len(frags))
    first = table_for(which, bpe, world, max_streams=max_streams, store=MemoryStore())
    results = first.feed(frags[:at], provisional=True)
    live = {f.key for f in frags[:at]} - {f.key for f in frags[:at] if f.end}
    exported = {k: first.export(k) for k in live}
    second = table_for(which, bpe, world, max_streams=max_streams, store=MemoryStore())
    for k, data in exported.items():
        second.restore(k, data)
    results += second.feed(frags[at:], provisional=True)
    for r, w in zip(results, reference, strict=True):
        assert (r.key, r.token_ids, r.tail_ids, r.tags, r.cats, r.probes, r.carry, r.text_start) == \
               (w.key, w.token_ids, w.tail_ids, w.tags, w.cats, w.probes, w.carry, w.text_start)


def test_eviction_through_a_directory_store_is_transparent(bpe, tmp_path):
    rng = random.Random(5)
    streams = {f"k{i}": " ".join(rng.choice(WORDS) for _ in range(9)) for i in range(7)}
    frags = [Fragment(k, t[i : i + 7], end=i + 7 >= len(t)) for i in range(0, 80, 7) for k, t in streams.items()
             if i < len(t)]
    store = DirectoryStore(tmp_path / "sessions")
    table = SessionTable(bpe.model, bpe.tokenizer, heads=dict(bpe.heads.heads), max_streams=2, store=store)
    got = per_stream(table.feed(frags[:20]) + table.feed(frags[20:]))
    assert table.evictions > 0
    assert_same(got, alone(lambda: SessionTable(bpe.model, bpe.tokenizer, heads=dict(bpe.heads.heads)), streams))
    assert list((tmp_path / "sessions").glob("*.session")) == []  # every stream ended: nothing left


def test_without_a_store_evicted_streams_wait_in_memory_and_discard_store_forgets_them(bpe):
    """Default store: a stream evicted while its tokenizer holds back text (a word cut mid-way) loses nothing."""
    frags = [Fragment("a", "f"), Fragment("b", "hello"), Fragment("a", "or"), Fragment("b", " x", end=True),
             Fragment("a", " you", end=True)]
    table = SessionTable(bpe.model, bpe.tokenizer, heads=dict(bpe.heads.heads), max_streams=1)
    got = per_stream([r for f in frags for r in table.feed([f])])
    assert table.evictions >= 3
    assert_same(got, alone(lambda: SessionTable(bpe.model, bpe.tokenizer, heads=dict(bpe.heads.heads)),
                           {"a": "for you", "b": "hello x"}))
    forgetful = SessionTable(bpe.model, bpe.tokenizer, max_streams=1, store=DiscardStore())
    lost = per_stream([r for f in frags for r in forgetful.feed([f])])
    assert bpe.tokenizer.decode(lost["b"]["ids"]).strip() == "x"  # "hello" was held back when b was evicted


def test_a_call_with_more_streams_than_fit_runs_in_waves_without_evicting_pending_work(bpe, monkeypatch):
    table = SessionTable(bpe.model, bpe.tokenizer, max_streams=2, store=MemoryStore())
    rounds: list[list] = []
    real = table._round
    monkeypatch.setattr(table, "_round", lambda batch, *a: (rounds.append([k for k, _ in batch]), real(batch, *a)))
    table.feed([Fragment(k, f"{k} says hi ") for k in "abcde" for _ in range(2)])
    assert rounds == [["a", "b"], ["a", "b"], ["c", "d"], ["c", "d"], ["e"], ["e"]]
    assert table.keys() == ["d", "e"] and table.evictions == 3


def test_replayed_positions_are_skipped_and_ended_streams_remember_them(bpe):
    store = MemoryStore()
    table = SessionTable(bpe.model, bpe.tokenizer, store=store)
    first = table.feed([Fragment("k", "hello there ", position=3), Fragment("k", "friend", end=True, position=4)])
    assert [r.skipped for r in first] == [False, False] and isinstance(store.load("k"), Ended)
    again = table.feed([Fragment("k", "hello there ", position=3), Fragment("k", "new call", position=5)])
    assert [r.skipped for r in again] == [True, False] and table.position("k") == 5
    assert again[1].token_ids + table.feed([Fragment("k", "", end=True)])[0].token_ids == \
        bpe.tokenizer.encode("new call")


def test_fork_reset_end_and_generation_leave_other_streams_alone(bpe):
    table = SessionTable(bpe.model, bpe.tokenizer, heads=dict(bpe.heads.heads))
    table.feed([Fragment("a", "the quick brown fo"), Fragment("b", "other stream")])
    before = table.export("a")
    table.fork("a", "a2")
    cfg = SamplingConfig(max_tokens=5, temperature=0.8, seed=1)
    assert table.generate("a", cfg) == table.generate("a2", cfg)
    assert table.export("a") == before
    x = table.feed([Fragment("a", "x jumps", end=True)])[0]
    y = table.feed([Fragment("a2", "x jumps", end=True)])[0]
    assert (x.token_ids, x.cats) == (y.token_ids, y.cats)
    table.reset("b")
    assert table.n_tokens("b") == 0 and table.feed([Fragment("b", "fresh", end=True)])[0].token_ids == \
        bpe.tokenizer.encode("fresh")
    with pytest.raises(ValueError, match="no text to continue"):
        table.generate("never-fed", cfg)


def test_foreign_and_corrupt_bytes_are_refused_with_the_reason(bpe):
    table = SessionTable(bpe.model, bpe.tokenizer)
    table.feed([Fragment("a", "some text")])
    data = table.export("a")
    with pytest.raises(StateError, match="checksum"):
        table.restore("b", data[:-3] + bytes([data[-3] ^ 1]) + data[-2:])
    plain = State(torch.zeros(2, 5, 32), 0, bpe.model.fingerprint).to_bytes()
    with pytest.raises(StateError, match="not an rwkv-stream session"):
        table.restore("b", plain)
    foreign = State(torch.zeros(2, 5, 32), 0, "0123456789abcdef").to_bytes()
    with pytest.raises(StateError, match="expected model"):
        table.restore("b", foreign)


def test_resident_set_is_bounded_in_bytes(bpe):
    per = SessionTable(bpe.model, bpe.tokenizer).state_nbytes
    table = SessionTable(bpe.model, bpe.tokenizer, max_streams=100, max_state_bytes=3 * per + 1, store=MemoryStore())
    assert table.capacity == 3
    table.feed([Fragment(f"k{i}", "a few words") for i in range(10)])
    assert len(table) == 3 and table.resident_bytes() <= 3 * per
    with pytest.raises(ValueError, match="holds no stream"):
        SessionTable(bpe.model, bpe.tokenizer, max_state_bytes=per - 1)


def test_idle_streams_expire_to_the_store(bpe):
    now = [0.0]
    store = MemoryStore()
    table = SessionTable(bpe.model, bpe.tokenizer, store=store, ttl_s=10, clock=lambda: now[0])
    table.feed([Fragment("old", "hello")])
    now[0] = 5.0
    table.feed([Fragment("new", "hello")])
    now[0] = 12.0
    assert table.expire_idle() == ["old"] and table.keys() == ["new"] and isinstance(store.load("old"), bytes)
    assert table.feed([Fragment("old", " again", end=True)])[0].n_tokens > 0  # back transparently


# ------------------------------------------------------------------------------------------ another process
def _continue_in_child(bundle_dir: str, exported: bytes, rest: list[str], conn) -> None:
    torch.set_num_threads(1)
    bundle = load_source(bundle_dir)
    table = SessionTable(bundle.model, bundle.tokenizer, heads=dict(bundle.heads.heads))
    table.restore("s", exported)
    out = table.feed([Fragment("s", f, end=i == len(rest) - 1) for i, f in enumerate(rest)])
    conn.send([(r.token_ids, r.tags, r.cats) for r in out])


def test_export_import_in_a_fresh_process_continues_exactly(bpe, tiny_bundle_dir):
    text = "so the meeting is on Monday at 10:30, café naïve 🙂 and then we vote"
    pieces = [text[:17], text[17:40], text[40:51], text[51:]]
    table = SessionTable(bpe.model, bpe.tokenizer, heads=dict(bpe.heads.heads))
    want = table.feed([Fragment("s", p, end=i == 3) for i, p in enumerate(pieces)])
    table.feed([Fragment("s", pieces[0])])
    exported = table.export("s")
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_continue_in_child, args=(str(tiny_bundle_dir), exported, pieces[1:], child))
    proc.start()
    got = parent.recv()
    proc.join(60)
    assert got == [(r.token_ids, r.tags, r.cats) for r in want[1:]]


def test_a_failing_fragment_leaves_no_stream_half_applied(bpe, monkeypatch):
    table = SessionTable(bpe.model, bpe.tokenizer, heads=dict(bpe.heads.heads))
    table.feed([Fragment("a", "first words "), Fragment("b", "other words ")])
    before = {k: table.export(k) for k in ("a", "b")}
    real_push = StreamingEncoder.push

    def push(self, fragment):
        if fragment == "poison":
            raise RuntimeError("tokenizer failure")
        return real_push(self, fragment)

    monkeypatch.setattr(StreamingEncoder, "push", push)
    with pytest.raises(RuntimeError, match="tokenizer failure"):
        table.feed([Fragment("a", "more text "), Fragment("b", "poison")])
    assert {k: table.export(k) for k in ("a", "b")} == before
    with pytest.raises(TypeError, match="stream 'a' must be str or bytes, not int"):
        table.feed([Fragment("a", 42)])  # type: ignore[arg-type]
