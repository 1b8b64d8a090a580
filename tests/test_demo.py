"""The README's main job: `rwkv-stream demo` streams the sample through the session layer and prints real results."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
from rwkv_stream.components.demo import build_live, compare, fragments, process

from rwkv_stream.loading import shipped_dir

shipped = pytest.mark.skipif(not (shipped_dir() / "bundle.json").exists(), reason="shipped model missing")


def test_fragments_cover_every_word_in_order():
    text = "one two three four five six seven eight nine ten eleven"
    parts = list(fragments(text, random.Random(3), 2, 4))
    assert "".join(parts).split() == text.split()
    assert all(2 <= len(p.split()) <= 4 for p in parts[:-1]) and all(p.endswith(" ") for p in parts)


def test_fragment_bounds_are_checked():
    with pytest.raises(SystemExit, match="min-words"):
        list(fragments("a b", random.Random(0), 3, 2))


def test_compare_scores_restored_punctuation():
    ref = "Is it you? Yes, it is. Good."
    perfect = compare(ref, "Is it you? Yes, it is. Good.")
    assert perfect["question P/R/F1"].startswith("1.00 / 1.00 / 1.00")
    assert perfect["capitalization accuracy"].startswith("1.000")
    flat = compare(ref, "is it you yes it is good")
    assert flat["period P/R/F1"].startswith("0.00 / 0.00")


@shipped
def test_demo_runs_on_the_shipped_model(tmp_path: Path):
    sample = tmp_path / "call.txt"
    sample.write_text("Are you there? I think so, yes. Then let us begin.\n")
    out = subprocess.run(
        [sys.executable, "-m", "rwkv_stream.cli", "demo", "--input", str(sample), "--generate", "5"],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout
    assert "=== restored transcript ===" in out
    assert "capitalization accuracy" in out and "per-fragment latency" in out
    assert "continuation from the live state" in out
    restored = out.split("=== restored transcript ===\n", 1)[1].splitlines()[0]
    assert restored.lower().replace(",", "").replace(".", "").replace("?", "").split() == (
        ["are", "you", "there", "i", "think", "so", "yes", "then", "let", "us", "begin"]
    )


@shipped
def test_demo_keeps_every_word_intact_in_any_script(tmp_path: Path):
    """Chloé was cut to Chlo: the ASR form kept only ASCII letters. Letters of any script with their combining
    marks (Devanagari vowel signs, a decomposed accent) and numbers stay whole, through the restored text."""
    text = "Chloé met Zoë in Köln. हिन्दी बोलो, said Cafe\u0301 Björn; 東京 costs 1,000 or 2.5 yen?\n"
    sample = tmp_path / "call.txt"
    sample.write_text(text, encoding="utf-8")
    out = subprocess.run(
        [sys.executable, "-m", "rwkv_stream.cli", "demo", "--input", str(sample), "--quiet"],
        capture_output=True, text=True, timeout=300, check=True, encoding="utf-8",
    ).stdout
    restored = out.split("=== restored transcript ===\n", 1)[1].splitlines()[0]
    words = [w.strip(",.?").lower() for w in restored.split()]
    assert words == ["chloé", "met", "zoë", "in", "köln", "हिन्दी", "बोलो", "said", "cafe\u0301", "björn", "東京",
                     "costs", "1000", "or", "2.5", "yen"]
    assert "capitalization accuracy" in out  # the restored text lines up word for word with the original


@shipped
def test_demo_word_tags_and_cats_equal_the_spacy_components():
    """The demo runs without spaCy but must say what `nlp.add_pipe("rwkv")` says, word for word."""
    import spacy

    nlp = spacy.blank("en")
    nlp.add_pipe("rwkv", config={"model": "shipped", "tag_alignment": "first"})
    live = build_live("shipped", seed=0)
    text = "so are you there i think so yes then let us begin what do you say mr knightley"
    for part in fragments(text, random.Random(1), 1, 4):
        heard, _ = process(live, part)
        doc = nlp.make_doc(part)
        doc._.stream_id = "same"
        doc = nlp(doc)
        words = [(t.text, t.tag_) for t in doc if not t.is_space]
        assert heard.words == words, part
        assert heard.cats == doc.cats
