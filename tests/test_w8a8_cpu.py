"""The compiled w8a8 layer parts (rwkv_stream.w8a8_cpu): close to the torch w8a8 path, bit-identical however
the rows are chunked, split into steps or batched, and the torch path where the kernels are off."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY

from rwkv_stream import cpu_kernels, load, w8a8_cpu

TEXT = [(7 * i + 3) % TINY.vocab_size for i in range(40)]

pytestmark = pytest.mark.skipif(w8a8_cpu.load() is None, reason="no C compiler: w8a8 runs on the torch path")


def test_compiled_w8a8_matches_the_torch_w8a8_path(tiny_pth, one_torch_thread):
    model = load(tiny_pth, dtype="w8a8")
    assert model._w8 is not None
    hidden, state = model.forward_hidden(TEXT)
    with cpu_kernels.disabled():
        torch_path = load(tiny_pth, dtype="w8a8")
    assert torch_path._w8 is None
    ref, ref_state = torch_path.forward_hidden(TEXT)
    assert (hidden - ref).abs().max() / ref.abs().max() < 1e-4  # same quantized products; exp and sums differ
    assert (state.tensor - ref_state.tensor).abs().max() < 1e-3


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_chunks_do_not_change_bits(tiny_pth, one_torch_thread, chunk):
    """Rows go through the layers in chunks; a stream cut by a chunk boundary continues from its state."""
    model = load(tiny_pth, dtype="w8a8")
    streams = [TEXT[:13], TEXT[5:6], TEXT, TEXT[3:20]]

    def run(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        model._w8.chunk_rows = rows
        pool = model.new_pool(len(streams))
        slots = [pool.alloc() for _ in streams]
        out = model.step(pool, slots, streams, batch_invariant=True)
        return torch.cat(out.hidden), pool.data[: len(streams)].clone()

    whole, chunked = run(10_000), run(chunk)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])


def test_split_and_batch_mates_do_not_change_bits(tiny_pth, one_torch_thread):
    model = load(tiny_pth, dtype="w8a8")
    hidden, state = model.forward_hidden(TEXT)
    first, mid = model.forward_hidden(TEXT[:11])
    rest, end = model.forward_hidden(TEXT[11:], mid)
    assert torch.equal(torch.cat([first, rest]), hidden) and torch.equal(end.tensor, state.tensor)
    pool = model.new_pool(3)
    slots = [pool.alloc() for _ in range(3)]
    out = model.step(pool, slots, [[4, 5, 6], TEXT, [9]], batch_invariant=True)
    assert torch.equal(out.hidden[1], hidden) and torch.equal(pool.read(slots[1]).tensor, state.tensor)
