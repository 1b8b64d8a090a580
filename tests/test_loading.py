"""rwkv_stream.loading: the one resolver and loader for shipped models, bundles, checkpoints and HF dirs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY

from rwkv_stream import CheckpointError, cli
from rwkv_stream.bundle import read_manifest, write_bundle
from rwkv_stream.heads import Head, HeadSet
from rwkv_stream.loading import (
    load,
    load_source,
    resolve_source,
    save_bundle,
    shipped_dir,
    shipped_models,
)

SHIPPED_NAME = "transcript-tagger"
needs_shipped = pytest.mark.skipif(not (shipped_dir() / "bundle.json").is_file(), reason="shipped model missing")


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    """A byte-level BPE with fewer ids than the tiny model's 97."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = sorted(set(" thequickbrownfox"))
    trainer = trainers.BpeTrainer(vocab_size=40, initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(["the quick brown fox"] * 20, trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory, tiny_tensors, tokenizer_file) -> Path:
    heads = HeadSet({"tags": Head("tagger", ["O", "X"], TINY.n_embd)})
    return write_bundle(tmp_path_factory.mktemp("bundle") / "b", tiny_tensors, tokenizer_file, heads, name="tiny")


# ------------------------------------------------------------------------------------------ resolving
@needs_shipped
def test_shipped_names_resolve_to_the_installed_bundle() -> None:
    assert SHIPPED_NAME in shipped_models()
    assert resolve_source("shipped") == resolve_source(f"shipped:{SHIPPED_NAME}") == shipped_dir(SHIPPED_NAME)


@pytest.mark.parametrize(
    "source,named",
    [("shipped:no-such-model", "'no-such-model'"), ("shipped:../data/transcript-tagger", "'../data/transcript-tagger'"),
     ("/no/such/dir", "'/no/such/dir'"), ("model.txt", "'model.txt'")],
)
def test_bad_sources_get_one_line_errors_naming_them(tmp_path, monkeypatch, source: str, named: str) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.txt").write_text("not a model")
    with pytest.raises(CheckpointError) as err:
        resolve_source(source)
    message = str(err.value)
    assert named in message and "\n" not in message
    if source != "model.txt":
        assert f"installed shipped models: {', '.join(shipped_models()) or 'none'}" in message


def test_cli_reports_a_bad_source_in_one_line(capsys) -> None:
    assert cli.main(["info", "shipped:no-such-model"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rwkv-stream: shipped model 'no-such-model' is not installed") and "\n" not in err


# ------------------------------------------------------------------------------------------ loading
def test_bundle_loads_everything_it_holds(tiny_bundle, tiny_tensors, tokenizer_file) -> None:
    loaded = load_source(tiny_bundle)
    assert loaded.manifest == read_manifest(tiny_bundle)
    assert loaded.model.fingerprint == loaded.manifest["fingerprint"]
    assert loaded.tokenizer_json == tokenizer_file.read_text(encoding="utf-8")
    assert loaded.tokenizer is not None and loaded.tokenizer.decode(loaded.tokenizer.encode("the fox")) == "the fox"
    assert sorted(loaded.heads.heads) == ["tags"]
    assert all(torch.equal(loaded.tensors[k], v.reshape(loaded.tensors[k].shape)) for k, v in tiny_tensors.items())
    assert load(tiny_bundle).fingerprint == loaded.model.fingerprint


def test_a_bundle_is_verified_unless_told_not_to(tiny_bundle, tmp_path) -> None:
    copy = shutil.copytree(tiny_bundle, tmp_path / "b")
    (copy / "tokenizer.json").write_text((copy / "tokenizer.json").read_text() + " ")
    for loader in (load_source, load):
        with pytest.raises(CheckpointError, match="checksum"):
            loader(copy)
    assert load_source(copy, verify=False).tokenizer_json.endswith(" ")


def test_bare_checkpoint_needs_a_tokenizer_unless_not_required(tiny_pth, tokenizer_file) -> None:
    with pytest.raises(CheckpointError, match="bare checkpoint"):
        load_source(tiny_pth)
    bare = load_source(tiny_pth, require_tokenizer=False)
    assert bare.tokenizer is None and bare.tokenizer_json is None and not bare.heads.heads
    assert bare.manifest["name"] == "tiny"
    with_tok = load_source(tiny_pth, tokenizer=tokenizer_file)
    assert with_tok.tokenizer_json == tokenizer_file.read_text(encoding="utf-8")
    assert with_tok.model.fingerprint == bare.model.fingerprint == load(tiny_pth).fingerprint


def test_hf_dir_uses_its_own_tokenizer_json(tiny_hf, tokenizer_file, tmp_path) -> None:
    hf = shutil.copytree(tiny_hf, tmp_path / "hf")
    shutil.copyfile(tokenizer_file, hf / "tokenizer.json")
    loaded = load_source(hf)
    assert loaded.tokenizer is not None and loaded.tokenizer_json == tokenizer_file.read_text(encoding="utf-8")
    assert loaded.model.fingerprint == load(tiny_hf).fingerprint


def test_extra_heads_are_merged_and_checked(tiny_bundle, tmp_path) -> None:
    HeadSet({"cls": Head("classifier", ["a", "b"], TINY.n_embd)}).save(tmp_path / "extra")
    assert sorted(load_source(tiny_bundle, heads=tmp_path / "extra").heads.heads) == ["cls", "tags"]
    HeadSet({"wide": Head("classifier", ["a", "b"], TINY.n_embd + 1)}).save(tmp_path / "wide")
    with pytest.raises(ValueError, match="head 'wide' reads vectors of size 33"):
        load_source(tiny_bundle, heads=tmp_path / "wide")


def test_extra_heads_of_a_name_the_source_has_clash_unless_same_or_replaced(tiny_bundle, tmp_path) -> None:
    shipped = load_source(tiny_bundle).heads
    other = Head(**shipped["tags"].spec())  # the same spec, other weights
    with torch.no_grad():
        for p in other.parameters():
            p.fill_(0.5)
    HeadSet({"tags": other, "cls": Head("classifier", ["a", "b"], TINY.n_embd)}).save(tmp_path / "clash")
    with pytest.raises(ValueError, match=r"has heads named \['tags'\] that the model already has") as err:
        load_source(tiny_bundle, heads=tmp_path / "clash")
    assert "\n" not in str(err.value) and "replace_heads=True" in str(err.value)
    replaced = load_source(tiny_bundle, heads=tmp_path / "clash", replace_heads=True).heads
    assert sorted(replaced.heads) == ["cls", "tags"] and replaced["tags"].same_as(other)
    HeadSet({"tags": shipped["tags"]}).save(tmp_path / "same")  # the same head twice (a run's OUT/heads): no clash
    assert load_source(tiny_bundle, heads=tmp_path / "same").heads["tags"].same_as(shipped["tags"])


def test_byte_level_is_checked_when_asked(tiny_pth, tokenizer_file, tmp_path) -> None:
    from tokenizers import Tokenizer, models

    words = Tokenizer(models.WordLevel({"the": 0, "fox": 1, "[UNK]": 2}, unk_token="[UNK]"))
    words.save(str(tmp_path / "words.json"))
    assert load_source(tiny_pth, tokenizer=tmp_path / "words.json").tokenizer is not None
    with pytest.raises(ValueError, match="needs a byte-level tokenizer"):
        load_source(tiny_pth, tokenizer=tmp_path / "words.json", byte_level=True)
    assert load_source(tiny_pth, tokenizer=tokenizer_file, byte_level=True).tokenizer is not None


def test_a_tokenizer_larger_than_the_model_is_refused(tiny_pth) -> None:
    pytest.importorskip("pyrwkv_tokenizer")
    with pytest.raises(ValueError, match="tokenizer has 65536 ids but the model only 97"):
        load_source(tiny_pth, tokenizer="world")


# ------------------------------------------------------------------------------------------ saving
def test_save_bundle_writes_the_same_files(tiny_bundle, tmp_path) -> None:
    loaded = load_source(tiny_bundle, dtype="bfloat16")  # the run dtype does not change what is saved
    out = save_bundle(loaded, tmp_path / "again")
    assert read_manifest(out)["files"] == read_manifest(tiny_bundle)["files"]
    again = load_source(out)
    assert again.model.fingerprint == loaded.model.fingerprint and again.manifest["name"] == "tiny"


@needs_shipped
def test_shipped_bundle_resaves_bit_for_bit(tmp_path) -> None:
    out = save_bundle(load_source("shipped"), tmp_path / "shipped")
    original = json.loads((shipped_dir() / "bundle.json").read_text())
    assert read_manifest(out)["files"] == original["files"]


def test_bare_checkpoint_saves_with_its_tokenizer(tiny_pth, tokenizer_file, tmp_path) -> None:
    out = save_bundle(load_source(tiny_pth, tokenizer=tokenizer_file), tmp_path / "b")
    assert (out / "tokenizer.json").read_bytes() == tokenizer_file.read_bytes()
    with pytest.raises(ValueError, match="cannot save this tokenizer"):
        save_bundle(load_source(tiny_pth, require_tokenizer=False), tmp_path / "c")


def test_loading_imports_neither_spacy_nor_kafka() -> None:
    code = ("import sys, rwkv_stream.loading, rwkv_stream.generate, rwkv_stream.bundle; "
            "assert not {'spacy', 'kafka'} & set(sys.modules), sorted({'spacy', 'kafka'} & set(sys.modules))")
    subprocess.run([sys.executable, "-c", code], check=True)
