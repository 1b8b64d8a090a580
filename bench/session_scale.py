"""Many more streams than fit: N streams through ``nlp.pipe`` with ``max_streams`` resident, each stream's Docs
far apart (every stream is evicted and restored between its Docs). Prints JSON: time, peak RSS, evictions, and
a check that nothing was lost (a sample of streams compared, bit for bit, with each stream fed alone).

    .venv/bin/python bench/session_scale.py --streams 10000 --max-streams 1000 --store dir
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import tempfile
import time
from collections.abc import Iterator

import spacy
import torch

WORDS = ("so", "we", "will", "meet", "on", "monday", "at", "ten", "thirty", "okay", "do", "not", "be", "late",
         "the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "alice", "and", "bob", "vote",
         "on", "the", "weather", "report", "a", "naive", "resume", "of", "the", "cafe", "well", "you", "know")


def make_nlp(max_streams: int, state_dir: str | None) -> spacy.Language:
    nlp = spacy.blank("en")
    nlp.add_pipe("rwkv", config={"model": "shipped:transcript-tagger", "max_streams": max_streams,
                                 "state_dir": state_dir})
    nlp.initialize()
    return nlp


def docs_for(nlp: spacy.Language, texts: dict[str, list[str]], depth: int) -> Iterator:
    """All streams' first Docs, then all second Docs, ...: each stream's Docs are a whole round apart.
    Made lazily, so memory measures the pipeline, not a list of 30,000 Docs."""
    for i in range(depth):
        for sid, parts in texts.items():
            doc = nlp.make_doc(parts[i])
            doc._.stream_id = sid
            yield doc


def outputs(doc) -> tuple:
    return [t.tag_ for t in doc], sorted(doc.cats.items()), doc._.rwkv_offset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=10_000)
    ap.add_argument("--max-streams", type=int, default=1000)
    ap.add_argument("--docs-per-stream", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--store", choices=("memory", "dir"), default="dir")
    ap.add_argument("--check", type=int, default=50, help="streams compared with a run of each alone")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = random.Random(0)
    texts = {f"call-{i}": [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6))) + " "
                           for _ in range(args.docs_per_stream)] for i in range(args.streams)}
    with tempfile.TemporaryDirectory() as tmp:
        nlp = make_nlp(args.max_streams, tmp if args.store == "dir" else None)
        rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        sample = set(rng.sample(sorted(texts), min(args.check, len(texts))))
        start, returned = time.perf_counter(), 0
        got: dict[str, list] = {}
        for doc in nlp.pipe(docs_for(nlp, texts, args.docs_per_stream), batch_size=args.batch_size):
            returned += 1
            if doc._.stream_id in sample:
                got.setdefault(doc._.stream_id, []).append(outputs(doc))
        elapsed = time.perf_counter() - start
        rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        sessions = nlp.get_pipe("rwkv").sessions
        solo = make_nlp(args.max_streams, None)
        mismatched = [sid for sid in sorted(sample)
                      if [outputs(d) for d in solo.pipe(docs_for(solo, {sid: texts[sid]}, args.docs_per_stream))]
                      != got[sid]]
        report = {
            "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} torch threads",
            "streams": args.streams, "max_streams": args.max_streams, "docs": args.streams * args.docs_per_stream,
            "batch_size": args.batch_size, "store": args.store, "seconds": round(elapsed, 2),
            "docs_per_s": round(returned / elapsed, 1), "evictions": sessions.evictions,
            "resident": len(sessions), "rss_before_pipe_mib": round(rss_start / 1024, 1),
            "peak_rss_mib": round(rss_peak / 1024, 1), "docs_returned": returned,
            "streams_checked": len(sample), "streams_mismatched": len(mismatched),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
