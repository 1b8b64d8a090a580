"""``rwkv-stream demo``: live transcript tagging with the shipped model, fragment by fragment.

A transcript (the bundled sample, a file, or stdin) is turned into what speech recognition emits (lowercase
words, no punctuation) and fed to the engine's session layer (:mod:`rwkv_stream.sessions`, what the spaCy
component ``nlp.add_pipe("rwkv")`` is built on, with the same word rule: a word takes the tag of the model token
holding its first character) a few words at a time, as one stream. It needs no extra (no spaCy). After each
fragment the demo shows the text restored so far (punctuation and capitals from the tagging head), the
fragment's tags, the running classification, and the fragment's latency; at the end the restored text is
scored against the original and, on request, the live state writes a short continuation.
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rwkv_stream.generate import SamplingConfig
from rwkv_stream.heads import Head, HeadSet
from rwkv_stream.loading import load_source
from rwkv_stream.sessions import Fragment, SessionTable
from rwkv_stream.train.transcript import END, normalize, parse, restore

from .spacy_align import CLASSIFIER, TAGGER, align, doc_result

STREAM = "demo-call"
WORDS_PER_SECOND = 2.5  # conversational speech, about 150 words a minute


def sample_path() -> Path:
    return Path(__file__).resolve().parent.parent / "rwkv_stream" / "data" / "demo" / "sample_transcript.txt"


def _installed_sample() -> Path:
    from importlib.resources import files

    return Path(str(files("rwkv_stream.data").joinpath("demo/sample_transcript.txt")))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="live transcript tagging with the shipped model (no server, no extra)")
    p.add_argument("--input", default=None, help="a text file, or - for stdin (default: the bundled sample)")
    p.add_argument("--model", default="shipped:transcript-tagger", help="bundle dir or shipped:NAME")
    p.add_argument("--min-words", type=int, default=2, help="fewest words per fragment")
    p.add_argument("--max-words", type=int, default=6, help="most words per fragment")
    p.add_argument("--realtime", action="store_true", help="replay at speaking pace (2.5 words/s)")
    p.add_argument("--speed", type=float, default=1.0, help="with --realtime: replay speed multiplier")
    p.add_argument("--generate", type=int, default=0, metavar="N", help="continue the stream for N tokens")
    p.add_argument("--seed", type=int, default=0, help="fragmentation and sampling seed")
    p.add_argument("--quiet", action="store_true", help="only the summary")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: a small model's products are too small to split, and "
                        "spinning OpenMP threads wreck latency when the cores are shared)")
    p.set_defaults(handler=run)


@dataclass
class Transcript:
    """What the demo knows of the stream: words with their tags, and per-fragment latencies."""

    words: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    end_tag: str | None = None

    def restored(self) -> str:
        return restore(self.words, [_label(t) for t in self.tags], _label(self.end_tag) if self.end_tag else None)


def _label(tag: str) -> str:
    return tag if "-" in tag else "O-lower"


def read_input(spec: str | None) -> str:
    if spec is None:
        path = sample_path() if sample_path().exists() else _installed_sample()
        return path.read_text(encoding="utf-8")
    if spec == "-":
        return sys.stdin.read()
    path = Path(spec)
    if not path.exists():
        raise SystemExit(f"demo: input file not found: {path}")
    return path.read_text(encoding="utf-8")


def fragments(asr_text: str, rng: random.Random, lo: int, hi: int) -> Iterator[str]:
    """Split ASR text into runs of ``lo..hi`` words; each ends with the space before the next word."""
    if not 1 <= lo <= hi:
        raise SystemExit(f"demo: need 1 <= --min-words <= --max-words, got {lo} and {hi}")
    words = asr_text.split()
    i = 0
    while i < len(words):
        n = rng.randint(lo, hi)
        yield " ".join(words[i : i + n]) + " "
        i += n


@dataclass
class Live:
    """The demo's stream: a session table over the model, with its tagging and classification heads."""

    table: SessionTable
    tagger: Head | None
    seed: int


@dataclass
class Heard:
    """What one fragment gave: (word, tag) per whitespace-separated word, and the running classification."""

    words: list[tuple[str, str]]
    cats: dict[str, float]


def build_live(model: str, seed: int) -> Live:
    loaded = load_source(model, byte_level=True)
    tagger, classifier = _only_head(loaded.heads, "tagger"), _only_head(loaded.heads, "classifier")
    heads = {role: h for role, h in ((TAGGER, tagger), (CLASSIFIER, classifier)) if h is not None}
    table = SessionTable(loaded.model, loaded.need_tokenizer(), heads=heads)
    table.feed([Fragment("__warmup__", "warming up the pipeline ")], provisional=True)  # one-off allocations
    table.end("__warmup__")
    return Live(table, tagger, seed)


def _only_head(heads: HeadSet, kind: str) -> Head | None:
    found = [h for h in heads.heads.values() if h.kind == kind]
    if len(found) > 1:
        raise SystemExit(f"demo: the model has {len(found)} {kind} heads; the demo shows a model with one")
    return found[0] if found else None


def process(live: Live, text: str, spans: list[tuple[int, int]] | None = None) -> tuple[Heard, float]:
    """Feed one fragment; its words' tags (or those of ``spans``) and the stream's classification."""
    t0 = time.perf_counter()
    res = live.table.feed([Fragment(STREAM, text)], provisional=True)[0]
    ms = (time.perf_counter() - t0) * 1e3
    view = doc_result(live.table.tokenizer, res, text, want_vector=False)
    spans = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)] if spans is None else spans
    index = align(spans, text, view.ends, view.doc_start, "first")
    labels = live.tagger.labels if live.tagger is not None else []
    tags = [labels[view.tag_ids[i]] if i is not None and view.tag_ids else "" for i in index]
    return Heard([(text[a:b], tag) for (a, b), tag in zip(spans, tags, strict=True)], view.cats), ms


def top_cat(cats: dict[str, float]) -> str:
    if not cats:
        return "-"
    label, score = max(cats.items(), key=lambda kv: kv[1])
    return f"{label} {score:.2f}"


def run(args: argparse.Namespace) -> int:
    import torch

    if args.speed <= 0:
        raise SystemExit(f"demo: --speed must be positive, got {args.speed}")
    torch.set_num_threads(max(1, args.threads))
    reference = read_input(args.input)
    asr = normalize(reference)
    if not asr:
        raise SystemExit("demo: the input has no words")
    rng = random.Random(args.seed)
    live = build_live(args.model, args.seed)
    transcript = Transcript()
    print(f"streaming {len(asr.split())} words as '{STREAM}' (lowercase, no punctuation, like ASR output)\n")
    started = time.perf_counter()
    for n, fragment in enumerate(fragments(asr, rng, args.min_words, args.max_words), 1):
        _pace(args, started, len(transcript.words))
        heard, ms = process(live, fragment)
        transcript.latencies_ms.append(ms)
        for word, tag in heard.words:
            transcript.words.append(word)
            transcript.tags.append(tag)
        if not args.quiet:
            _show_fragment(n, fragment, heard, ms, transcript)
    end, ms = process(live, END, spans=[(0, len(END))])  # the end-of-stream marker: its tag ends the text
    transcript.end_tag = end.words[0][1] or None
    _summary(args, live, end, reference, transcript)
    return 0


def _pace(args: argparse.Namespace, started: float, words_so_far: int) -> None:
    if args.realtime:
        due = started + words_so_far / (WORDS_PER_SECOND * args.speed)
        time.sleep(max(0.0, due - time.perf_counter()))


def _show_fragment(n: int, fragment: str, heard: Heard, ms: float, transcript: Transcript) -> None:
    tags = " ".join(f"{w}/{t}" for w, t in heard.words)
    tail = transcript.restored()[-90:]
    print(f"#{n:<3} {ms:6.1f} ms  heard: {fragment.strip()!r}")
    print(f"      tags: {tags}")
    print(f"      cats: {top_cat(heard.cats)}   restored: ...{tail}")


def _summary(args: argparse.Namespace, live: Live, end: Heard, reference: str, transcript: Transcript) -> None:
    restored = transcript.restored()
    print("\n=== restored transcript ===")
    print(restored)
    score = compare(reference, restored)
    if score:
        print("\n=== against the original ===")
        for key, value in score.items():
            print(f"  {key:<28} {value}")
    print(f"\nrunning classification: {top_cat(end.cats)}")
    lat = sorted(transcript.latencies_ms)
    p99 = lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))]
    print(f"per-fragment latency over {len(lat)} fragments: p50 {statistics.median(lat):.1f} ms, p99 {p99:.1f} ms")
    if args.generate:
        cfg = SamplingConfig(args.generate, temperature=0.8, top_p=0.9, seed=live.seed)
        continuation = live.table.generate(STREAM, cfg)
        print(f"\ncontinuation from the live state ({args.generate} tokens): {continuation!r}")


def compare(reference: str, restored: str) -> dict[str, str]:
    """Word-level scores of the restored text against the original (when the input was punctuated)."""
    ref_words, ref_end = parse(reference)
    got_words, got_end = parse(restored)
    if len(ref_words) != len(got_words) or not any(w.punct != "O" or w.case != "lower" for w in ref_words):
        return {}
    gold = [w.punct for w in ref_words[1:]] + [ref_end]
    pred = [w.punct for w in got_words[1:]] + [got_end]
    out = {}
    for cls in ("PERIOD", "COMMA", "QUESTION"):
        tp = sum(g == p == cls for g, p in zip(gold, pred, strict=True))
        n_gold, n_pred = gold.count(cls), pred.count(cls)
        prec = tp / n_pred if n_pred else 0.0
        rec = tp / n_gold if n_gold else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        out[f"{cls.lower()} P/R/F1"] = f"{prec:.2f} / {rec:.2f} / {f1:.2f}  ({n_gold} in the original)"
    case_ok = sum(a.case == b.case for a, b in zip(ref_words, got_words, strict=True))
    out["capitalization accuracy"] = f"{case_ok / len(ref_words):.3f} over {len(ref_words)} words"
    return out
