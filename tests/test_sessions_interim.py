# ruff: noqa: F811  (the fixtures bpe and world are imported from test_sessions)
"""Interim hypotheses (SessionTable.feed_interim): revisions run on forks, so interims then the final give
exactly what the final alone gives, for any sequence of revisions, streams and calls; an interim's results are
those of feeding its text on a copy of the stream."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_sessions import bpe, fragmentation, table_for, texts, world  # noqa: F401  (fixtures)

from rwkv_stream.sessions import Fragment, FragmentResult, MemoryStore

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _fields(r: FragmentResult) -> tuple:
    return (r.key, r.skipped, r.token_ids, [(t.text, t.start, t.end) for t in r.tokens], r.tail_ids, r.tags,
            r.cats, r.probes, r.carry, r.text_start, r.held_back, r.n_tokens, r.ended)


@st.composite
def sessions_with_revisions(draw: st.DrawFn) -> tuple[list[Fragment], list[list[Fragment]], int]:
    """Streams cut into final fragments, interleaved; before each final, 0-3 calls of interim revisions
    (random text: the final's prefix, or anything: ASR may revise wildly), sometimes for other streams too."""
    n = draw(st.integers(1, 4))
    queues = {f"s{i}": draw(fragmentation(draw(texts))) for i in range(n)}
    order = draw(st.permutations([k for k, q in queues.items() for _ in q]))
    pos = dict.fromkeys(queues, 0)
    finals, interims = [], []
    for k in order:
        text = queues[k][pos[k]]
        finals.append(Fragment(k, text, end=pos[k] == len(queues[k]) - 1))
        pos[k] += 1
        calls = []
        for _ in range(draw(st.integers(0, 3))):
            keys = draw(st.lists(st.sampled_from([*queues, "never-fed"]), min_size=1, max_size=3))
            calls.append([Fragment(key, draw(st.one_of(texts, st.just(text[: len(text) // 2])))) for key in keys])
        interims.append(calls)
    return finals, interims, draw(st.integers(1, 6))


@pytest.mark.parametrize("which", ["bpe", "world"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(work=sessions_with_revisions())
def test_interims_then_final_equal_the_final_alone(which, bpe, world, work):
    finals, interims, max_streams = work
    alone = table_for(which, bpe, world, max_streams=max_streams, store=MemoryStore())
    want = [alone.feed([f], provisional=True)[0] for f in finals]
    table = table_for(which, bpe, world, max_streams=max_streams, store=MemoryStore())
    got = []
    for final, calls in zip(finals, interims, strict=True):
        for call in calls:
            results = table.feed_interim(call)
            assert [r.key for r in results] == [f.key for f in call]
            assert all(not r.ended for r in results)
        got.append(table.feed([final], provisional=True)[0])
    assert [_fields(r) for r in got] == [_fields(r) for r in want]
    assert not table.exists("never-fed")
    assert len(table) == 0 and table.pool.live == 0  # every stream ended, every fork freed


@pytest.mark.parametrize("which", ["bpe", "world"])
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(history=texts, revision=texts)
def test_an_interim_is_the_text_fed_on_a_copy_and_leaves_the_stream_byte_identical(which, bpe, world, history,
                                                                                      revision):
    table = table_for(which, bpe, world, store=MemoryStore())
    table.feed([Fragment("k", history)])
    before = table.export("k")
    interim = table.feed_interim([Fragment("k", revision)])[0]
    assert table.export("k") == before
    copy = table_for(which, bpe, world)
    copy.restore("k", before)
    assert _fields(interim) == _fields(copy.feed([Fragment("k", revision)], provisional=True)[0])


def test_interim_refuses_final_only_fields(bpe):
    table = table_for("bpe", bpe, None)
    for frag in (Fragment("k", "x", end=True), Fragment("k", "x", position=3)):
        with pytest.raises(ValueError, match="interim"):
            table.feed_interim([frag])
    assert table.pool.live == 0 and len(table) == 0
