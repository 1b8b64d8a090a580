"""The spaCy component's own cost with the shipped model: live fragments one Doc at a time (the demo's pattern)
and many streams through ``nlp.pipe``. Uses only the public component API, so builds can be compared. JSON out.

    .venv/bin/python bench/spacy_pipe.py [--streams 200 --docs-per-stream 5 --batch-size 64 --repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time

import spacy
import torch

WORDS = ("so", "we", "will", "meet", "on", "monday", "at", "ten", "thirty", "okay", "do", "not", "be", "late",
         "the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "alice", "and", "bob", "vote",
         "on", "the", "weather", "report", "a", "naive", "resume", "of", "the", "cafe", "well", "you", "know")


def fragments(rng: random.Random, n: int) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6))) + " " for _ in range(n)]


def live_fragments(nlp: spacy.Language, rng: random.Random, n: int) -> list[float]:
    """Milliseconds per ``nlp(doc)`` of one live stream."""
    times = []
    for i, text in enumerate(fragments(rng, n)):
        doc = nlp.make_doc(text)
        doc._.stream_id = "live"
        start = time.perf_counter()
        nlp(doc)
        times.append((time.perf_counter() - start) * 1000)
        if i == n - 1:
            nlp.get_pipe("rwkv").end_stream("live")
    return times


def piped(nlp: spacy.Language, rng: random.Random, streams: int, depth: int, batch_size: int) -> float:
    """Docs per second through ``nlp.pipe`` for ``streams`` interleaved streams."""
    texts = {f"s{i}": fragments(rng, depth) for i in range(streams)}
    docs = []
    for d in range(depth):
        for sid, parts in texts.items():
            doc = nlp.make_doc(parts[d])
            doc._.stream_id = sid
            docs.append(doc)
    start = time.perf_counter()
    for _ in nlp.pipe(docs, batch_size=batch_size):
        pass
    elapsed = time.perf_counter() - start
    for sid in texts:
        nlp.get_pipe("rwkv").end_stream(sid)
    return len(docs) / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=200)
    ap.add_argument("--docs-per-stream", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--live", type=int, default=200, help="fragments of the one-Doc-at-a-time stream")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    nlp = spacy.blank("en")
    nlp.add_pipe("rwkv", config={"model": "shipped:transcript-tagger"})
    nlp.initialize()
    rng = random.Random(0)
    live_fragments(nlp, rng, 20)  # warm-up (probes, allocator)
    live, rates = [], []
    for _ in range(args.repeats):
        live += live_fragments(nlp, rng, args.live)
        rates.append(piped(nlp, rng, args.streams, args.docs_per_stream, args.batch_size))
    live.sort()
    print(json.dumps({
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s)",
        "live_ms_p50": round(statistics.median(live), 3),
        "live_ms_p99": round(live[int(0.99 * (len(live) - 1))], 3),
        "pipe_docs_per_s": [round(r, 1) for r in rates],
        "pipe_docs_per_s_best": round(max(rates), 1),
        "streams": args.streams, "docs_per_stream": args.docs_per_stream, "batch_size": args.batch_size,
    }, indent=2))


if __name__ == "__main__":
    main()
