"""Interim ASR hypotheses in the spaCy component (doc._.rwkv_interim): an interim Doc is annotated as the same
text would be, on a fork, and interims then finals give exactly what the finals alone give, for any sequence of
revisions."""

from __future__ import annotations

import numpy as np
import pytest
import spacy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.usefixtures("one_torch_thread")
WORDS = ["so", "we'll", "meet", "on", "monday", "at", "10", "don't", "chloé", "the", "quick", "東京", "okay"]
phrases = st.lists(st.sampled_from(WORDS), min_size=1, max_size=5).map(lambda w: " ".join(w) + " ")


@pytest.fixture(scope="module")
def nlp(tiny_bundle_dir):
    nlp = spacy.blank("en")
    nlp.add_pipe("rwkv", config={"model": str(tiny_bundle_dir)})
    nlp.initialize()
    return nlp


def _doc(nlp, text: str, stream: str, interim: bool):
    doc = nlp.make_doc(text)
    doc._.stream_id, doc._.rwkv_interim = stream, interim
    return doc


def _seen(doc) -> tuple:
    return ([t.tag_ for t in doc], doc._.rwkv_restored, sorted(doc.cats.items()), doc.tensor.tobytes(),
            doc._.rwkv_offset)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), finals=st.lists(phrases, min_size=1, max_size=5))
def test_interims_then_finals_equal_the_finals_alone(nlp, data, finals):
    rwkv = nlp.get_pipe("rwkv")
    want = [_seen(d) for d in nlp.pipe([_doc(nlp, t, "alone", False) for t in finals])]
    rwkv.end_stream("alone")
    docs = []
    for text in finals:
        for revision in data.draw(st.lists(st.one_of(phrases, st.just(text[: len(text) // 2] or text)), max_size=3)):
            docs.append(_doc(nlp, revision, "live", True))
        docs.append(_doc(nlp, text, "live", False))
    batch = data.draw(st.integers(1, 8))
    out = list(nlp.pipe(docs, batch_size=batch))
    assert [_seen(d) for d in out if not d._.rwkv_interim] == want
    rwkv.end_stream("live")


def test_an_interim_doc_is_annotated_as_its_text_would_be(nlp):
    rwkv = nlp.get_pipe("rwkv")
    nlp(_doc(nlp, "so we'll meet ", "a", False))
    nlp(_doc(nlp, "so we'll meet ", "b", False))
    interim = nlp(_doc(nlp, "on monday at 10 ", "a", True))
    final = nlp(_doc(nlp, "on monday at 10 ", "b", False))
    assert _seen(interim)[:3] == _seen(final)[:3]
    np.testing.assert_array_equal(interim.tensor, final.tensor)
    assert rwkv.sessions.n_tokens("a") < rwkv.sessions.n_tokens("b")  # the interim did not advance "a"
    for key in ("a", "b"):
        rwkv.end_stream(key)
