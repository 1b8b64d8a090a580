"""Clean the Jane Austen novels and split them into train/valid/test text files.

Input: a TSV of ``book<TAB>line`` rows, as dumped by ``scripts/make_corpus.sh`` from the Debian package
``r-cran-janeaustenr`` (MIT-licensed package; the novels themselves are in the public domain).
Output: one paragraph per line in ``train.txt``, ``valid.txt`` and ``test.txt``, and the title of the
novel each paragraph comes from, line by line, in ``train.books.txt``, ``valid.books.txt``, ``test.books.txt``
(the labels of the shipped model's classification head). Paragraphs are grouped
into runs of consecutive paragraphs of one book, and each run goes to one split by a seeded draw, so the
held-out text is contiguous prose the training split never saw.
"""

from __future__ import annotations

import argparse
import csv
import random
import re
import sys
from collections.abc import Iterable
from pathlib import Path

SEED = 20240521
RUN_LENGTH = 40  # paragraphs per run assigned to one split
SPLITS = (("train", 0.90), ("valid", 0.05), ("test", 0.05))

_HEADING = re.compile(
    r"^(chapter|volume|vol\.|end of|the end|finis|by jane austen|\(\d{4}\))\b.*$|^[^a-z]*$", re.IGNORECASE
)
_ALLCAPS = re.compile(r"^[^a-z]+$")


def read_books(path: Path) -> dict[str, list[str]]:
    """Lines of each book, in file order."""
    books: dict[str, list[str]] = {}
    with path.open(encoding="utf-8", newline="") as fh:
        for row in csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(row) != 2 or row[0] == "book":
                continue
            books.setdefault(row[0], []).append(row[1])
    return books


def paragraphs(lines: Iterable[str]) -> list[str]:
    """Blank-line separated paragraphs, whitespace normalized, headings dropped."""
    out: list[str] = []
    buf: list[str] = []
    for line in [*lines, ""]:
        if line.strip():
            buf.append(line.strip())
            continue
        if buf:
            text = clean(" ".join(buf))
            if text:
                out.append(text)
            buf = []
    return out


def clean(text: str) -> str:
    """Normalize one paragraph; empty when it is a heading or has no prose."""
    text = text.replace("_", "")  # Gutenberg italics markers
    text = re.sub(r"\s+", " ", text).strip()
    if _ALLCAPS.match(text) or _HEADING.match(text):
        return ""
    if sum(ch.isalpha() for ch in text) < 3:
        return ""
    return text


def split_runs(books: dict[str, list[str]], seed: int = SEED) -> dict[str, list[tuple[str, str]]]:
    """Assign runs of consecutive paragraphs to splits with a seeded draw: (paragraph, book) pairs."""
    rng = random.Random(seed)
    out: dict[str, list[tuple[str, str]]] = {name: [] for name, _ in SPLITS}
    for book in sorted(books):
        paras = paragraphs(books[book])
        for start in range(0, len(paras), RUN_LENGTH):
            out[_draw(rng)].extend((p, book) for p in paras[start : start + RUN_LENGTH])
    return out


def _draw(rng: random.Random) -> str:
    x = rng.random()
    acc = 0.0
    for name, frac in SPLITS:
        acc += frac
        if x < acc:
            return name
    return SPLITS[-1][0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("raw_tsv", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args(argv)
    splits = split_runs(read_books(args.raw_tsv), args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, pairs in splits.items():
        paras = [p for p, _ in pairs]
        (args.out_dir / f"{name}.txt").write_text("\n".join(paras) + "\n", encoding="utf-8")
        (args.out_dir / f"{name}.books.txt").write_text("\n".join(b for _, b in pairs) + "\n", encoding="utf-8")
        size = sum(len(p) + 1 for p in paras)
        print(f"{name}: {len(paras)} paragraphs, {size} chars", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
