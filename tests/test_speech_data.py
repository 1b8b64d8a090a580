"""The spoken-English training data: words in any script, numbers as ASR writes them, lookahead labels,
document-bounded streams, and the corpus builder's cleaning rules."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from rwkv_stream.train import data as D
from rwkv_stream.train import transcript

ROOT = Path(__file__).resolve().parent.parent


def _corpus_module():
    spec = importlib.util.spec_from_file_location("make_speech_corpus", ROOT / "scripts" / "make_speech_corpus.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize(("text", "words"), [
    ("Chloé met Zoë.", ["chloé", "met", "zoë"]),
    ("हिन्दी बोलो", ["हिन्दी", "बोलो"]),  # vowel signs and virama are combining marks: words stay whole
    ("Cafe\u0301 noir", ["cafe\u0301", "noir"]),  # a decomposed accent
    ("東京 and Москва", ["東京", "and", "москва"]),
    ("It cost 1,000.50, or 2.5 million; in 1990, 2000 and 3.", ["it", "cost", "1000.50", "or", "2.5", "million",
                                                                  "in", "1990", "2000", "and", "3"]),
])
def test_words_are_never_cut(text: str, words: list[str]) -> None:
    assert transcript.normalize(text).split() == words


def test_number_labels_keep_their_punctuation() -> None:
    words, end = transcript.parse("In 1990, 2000 and 2.5 percent.")
    assert [w.label for w in words] == ["O-Cap", "O-lower", "COMMA-lower", "O-lower", "O-lower", "O-lower"]
    assert end == "PERIOD"


class _Tok:
    """Each character is one id (enough for label placement)."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode_bytes(self, ids: list[int]) -> bytes:
        return "".join(map(chr, ids)).encode()


def test_lookahead_labels_shift_by_items() -> None:
    enc = D.WordEncoder(_Tok())  # type: ignore[arg-type]
    doc = D.transcript_document(["Hi, how are you?", "Fine."], enc, end_marks=[True], lookahead=2)
    firsts = [i for i, t in enumerate(doc.tags) if t != D.IGNORE]
    labels = [transcript.LABELS[doc.tags[i]] for i in firsts]
    # items: hi how are you <end> fine <end>
    assert labels == ["O-Cap", "COMMA-lower", "O-lower", "O-lower", "QUESTION-lower", "O-Cap", "PERIOD-lower"]
    for k in (1, 2):
        got = [doc.ahead[k - 1][i] for i in firsts]
        want = [D.IGNORE] * k + [doc.tags[i] for i in firsts[:-k]]
        assert got == want
        assert all(t == D.IGNORE for i, t in enumerate(doc.ahead[k - 1]) if i not in firsts)


def test_streams_stop_at_document_boundaries(tmp_path: Path) -> None:
    (tmp_path / "train.txt").write_text("A b.\nC d.\nE f.\nG h.\n")
    (tmp_path / "train.books.txt").write_text("chat\nchat\nchat\nchat\n")
    (tmp_path / "train.docs.txt").write_text("x:1\nx:1\nx:2\nx:2\n")
    ds = D.transcript_dataset(tmp_path / "train.txt", _Tok(), 40, tmp_path / "train.books.txt",  # type: ignore[arg-type]
                              lookahead=1)
    assert len(ds.docs) == 2 and ds.lookahead == 1 and ds.cat_labels == ["chat"]
    batch = D.make_batch([D.doc_windows(d, 16, None) for d in ds.docs], 16)
    assert batch.ahead is not None and batch.ahead.shape == (2, 1, batch.ids.shape[1])


def test_well_formed_messages_and_spoken_forms() -> None:
    mod = _corpus_module()
    assert mod.well_formed("How are you doing today?")
    assert not mod.well_formed("im doing good")
    assert not mod.well_formed("I think i will go.")
    assert not mod.well_formed("Haha :) ok.")
    assert not mod.well_formed("Hello")
    assert mod.spoken_forms("It cost $5 million, 7% of the U.S. budget at 9 p.m.") == \
        "It cost 5 million dollars, 7 percent of the US budget at 9 pm"


def test_lookahead_decisions_fall_back_to_smaller_k_at_the_stream_end() -> None:
    from rwkv_stream.train.speech_eval import decisions, doc_counts, report

    # preds[j][p]: head j's label at item p; head j at p decides item p - j
    preds = [[10, 11, 12, 13], [20, 21, 22, 23], [30, 31, 32, 33]]
    assert decisions(preds[:1], 0) == [10, 11, 12, 13]
    assert decisions(preds[:2], 1) == [21, 22, 23, 13]  # the last item: head 0 at the end marker
    assert decisions(preds, 2) == [32, 33, 23, 13]
    gold = ["O-Cap", "COMMA-lower", "QUESTION-Cap", "PERIOD-lower"]
    c = doc_counts(gold, ["O-Cap", "O-lower", "QUESTION-Cap", "PERIOD-lower"])
    r = report([c])
    assert r["COMMA"]["recall"] == 0 and r["QUESTION"]["f1"] == 1 and r["PERIOD"]["f1"] == 1
    assert r["CAP"]["f1"] == 1 and r["case_accuracy"] == 1 and r["n_words"] == 3
