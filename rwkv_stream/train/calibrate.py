"""Decision offsets of the tagging heads, fitted on the valid split, so that argmax serves F1 rather than accuracy.

    python -m rwkv_stream.train.calibrate BUNDLE RUN/heads OUT_HEADS OFFSETS.json [--corpus data/speech]

A head trained with cross-entropy and read by argmax favours the frequent labels (``O``, ``lower``): rare
classes get high precision and low recall. Each tagging head (``tagger``, ``tagger+k``) gets a score offset
per punctuation class (COMMA, PERIOD, QUESTION; ``O`` stays 0) and per case (Cap, UPPER; ``lower`` stays 0),
added to the bias of its last layer: label ``P-c`` gets ``offset[P] + offset[c]``. The offsets maximize the
mean F1 of COMMA, PERIOD, QUESTION and capitalized words (the goal figures of issue 17) on the ``valid``
split's chats (``valid/chitchat``: held-out chats, not the test documents), by coordinate ascent on a grid.

When OFFSETS.json exists its offsets are applied as they are (a rerun of the recipe does not refit). Writes
OUT_HEADS (all heads, the tagging ones with the offsets) and replaces the bundle's heads by the calibrated
``tagger`` and the unchanged ``classifier`` (checksums in ``bundle.json`` updated, offsets in its ``info``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import Tensor

from rwkv_stream.heads import Head, HeadSet
from rwkv_stream.train import data as D
from rwkv_stream.train import speech_eval

PUNCT_OFFSETS = ("COMMA", "PERIOD", "QUESTION")
CASE_OFFSETS = ("Cap", "UPPER")
GRID = [round(-2.0 + 0.25 * i, 2) for i in range(21)]  # -2 .. 3
ROUNDS = 3


def offset_vector(labels: list[str], offsets: dict[str, float]) -> Tensor:
    """Per-label score offsets: ``offset[P] + offset[c]`` for label ``P-c`` (missing keys: 0)."""
    out = []
    for label in labels:
        punct, case = label.split("-")
        out.append(offsets.get(punct, 0.0) + offsets.get(case, 0.0))
    return torch.tensor(out)


def mean_f1(scores: Tensor, gold: Tensor, is_word: Tensor, labels: list[str]) -> float:
    """Mean F1 of COMMA, PERIOD, QUESTION and capitalized words of argmax(scores) (as speech_eval counts)."""
    pred = scores.argmax(-1)
    punct = torch.tensor([speech_eval.PUNCT_CLASSES.index(lab.split("-")[0]) if lab.split("-")[0]
                          in speech_eval.PUNCT_CLASSES else -1 for lab in labels])
    cap = torch.tensor([not lab.endswith("-lower") for lab in labels])
    f1s = []
    for c in range(len(speech_eval.PUNCT_CLASSES)):
        f1s.append(_f1(punct[pred] == c, punct[gold] == c))
    f1s.append(_f1(cap[pred] & is_word, cap[gold] & is_word))
    return sum(f1s) / len(f1s)


def _f1(pred: Tensor, gold: Tensor) -> float:
    tp, n_pred, n_gold = float((pred & gold).sum()), float(pred.sum()), float(gold.sum())
    return 2 * tp / (n_pred + n_gold) if n_pred + n_gold else 0.0


def fit(scores: Tensor, gold: Tensor, is_word: Tensor, labels: list[str]) -> tuple[dict[str, float], float, float]:
    """Offsets by coordinate ascent on :data:`GRID`; returns them, the mean F1 before and after."""
    offsets = {k: 0.0 for k in (*PUNCT_OFFSETS, *CASE_OFFSETS)}
    best = before = mean_f1(scores, gold, is_word, labels)
    for _ in range(ROUNDS):
        for key in offsets:
            for value in GRID:
                trial = {**offsets, key: value}
                f = mean_f1(scores + offset_vector(labels, trial), gold, is_word, labels)
                if f > best + 1e-9:
                    best, offsets = f, trial
    return offsets, before, best


@torch.no_grad()
def collect(loaded, names: list[str], corpus: Path, split: str, source: str) -> dict[str, tuple]:  # type: ignore[no-untyped-def]
    """For each head ``tagger+k``: the scores deciding each word (k words later) with gold labels and word mask."""
    enc = D.WordEncoder(loaded.need_tokenizer())
    rows: dict[str, tuple[list[Tensor], list[Tensor], list[Tensor]]] = {n: ([], [], []) for n in names}
    for lines in speech_eval.documents(corpus / f"{split}.txt")[source]:
        doc = D.transcript_document(lines, enc)
        pos = [i for i, t in enumerate(doc.tags) if t != D.IGNORE]
        hidden = loaded.model.forward_hidden(doc.ids)[0].float()[pos]
        gold = torch.tensor([doc.tags[i] for i in pos])
        n = len(pos)
        for k, name in enumerate(names):
            if n <= k:
                continue
            rows[name][0].append(loaded.heads[name](hidden[k:]).float())
            rows[name][1].append(gold[: n - k])
            rows[name][2].append(torch.arange(n - k) < n - 1)  # the last item is the end marker
    return {n: tuple(torch.cat(parts) for parts in r) for n, r in rows.items() if r[0]}


@torch.no_grad()
def with_offsets(head: Head, offsets: dict[str, float]) -> Head:
    copy = Head(**head.spec())
    copy.load_state_dict(head.state_dict())
    last = copy.net if isinstance(copy.net, torch.nn.Linear) else list(copy.net.children())[-1]
    assert isinstance(last, torch.nn.Linear)
    last.bias.add_(offset_vector(copy.labels, offsets).to(last.bias.dtype))
    return copy.eval()


def calibrate(bundle: Path, run_heads: Path, out_heads: Path, offsets_file: Path, corpus: Path,
              split: str = "valid", source: str = "chitchat") -> dict:
    from rwkv_stream.bundle import sha256_file
    from rwkv_stream.loading import load_source
    from rwkv_stream.train.loop import lookahead_head

    raw = HeadSet.load(run_heads)
    names = [lookahead_head(k) for k in range(len(raw.heads)) if lookahead_head(k) in raw]
    if offsets_file.exists():
        result = json.loads(offsets_file.read_text())
    else:
        loaded = load_source(bundle, heads=run_heads)
        data = collect(loaded, names, corpus, split, source)
        result = {"fitted_on": f"{split}/{source}", "objective": "mean F1 of COMMA, PERIOD, QUESTION, capitalized",
                  "heads": {}}
        for name, (scores, gold, is_word) in data.items():
            offsets, before, after = fit(scores, gold, is_word, raw[name].labels)
            result["heads"][name] = {"offsets": offsets, "mean_f1_before": round(before, 4),
                                     "mean_f1_after": round(after, 4)}
            print(f"{name}: {offsets} mean F1 on {split}/{source} {before:.4f} -> {after:.4f}", file=sys.stderr)
        offsets_file.write_text(json.dumps(result, indent=1) + "\n")
    calibrated = {n: with_offsets(h, result["heads"][n]["offsets"]) if n in result["heads"] else h
                  for n, h in raw.heads.items()}
    HeadSet(calibrated, raw.model_fingerprint).save(out_heads)
    HeadSet({n: h for n, h in calibrated.items() if "+" not in n}, raw.model_fingerprint).save(bundle)
    manifest_file = bundle / "bundle.json"
    manifest = json.loads(manifest_file.read_text())
    for f in ("heads.json", "heads.safetensors"):
        manifest["files"][f] = sha256_file(bundle / f)
    manifest["info"]["calibration"] = result
    manifest_file.write_text(json.dumps(manifest, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path, help="the run's bundle (its heads are replaced)")
    ap.add_argument("run_heads", type=Path, help="the run's raw heads (OUT/heads: tagger, tagger+k, classifier)")
    ap.add_argument("out_heads", type=Path, help="folder for the calibrated heads")
    ap.add_argument("offsets", type=Path, help="offsets JSON: written when missing, else applied as is")
    ap.add_argument("--corpus", type=Path, default=Path("data/speech"))
    ap.add_argument("--split", default="valid")
    ap.add_argument("--source", default="chitchat")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    calibrate(args.bundle, args.run_heads, args.out_heads, args.offsets, args.corpus, args.split, args.source)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
