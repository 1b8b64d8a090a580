"""The ``spacy train`` contract: configs/rwkv_train.cfg fine-tunes the shipped RWKV model from DocBins.

The DocBins are generated here (seeded synthetic prose in transcript form, see
``rwkv_stream.components.spacy_corpus``), so the test needs no download and no corpus package. It trains with
``python -m spacy train`` on one CPU thread, then checks: dev tag accuracy well above a most-frequent-tag-per-word
baseline; the saved pipeline reproduces the training run's own dev score (``meta.json``) in this process and
through ``spacy evaluate``; a fresh process gives identical tags and cats; and fragments fed as a live stream
give the same tags as the whole texts.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import spacy
from rwkv_stream.components.spacy_corpus import most_frequent_tag_accuracy, read_docs, write_synthetic
from spacy.tokens import Doc

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "rwkv_train.cfg"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("spacy_train")
    train, dev = write_synthetic(tmp, n_train=300, n_dev=60, seed=1)
    out = tmp / "out"
    cmd = [sys.executable, "-m", "spacy", "train", str(CONFIG), "--paths.train", str(train), "--paths.dev", str(dev),
           "--output", str(out), "--training.max_steps", "60", "--training.eval_frequency", "20"]
    start = time.monotonic()
    run = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    seconds = time.monotonic() - start
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return {"train": train, "dev": dev, "best": out / "model-best", "seconds": seconds, "log": run.stdout}


def predict(nlp: spacy.Language, texts: list[str]) -> list[dict]:
    return [{"tags": [t.tag_ for t in doc], "cats": doc.cats} for doc in nlp.pipe(texts)]


def tag_accuracy(nlp: spacy.Language, gold: list[Doc]) -> float:
    pairs = [(p.tag_, g.tag_) for doc, ref in zip(nlp.pipe([d.text for d in gold]), gold, strict=True)
             for p, g in zip(doc, ref, strict=True)]
    return sum(p == g for p, g in pairs) / len(pairs)


def test_trains_in_under_three_minutes_and_beats_the_per_word_baseline(trained):
    assert trained["seconds"] < 180, trained["seconds"]
    train_docs, dev_docs = read_docs(trained["train"]), read_docs(trained["dev"])
    baseline = most_frequent_tag_accuracy(train_docs, dev_docs)
    nlp = spacy.load(trained["best"])
    accuracy = tag_accuracy(nlp, dev_docs)
    assert accuracy > baseline + (1 - baseline) / 2, (accuracy, baseline)  # at least halves the baseline's errors
    cats_hits = sum(max(doc.cats, key=doc.cats.get) == max(ref.cats, key=ref.cats.get)
                    for doc, ref in zip(nlp.pipe([d.text for d in dev_docs]), dev_docs, strict=True))
    assert cats_hits / len(dev_docs) > 0.9
    meta = json.loads((trained["best"] / "meta.json").read_text())
    assert accuracy == pytest.approx(meta["performance"]["tag_acc"], abs=1e-9)  # the saved model is the trained one


def test_spacy_evaluate_reports_tags_and_cats(trained, tmp_path):
    out = tmp_path / "scores.json"
    cmd = [sys.executable, "-m", "spacy", "evaluate", str(trained["best"]), str(trained["dev"]), "--output", str(out)]
    run = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    scores = json.loads(out.read_text())
    meta = json.loads((trained["best"] / "meta.json").read_text())
    assert scores["tag_acc"] == pytest.approx(meta["performance"]["tag_acc"], abs=1e-9)
    assert scores["cats_score"] == pytest.approx(meta["performance"]["cats_score"], abs=1e-9)


def test_fresh_process_gives_identical_output(trained):
    texts = [d.text for d in read_docs(trained["dev"])][:20]
    script = textwrap.dedent(f"""
        import json, sys, torch, spacy
        torch.set_num_threads(1)
        nlp = spacy.load({str(trained["best"])!r})
        texts = json.loads(sys.stdin.read())
        print(json.dumps([{{"tags": [t.tag_ for t in d], "cats": d.cats}} for d in nlp.pipe(texts)]))
    """)
    run = subprocess.run([sys.executable, "-c", script], input=json.dumps(texts), env=ENV, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout) == predict(spacy.load(trained["best"]), texts)


def test_streamed_fragments_give_the_whole_texts_tags(trained):
    nlp = spacy.load(trained["best"])
    rng = random.Random(3)
    for i, ref in enumerate(read_docs(trained["dev"])[:15]):
        whole = nlp(ref.text)
        spaces = [j for j, ch in enumerate(ref.text) if ch == " "]
        cuts = sorted(rng.sample(spaces, min(len(spaces), rng.randint(1, 5))))
        parts = [ref.text[a:b] for a, b in zip([0, *cuts], [*cuts, len(ref.text)], strict=True)]
        tags: dict[tuple[int, int], str] = {}
        for part in parts:
            doc = nlp.make_doc(part)
            doc._.stream_id = f"dev-{i}"
            doc = nlp(doc)
            tags.update({(doc._.rwkv_offset + t.idx, len(t)): t.tag_ for t in doc if not t.is_space})
        assert tags == {(t.idx, len(t)): t.tag_ for t in whole}, (ref.text, cuts)
        assert doc.cats.keys() == whole.cats.keys()
        assert all(abs(doc.cats[k] - whole.cats[k]) < 1e-5 for k in whole.cats)
        assert nlp.get_pipe("rwkv").end_stream(f"dev-{i}")
