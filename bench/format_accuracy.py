"""Accuracy of each weight format against fp32 on the shipped model and the demo transcript; prints JSON.

    .venv/bin/python bench/format_accuracy.py

For every format: the largest |logit error| relative to the largest |logit| over the transcript, how often the
top LM token agrees with fp32, and how often each head's label (tagger, classifier) agrees with fp32.
"""

from __future__ import annotations

import json
import sys

from rwkv_stream.loading import load_source, shipped_dir

FORMATS = ("bfloat16", "float16", "int8", "w8a8")


def main() -> int:
    text = (shipped_dir().parent / "demo" / "sample_transcript.txt").read_text()
    loaded = load_source("shipped")
    model, tokenizer, heads = loaded.model, loaded.tokenizer, loaded.heads
    ids = tokenizer.encode(text)
    hidden, _ = model.forward_hidden(ids)
    logits = model.head(hidden)
    labels = {name: heads[name].predict(hidden) for name in heads.heads}
    report = {"model": "shipped transcript-tagger", "tokens": len(ids), "formats": {}}
    for fmt in FORMATS:
        other = load_source("shipped", dtype=fmt).model
        h, _ = other.forward_hidden(ids)
        lg = other.head(h)
        report["formats"][fmt] = {
            "max_rel_logit_error": round(float((lg - logits).abs().max() / logits.abs().max()), 4),
            "top1_agreement": round(float((lg.argmax(-1) == logits.argmax(-1)).float().mean()), 4),
            **{f"{name}_agreement": round(sum(a == b for a, b in zip(heads[name].predict(h), want, strict=True))
                                          / len(want), 4) for name, want in labels.items()},
        }
    json.dump(report, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
