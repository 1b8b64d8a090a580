"""Held-out evaluation of a transcript tagger on spoken/conversational English, per source and per label,
with bootstrap confidence intervals over documents and the lookahead trade-off.

    python -m rwkv_stream.train.speech_eval MODEL [--heads RUN/heads] [--corpus data/speech] [--out FILE.json]

MODEL is a bundle (``shipped`` for the shipped one). Each held-out document (a chat, a speech, a chatterbot
conversation) is streamed through the engine as ASR would give it: lowercase words, no punctuation, the end
marker only at the end of the document (the heads are causal, so cutting the stream into 1-5 word fragments
gives the same tags). Scored:

* punctuation after each word (COMMA, PERIOD, QUESTION: precision, recall, F1), the last word's at the end
  marker;
* case: F1 of *capitalized* words (``Cap`` or ``UPPER`` vs ``lower``) and exact-case accuracy;
* for a lookahead k (heads ``tagger+k`` of the run): the decision for a word is the one made k words later
  (at the stream's end, the remaining words are decided at the end marker by the heads k-1..0).

95 % intervals: percentiles of 1000 resamples of the documents with replacement (seed 0).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch

from rwkv_stream.train import data as D

PUNCT_CLASSES = ("COMMA", "PERIOD", "QUESTION")
WORDS_PER_SECOND = 2.5  # conversational pace (components/demo.py): one word of lookahead waits 400 ms
BOOTSTRAP = 1000

Counts = dict[str, float]


def documents(text_file: Path) -> dict[str, list[list[str]]]:
    """Lines grouped by document id (``<stem>.docs.txt``), per source (the id's prefix before ``:``)."""
    lines = D.read_lines(text_file)
    ids = D.read_lines(text_file.with_name(text_file.stem + ".docs.txt"))
    out: dict[str, dict[str, list[str]]] = defaultdict(dict)
    for line, doc in zip(lines, ids, strict=True):
        out[doc.split(":")[0]].setdefault(doc, []).append(line)
    return {src: list(docs.values()) for src, docs in out.items()}


def decisions(preds: Sequence[Sequence[int]], k: int) -> list[int]:
    """Label id decided for each item with lookahead ``k``: ``preds[j][p]`` is head j's label at item p."""
    n = len(preds[0])
    return [preds[k][i + k] if i + k < n else preds[n - 1 - i][n - 1] for i in range(n)]


def doc_counts(gold: Sequence[str], pred: Sequence[str]) -> Counts:
    """Counts of one document: per punctuation class tp/pred/gold; capitalized words tp/pred/gold; case."""
    c: Counts = defaultdict(float)
    for i, (g, p) in enumerate(zip(gold, pred, strict=True)):
        gp, gc = g.split("-")
        pp, pc = p.split("-")
        for cls in PUNCT_CLASSES:
            c[f"{cls}:tp"] += gp == pp == cls
            c[f"{cls}:pred"] += pp == cls
            c[f"{cls}:gold"] += gp == cls
        if i < len(gold) - 1:  # words (the last item is the end marker: punctuation only)
            c["CAP:tp"] += gc != "lower" and pc != "lower"
            c["CAP:pred"] += pc != "lower"
            c["CAP:gold"] += gc != "lower"
            c["case:ok"] += gc == pc
            c["case:lower_ok"] += gc == "lower"
            c["case:n"] += 1
    return c


def _f1(c: Counts, cls: str) -> tuple[float, float, float]:
    tp, n_pred, n_gold = c[f"{cls}:tp"], c[f"{cls}:pred"], c[f"{cls}:gold"]
    prec = tp / n_pred if n_pred else 0.0
    rec = tp / n_gold if n_gold else 0.0
    return prec, rec, 2 * prec * rec / (prec + rec) if prec + rec else 0.0


def _total(docs: Sequence[Counts]) -> Counts:
    out: Counts = defaultdict(float)
    for d in docs:
        for key, value in d.items():
            out[key] += value
    return out


def report(docs: Sequence[Counts], seed: int = 0) -> dict:
    """P/R/F1 per class with bootstrap 95 % intervals of F1 (and of case accuracy)."""
    total = _total(docs)
    rng = random.Random(seed)
    samples = [_total([docs[rng.randrange(len(docs))] for _ in docs]) for _ in range(BOOTSTRAP)] if docs else []

    def ci(fn) -> list[float]:  # type: ignore[no-untyped-def]
        vals = sorted(fn(s) for s in samples)
        return [round(vals[int(0.025 * len(vals))], 3), round(vals[int(0.975 * len(vals)) - 1], 3)] if vals else []

    out: dict = {"n_docs": len(docs), "n_words": int(total["case:n"])}
    for cls in (*PUNCT_CLASSES, "CAP"):
        p, r, f = _f1(total, cls)
        out[cls] = {"precision": round(p, 3), "recall": round(r, 3), "f1": round(f, 3),
                    "f1_ci95": ci(lambda s, cls=cls: _f1(s, cls)[2]), "support": int(total[f"{cls}:gold"])}
    n = max(total["case:n"], 1)
    out["case_accuracy"] = round(total["case:ok"] / n, 4)
    out["case_accuracy_ci95"] = ci(lambda s: s["case:ok"] / max(s["case:n"], 1))
    out["case_accuracy_all_lower"] = round(total["case:lower_ok"] / n, 4)
    return out


@torch.no_grad()
def run_model(model_dir: str, heads_dir: Path | None, corpus: Path, splits: Sequence[str], max_k: int) -> dict:
    from rwkv_stream.loading import load_source
    from rwkv_stream.train.loop import lookahead_head

    loaded = load_source(model_dir, heads=heads_dir)
    tok = loaded.need_tokenizer()
    enc = D.WordEncoder(tok)
    names = [lookahead_head(k) for k in range(max_k + 1) if lookahead_head(k) in loaded.heads]
    ks = range(len(names))
    labels = loaded.heads["tagger"].labels
    results: dict = {"model": str(model_dir), "fingerprint": loaded.model.fingerprint, "lookahead": {}}
    per_k: dict[int, dict[str, list[Counts]]] = {k: defaultdict(list) for k in ks}
    t0, n_words = time.time(), 0
    for split in splits:
        for source, docs in documents(corpus / f"{split}.txt").items():
            for lines in docs:
                doc = D.transcript_document(lines, enc)
                pos = [i for i, t in enumerate(doc.tags) if t != D.IGNORE]
                hidden = loaded.model.forward_hidden(doc.ids)[0].float()[pos]
                preds = [loaded.heads[name](hidden).argmax(-1).tolist() for name in names]
                gold = [labels[doc.tags[i]] for i in pos]
                for k in ks:
                    got = [labels[x] for x in decisions(preds[: k + 1], k)]
                    per_k[k][f"{split}/{source}"].append(doc_counts(gold, got))
                n_words += len(pos) - 1
            print(f"  {model_dir} {split}/{source}: {len(docs)} documents, {n_words} words so far, "
                  f"{time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    conversational = [s for s in per_k[0] if "chitchat" in s or "chatterbot" in s]
    for k in ks:
        groups = {**per_k[k], "conversational": [c for s in conversational for c in per_k[k][s]]}
        results["lookahead"][str(k)] = {name: report(docs) for name, docs in groups.items()}
        results["lookahead"][str(k)]["added_latency"] = {
            "words": k, "ms_at_speaking_pace": round(1000 * k / WORDS_PER_SECOND)}
    results["head_cost_us"] = head_cost_us(loaded.heads, names)
    return results


def head_cost_us(heads, names: Sequence[str], words: int = 5, reps: int = 2000) -> dict:  # type: ignore[no-untyped-def]
    """Wall time of applying the lookahead heads to one fragment's words (microseconds, median of reps)."""
    hidden = torch.randn(words, heads["tagger"].n_embd)
    out = {}
    for n in range(1, len(names) + 1):
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            for name in names[:n]:
                heads[name](hidden).argmax(-1)
            times.append(time.perf_counter() - t)
        out[f"{n} heads"] = round(1e6 * sorted(times)[len(times) // 2], 1)
    return out


def table(results: dict, group: str = "conversational") -> str:
    rows = ["| lookahead k | added latency | comma F1 | period F1 | question F1 | capitalized F1 | case acc |",
            "|---|---|---|---|---|---|---|"]
    for k, res in results["lookahead"].items():
        r, lat = res[group], res["added_latency"]
        cells = [f"{r[c]['f1']:.3f} [{r[c]['f1_ci95'][0]:.2f}, {r[c]['f1_ci95'][1]:.2f}]"
                 for c in (*PUNCT_CLASSES, "CAP")]
        rows.append(f"| {k} | {lat['words']} words, {lat['ms_at_speaking_pace']} ms | " + " | ".join(cells)
                    + f" | {r['case_accuracy']:.3f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="bundle directory or shipped[:NAME]")
    ap.add_argument("--heads", type=Path, help="extra heads (a run's OUT/heads: tagger+1..tagger+K)")
    ap.add_argument("--corpus", type=Path, default=Path("data/speech"))
    ap.add_argument("--splits", nargs="+", default=["test", "heldout"])
    ap.add_argument("--max-k", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = run_model(args.model, args.heads, args.corpus, args.splits, args.max_k)
    text = json.dumps(res, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
