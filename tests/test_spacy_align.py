"""Pure alignment helpers of the spaCy component: byte offsets, model-token lookup, BIO tags to spans."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rwkv_stream.components.spacy_align import align, align_indices, bio_spans, byte_offsets, overlapping, token_ends
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


def _align_reference(spans, text, ends, doc_start, rule):
    """The token-by-token rule (bisect per span), as the component ran it before align_indices."""
    from bisect import bisect_right

    offsets = byte_offsets(text)
    out = []
    for start, end in spans:
        if end <= start or not ends:
            out.append(None)
            continue
        byte = doc_start + (offsets[start] if rule == "first" else offsets[end] - 1)
        out.append(min(bisect_right(ends, byte), len(ends) - 1))
    return out


@given(st.text(alphabet="ab é🙂\n", max_size=24), st.lists(st.integers(1, 5), max_size=12), st.integers(0, 6),
       st.sampled_from(["first", "last"]), st.data())
def test_align_indices_equals_the_per_span_rule(text, lengths, doc_start, rule, data):
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=10)))
    spans = list(zip(cuts[::2], cuts[1::2], strict=False))
    ends = token_ends(lengths)
    expected = _align_reference(spans, text, ends, doc_start, rule)
    assert align(spans, text, ends, doc_start, rule) == expected
    import numpy as np

    starts, stops = (np.array([s[j] for s in spans], dtype=np.int64) for j in (0, 1))
    got = align_indices(starts, stops, text, np.array(ends), doc_start, rule)
    assert got.tolist() == [-1 if i is None else i for i in expected]


def test_region_token_ends_from_the_byte_length_table():
    from rwkv_stream.components.spacy_align import region_token_ends

    from rwkv_stream.loading import load_source

    tok = load_source("shipped:transcript-tagger", byte_level=True).need_tokenizer()
    ids = tok.encode(" so é the meeting")
    lengths = [len(tok.id_to_token_bytes(i)) for i in ids]
    assert region_token_ends(tok, ids, sum(lengths)) == token_ends(lengths)
    extra = 1  # a prefix space the tokens hold beyond the text sits at the start of the region
    assert region_token_ends(tok, ids, sum(lengths) - extra) == [max(0, e - extra) for e in token_ends(lengths)]
    assert region_token_ends(tok, [], 0) == []
