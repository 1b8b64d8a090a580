"""Word-level restoration (punctuation and case) on spaCy tokens: the pure rule, and the rwkv component with
the shipped transcript tagger, whole and streamed."""

from __future__ import annotations

import random

import pytest
import spacy
from hypothesis import given, settings
from hypothesis import strategies as st
from rwkv_stream.components.spacy_restore import parse_label, restore_doc
from spacy.tokens import Doc, Token

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_labels_parse_and_others_are_refused():
    assert parse_label("COMMA-Cap") == (",", "Cap")
    assert parse_label("O-lower") == ("", "lower")
    assert parse_label("B-PER") is None and parse_label(None) is None
    doc = spacy.blank("en")("so it is")
    assert restore_doc(doc, ["B-PER", "O", "O"]) is False and doc._.rwkv_restored is None


def test_word_decisions_apply_to_all_tokens_of_a_word():
    nlp = spacy.blank("en")
    doc = nlp("well i don't know sir it's mr darcy\n")
    assert [t.text for t in doc] == ["well", "i", "do", "n't", "know", "sir", "it", "'s", "mr", "darcy", "\n"]
    labels = ["O-Cap", "COMMA-Cap", "O-lower", "PERIOD-Cap", "O-lower", "COMMA-lower", "PERIOD-Cap",
              "QUESTION-UPPER", "O-Cap", "O-Cap", "QUESTION-lower"]
    assert restore_doc(doc, labels)
    # "n't" and "'s" continue their words: their own labels are ignored, the word's case applies to them
    assert doc._.rwkv_restored == "Well, I don't know, sir. It's Mr Darcy?\n"
    assert [t._.rwkv_case for t in doc] == ["Cap", "Cap", "lower", "lower", "lower", "lower", "Cap", "Cap", "Cap",
                                            "Cap", None]
    assert [t._.rwkv_punct for t in doc][:6] == [",", "", "", "", ",", "."]
    assert doc[9]._.rwkv_punct == "?"  # known from the end marker
    assert doc[6:8]._.rwkv_restored == "It's" and doc[2:5]._.rwkv_restored == "don't know,"


def test_upper_case_words_and_unknown_final_punctuation():
    doc = spacy.blank("en")("the bbc said so")
    assert restore_doc(doc, ["O-Cap", "O-UPPER", "O-lower", "COMMA-lower"])
    assert doc._.rwkv_restored == "The BBC said, so"
    assert doc[-1]._.rwkv_punct is None  # the last word's punctuation comes with the next word or the end marker


def test_a_fragment_owes_its_leading_punctuation_to_the_previous_one():
    doc = spacy.blank("en")(" she said")
    assert restore_doc(doc, ["PERIOD-Cap", "PERIOD-Cap", "O-lower"])  # the leading space token reads " she"
    assert doc._.rwkv_restored == ". She said"


@pytest.fixture(scope="module")
def nlp() -> spacy.Language:
    nlp = spacy.blank("en")
    nlp.add_pipe("rwkv")
    return nlp


TEXT = ("well i do not know what you mean said elizabeth it is mr darcy's fault is it not i am sure "
        "he will come tomorrow and we shall all dine at netherfield")


def test_shipped_tagger_restores_the_text(nlp):
    doc = nlp(TEXT + "\n")
    restored = doc._.rwkv_restored
    assert restored.lower().replace(",", "").replace(".", "").replace("?", "") == TEXT + "\n"
    assert any(mark in restored for mark in ",.?") and any(ch.isupper() for ch in restored)
    assert doc[-2]._.rwkv_punct is not None  # the end marker decided the last word
    assert nlp(TEXT)[-1]._.rwkv_punct is None


def test_streamed_fragments_restore_the_same_text(nlp):
    whole = nlp(TEXT + "\n")._.rwkv_restored
    spaces = [i for i, ch in enumerate(TEXT) if ch == " "]
    rng = random.Random(7)
    for trial in range(8):
        cuts = sorted(rng.sample(spaces, rng.randint(1, 6)))
        parts = [TEXT[a:b] for a, b in zip([0, *cuts], [*cuts, len(TEXT)], strict=True)]
        parts[-1] += "\n"
        pieces = []
        for part in parts:
            doc = nlp.make_doc(part)
            doc._.stream_id = f"restore-{trial}"
            pieces.append(nlp(doc)._.rwkv_restored)
        assert "".join(pieces) == whole, (cuts, pieces)
        nlp.get_pipe("rwkv").end_stream(f"restore-{trial}")


def test_docs_of_other_labels_get_no_restoration(nlp):
    doc = Doc(nlp.vocab, words=["a"])
    assert doc._.rwkv_restored is None


def _restore_reference(doc, labels):
    """restore_tokens over Token objects and token._ writes, the way restore_doc ran before DocLayout."""
    from rwkv_stream.components.spacy_restore import restore_tokens

    gaps = [i > 0 and bool(doc[i - 1].whitespace_) for i in range(len(doc))]
    result = restore_tokens([t.text for t in doc], [t.is_space for t in doc], gaps, labels)
    return (result.text([t.whitespace_ for t in doc]), result.texts, result.cases, result.puncts)


@given(st.lists(st.sampled_from(["so", "I", "don't", "Mr.", " ", "\n", "é🙂", "--", "it's"]), max_size=14),
       st.data())
@settings(max_examples=60, deadline=None)
def test_layout_and_restoration_equal_the_token_by_token_way(words, data):
    from rwkv_stream.components.spacy_restore import DocLayout, set_restored

    nlp = spacy.blank("en")
    doc = nlp(" ".join(words))
    layout = DocLayout.of(doc)
    assert layout.text == doc.text and layout.words == [t.text for t in doc]
    assert layout.starts == [t.idx for t in doc] and layout.is_space == [int(t.is_space) for t in doc]
    labels = data.draw(st.lists(st.sampled_from([None, "O-lower", "COMMA-Cap", "PERIOD-UPPER", "QUESTION-lower"]),
                                min_size=len(doc), max_size=len(doc)))
    text, texts, cases, puncts = _restore_reference(doc, labels)
    set_restored(doc, labels, layout)
    assert doc._.rwkv_restored == text
    assert [t._.rwkv_restored for t in doc] == texts
    assert [t._.rwkv_case for t in doc] == cases and [t._.rwkv_punct for t in doc] == puncts
    other = nlp(" ".join(words))
    assert restore_doc(other, labels) and other.user_data == doc.user_data  # the same keys token._ writes


def test_restoration_goes_through_a_reregistered_setter():
    from rwkv_stream.components.spacy_restore import set_restored

    seen = []
    Token.set_extension("rwkv_case", getter=lambda t: "getter", setter=lambda t, v: seen.append((t.i, v)),
                        force=True)
    try:
        doc = spacy.blank("en")("so it is")
        set_restored(doc, ["O-Cap", "O-lower", "PERIOD-lower"])
        assert seen == [(0, "Cap"), (1, "lower"), (2, "lower")]
    finally:
        Token.set_extension("rwkv_case", default=None, force=True)
