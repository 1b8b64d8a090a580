"""Read spaCy ``DocBin`` files (``.spacy``) as training records for ``rwkv-stream train``.

Imported lazily by :func:`rwkv_stream.train.data.read_records` only when a ``.spacy`` file is given, so the
engine never needs spaCy. A record is ``{"text": str, "tags": [[start, end, label], ...], "cats": {...}}``:
entity spans (``doc.ents``) become character-span tags, ``doc.cats`` the classes.
"""

from __future__ import annotations

from pathlib import Path

import spacy
from spacy.tokens import DocBin


def read_docbin(path: str | Path, lang: str = "xx") -> list[dict]:
    """Records from a DocBin; the vocabulary of a blank ``lang`` pipeline is enough to deserialize it."""
    nlp = spacy.blank(lang)
    records = []
    for doc in DocBin().from_disk(Path(path)).get_docs(nlp.vocab):
        record: dict = {"text": doc.text}
        if doc.has_annotation("ENT_IOB"):
            record["tags"] = [[e.start_char, e.end_char, e.label_] for e in doc.ents]
        if doc.cats:
            record["cats"] = dict(doc.cats)
        records.append(record)
    return records
