"""rwkv + listeners against spaCy's standard CNN ``tok2vec`` pipeline (``spacy init config --pipeline
tagger,textcat --optimize efficiency``), on the same transcript data and the same wall-clock training budget;
prints JSON (tag accuracy, cats macro F1, steps, training seconds, words/s).

rwkv variants (``--variants``, the first is reported as ``rwkv``, the others as ``rwkv_<variant>``):
``textcat`` (default): ``configs/rwkv_textcat.cfg``, the shipped RWKV fine-tuned with its own tag head and
spaCy's ``textcat`` listening to it (TextCatEnsemble.v2: an ``rwkv_stream.RWKVListener.v1`` beside a
bag-of-words model); ``textcat_reduce``: the same with a ``spacy.TextCatReduce.v1`` textcat (mean and max
pooling of the listener's vectors, no bag of words); ``stream_classifier``: ``configs/rwkv_train.cfg`` (rwkv's
own stream classifier, read at each Doc's last token). A variant can carry a label and config overrides:
``lr5:textcat@training.optimizer.learn_rate.initial_rate=0.005@components.rwkv.weights_learn_rate=0.08``.

Data: the Austen corpus of ``scripts/make_corpus.sh`` (``--corpus DIR``: train on the first ``--train``
paragraphs of ``train.txt``, evaluate on the first ``--dev`` of ``test.txt``, the split the shipped model never
saw; the shipped model was pretrained on all of ``train.txt``; both drawn at random, seed 0), or generated prose
(``--synthetic``).

The machine is shared, so the two pipelines are measured side by side, not one after the other: training
alternates update steps (always the pipeline that has used less of its budget), and inference alternates
``nlp.pipe`` passes over the dev texts (``--passes`` each; words/s from the best pass, wall clock and CPU
time of this process, with the median beside it). The host (``/proc/cpuinfo``) and its load (``/proc/loadavg``
and the share of all cores busy during the inference passes, from ``/proc/stat``) are in the JSON.
``--formats`` also times the trained rwkv pipeline reloaded with other weight formats (accuracy beside).

    OMP_NUM_THREADS=1 .venv/bin/python bench/spacy_vs_cnn.py --corpus data/corpus --budget 180
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import spacy  # noqa: E402
import torch  # noqa: E402
from rwkv_stream.components.spacy_corpus import (  # noqa: E402
    TOPICS,
    make_docbin,
    most_frequent_tag_accuracy,
    synthetic_paragraphs,
)
from spacy.cli.init_config import init_config  # noqa: E402
from spacy.language import Language  # noqa: E402
from spacy.tokens import Doc  # noqa: E402
from spacy.training import Example  # noqa: E402
from spacy.training.batchers import minibatch_by_words  # noqa: E402
from spacy.util import load_config, load_model_from_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def corpus(args: argparse.Namespace) -> tuple[list[Doc], list[Doc]]:
    nlp = spacy.blank("en")
    if args.synthetic:
        labels = sorted(TOPICS)
        train, dev = synthetic_paragraphs(args.train, 1), synthetic_paragraphs(args.dev, 2)
    else:
        def read(name: str, n: int) -> list[tuple[str, str | None]]:
            lines = [x for x in (args.corpus / f"{name}.txt").read_text().split("\n") if x.strip()]
            books = [x for x in (args.corpus / f"{name}.books.txt").read_text().split("\n") if x.strip()]
            pairs: list[tuple[str, str | None]] = list(zip(lines, books, strict=True))
            return random.Random(0).sample(pairs, min(n, len(pairs)))  # all six novels, not the first one
        train, dev = read("train", args.train), read("test", args.dev)
        labels = sorted({b for _, b in train + dev if b})
    return ([*make_docbin(nlp, train, labels).get_docs(nlp.vocab)],
            [*make_docbin(nlp, dev, labels).get_docs(nlp.vocab)])


VARIANTS = ("textcat", "textcat_reduce", "stream_classifier")
REDUCE_TEXTCAT = {"@architectures": "spacy.TextCatReduce.v1", "exclusive_classes": True, "use_reduce_first": False,
                  "use_reduce_last": False, "use_reduce_max": True, "use_reduce_mean": True, "nO": None}


def rwkv_pipeline(spec: str) -> Language:
    """``VARIANT[@section.key=value...]``: a variant's config with ``spacy train``-style overrides (JSON values)."""
    variant, *pairs = spec.split("@")
    overrides = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    path = ROOT / "configs" / ("rwkv_train.cfg" if variant == "stream_classifier" else "rwkv_textcat.cfg")
    config = load_config(path, overrides=overrides)
    if variant == "textcat_reduce":
        tok2vec = config["components"]["textcat"]["model"]["tok2vec"]
        config["components"]["textcat"]["model"] = {**REDUCE_TEXTCAT, "tok2vec": tok2vec}
    return load_model_from_config(config, auto_fill=True)


def cnn_pipeline() -> Language:
    config = init_config(lang="en", pipeline=["tagger", "textcat"], optimize="efficiency", gpu=False)
    return load_model_from_config(config, auto_fill=True)


def shipped_model(nlp: Language) -> dict:
    """The RWKV model the rwkv pipelines start from (source, version when a bundle says it, fingerprint)."""
    rwkv = nlp.get_pipe("rwkv")
    source = str(rwkv.settings.model)
    out = {"source": source, "fingerprint": rwkv.sessions.fingerprint}
    if source.startswith("shipped:"):
        manifest = json.loads((ROOT / "rwkv_stream" / "data" / source[8:] / "bundle.json").read_text())
        out["model_version"] = manifest.get("model_version")
    return out


def host() -> dict:
    cpus = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")]
    return {"cpu": cpus[0] if cpus else "unknown", "vcpus": os.cpu_count(), "torch": torch.__version__,
            "spacy": spacy.__version__}


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all cores from /proc/stat (busy: all but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(fields) - fields[3] - fields[4], sum(fields)


class Trainer:
    """One pipeline's training loop, advanced one update at a time (so two can alternate)."""

    def __init__(self, nlp: Language, train_docs: list[Doc], batch_words: int) -> None:
        self.nlp = nlp
        self.examples = [Example(nlp.make_doc(d.text), d) for d in train_docs]
        self.optimizer = nlp.initialize(lambda: self.examples)
        self.batch_words, self.epoch, self.steps, self.seconds, self.cpu = batch_words, 0, 0, 0.0, 0.0
        self._batches = self._epoch()

    def _epoch(self):  # type: ignore[no-untyped-def]
        n = len(self.examples)
        order = self.examples[self.epoch % n:] + self.examples[: self.epoch % n]
        return iter(minibatch_by_words(order, size=self.batch_words))

    def step(self) -> None:
        batch = next(self._batches, None)
        if batch is None:
            self.epoch += 1
            self._batches = self._epoch()
            batch = next(self._batches)
        wall, cpu = time.monotonic(), time.process_time()
        self.nlp.update(batch, sgd=self.optimizer)
        self.optimizer.step_schedules()  # as spacy train does (learning-rate warmup and decay)
        self.seconds += time.monotonic() - wall
        self.cpu += time.process_time() - cpu
        self.steps += 1


def train_side_by_side(trainers: dict[str, Trainer], budget: float) -> dict:
    """Update steps alternate: always the pipeline that has used less of its budget (wall clock)."""
    load_start = loadavg()
    while True:
        open_ = [t for t in trainers.values() if t.seconds < budget]
        if not open_:
            break
        min(open_, key=lambda t: t.seconds).step()
    return {name: {"steps": t.steps, "train_seconds": round(t.seconds, 1), "train_cpu_seconds": round(t.cpu, 1)}
            for name, t in trainers.items()} | {"loadavg": [load_start, loadavg()]}


def accuracy(nlp: Language, dev_docs: list[Doc]) -> dict:
    scores = nlp.evaluate([Example(nlp.make_doc(d.text), d) for d in dev_docs])
    return {"tag_acc": round(scores["tag_acc"], 4), "cats_macro_f": round(scores["cats_macro_f"], 4)}


def time_side_by_side(pipelines: dict[str, Language], texts: list[str], passes: int) -> dict:
    """``nlp.pipe`` passes over ``texts``, alternating between the pipelines; words/s of the best pass
    (wall and CPU time) and of the median one."""
    for nlp in pipelines.values():
        list(nlp.pipe(texts[:20]))  # warm-up (lazy loads, first-call allocations)
    walls: dict[str, list[float]] = {name: [] for name in pipelines}
    cpus: dict[str, list[float]] = {name: [] for name in pipelines}
    n_words = 0
    load_start, ticks = loadavg(), cpu_ticks()
    for i in range(passes):
        names = list(pipelines) if i % 2 == 0 else list(reversed(pipelines))
        for name in names:
            wall, cpu = time.monotonic(), time.process_time()
            n_words = sum(len(doc) for doc in pipelines[name].pipe(texts))
            walls[name].append(time.monotonic() - wall)
            cpus[name].append(time.process_time() - cpu)
    busy, total = (b - a for a, b in zip(ticks, cpu_ticks(), strict=True))
    out: dict = {name: {"words_per_s": round(n_words / min(walls[name])),
                        "words_per_s_median": round(n_words / statistics.median(walls[name])),
                        "words_per_cpu_s": round(n_words / min(cpus[name])),
                        "words_per_cpu_s_median": round(n_words / statistics.median(cpus[name]))}
                 for name in pipelines}
    out["host_load"] = {"loadavg": [load_start, loadavg()], "cores_busy": round(busy / max(total, 1), 3),
                        "passes": passes}
    return out


def reload_as(nlp: Language, dtype: str) -> Language:
    """The trained rwkv pipeline saved and loaded again with another weight format."""
    with tempfile.TemporaryDirectory() as tmp:
        nlp.to_disk(tmp)
        return spacy.load(tmp, config={"components": {"rwkv": {"dtype": dtype}}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=ROOT / "data" / "corpus")
    parser.add_argument("--synthetic", action="store_true")
    parser.add_argument("--train", type=int, default=1500, help="training paragraphs (a random sample)")
    parser.add_argument("--dev", type=int, default=300, help="evaluation paragraphs (a random sample)")
    parser.add_argument("--budget", type=float, default=180.0, help="training seconds per pipeline")
    parser.add_argument("--batch-words", type=int, default=1000)
    parser.add_argument("--passes", type=int, default=5, help="inference passes per pipeline (alternating)")
    parser.add_argument("--formats", default="", help="comma-separated weight formats to time the trained rwkv "
                                                      "pipeline in too (e.g. w8a8,int8,bfloat16)")
    parser.add_argument("--variants", default="textcat", help=f"comma-separated rwkv pipelines, of {VARIANTS}")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    variants = [v.rpartition(":") for v in args.variants.split(",") if v]  # [LABEL:]SPEC
    if not variants or {spec.split("@")[0] for _, _, spec in variants} - set(VARIANTS):
        parser.error(f"--variants: one or more of {VARIANTS}")
    names = {spec: "rwkv" if i == 0 else f"rwkv_{label or spec}" for i, (label, _, spec) in enumerate(variants)}
    torch.set_num_threads(1)
    train_docs, dev_docs = corpus(args)
    texts = [d.text for d in dev_docs]
    result: dict = {
        "host": host(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "data": "synthetic" if args.synthetic else str(args.corpus),
        "train_docs": len(train_docs), "train_words": sum(len(d) for d in train_docs),
        "dev_docs": len(dev_docs), "dev_words": sum(len(d) for d in dev_docs),
        "budget_s": args.budget, "threads": torch.get_num_threads(), "rwkv_variants": names,
        "most_frequent_tag_per_word_acc": round(most_frequent_tag_accuracy(train_docs, dev_docs), 4),
    }
    shipped = rwkv_pipeline(variants[0][2])
    shipped.initialize(lambda: [Example(shipped.make_doc(d.text), d) for d in train_docs])
    result["rwkv_model"] = shipped_model(shipped)
    # the shipped heads relabelled to the data (a new textcat: untrained)
    result["rwkv_before_training"] = accuracy(shipped, dev_docs)
    trainers = {name: Trainer(rwkv_pipeline(v), train_docs, args.batch_words) for v, name in names.items()}
    trainers["cnn_tok2vec"] = Trainer(cnn_pipeline(), train_docs, args.batch_words)
    result["training"] = train_side_by_side(trainers, args.budget)
    pipelines = {name: t.nlp for name, t in trainers.items()}
    for name, nlp in pipelines.items():
        result[name] = {**result["training"][name], **accuracy(nlp, dev_docs)}
    formats = [f for f in args.formats.split(",") if f]
    timed = {**pipelines, "rwkv_before_training": shipped}
    for dtype in formats:
        timed[f"rwkv_{dtype}"] = reload_as(pipelines["rwkv"], dtype)
        result[f"rwkv_{dtype}"] = accuracy(timed[f"rwkv_{dtype}"], dev_docs)
    speed = time_side_by_side(timed, texts, args.passes)
    result["inference_host_load"] = speed.pop("host_load")
    for name, row in speed.items():
        result[name] = {**result[name], **row}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
