"""The shipped model's recipe beyond plain training: a fine-tune that starts its heads from the previous model
(``--init-heads``), and the decision offsets fitted on the valid split (``rwkv_stream.train.calibrate``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rwkv_stream.heads import Head, HeadSet
from rwkv_stream.train import calibrate as C
from rwkv_stream.train import transcript

CORPUS = [
    "Hi, how are you today? I am fine, thanks.",
    "Did you see the game last night? Yes, it was great, wasn't it?",
    "I think so. We should go to the next one, Tom.",
    "Sure. What time does it start? At seven, I guess.",
]
TINY = ["--n-embd", "16", "--n-layer", "2", "--vocab-size", "300", "--batch-size", "2", "--ctx", "32",
        "--warmup", "1", "--checkpoint-every", "2", "--device", "cpu", "--group", "2"]


def _train(*argv: str) -> int:
    from rwkv_stream.cli import main

    return main(["train", "--task", "transcript", *argv, *TINY])


def _corpus(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.txt").write_text("\n".join(CORPUS * 3) + "\n")
    (folder / "train.books.txt").write_text("\n".join(["chat", "chat", "talk", "talk"] * 3) + "\n")
    (folder / "test.txt").write_text("\n".join(CORPUS) + "\n")
    (folder / "valid.txt").write_text("\n".join(CORPUS) + "\n")
    (folder / "valid.docs.txt").write_text("chitchat:1\nchitchat:1\nchitchat:2\nchitchat:2\n")
    return folder


def _same(a: Head, b: Head) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_a_fine_tune_starts_its_heads_from_the_init_bundle_and_run(tmp_path: Path) -> None:
    corpus = _corpus(tmp_path / "corpus")
    assert _train("--corpus", str(corpus), "--out", str(tmp_path / "a"), "--steps", "2", "--lookahead", "1",
                  "--bundle", str(tmp_path / "b")) == 0
    assert _train("--corpus", str(corpus), "--out", str(tmp_path / "c"), "--steps", "0", "--lookahead", "1",
                  "--init", str(tmp_path / "b"), "--init-heads", str(tmp_path / "b"),
                  "--init-heads", str(tmp_path / "a" / "heads")) == 0
    before, after = HeadSet.load(tmp_path / "a" / "heads"), HeadSet.load(tmp_path / "c" / "heads")
    for name in ("tagger", "tagger+1", "classifier"):  # no step taken: every head is the one it started from
        assert _same(before[name], after[name]), name


def test_offsets_add_per_punctuation_and_per_case() -> None:
    labels = transcript.LABELS
    vec = C.offset_vector(labels, {"COMMA": 1.0, "Cap": 0.5})
    assert vec[labels.index("COMMA-Cap")] == 1.5 and vec[labels.index("O-Cap")] == 0.5
    assert vec[labels.index("COMMA-lower")] == 1.0 and vec[labels.index("O-lower")] == 0.0


def test_fit_raises_the_recall_of_an_under_predicted_class() -> None:
    labels = transcript.LABELS
    gen = torch.Generator().manual_seed(0)
    gold = torch.tensor([labels.index("COMMA-lower") if i % 5 == 0 else labels.index("O-lower") for i in range(500)])
    scores = torch.randn(500, len(labels), generator=gen) * 0.1
    scores[:, labels.index("O-lower")] += 1.0
    scores[gold == labels.index("COMMA-lower"), labels.index("COMMA-lower")] += 0.8  # right, but never the argmax
    is_word = torch.ones(500, dtype=torch.bool)
    offsets, before, after = C.fit(scores, gold, is_word, labels)
    assert offsets["COMMA"] > 0 and after > before


def test_calibrate_writes_offsets_once_and_a_verified_bundle(tmp_path: Path) -> None:
    from rwkv_stream.loading import load_source

    corpus = _corpus(tmp_path / "corpus")
    run, bundle = tmp_path / "run", tmp_path / "bundle"
    assert _train("--corpus", str(corpus), "--out", str(run), "--steps", "2", "--lookahead", "1",
                  "--bundle", str(bundle)) == 0
    offsets = tmp_path / "offsets.json"
    result = C.calibrate(bundle, run / "heads", run / "heads-cal", offsets, corpus)
    assert set(result["heads"]) == {"tagger", "tagger+1"} and offsets.exists()
    b = load_source(bundle)  # checksums verified
    raw, cal = HeadSet.load(run / "heads"), HeadSet.load(run / "heads-cal")
    for name in ("tagger", "tagger+1"):
        shift = C.offset_vector(raw[name].labels, result["heads"][name]["offsets"])
        torch.testing.assert_close(cal[name].net.bias, raw[name].net.bias + shift)
    assert _same(b.heads["tagger"], cal["tagger"]) and _same(b.heads["classifier"], raw["classifier"])
    assert json.loads((bundle / "bundle.json").read_text())["info"]["calibration"] == result
    again = C.calibrate(bundle, run / "heads", run / "heads-cal", offsets, corpus)  # applied to the raw heads again
    assert again == result and _same(load_source(bundle).heads["tagger"], cal["tagger"])
