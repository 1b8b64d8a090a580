"""The shipped model (rwkv_stream/data/transcript-tagger): checksums, metrics on a stored held-out sample,
and the engine's one-token mode against the training forward. Needs no corpus package."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from rwkv_stream.checkpoint import CheckpointError, load_canonical
from rwkv_stream.loading import LoadedModel, load_source, shipped_dir
from rwkv_stream.tokenizer import StreamingEncoder
from rwkv_stream.train import RWKV4, transcript
from rwkv_stream.train.shipped import engine_metrics

BUNDLE = shipped_dir()
SAMPLE = Path(__file__).parent / "data" / "transcript_sample.json"
MAX_BYTES = 20_000_000


@pytest.fixture(scope="module")
def bundle() -> LoadedModel:
    return load_source("shipped")  # verifies every file's sha256 against bundle.json


@pytest.fixture(scope="module")
def sample() -> dict:
    return json.loads(SAMPLE.read_text())


def test_bundle_manifest_heads_and_size(bundle: LoadedModel) -> None:
    m = bundle.manifest
    assert m["name"] == "transcript-tagger" and m["model_version"]
    assert set(m["files"]) == {"model.safetensors", "tokenizer.json", "heads.json", "heads.safetensors"}
    assert sum((BUNDLE / f).stat().st_size for f in m["files"]) < MAX_BYTES
    assert bundle.model.fingerprint == m["fingerprint"] == bundle.heads.model_fingerprint
    tagger, classifier = bundle.heads["tagger"], bundle.heads["classifier"]
    assert tagger.kind == "tagger" and tagger.labels == transcript.LABELS
    assert classifier.kind == "classifier" and classifier.labels == ["address", "chat", "novel"]  # the register
    assert bundle.tokenizer.vocab_size == bundle.model.config.vocab_size
    info = m["info"]
    assert info["tagger"]["punct_micro_f1"] > info["baseline_rule"]["punct_micro_f1"]
    assert info["tagger"]["case_accuracy"] > info["baseline_rule"]["case_accuracy"]
    assert info["classifier"]["accuracy"] > info["classifier"]["majority_accuracy"]
    assert 0 < info["lm"]["bits_per_byte"] < 8
    speech, previous = info["speech"]["lookahead"]["0"]["conversational"], info["speech_previous"]["lookahead"]["0"]
    for label in ("COMMA", "PERIOD", "QUESTION", "CAP"):  # shipped only if better on held-out conversation
        assert speech[label]["f1"] > previous["conversational"][label]["f1"], label


def test_a_changed_file_fails_verification(tmp_path: Path) -> None:
    copy = shutil.copytree(BUNDLE, tmp_path / "b")
    heads = json.loads((copy / "heads.json").read_text())
    (copy / "heads.json").write_text(json.dumps(heads, indent=1))
    with pytest.raises(CheckpointError, match="checksum"):
        load_source(copy)


def test_sample_reproduces_the_stored_metrics(bundle: LoadedModel, sample: dict) -> None:
    assert sample["fingerprint"] == bundle.manifest["fingerprint"]
    got = engine_metrics(BUNDLE, sample["paragraphs"], sample["group"])
    expected = sample["expected"]
    assert got["n_positions"] == expected["n_positions"]
    for key in ("label_accuracy", "punct_micro_f1", "case_accuracy", "bits_per_byte"):
        assert got[key] == pytest.approx(expected[key], abs=sample["tolerance"]), key


def test_engine_one_token_mode_matches_training_forward(bundle: LoadedModel, sample: dict) -> None:
    tensors, _ = load_canonical(BUNDLE / "model.safetensors")
    trained = RWKV4.from_state_dict(tensors).eval()
    ids = bundle.tokenizer.encode(transcript.normalize(sample["paragraphs"][0]))[:40]
    with torch.no_grad():
        hidden, _ = trained.forward_hidden(torch.tensor([ids]))
        logits = trained.head(hidden)[0]
    state, rows, hidden_rows = None, [], []
    for tok in ids:
        h, state = bundle.model.forward_hidden([tok], state)
        hidden_rows.append(h[0])
        rows.append(bundle.model.head(h)[0])
    torch.testing.assert_close(torch.stack(hidden_rows), hidden[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.stack(rows), logits, rtol=1e-4, atol=2e-3)
    tagger = bundle.heads["tagger"]
    assert tagger.predict(torch.stack(hidden_rows)) == tagger.predict(hidden[0])


def test_streamed_fragments_tag_like_the_whole_text(bundle: LoadedModel, sample: dict) -> None:
    words = transcript.normalize(sample["paragraphs"][1]).split()[:30]
    enc = StreamingEncoder(bundle.tokenizer)
    state, streamed = None, []
    for i, word in enumerate(words):
        ids = enc.push(word if i == 0 else " " + word)
        if ids:
            h, state = bundle.model.forward_hidden(ids, state)
            streamed.append(h)
    h, state = bundle.model.forward_hidden(enc.push(transcript.END) + enc.flush(), state)
    streamed.append(h)
    whole_ids = bundle.tokenizer.encode(" ".join(words) + transcript.END)
    whole, _ = bundle.model.forward_hidden(whole_ids)
    torch.testing.assert_close(torch.cat(streamed), whole, rtol=1e-4, atol=1e-4)
    labels = bundle.heads["tagger"].predict(whole[-1:])
    assert labels[0].endswith("-lower")  # the end marker's label: only its punctuation part is meaningful
