"""Shared fixtures: tiny random RWKV-4 checkpoints written in the real file formats."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RWKV_JIT_ON", "0")  # the `rwkv` peer package reads these at import
os.environ.setdefault("RWKV_CUDA_ON", "0")

from rwkv_stream import ModelConfig, cpu_kernels  # noqa: E402
from rwkv_stream.random_checkpoint import random_tensors, save_hf, save_pth  # noqa: E402

pytest_plugins = ["kafka_broker"]  # the real-broker fixtures (tests/kafka_broker.py)

# builds of the compiled CPU kernels for CPUs without AVX-512 (the AVX2 code) or without AVX2 (plain C)
NON_NATIVE_BUILDS = pytest.mark.parametrize("march", [["-march=x86-64-v3", "-mf16c"], ["-march=x86-64"]],
                                            ids=["avx2", "plain-c"])


@contextlib.contextmanager
def kernels_built_for(monkeypatch: pytest.MonkeyPatch, cache: Path, march: list[str],
                      reset: Callable[[], None]) -> Iterator[None]:
    """Inside: the compiled CPU kernels built with ``march`` instead of ``-march=native``, into ``cache``;
    ``reset`` forgets the loaded library on entry and on exit."""
    flags = [f for f in cpu_kernels.CFLAGS if f != "-march=native"] + march
    monkeypatch.setattr(cpu_kernels, "CFLAGS", flags)
    monkeypatch.setenv("RWKV_STREAM_CACHE", str(cache))
    reset()
    try:
        yield
    finally:
        reset()

TINY = ModelConfig(n_layer=3, n_embd=32, vocab_size=97, ffn_dim=128)


@pytest.fixture(scope="session")
def tiny_tensors():
    return random_tensors(TINY, seed=1)


@pytest.fixture(scope="session")
def tiny_pth(tmp_path_factory, tiny_tensors) -> Path:
    path = tmp_path_factory.mktemp("pth") / "tiny.pth"
    save_pth(tiny_tensors, path)
    return path


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory, tiny_tensors) -> Path:
    return save_hf(tiny_tensors, TINY, tmp_path_factory.mktemp("hf") / "tiny")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread (two threads on two busy cores are many times slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_bundle_dir(tmp_path_factory) -> Path:
    """A tiny bundle with tagger, classifier and zero-shot heads (what the Kafka tests run)."""
    from kafka_harness import make_tiny_bundle

    return make_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny")
