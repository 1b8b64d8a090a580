"""Pure alignment helpers of the spaCy component: byte offsets, model-token lookup, BIO tags to spans."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rwkv_stream.components.spacy_align import align, bio_spans, byte_offsets, overlapping, token_ends
from rwkv_stream.components.spacy_component import check_stream_id


def test_byte_offsets_ascii_and_multibyte():
    assert byte_offsets("abc") == [0, 1, 2, 3]
    assert byte_offsets("aé🙂b") == [0, 1, 3, 7, 8]


@given(st.text(max_size=30))
def test_byte_offsets_match_utf8(text):
    offsets = byte_offsets(text)
    assert all(offsets[i] == len(text[:i].encode("utf-8", "surrogatepass")) for i in range(len(text) + 1))


def test_align_rules_many_to_one_and_one_to_many():
    # region: held-back "ab" from the previous Doc, then this Doc's "cdef gh"; model tokens "abc" "de" "f gh"
    ends = token_ends([3, 2, 4])
    text = "cdef gh"
    spans = [(0, 4), (5, 7)]  # spaCy tokens "cdef" (3 model tokens) and "gh"
    assert align(spans, text, ends, 2, "last") == [2, 2]
    assert align(spans, text, ends, 2, "first") == [0, 2]
    # one model token over two spaCy tokens: "f gh" is read by "f..." (last byte of "cdef") and by "gh"
    assert align([(3, 4), (5, 7)], text, ends, 2, "first") == [2, 2]


def test_align_multibyte_character_split_between_tokens():
    text = "x🙂"  # the emoji's 4 bytes are split 2 + 2 between two model tokens
    ends = token_ends([1, 2, 2])
    assert align([(0, 1), (1, 2)], text, ends, 0, "last") == [0, 2]
    assert align([(0, 1), (1, 2)], text, ends, 0, "first") == [0, 1]


def test_align_without_tokens_and_empty_span():
    assert align([(0, 1)], "a", [], 0) == [None]
    assert align([(1, 1)], "ab", [2], 0) == [None]


def test_overlapping_tokens():
    ends = token_ends([3, 2, 4])  # [0,3) [3,5) [5,9)
    assert overlapping(ends, 2, 6) == [0, 1, 2]
    assert overlapping(ends, 3, 5) == [1]
    assert overlapping(ends, 9, 9) == []


@pytest.mark.parametrize(
    ("tags", "spans"),
    [
        (["O", "B-PER", "I-PER", "O"], [(1, 3, "PER")]),
        (["B-PER", "B-PER", "I-ORG", "I-ORG"], [(0, 1, "PER"), (1, 2, "PER"), (2, 4, "ORG")]),
        (["I-LOC", "I-LOC", "O", "I-LOC"], [(0, 2, "LOC"), (3, 4, "LOC")]),
        (["U-PER", "B-ORG", "L-ORG", "O"], [(0, 1, "PER"), (1, 3, "ORG")]),
        (["B-PER", None, "O", "B-PER"], [(0, 1, "PER"), (3, 4, "PER")]),
        (["O", "PER", "PER", "O", "ORG", "LOC"], [(1, 3, "PER"), (4, 5, "ORG"), (5, 6, "LOC")]),
        (["X-Y", "X-Y", "I-X-Y", ""], [(0, 3, "X-Y")]),
        ([], []),
    ],
)
def test_bio_spans(tags, spans):
    assert bio_spans(tags) == spans


def test_check_stream_id_types():
    assert check_stream_id("x") == "x"
    assert check_stream_id(3) == 3
    assert check_stream_id(None) is None
    for bad in (1.5, True, ["x"], b"x", ("a",)):
        with pytest.raises(TypeError, match="must be a str or an int"):
            check_stream_id(bad)
