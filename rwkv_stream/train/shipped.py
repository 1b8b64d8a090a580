"""Helpers of ``scripts/train_shipped_model.sh``: the held-out sample the tests replay, and the model card.

    python -m rwkv_stream.train.shipped sample BUNDLE TEST_TXT OUT_JSON   # engine metrics on a few KB of test text
    python -m rwkv_stream.train.shipped card BUNDLE OUT_MD                # docs/model-card.md from bundle.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from rwkv_stream.train import data as D
from rwkv_stream.train import transcript

if TYPE_CHECKING:
    from rwkv_stream.tokenizer import Tokenizer

SAMPLE_PARAGRAPHS = 12
SAMPLE_GROUP = 4
SAMPLE_TOLERANCE = 0.002


def sample_dataset(paragraphs: list[str], tokenizer: Tokenizer, group: int) -> D.Dataset:
    """Streams of ``group`` paragraphs, each ending with the end marker (as in the held-out evaluation)."""
    enc = D.WordEncoder(tokenizer)
    docs = [D.transcript_document(paragraphs[i : i + group], enc) for i in range(0, len(paragraphs), group)]
    return D.Dataset(docs, list(transcript.LABELS))


def engine_metrics(bundle_dir: Path, paragraphs: list[str], group: int) -> dict:
    """Tagger metrics of the bundle, run by the engine (one stream at a time, fp32)."""
    from rwkv_stream.loading import load_source
    from rwkv_stream.train.evaluate import engine_hidden_fn, evaluate

    b = load_source(bundle_dir)
    tok = b.need_tokenizer()
    ds = sample_dataset(paragraphs, tok, group)
    end_id = D.WordEncoder(tok).end[0]
    heads = {"tagger": b.heads["tagger"]}
    report = evaluate(ds, engine_hidden_fn(b.model), b.model.head, heads, tok, end_id)
    tagger = report["tagger"]
    return {"label_accuracy": tagger["label_accuracy"], "punct_micro_f1": tagger["punct_micro_f1"],
            "case_accuracy": tagger["case_accuracy"], "n_positions": tagger["n_positions"],
            "bits_per_byte": report["lm"]["bits_per_byte"]}


def write_sample(bundle_dir: Path, test_txt: Path, out: Path, n: int = SAMPLE_PARAGRAPHS) -> dict:
    paragraphs = D.read_lines(test_txt)[:n]
    manifest = json.loads((bundle_dir / "bundle.json").read_text())
    sample = {
        "source": f"first {n} lines of {test_txt} (held-out split)",
        "model_version": manifest["model_version"], "fingerprint": manifest["fingerprint"],
        "group": SAMPLE_GROUP, "tolerance": SAMPLE_TOLERANCE, "paragraphs": paragraphs,
        "expected": engine_metrics(bundle_dir, paragraphs, SAMPLE_GROUP),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(sample, indent=1, ensure_ascii=False) + "\n")
    return sample


def attach(bundle_dir: Path, key: str, value: str) -> None:
    """Put evaluation results into the bundle's ``info`` (``bundle.json`` is not among the checksummed files)."""
    manifest_file = bundle_dir / "bundle.json"
    manifest = json.loads(manifest_file.read_text())
    path = Path(value)
    manifest["info"][key] = json.loads(path.read_text()) if value.endswith(".json") and path.exists() \
        else json.loads(value)
    manifest_file.write_text(json.dumps(manifest, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sample")
    s.add_argument("bundle", type=Path)
    s.add_argument("test_txt", type=Path)
    s.add_argument("out", type=Path)
    c = sub.add_parser("card")
    c.add_argument("bundle", type=Path)
    c.add_argument("out", type=Path)
    t = sub.add_parser("attach", help="store a JSON file (or a JSON value) in bundle.json info[KEY]")
    t.add_argument("bundle", type=Path)
    t.add_argument("key")
    t.add_argument("value", help="a .json file, or a JSON string")
    args = ap.parse_args(argv)
    if args.cmd == "sample":
        print(json.dumps(write_sample(args.bundle, args.test_txt, args.out)["expected"], indent=2))
    elif args.cmd == "attach":
        attach(args.bundle, args.key, args.value)
    else:
        from rwkv_stream.train.model_card import write_card

        write_card(args.bundle, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
