"""Tokenizers and their streaming encoder/decoder: streaming must equal encoding all text at once."""

from __future__ import annotations

import time
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import msgpack
import pytest
import tokenizers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors, trainers

from rwkv_stream import tokenizer as tk
from rwkv_stream.tokenizer import (
    HFTokenizer,
    StreamingDecoder,
    StreamingEncoder,
    Tokenizer,
    WorldTokenizer,
    find_world_vocab,
    load_tokenizer,
)

# Pieces that stress the boundaries: contractions split across fragments, whitespace runs (and the
# added space-run tokens of GPT-NeoX), CRLF, digits, emoji with skin tones and ZWJ, CJK, combining
# marks, and special tokens arriving in pieces.
PIECES = [
    "Hello", " world", "The", " quick", "'s", "'re", "'ll", "'", "r", "e", "’s", " ", "  ", "    ", " " * 9,
    "\n", "\n\n", "\r\n", "\t", " \n ", "123", "4", "3.14", ".", ",", "!?", "...", "—", "(", ")", "=",
    "🙂", "👍🏽", "👨‍👩‍👧", "🏳️‍🌈", "日本語", "中文", "한국어", "é", "e\u0301", "ß", "\u00a0", "\u3000",
    "<|endoftext|>", "<|end", "oftext|>", "<", " it", "-", "--------",
]  # fmt: skip

texts = st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=4)), max_size=40).map("".join)
FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

SAMPLES = [
    "",
    "Hello world! It's 2024, isn't it?",
    "    indented\n\tcode = f(x) + 12345;\r\n",
    "日本語のテキストと中文和한국어 mixed with English.",
    "emoji 🙂👍🏽 family 👨‍👩‍👧 flag 🏳️‍🌈 end",
    " " * 300 + "-" * 200 + "=" * 90 + "\n" * 20,
    "e\u0301 ñ ß ﬁ \u00a0\u3000 tab\tand\u200bzero-width",
    "<|endoftext|> special in text",
]


def split_at(payload: str | bytes, cuts: Sequence[int]) -> list[str | bytes]:
    bounds = [0, *sorted(cuts), len(payload)]
    return [payload[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def stream(encoder: StreamingEncoder, fragments: Sequence[str | bytes]) -> list[int]:
    ids: list[int] = []
    for fragment in fragments:
        ids += encoder.push(fragment)
        assert encoder.held_back <= encoder.max_holdback
    return ids + encoder.flush()


def cuts_for(data: st.DataObject, payload: str | bytes) -> list[int]:
    return data.draw(st.lists(st.integers(0, len(payload)), max_size=24))


# --------------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world() -> WorldTokenizer:
    return WorldTokenizer.from_installed_package()


@pytest.fixture(scope="module")
def world_reference():
    rwkv_tokenizer = pytest.importorskip("rwkv.rwkv_tokenizer")
    return rwkv_tokenizer.TRIE_TOKENIZER(str(find_world_vocab()))


# Llama-3's pre-tokenization regex: another family the streaming encoder must handle exactly.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def build_bpe(folder: Path, style: str = "neox") -> Path:
    """A small byte-level BPE tokenizer.json, trained here.

    ``neox`` is laid out like GPT-NeoX's 20B_tokenizer.json (NFC, ByteLevel pre-tokenizer, decoder and
    post-processor, special tokens, added space-run tokens); ``prefix-space`` adds ByteLevel's
    ``add_prefix_space``; ``llama3`` splits with Llama-3's regex before a regex-free ByteLevel.
    """
    tok = tokenizers.Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    if style == "llama3":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(tokenizers.Regex(LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=style == "prefix-space")
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|padding|>"],
        show_progress=False,
    )
    tok.train_from_iterator([" ".join(PIECES) * 3, *SAMPLES] * 5, trainer)
    tok.add_tokens([AddedToken(" " * n, normalized=True) for n in (2, 4, 8, 24)])
    path = folder / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="module", params=["neox", "prefix-space", "llama3"])
def bpe(request, tmp_path_factory) -> HFTokenizer:
    tokenizer = load_tokenizer(build_bpe(tmp_path_factory.mktemp(request.param), request.param))
    assert isinstance(tokenizer, HFTokenizer)
    return tokenizer


@pytest.fixture(scope="module")
def neox(tmp_path_factory) -> HFTokenizer:
    return HFTokenizer.from_file(build_bpe(tmp_path_factory.mktemp("neox")))


# --------------------------------------------------------------------------------------------------
# World tokenizer
# --------------------------------------------------------------------------------------------------


def test_world_vocabulary(world: WorldTokenizer) -> None:
    assert isinstance(world, Tokenizer)
    assert world.vocab_size == 65536
    assert world.max_token_bytes == 128
    assert world.id_to_token_bytes(0) == b""  # end-of-document id, not in the file
    for token_id in (1, 33, 256, 10000, 65529):
        token = world.id_to_token_bytes(token_id)
        assert world.token_to_id(token) == token_id
    assert world.token_to_id("Hello") == world.encode("Hello")[0]
    assert world.token_to_id(b"\xff\xfe\xfd-not-a-token") is None


@pytest.mark.parametrize("text", SAMPLES)
def test_world_matches_reference(world: WorldTokenizer, world_reference, text: str) -> None:
    ids = world.encode(text)
    assert ids == world_reference.encode(text)
    assert world.decode(ids) == text


@FAST
@given(text=texts)
def test_world_matches_reference_random(world: WorldTokenizer, world_reference, text: str) -> None:
    assert world.encode(text) == world_reference.encode(text)


@FAST
@given(data=st.binary(max_size=64))
def test_world_matches_reference_on_raw_bytes(world: WorldTokenizer, world_reference, data: bytes) -> None:
    ids = world.encode_bytes(data)
    assert ids == world_reference.encodeBytes(data)
    assert world.decode_bytes(ids) == data


def test_world_encode_is_fast(world: WorldTokenizer) -> None:
    text = "".join(SAMPLES) * 4  # about 4 KB
    assert len(text.encode()) > 3000
    start = time.perf_counter()
    world.encode(text)
    assert time.perf_counter() - start < 0.25


@FAST
@given(text=texts, data=st.data())
def test_world_streaming_text_fragments(world: WorldTokenizer, text: str, data: st.DataObject) -> None:
    ids = stream(StreamingEncoder(world), split_at(text, cuts_for(data, text)))
    assert ids == world.encode(text)


@FAST
@given(text=texts, data=st.data())
def test_world_streaming_byte_fragments(world: WorldTokenizer, text: str, data: st.DataObject) -> None:
    payload = text.encode("utf-8")  # cuts fall anywhere, including inside multi-byte characters
    ids = stream(StreamingEncoder(world), split_at(payload, cuts_for(data, payload)))
    assert ids == world.encode(text)


@FAST
@given(payload=st.binary(max_size=80), data=st.data())
def test_world_streaming_invalid_utf8(world: WorldTokenizer, payload: bytes, data: st.DataObject) -> None:
    ids = stream(StreamingEncoder(world), split_at(payload, cuts_for(data, payload)))
    assert ids == world.encode_bytes(payload)


def test_world_holdback_bound_on_long_runs(world: WorldTokenizer) -> None:
    text = " " * 1000 + "-" * 500 + "=" * 333 + "\n" * 77 + "x"
    encoder = StreamingEncoder(world)
    assert (encoder.max_holdback, encoder.holdback_unit) == (127, "bytes")
    most = 0
    ids: list[int] = []
    for char in text:
        ids += encoder.push(char.encode())
        most = max(most, encoder.held_back)
    assert ids + encoder.flush() == world.encode(text)
    assert most == 127  # the run of spaces really reaches the bound


def test_world_streaming_holds_back_little(world: WorldTokenizer) -> None:
    encoder = StreamingEncoder(world)
    emitted = []
    for word in ("Hello", " world", ",", " this", " is", " streaming", ".\n"):
        emitted += encoder.push(word)
        assert encoder.held_back < 16
    assert emitted + encoder.flush() == world.encode("Hello world, this is streaming.\n")


# --------------------------------------------------------------------------------------------------
# Hugging Face byte-level BPE
# --------------------------------------------------------------------------------------------------


def test_bpe_interface(bpe: HFTokenizer) -> None:
    assert isinstance(bpe, Tokenizer)
    assert bpe.is_byte_level
    assert 256 < bpe.vocab_size <= 700 + 4
    end = bpe.token_to_id("<|endoftext|>")
    assert end is not None and bpe.id_to_token_bytes(end) == b"<|endoftext|>"
    assert bpe.token_to_id(b"<|endoftext|>") == end
    [world_id] = bpe.encode(" world")  # a merge the training text guarantees
    assert bpe.token_to_id("Ġworld") == world_id
    assert bpe.id_to_token_bytes(world_id) == b" world"
    assert bpe.token_to_id(b" world") == world_id


@FAST
@given(text=texts)
def test_bpe_decode_matches(bpe: HFTokenizer, text: str) -> None:
    ids = bpe.encode(text)
    assert bpe.decode(ids) == bpe.decode_bytes(ids).decode("utf-8", "replace")


@FAST
@given(text=texts)
def test_bpe_is_lossless_without_prefix_space(neox: HFTokenizer, text: str) -> None:
    assert neox.decode(neox.encode(text)) == unicodedata.normalize("NFC", text)


@FAST
@given(text=texts, data=st.data())
def test_bpe_streaming_text_fragments(bpe: HFTokenizer, text: str, data: st.DataObject) -> None:
    ids = stream(StreamingEncoder(bpe), split_at(text, cuts_for(data, text)))
    assert ids == bpe.encode(text)


@FAST
@given(text=texts, data=st.data())
def test_bpe_streaming_byte_fragments(bpe: HFTokenizer, text: str, data: st.DataObject) -> None:
    payload = text.encode("utf-8")
    ids = stream(StreamingEncoder(bpe), split_at(payload, cuts_for(data, payload)))
    assert ids == bpe.encode(text)


@FAST
@given(text=texts, data=st.data())
def test_bpe_streaming_char_by_char(bpe: HFTokenizer, text: str, data: st.DataObject) -> None:
    as_bytes = data.draw(st.booleans())
    payload: str | bytes = text.encode("utf-8") if as_bytes else text
    fragments = [payload[i : i + 1] for i in range(len(payload))]
    assert stream(StreamingEncoder(bpe), fragments) == bpe.encode(text)


def test_bpe_invalid_utf8_is_replaced_like_a_one_shot_decode(bpe: HFTokenizer) -> None:
    payload = "ok 🙂".encode() + b"\xff\xe2\x82 tail \xf0\x9f"
    fragments = [payload[i : i + 1] for i in range(len(payload))]
    expected = bpe.encode(payload.decode("utf-8", "replace"))
    assert stream(StreamingEncoder(bpe), fragments) == expected


def test_bpe_context_stays_small_on_long_streams(bpe: HFTokenizer) -> None:
    text = " ".join(SAMPLES[1:5]) * 40
    encoder = StreamingEncoder(bpe)
    ids: list[int] = []
    for i in range(0, len(text), 7):
        ids += encoder.push(text[i : i + 7])
        assert encoder.held_back < 60  # a couple of words, not the stream so far
    assert ids + encoder.flush() == bpe.encode(text)


def test_bpe_endless_word_is_capped_and_lossless(neox: HFTokenizer) -> None:
    bpe = neox
    word = "".join("qwertyuiopasdfghjklzxcvbnm"[(i * 7) % 26] for i in range(3000))
    text = f"start {word} 12345{'!' * 500} end"
    encoder = StreamingEncoder(bpe, max_holdback_chars=64)
    ids: list[int] = []
    for i in range(0, len(text), 5):
        ids += encoder.push(text[i : i + 5])
        assert encoder.held_back <= 64
    ids += encoder.flush()
    assert bpe.decode(ids) == text
    # Words shorter than the cap stay exact.
    short = " ".join(SAMPLES[1:4])
    assert stream(StreamingEncoder(bpe, max_holdback_chars=64), list(short)) == bpe.encode(short)


def test_bpe_cap_must_be_reasonable(bpe: HFTokenizer) -> None:
    with pytest.raises(ValueError, match="max_holdback_chars"):
        StreamingEncoder(bpe, max_holdback_chars=8)


# --------------------------------------------------------------------------------------------------
# streaming decode
# --------------------------------------------------------------------------------------------------


def decode_in_chunks(tokenizer: Tokenizer, ids: list[int], cuts: Sequence[int]) -> list[str]:
    decoder = StreamingDecoder(tokenizer)
    return [decoder.push(chunk) for chunk in split_at(ids, cuts)] + [decoder.flush()]


@FAST
@given(text=texts, data=st.data())
def test_streaming_decode_world(world: WorldTokenizer, text: str, data: st.DataObject) -> None:
    ids = world.encode(text)
    pieces = decode_in_chunks(world, ids, cuts_for(data, ids))
    assert "".join(pieces) == world.decode(ids) == text
    if "\ufffd" not in text:
        assert not any("\ufffd" in piece for piece in pieces)  # no broken character, ever


@FAST
@given(text=texts, data=st.data())
def test_streaming_decode_bpe(bpe: HFTokenizer, text: str, data: st.DataObject) -> None:
    ids = bpe.encode(text)
    pieces = decode_in_chunks(bpe, ids, cuts_for(data, ids))
    assert "".join(pieces) == bpe.decode(ids)
    if "\ufffd" not in text:
        assert not any("\ufffd" in piece for piece in pieces)


@FAST
@given(ids=st.lists(st.integers(0, 65529), max_size=30), data=st.data())
def test_streaming_decode_arbitrary_ids(world: WorldTokenizer, ids: list[int], data: st.DataObject) -> None:
    pieces = decode_in_chunks(world, ids, cuts_for(data, ids))
    assert "".join(pieces) == world.decode_bytes(ids).decode("utf-8", "replace")


def test_streaming_decode_holds_back_split_character(world: WorldTokenizer) -> None:
    byte_ids = [world.token_to_id(bytes([b])) for b in "€".encode()]
    decoder = StreamingDecoder(world)
    assert [decoder.push(i) for i in byte_ids if i is not None] == ["", "", "€"]
    assert decoder.push(byte_ids[0]) == ""
    assert decoder.flush() == "\ufffd"
    assert decoder.push(world.encode("ok")) == "ok"  # reset by flush


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------


def test_load_tokenizer_specs(tmp_path: Path) -> None:
    assert load_tokenizer("world") is WorldTokenizer.from_installed_package()
    assert isinstance(load_tokenizer(find_world_vocab()), WorldTokenizer)
    json_path = build_bpe(tmp_path)
    by_file, by_folder = load_tokenizer(json_path), load_tokenizer(tmp_path)
    assert isinstance(by_file, HFTokenizer) and isinstance(by_folder, HFTokenizer)
    assert by_file.encode("Hello world") == by_folder.encode("Hello world")
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing")


def test_missing_world_vocabulary_names_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tk, "WORLD_VOCAB_PACKAGES", ("surely_not_installed_pkg",))
    with pytest.raises(FileNotFoundError, match="surely-not-installed-pkg"):
        find_world_vocab()


def test_encoder_resets_after_flush(world: WorldTokenizer, bpe: HFTokenizer) -> None:
    for tokenizer in (world, bpe):
        encoder = StreamingEncoder(tokenizer)
        first = stream(encoder, ["Hello", " wor", "ld"])
        second = stream(encoder, ["Hello", " wor", "ld"])
        assert first == second == tokenizer.encode("Hello world")


def test_streaming_encoder_rejects_unknown_tokenizers() -> None:
    with pytest.raises(TypeError):
        StreamingEncoder(object())  # type: ignore[arg-type]


@FAST
@given(text=texts, data=st.data())
def test_encoder_state_survives_export_and_import_mid_stream(world: WorldTokenizer, bpe: HFTokenizer, text: str,
                                                             data: st.DataObject) -> None:
    """A stream can move between processes: export the held-back tail as plain values, resume elsewhere."""
    payload = text.encode("utf-8")
    pieces = split_at(payload, cuts_for(data, payload))
    for tokenizer in (world, bpe):
        ids, encoder = [], StreamingEncoder(tokenizer)
        for piece in pieces:
            ids += encoder.push(piece)
            state = msgpack.unpackb(msgpack.packb(encoder.export_state()))
            encoder = StreamingEncoder(tokenizer)
            encoder.import_state(state)
        assert ids + encoder.flush() == tokenizer.encode(text)


def test_encoder_state_of_another_kind_is_refused(world: WorldTokenizer, bpe: HFTokenizer) -> None:
    with pytest.raises(ValueError, match="does not fit"):
        StreamingEncoder(bpe).import_state(StreamingEncoder(world).export_state())
