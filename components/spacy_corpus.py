"""Training data for ``spacy train`` with the rwkv component: transcript-style DocBins.

A transcript Doc is prose as speech recognition emits it (lower case, no punctuation; see
:mod:`rwkv_stream.train.transcript`), with gold ``token.tag_`` = the word's label (the punctuation before the
word and its case, e.g. ``COMMA-Cap``; every spaCy token of a word gets the word's label) and exclusive
``doc.cats`` (the paragraph's source: a novel, a topic).

Two sources:

* real prose, one paragraph per line, with a line-aligned file of class labels: the Austen corpus that
  ``scripts/make_corpus.sh`` builds from the Debian package ``r-cran-janeaustenr``::

      python -m rwkv_stream.components.spacy_corpus --text data/corpus/train.txt \\
          --labels data/corpus/train.books.txt --out train.spacy

* :func:`synthetic_paragraphs`: seeded, generated prose (three topics, statements, questions, introductory
  words, names, compound sentences), for tests and benchmarks on machines without the corpus::

      python -m rwkv_stream.components.spacy_corpus --synthetic 400 --seed 1 --out train.spacy
"""

from __future__ import annotations

import argparse
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import spacy
from spacy.language import Language
from spacy.tokens import Doc, DocBin

from rwkv_stream.train import transcript

TOPICS: dict[str, dict[str, list[str]]] = {
    "society": {
        "verbs": ["danced with", "spoke of", "admired", "invited", "met", "praised", "avoided"],
        "objects": ["the ball", "her partner", "the assembly", "his manners", "the officers", "a gentleman"],
        "places": ["at the ball", "in the drawing room", "at netherfield", "after supper", "in town"],
    },
    "fortune": {
        "verbs": ["inherited", "lost", "counted", "settled", "wanted", "secured", "spent"],
        "objects": ["the estate", "ten thousand pounds", "his fortune", "the living", "an income", "the debts"],
        "places": ["in the will", "at pemberley", "by the lawyer", "for the sisters", "in the settlement"],
    },
    "country": {
        "verbs": ["walked to", "rode past", "painted", "gathered", "crossed", "watched", "planted"],
        "objects": ["the hedgerows", "the meadow", "the orchard", "a muddy lane", "the garden", "the river"],
        "places": ["in the rain", "near the village", "before breakfast", "along the park", "at dawn"],
    },
}
SUBJECTS = ["she", "he", "they", "we", "I", "Elizabeth", "Jane", "Mr. Darcy", "Mrs. Bennet", "the colonel",
            "her sister", "Captain Wentworth", "Anne", "my aunt"]
INTROS = ["well", "indeed", "however", "oh", "yes", "no", "of course", "in truth"]
QUESTIONS = ["did", "will", "would", "could", "shall"]
BASES = {"danced with": "dance with", "spoke of": "speak of", "admired": "admire", "invited": "invite",
         "met": "meet", "praised": "praise", "avoided": "avoid", "inherited": "inherit", "lost": "lose",
         "counted": "count", "settled": "settle", "wanted": "want", "secured": "secure", "spent": "spend",
         "walked to": "walk to", "rode past": "ride past", "painted": "paint", "gathered": "gather",
         "crossed": "cross", "watched": "watch", "planted": "plant"}


# ------------------------------------------------------------------------------------------ synthetic prose
def synthetic_paragraphs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` generated paragraphs ``(prose, topic)``, two to five sentences each."""
    rng = random.Random(seed)
    topics = sorted(TOPICS)
    return [_paragraph(rng, rng.choice(topics)) for _ in range(n)]


def _paragraph(rng: random.Random, topic: str) -> tuple[str, str]:
    sentences = [_sentence(rng, TOPICS[topic]) for _ in range(rng.randint(2, 5))]
    return " ".join(sentences), topic


def _sentence(rng: random.Random, vocab: dict[str, list[str]]) -> str:
    if rng.random() < 0.25:
        return _question(rng, vocab)
    text = _clause(rng, vocab)
    text = f"{_cap(rng.choice(INTROS))}, {text}" if rng.random() < 0.3 else _cap(text)
    if rng.random() < 0.35:
        text += f", {rng.choice(['and', 'but', 'so'])} {_clause(rng, vocab)}"
    return text + ("!" if rng.random() < 0.08 else ".")


def _question(rng: random.Random, vocab: dict[str, list[str]]) -> str:
    verb = BASES[rng.choice(vocab["verbs"])]
    where = f" {rng.choice(vocab['places'])}" if rng.random() < 0.5 else ""
    return f"{_cap(rng.choice(QUESTIONS))} {rng.choice(SUBJECTS)} {verb} {rng.choice(vocab['objects'])}{where}?"


def _clause(rng: random.Random, vocab: dict[str, list[str]]) -> str:
    where = f" {rng.choice(vocab['places'])}" if rng.random() < 0.6 else ""
    return f"{rng.choice(SUBJECTS)} {rng.choice(vocab['verbs'])} {rng.choice(vocab['objects'])}{where}"


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


# ------------------------------------------------------------------------------------------ DocBins
def transcript_doc(nlp: Language, prose: str, label: str | None, labels: Sequence[str]) -> Doc:
    """The transcript form of ``prose`` with gold word labels in ``token.tag_`` and ``doc.cats``."""
    words, _ = transcript.parse(prose)
    text = " ".join(w.text for w in words)
    doc = nlp.make_doc(text)
    starts, pos = [], 0
    for w in words:
        starts.append(pos)
        pos += len(w.text) + 1
    word = 0
    for token in doc:
        while word + 1 < len(starts) and starts[word + 1] <= token.idx:
            word += 1
        token.tag_ = words[word].label
    if label is not None:
        doc.cats = {c: float(c == label) for c in labels}
    return doc


def make_docbin(nlp: Language, paragraphs: Iterable[tuple[str, str | None]], labels: Sequence[str]) -> DocBin:
    docbin = DocBin(attrs=["ORTH", "TAG"], store_user_data=False)
    for prose, label in paragraphs:
        doc = transcript_doc(nlp, prose, label, labels)
        if len(doc):
            docbin.add(doc)
    return docbin


def write_synthetic(out_dir: Path, n_train: int, n_dev: int, seed: int = 0) -> tuple[Path, Path]:
    """``train.spacy`` and ``dev.spacy`` of generated paragraphs (disjoint seeds)."""
    nlp = spacy.blank("en")
    labels = sorted(TOPICS)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, n, s in (("train", n_train, seed), ("dev", n_dev, seed + 1_000_003)):
        path = out_dir / f"{name}.spacy"
        make_docbin(nlp, synthetic_paragraphs(n, s), labels).to_disk(path)
        paths.append(path)
    return paths[0], paths[1]


def read_docs(path: Path, nlp: Language | None = None) -> list[Doc]:
    nlp = nlp or spacy.blank("en")
    return list(DocBin().from_disk(path).get_docs(nlp.vocab))


# ------------------------------------------------------------------------------------------ baseline
def most_frequent_tag_accuracy(train: Sequence[Doc], dev: Sequence[Doc]) -> float:
    """Dev accuracy of tagging each word with its most frequent training tag (unseen words: the most
    frequent tag overall)."""
    per_word: dict[str, Counter[str]] = defaultdict(Counter)
    overall: Counter[str] = Counter()
    for doc in train:
        for t in doc:
            per_word[t.lower_][t.tag_] += 1
            overall[t.tag_] += 1
    default = overall.most_common(1)[0][0]
    hits = total = 0
    for doc in dev:
        for t in doc:
            guess = per_word[t.lower_].most_common(1)[0][0] if t.lower_ in per_word else default
            hits += guess == t.tag_
            total += 1
    return hits / max(total, 1)


# ------------------------------------------------------------------------------------------ CLI
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the .spacy file to write")
    parser.add_argument("--text", type=Path, help="prose, one paragraph per line")
    parser.add_argument("--labels", type=Path, help="the class of each line of --text")
    parser.add_argument("--synthetic", type=int, default=0, help="generate this many paragraphs instead")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=0, help="at most this many paragraphs")
    args = parser.parse_args(argv)
    if args.synthetic:
        paragraphs: list[tuple[str, str | None]] = list(synthetic_paragraphs(args.synthetic, args.seed))
        labels = sorted(TOPICS)
    elif args.text:
        lines = [x for x in args.text.read_text(encoding="utf-8").split("\n") if x.strip()]
        classes: list[str | None] = (
            [x for x in args.labels.read_text(encoding="utf-8").split("\n") if x.strip()] if args.labels
            else [None] * len(lines))
        paragraphs = list(zip(lines, classes, strict=True))
        labels = sorted({c for c in classes if c})
    else:
        parser.error("give --text or --synthetic")
    if args.limit:
        paragraphs = paragraphs[: args.limit]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    make_docbin(spacy.blank("en"), paragraphs, labels).to_disk(args.out)
    print(f"{args.out}: {len(paragraphs)} docs, labels {labels}")


if __name__ == "__main__":
    main()
