"""The README's main job: `rwkv-stream demo` streams the sample through spaCy and prints real results."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("spacy")

from rwkv_stream.components.demo import compare, fragments  # noqa: E402

from rwkv_stream.loading import shipped_dir  # noqa: E402

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
