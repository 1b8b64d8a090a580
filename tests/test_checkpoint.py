"""Checkpoint loading errors: missing files, wrong shapes, later RWKV versions, unsafe pickles."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY

from rwkv_stream import CheckpointError, load
from rwkv_stream.random_checkpoint import save_hf, save_pth


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load(tmp_path / "nope.pth")


def test_missing_tensor_names_key_and_shape(tmp_path, tiny_tensors):
    broken = dict(tiny_tensors)
    del broken["blocks.1.att.output.weight"]
    save_pth(broken, tmp_path / "m.pth")
    expected = r"missing tensor 'blocks.1.att.output.weight' \(expected shape \[32, 32\]\)"
    with pytest.raises(CheckpointError, match=expected):
        load(tmp_path / "m.pth")


def test_wrong_shape_names_both_shapes(tmp_path, tiny_tensors):
    broken = dict(tiny_tensors)
    broken["blocks.2.ffn.value.weight"] = torch.zeros(32, 64)
    save_pth(broken, tmp_path / "m.pth")
    expected = r"'blocks.2.ffn.value.weight' has shape \[32, 64\], expected \[32, 128\]"
    with pytest.raises(CheckpointError, match=expected):
        load(tmp_path / "m.pth")


@pytest.mark.parametrize("marker,version", [("blocks.0.att.ln_x.weight", 5), ("blocks.0.att.time_maa_x", 6)])
def test_later_versions_are_named(tmp_path, tiny_tensors, marker, version):
    save_pth({**tiny_tensors, marker: torch.zeros(32)}, tmp_path / "m.pth")
    with pytest.raises(CheckpointError, match=f"version {version} not supported yet"):
        load(tmp_path / "m.pth")


def test_hf_config_of_a_later_version(tmp_path, tiny_tensors):
    directory = save_hf(tiny_tensors, TINY, tmp_path / "hf")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "model_type": "rwkv6"}))
    with pytest.raises(CheckpointError, match="version 6 not supported yet"):
        load(directory)


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"emb.weight": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="weights_only"):
        load(tmp_path / "evil.pth")


def test_empty_hf_dir(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load(tmp_path)


def test_bad_dtype_is_named(tiny_pth):
    with pytest.raises(ValueError, match="unsupported weight dtype 'int4'"):
        load(tiny_pth, dtype="int4")


def test_legacy_non_zip_pth_loads(tmp_path, tiny_tensors, tiny_pth):
    legacy = {k: (v.reshape(1, 1, -1) if ".time_mix_" in k else v) for k, v in tiny_tensors.items()}
    torch.save(legacy, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    assert load(tmp_path / "legacy.pth").fingerprint == load(tiny_pth).fingerprint
