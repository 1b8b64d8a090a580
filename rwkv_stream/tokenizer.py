"""Tokenizers for the engine, and exact streaming encode/decode for text that arrives in fragments.

Two tokenizer families share the :class:`Tokenizer` protocol:

* :class:`WorldTokenizer` -- the RWKV "World" vocabulary (``rwkv_vocab_v20230424.txt``, 65,536 ids):
  greedy longest-byte-prefix matching over a byte trie, implemented here in pure Python. The vocabulary
  file is taken from an installed package that ships it (``rwkv``, ``pyrwkv-tokenizer`` or
  ``rwkv-tokenizer``); nothing is downloaded. Id 0 is not in the file: World models use it as the
  end-of-document separator, and it decodes to nothing.
* :class:`HFTokenizer` -- any Hugging Face ``tokenizers`` JSON (``tokenizer.json``), e.g. GPT-NeoX's
  byte-level BPE used by the RWKV-4 Pile models.

:func:`load_tokenizer` picks one from a spec: ``"world"``, a ``tokenizer.json`` (or a folder holding
one), or a ``rwkv_vocab_*.txt`` file.

Streaming encode
----------------
:class:`StreamingEncoder` turns fragments (``str``, or ``bytes`` cut anywhere, even inside a UTF-8
sequence) into ids. Its contract: the ids returned by all ``push`` calls followed by ``flush`` equal
``tokenizer.encode`` of the concatenated text (for ``bytes`` fragments: of the concatenated bytes --
World encodes bytes as they are; text tokenizers see them decoded as UTF-8 with ``errors="replace"``).
Only the tail that more text could still change is held back, and each push costs time proportional to
the fragment plus the (bounded) held-back tail, never to the length of the stream.

*World (greedy longest match).* Greedy tokenization is left to right and the token chosen at a position
depends only on the bytes from that position on. Walk the trie from the first unencoded position ``p``
over the buffered bytes. If the walk stops *before* the end of the buffer (the next byte has no trie
edge), or ends at a node without children, no vocabulary entry starting at ``p`` can be longer than what
was seen whatever bytes follow, so the longest match found is the one full-text encoding makes: emit it
and continue at its end. If the walk reaches the end of the buffer at a node that still has children,
a longer entry could match once more bytes arrive: stop and hold ``buffer[p:]``. That walk had depth
``len(buffer) - p`` and its node has a child, so some entry is longer than the held bytes: at most
``max_token_bytes - 1`` bytes (127 for ``rwkv_vocab_v20230424``) are ever held, with no exception.
World works on bytes, so an incomplete UTF-8 sequence needs no special treatment.

*Hugging Face tokenizers.* Encoding is: split out added/special tokens (leftmost-longest match), then
per split normalize, pre-tokenize into "words" (for byte-level BPE, the GPT-2 regex ``'s|'t|'re|'ve|'m|
'll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+``) and encode each word on its own.
Regex matching runs left to right and a match depends only on the text from its start up to the last
character the engine read: one past the match's end (greedy runs, the ``(?!\\S)`` lookahead), or up to
3 from its start (the contractions). So a match reads past the end of the input only if it runs to
the end (the last word) or starts within the last 2 characters -- one of the last two words. Every
earlier word is final: ``_HOLD_WORDS = 2`` words are held (this holds for the GPT-2/NeoX regex, Llama-3
style regexes, Whitespace, Metaspace and Bert pre-tokenizers). An added token that may still complete
at the tail (the text from some position is a proper prefix of one) would end a split there, which is
an end of input too: the last two words before the earliest such position are held as well.

Each push re-encodes ``context + pending``: ``pending`` is the held-back text and ``context`` the last
finalized word, so pending is tokenized as it is mid-stream (in the same added-token split, with no
start-of-input effect such as ByteLevel's ``add_prefix_space`` applied to it); the context's tokens are
dropped. Any context does if its end is a word boundary, since the regex restarts there; this is
checked on every encode. When a start-of-input effect moves it (the prefix space turns the word ``'re``
into `` '`` + ``re``), stand-in contexts that end a word whatever follows (``"0"``, ``"a"``) are tried;
if none works a RuntimeError is raised rather than emitting wrong ids. Stream start uses no context, so
start-of-input effects apply exactly as in one-shot encoding. Other assumptions: the normalizer acts
locally (none, NFC, lowercase; appended text cannot change what was before a final word boundary),
added tokens match their raw content (``lstrip``/``rstrip``/``single_word`` tokens are not analysed),
and the model encodes words independently (BPE without dropout, WordPiece, Unigram).

*Holdback bound (text tokenizers).* Usually two words. But a word never ends while text of its class
keeps coming (an endless run of letters, digits, punctuation or whitespace, or a tokenizer without a
pre-tokenizer), so the held text is capped at ``max_holdback_chars`` (default 1024): past it, pending
tokens up to a token boundary about ``max_holdback_chars // 2`` characters before the end are emitted
and the rest is encoded afresh (without context and without start-of-input effects). The ids then
still spell exactly the pushed text but may differ from one-shot encoding -- only inside words longer
than the cap, and since BPE merges act locally, tokens that far from the word's end rarely differ.
Held text never exceeds ``max_holdback_chars`` characters (given no token longer than half of that),
plus up to 3 bytes of an incomplete UTF-8 sequence when bytes are pushed. Each push encodes at most
the context and pending (each within the cap) plus the new fragment.

Streaming decode
----------------
:class:`StreamingDecoder` joins token bytes and decodes them incrementally, holding back an incomplete
UTF-8 sequence so no fragment ever contains a broken character; bytes that can never become valid are
replaced by U+FFFD at once. Over a whole stream its output equals
``decode_bytes(ids).decode("utf-8", "replace")``.
"""

from __future__ import annotations

import ast
import codecs
import functools
import importlib.util
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import tokenizers

WORLD_VOCAB_FILE = "rwkv_vocab_v20230424.txt"
WORLD_VOCAB_SIZE = 65536
# Packages known to ship the World vocabulary next to their __init__.py, in order of preference.
WORLD_VOCAB_PACKAGES = ("rwkv", "pyrwkv_tokenizer", "rwkv_tokenizer")

# Words (pre-tokens) at the end of the buffer that appended text may still change; see module docstring.
_HOLD_WORDS = 2
DEFAULT_MAX_HOLDBACK_CHARS = 1024
_MIN_HOLDBACK_CHARS = 64
# Contexts that end a word whatever follows (for regex pre-tokenizers of the GPT-2 / Llama-3 family):
# a digit before a letter, a letter before anything else.
_STAND_IN_CONTEXTS = ("0", "a")


@runtime_checkable
class Tokenizer(Protocol):
    """What the engine needs from a tokenizer."""

    @property
    def vocab_size(self) -> int:
        """Number of ids (rows of the model's embedding it is meant for)."""
        ...

    @property
    def is_byte_level(self) -> bool:
        """True when every id has exact byte content, so token bytes can be concatenated."""
        ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def decode_bytes(self, ids: Sequence[int]) -> bytes: ...

    def token_to_id(self, token: str | bytes) -> int | None: ...

    def id_to_token_bytes(self, token_id: int) -> bytes: ...


# --------------------------------------------------------------------------------------------------
# RWKV World
# --------------------------------------------------------------------------------------------------


def find_world_vocab() -> Path:
    """Path of ``rwkv_vocab_v20230424.txt`` inside an installed package (no package is imported)."""
    for package in WORLD_VOCAB_PACKAGES:
        spec = importlib.util.find_spec(package)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            path = Path(folder) / WORLD_VOCAB_FILE
            if path.is_file():
                return path
    names = ", ".join(p.replace("_", "-") for p in WORLD_VOCAB_PACKAGES)
    raise FileNotFoundError(
        f"RWKV World vocabulary {WORLD_VOCAB_FILE} not found: install one of the packages that ship it "
        f"({names}), e.g. `pip install 'rwkv-stream[world]'`, or pass the file's path"
    )


def _parse_vocab_line(line: str) -> tuple[int, bytes]:
    """``<id> <python str or bytes literal> <byte length>`` -> (id, token bytes)."""
    first, last = line.index(" "), line.rindex(" ")
    literal = line[first + 1 : last]
    if "\\" not in literal and literal[:1] in ("'", '"'):  # fast path for plain str literals
        value: str | bytes = literal[1:-1]
    else:
        value = ast.literal_eval(literal)
    token = value.encode("utf-8") if isinstance(value, str) else value
    if not isinstance(token, bytes) or len(token) != int(line[last + 1 :]):
        raise ValueError(f"bad vocabulary line: {line!r}")
    return int(line[:first]), token


class WorldTokenizer:
    """RWKV World tokenizer: greedy longest match of byte strings, via a byte trie.

    The trie is stored flat for speed: node ``n``'s child for byte ``b`` is ``edges[n << 8 | b]``.
    """

    is_byte_level = True

    def __init__(self, tokens: dict[int, bytes], vocab_size: int = WORLD_VOCAB_SIZE) -> None:
        if not tokens or max(tokens) >= vocab_size or min(tokens) < 0:
            raise ValueError("token ids must lie in [0, vocab_size)")
        present = set(tokens.values())
        missing = [b for b in range(256) if bytes([b]) not in present]
        if missing:  # guarantees the greedy walk always makes progress
            raise ValueError(f"vocabulary lacks single-byte tokens for {len(missing)} byte values")
        self._vocab_size = vocab_size
        self._id_to_bytes: list[bytes] = [b""] * vocab_size
        self._bytes_to_id: dict[bytes, int] = {}
        self._edges: dict[int, int] = {}
        self._node_token: list[int] = [-1]
        self._has_children = bytearray(1)
        for token_id, token in sorted(tokens.items()):
            self._id_to_bytes[token_id] = token
            self._bytes_to_id.setdefault(token, token_id)
            self._insert(token, token_id)
        self.max_token_bytes = max(len(t) for t in tokens.values())

    def _insert(self, token: bytes, token_id: int) -> None:
        node = 0
        for byte in token:
            key = node << 8 | byte
            child = self._edges.get(key)
            if child is None:
                child = len(self._node_token)
                self._edges[key] = child
                self._node_token.append(-1)
                self._has_children.append(0)
                self._has_children[node] = 1
            node = child
        if self._node_token[node] < 0:
            self._node_token[node] = token_id

    @classmethod
    def from_file(cls, path: str | Path) -> WorldTokenizer:
        with open(path, encoding="utf-8") as f:
            tokens = dict(_parse_vocab_line(line.rstrip("\r\n")) for line in f if line.strip())
        return cls(tokens)

    @staticmethod
    def from_installed_package() -> WorldTokenizer:
        """The World tokenizer from an installed package's vocabulary file (loaded once per process)."""
        return _installed_world_tokenizer()

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def longest_match(self, data: bytes, pos: int) -> tuple[int, int, bool]:
        """Longest vocabulary entry at ``data[pos:]``: ``(token_id, end, open)``.

        ``open`` is True when the walk reached the end of ``data`` at a node with children: a longer
        entry might still match once more bytes are appended. ``pos`` must be < ``len(data)``.
        """
        edges, node_token = self._edges, self._node_token
        node, best_id, best_end = 0, -1, pos
        for i in range(pos, len(data)):
            child = edges.get(node << 8 | data[i])
            if child is None:
                return best_id, best_end, False
            node = child
            if node_token[node] >= 0:
                best_id, best_end = node_token[node], i + 1
        return best_id, best_end, bool(self._has_children[node])

    def encode_final_prefix(self, data: bytes, final: bool) -> tuple[list[int], int]:
        """Encode the prefix of ``data`` that no appended bytes can change: ``(ids, bytes consumed)``.

        With ``final`` everything is encoded (the stream has ended).
        """
        ids: list[int] = []
        pos = 0
        while pos < len(data):
            token_id, end, is_open = self.longest_match(data, pos)
            if is_open and not final:
                break
            ids.append(token_id)
            pos = end
        return ids, pos

    def encode_bytes(self, data: bytes) -> list[int]:
        return self.encode_final_prefix(data, final=True)[0]

    def encode(self, text: str) -> list[int]:
        return self.encode_bytes(text.encode("utf-8"))

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return b"".join(self.id_to_token_bytes(i) for i in ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_to_id(self, token: str | bytes) -> int | None:
        key = token.encode("utf-8") if isinstance(token, str) else token
        return self._bytes_to_id.get(key)

    def id_to_token_bytes(self, token_id: int) -> bytes:
        if not 0 <= token_id < self._vocab_size:
            raise IndexError(f"token id {token_id} outside [0, {self._vocab_size})")
        return self._id_to_bytes[token_id]


@functools.lru_cache(maxsize=1)
def _installed_world_tokenizer() -> WorldTokenizer:
    return WorldTokenizer.from_file(find_world_vocab())


# --------------------------------------------------------------------------------------------------
# Hugging Face tokenizers
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode``: the printable stand-in character of each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


def _mentions_type(node: Any, kind: str) -> bool:
    if isinstance(node, dict):
        return node.get("type") == kind or any(_mentions_type(v, kind) for v in node.values())
    if isinstance(node, list):
        return any(_mentions_type(v, kind) for v in node)
    return False


def _strip_start_effects(node: Any) -> Any:
    """Copy of a normalizer/pre-tokenizer JSON node that adds nothing at the start of the input."""
    if isinstance(node, list):
        return [x for x in map(_strip_start_effects, node) if x is not None]
    if not isinstance(node, dict):
        return node
    kind = node.get("type")
    if kind == "Prepend":
        return None
    node = {k: _strip_start_effects(v) for k, v in node.items()}
    if kind == "ByteLevel":
        node["add_prefix_space"] = False
    elif kind == "Metaspace":
        node["prepend_scheme"] = "never"
        if "add_prefix_space" in node:
            node["add_prefix_space"] = False
    return node


@dataclass(frozen=True)
class _Word:
    start: int  # first character (in the encoded string)
    first_token: int  # index of its first token


@dataclass(frozen=True)
class _Encoded:
    ids: list[int]
    offsets: list[tuple[int, int]]
    words: list[_Word]


def _group_words(word_ids: list[int | None], offsets: list[tuple[int, int]]) -> list[_Word]:
    """Group the tokens of each pre-token ("word"); word starts strictly increase.

    A word that starts where the previous one does (ByteLevel's added prefix space is a word of its
    own before a tab, mapped onto the tab) is merged with it, so no cut falls between them.
    """
    words: list[_Word] = []
    previous: int | None = None
    for index, (word_id, (start, _end)) in enumerate(zip(word_ids, offsets, strict=True)):
        is_new = word_id is None or word_id != previous
        if not words or (is_new and start > words[-1].start):
            words.append(_Word(start, index))
        elif start < words[-1].start:  # a token mapped before the word's first one
            words[-1] = _Word(start, words[-1].first_token)
        previous = word_id
    return words


class HFTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer. ``encode`` adds no special tokens (no BOS/EOS)."""

    def __init__(self, tokenizer: tokenizers.Tokenizer) -> None:
        self._spec: dict[str, Any] = json.loads(tokenizer.to_str())
        # Post-processors never change ids without special tokens, but ByteLevel's trims offsets,
        # and the streaming encoder needs untrimmed ones.
        self._tok = tokenizers.Tokenizer.from_str(tokenizer.to_str())
        self._tok.post_processor = None
        self._bare: tokenizers.Tokenizer | None = None
        self._added = {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items()}
        self._added_prefixes = frozenset(c[:k] for c in self._added.values() for k in range(1, len(c)))
        self._added_contents = frozenset(self._added.values())
        self._max_added_chars = max((len(c) for c in self._added.values()), default=0)
        self._is_byte_level = _mentions_type(self._spec.get("decoder"), "ByteLevel")
        self._token_bytes: list[bytes] | None = None
        self._bytes_to_id: dict[bytes, int] | None = None

    @classmethod
    def from_file(cls, path: str | Path) -> HFTokenizer:
        return cls(tokenizers.Tokenizer.from_file(str(path)))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def is_byte_level(self) -> bool:
        """True for byte-level BPE (GPT-2/NeoX style): token bytes are exact and concatenate."""
        return self._is_byte_level

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        if not self._is_byte_level:
            return self.decode(ids).encode("utf-8")
        table = self._byte_table()
        return b"".join(table[i] for i in ids)

    def token_to_id(self, token: str | bytes) -> int | None:
        """``str``: the vocabulary's own spelling (e.g. ``"Ġworld"``); ``bytes``: the raw content."""
        if isinstance(token, str):
            return self._tok.token_to_id(token)
        if self._bytes_to_id is None:
            table = self._byte_table()
            self._bytes_to_id = {}
            for i, b in enumerate(table):
                self._bytes_to_id.setdefault(b, i)
        return self._bytes_to_id.get(token)

    def id_to_token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of a token; exact when ``is_byte_level``, else its standalone decoding."""
        return self._byte_table()[token_id]

    def _byte_table(self) -> list[bytes]:
        if self._token_bytes is None:
            self._token_bytes = [self._token_bytes_of(i) for i in range(self.vocab_size)]
        return self._token_bytes

    def _token_bytes_of(self, token_id: int) -> bytes:
        if token_id in self._added:
            return self._added[token_id].encode("utf-8")
        token = self._tok.id_to_token(token_id)
        if token is None:
            return b""
        if not self._is_byte_level:
            return self._tok.decode([token_id], skip_special_tokens=False).encode("utf-8")
        inverse = _byte_level_decoder()
        return b"".join(bytes([inverse[c]]) if c in inverse else c.encode("utf-8") for c in token)

    # -- streaming support -------------------------------------------------------------------------

    def encode_words(self, text: str, *, bare: bool = False) -> _Encoded:
        """Encode ``text`` and group its tokens by pre-token ("word").

        ``bare`` uses a variant without start-of-input effects (prefix space, Prepend normalizers).
        """
        tok = self._bare_tokenizer() if bare else self._tok
        enc = tok.encode(text, add_special_tokens=False)
        return _Encoded(enc.ids, enc.offsets, _group_words(enc.word_ids, enc.offsets))

    def is_added_token(self, text: str) -> bool:
        return text in self._added_contents

    def added_token_prefix_start(self, text: str, lo: int) -> int:
        """Smallest ``i >= lo`` where ``text[i:]`` could grow into an added token; ``len(text)`` if none."""
        for i in range(max(lo, len(text) - self._max_added_chars + 1), len(text)):
            if text[i:] in self._added_prefixes:
                return i
        return len(text)

    def _bare_tokenizer(self) -> tokenizers.Tokenizer:
        if self._bare is None:
            spec = dict(self._spec)
            for key in ("normalizer", "pre_tokenizer"):
                spec[key] = _strip_start_effects(spec.get(key))
            self._bare = tokenizers.Tokenizer.from_str(json.dumps(spec))
            self._bare.post_processor = None
        return self._bare


def load_tokenizer(spec: str | Path) -> WorldTokenizer | HFTokenizer:
    """``"world"``; a ``tokenizer.json`` or a folder holding one; or a ``rwkv_vocab_*.txt`` file."""
    if isinstance(spec, str) and spec.lower() == "world":
        return WorldTokenizer.from_installed_package()
    path = Path(spec)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer at {path} (expected 'world', a tokenizer.json or a folder)")
    if path.suffix == ".txt" and path.name.startswith("rwkv_vocab"):
        return WorldTokenizer.from_file(path)
    return HFTokenizer.from_file(path)


# --------------------------------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------------------------------


class _WorldStream:
    """Byte buffer for the World tokenizer; holds at most ``max_token_bytes - 1`` bytes."""

    unit = "bytes"

    def __init__(self, tokenizer: WorldTokenizer) -> None:
        self._tok = tokenizer
        self._buffer = b""

    @property
    def max_holdback(self) -> int:
        return self._tok.max_token_bytes - 1

    @property
    def held_back(self) -> int:
        return len(self._buffer)

    @property
    def held_bytes(self) -> bytes:
        return bytes(self._buffer)

    def push(self, fragment: str | bytes) -> list[int]:
        data = fragment.encode("utf-8") if isinstance(fragment, str) else fragment
        return self._advance(self._buffer + data, final=False)

    def flush(self) -> list[int]:
        return self._advance(self._buffer, final=True)

    def export_state(self) -> dict[str, Any]:
        return {"kind": "bytes", "buffer": bytes(self._buffer)}

    def import_state(self, state: dict[str, Any]) -> None:
        self._buffer = bytes(state["buffer"])

    def _advance(self, data: bytes, final: bool) -> list[int]:
        ids, used = self._tok.encode_final_prefix(data, final)
        self._buffer = data[used:]
        return ids


@dataclass(frozen=True)
class _View:
    """``context + pending`` encoded: ``skip`` characters of context, then the words of pending."""

    text: str
    skip: int
    enc: _Encoded
    words: list[_Word]


class _TextStream:
    """Text buffer for Hugging Face tokenizers; see the module docstring for the argument.

    State: ``pending`` (text not yet emitted) and ``context`` (the last finalized word; it is encoded
    in front of pending so pending is tokenized as in mid-stream, and its tokens are dropped). At the
    start of a stream the context is empty, so start-of-input effects apply to pending as they should.
    ``bare`` is set after a forced cut, when pending starts mid-word: it is then encoded without
    start-of-input effects and without context.
    """

    unit = "chars"

    def __init__(self, tokenizer: HFTokenizer, max_holdback_chars: int) -> None:
        if max_holdback_chars < _MIN_HOLDBACK_CHARS:
            raise ValueError(f"max_holdback_chars must be at least {_MIN_HOLDBACK_CHARS}")
        self._tok = tokenizer
        self._limit = max_holdback_chars
        self._reset()

    def _reset(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._context = ""
        self._pending = ""
        self._bare = False

    @property
    def max_holdback(self) -> int:
        return self._limit

    @property
    def held_back(self) -> int:
        return len(self._pending)

    @property
    def held_bytes(self) -> bytes:
        return self._pending.encode("utf-8") + bytes(self._utf8.getstate()[0])

    def push(self, fragment: str | bytes) -> list[int]:
        if isinstance(fragment, str) and not self._utf8.getstate()[0]:
            text = fragment
        else:
            data = fragment.encode("utf-8") if isinstance(fragment, str) else fragment
            text = self._utf8.decode(data)
        if not text:
            return []
        self._pending += text
        return self._advance(final=False)

    def flush(self) -> list[int]:
        self._pending += self._utf8.decode(b"", final=True)
        ids = self._advance(final=True) if self._pending else []
        self._reset()
        return ids

    def export_state(self) -> dict[str, Any]:
        pending_bytes, flag = self._utf8.getstate()
        return {"kind": "text", "context": self._context, "pending": self._pending, "bare": self._bare,
                "utf8": [bytes(pending_bytes), int(flag)]}

    def import_state(self, state: dict[str, Any]) -> None:
        self._context, self._pending, self._bare = str(state["context"]), str(state["pending"]), bool(state["bare"])
        self._utf8.setstate((bytes(state["utf8"][0]), int(state["utf8"][1])))

    def _advance(self, final: bool) -> list[int]:
        view = self._encode_pending()
        if not view.words:
            return []
        first = view.words[0].first_token
        if final:
            return view.enc.ids[first:]
        keep = self._stable_word_count(view)
        held = view.words[keep].first_token
        if keep:
            self._context = view.text[view.words[keep - 1].start : view.words[keep].start]
            self._pending = view.text[view.words[keep].start :]
            self._bare = False
        ids = view.enc.ids[first:held]
        if len(self._pending) > self._limit:
            ids += self._cut_forced(view, held)
        return ids

    def _encode_pending(self) -> _View:
        """Encode context + pending and check that the context's words end exactly where it ends.

        Start-of-input effects can change how the context itself is split (ByteLevel's prefix space
        turns ``'re`` into `` '`` + ``re``); then stand-in contexts that always end a word are tried.
        Any context works once its end is a word boundary: the regex restarts there, and pending lies
        in the same added-token split as in the full text.
        """
        contexts = [self._context]
        if self._context and not self._tok.is_added_token(self._context):
            contexts += _STAND_IN_CONTEXTS
        for context in contexts:
            text = context + self._pending
            enc = self._tok.encode_words(text, bare=self._bare)
            words = _words_from(enc, len(context))
            if words is not None:
                return _View(text, len(context), enc, words)
        raise RuntimeError(
            "the tokenizer's pre-tokenization is not local enough for exact streaming: a final word "
            "boundary moved when text was appended"
        )

    def _stable_word_count(self, view: _View) -> int:
        """How many leading words appended text cannot change.

        Input can end (for the pre-tokenizer) at the end of the buffer, or where an added token may
        begin and split the text; before each such end, the last ``_HOLD_WORDS`` words are held.
        """
        added_start = self._tok.added_token_prefix_start(view.text, view.skip)
        before_end = sum(1 for w in view.words if w.start < added_start)
        return max(before_end - _HOLD_WORDS, 0)

    def _cut_forced(self, view: _View, first: int) -> list[int]:
        """Pending text is over the cap: emit its tokens up to the last token boundary at least
        ``limit // 2`` characters before the end (or the first boundary, if there is none)."""
        offsets = view.enc.offsets
        base = len(view.text) - len(self._pending)
        target = len(view.text) - self._limit // 2
        boundaries = [
            i for i in range(first + 1, len(offsets)) if offsets[i][0] > base and offsets[i][0] >= offsets[i - 1][1]
        ]
        if not boundaries:
            return []
        early = [i for i in boundaries if offsets[i][0] <= target]
        cut = early[-1] if early else boundaries[0]
        self._context = ""
        self._pending = view.text[offsets[cut][0] :]
        self._bare = True
        return view.enc.ids[first:cut]


def _words_from(enc: _Encoded, skip: int) -> list[_Word] | None:
    """Words starting at or after ``skip``; None if a word or token straddles ``skip``."""
    first = next((i for i, w in enumerate(enc.words) if w.start >= skip), len(enc.words))
    context_end = enc.words[first].first_token if first < len(enc.words) else len(enc.ids)
    if any(end > skip for _, end in enc.offsets[:context_end]):
        return None
    return enc.words[first:]


class StreamingEncoder:
    """Encode text arriving in fragments; the ids equal encoding the whole text at once.

    ``push`` returns the ids that are now final, ``flush`` the rest (and resets for a new stream).
    ``max_holdback`` bounds the held-back tail, in ``holdback_unit`` (see the module docstring).
    """

    def __init__(self, tokenizer: Tokenizer, *, max_holdback_chars: int = DEFAULT_MAX_HOLDBACK_CHARS) -> None:
        self._impl: _WorldStream | _TextStream
        if isinstance(tokenizer, WorldTokenizer):
            self._impl = _WorldStream(tokenizer)
        elif isinstance(tokenizer, HFTokenizer):
            self._impl = _TextStream(tokenizer, max_holdback_chars)
        else:
            raise TypeError(f"no streaming encoder for {type(tokenizer).__name__}")

    @property
    def max_holdback(self) -> int:
        """Most units ever held back: ``max_token_bytes - 1`` bytes (World, exact), or
        ``max_holdback_chars`` characters (text tokenizers; plus <= 3 bytes of a split UTF-8 sequence)."""
        return self._impl.max_holdback

    @property
    def holdback_unit(self) -> str:
        return self._impl.unit

    @property
    def held_back(self) -> int:
        """Units pushed but not yet returned as ids."""
        return self._impl.held_back

    @property
    def held_bytes(self) -> bytes:
        """The UTF-8 bytes of the input pushed but not yet returned as ids (a split character included)."""
        return self._impl.held_bytes

    def push(self, fragment: str | bytes) -> list[int]:
        return self._impl.push(fragment)

    def flush(self) -> list[int]:
        return self._impl.flush()

    def export_state(self) -> dict[str, Any]:
        """What is held back, as plain msgpack/JSON-able values, to resume the stream elsewhere."""
        return self._impl.export_state()

    def import_state(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`export_state` of an encoder of the same tokenizer."""
        kind = "bytes" if isinstance(self._impl, _WorldStream) else "text"
        if state.get("kind") != kind:
            raise ValueError(f"encoder state of kind {state.get('kind')!r} does not fit this {kind} tokenizer")
        self._impl.import_state(state)


class StreamingDecoder:
    """Decode generated ids incrementally without ever emitting a broken UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        if not tokenizer.is_byte_level:
            raise ValueError("streaming decode needs a byte-level tokenizer (World or byte-level BPE)")
        self._tok = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, ids: int | Iterable[int]) -> str:
        """Text completed by these ids; an incomplete multi-byte sequence at the end is held back."""
        batch = [ids] if isinstance(ids, int) else list(ids)
        return self._utf8.decode(self._tok.decode_bytes(batch))

    def flush(self) -> str:
        """Whatever is held back (incomplete bytes become U+FFFD); resets for a new stream."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


def encode_continuation(tokenizer: Tokenizer, text: str) -> list[int]:
    """Ids of ``text`` appended to a stream: without start-of-input effects such as a prefix space."""
    if isinstance(tokenizer, HFTokenizer):
        return list(tokenizer.encode_words(text, bare=True).ids)
    return tokenizer.encode(text)
