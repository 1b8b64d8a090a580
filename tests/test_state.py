"""State bytes: versioned, checksummed round trips that continue bit-identically; clear errors otherwise."""

from __future__ import annotations

import msgpack
import pytest
import torch

from rwkv_stream import State, StateError, load


@pytest.fixture(scope="module")
def model(tiny_pth):
    return load(tiny_pth)


def test_round_trip_mid_stream_continues_bit_identically(model):
    _, state = model.forward([1, 2, 3, 4])
    state.meta["offset"] = 41
    restored = State.from_bytes(state.to_bytes(), expected_fingerprint=model.fingerprint)
    assert restored.n_tokens == 4 and restored.meta == {"offset": 41}
    a, sa = model.forward([5, 6, 7], state)
    b, sb = model.forward([5, 6, 7], restored)
    assert torch.equal(a, b) and torch.equal(sa.tensor, sb.tensor)


def test_truncated_bytes_are_refused(model):
    data = model.forward([1, 2])[1].to_bytes()
    for cut in (0, 1, len(data) // 2, len(data) - 1):
        with pytest.raises(StateError):
            State.from_bytes(data[:cut])


def test_flipped_byte_fails_the_checksum(model):
    data = bytearray(model.forward([1, 2])[1].to_bytes())
    data[len(data) // 2] ^= 0x40
    with pytest.raises(StateError, match="corrupt|truncated"):
        State.from_bytes(bytes(data))


def test_fingerprint_mismatch_is_named(model):
    data = model.forward([1])[1].to_bytes()
    with pytest.raises(StateError, match="expected model 0000"):
        State.from_bytes(data, expected_fingerprint="0000")


def test_unknown_format_version_is_refused(model):
    obj = msgpack.unpackb(model.forward([1])[1].to_bytes())
    obj["version"] = 99
    with pytest.raises(StateError, match="version 99 not supported"):
        State.from_bytes(msgpack.packb(obj))


def test_not_a_state(model):
    with pytest.raises(StateError, match="not an rwkv-stream state"):
        State.from_bytes(msgpack.packb({"hello": 1}))


def test_copy_is_a_fork_and_reset_empties(model):
    _, state = model.forward([1, 2, 3])
    fork = state.copy()
    _, advanced = model.forward([4], fork)
    assert torch.equal(fork.tensor, state.tensor)
    state.reset()
    assert state.n_tokens == 0 and torch.equal(state.tensor, model.new_state().tensor)
    assert advanced.n_tokens == 4
