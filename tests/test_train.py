"""The parallel training model against the token-by-token stable RWKV-4 recurrence of the runtime
(:func:`rwkv_stream.wkv.wkv_step`, the one statement of the WKV equations)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from torch import Tensor

from rwkv_stream.train import RWKV4, TrainConfig, wkv_parallel
from rwkv_stream.wkv import EMPTY_PP, wkv_step

VOCAB, C, LAYERS, FFN = 23, 16, 3, 40


def _randomize(model: RWKV4, seed: int, decay_scale: float = 2.0) -> None:
    """Every parameter random, decays and bonuses spread wide (the default ramps hide bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("time_decay"):
                p.copy_(torch.randn(p.shape, generator=gen) * decay_scale)
            elif name.endswith("time_first"):
                p.copy_(torch.randn(p.shape, generator=gen) * 2)
            elif "time_mix" in name:
                p.copy_(torch.rand(p.shape, generator=gen))
            elif name.endswith("ln0.weight") or ".ln" in name or name.startswith("ln_out"):
                p.copy_(
                    1 + 0.3 * torch.randn(p.shape, generator=gen)
                    if name.endswith("weight")
                    else 0.3 * torch.randn(p.shape, generator=gen)
                )
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))


def _tiny(seed: int = 0, chunk_len: int = 5, decay_scale: float = 2.0) -> RWKV4:
    torch.manual_seed(seed)
    model = RWKV4(TrainConfig(VOCAB, C, LAYERS, FFN, chunk_len=chunk_len))
    _randomize(model, seed, decay_scale)
    return model


def _ln(x: Tensor, sd: dict[str, Tensor], name: str) -> Tensor:
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), sd[f"{name}.weight"], sd[f"{name}.bias"])


def _att_step(x: Tensor, st: list[Tensor], sd: dict[str, Tensor], p: str) -> Tensor:
    """One token of time mixing with the stable recurrence; st = [att_x, aa, bb, pp, ffn_x]."""

    def mix(name: str) -> Tensor:
        m = sd[f"{p}.time_mix_{name}"].flatten()
        return x * m + st[0] * (1 - m)

    k = sd[f"{p}.key.weight"] @ mix("k")
    v = sd[f"{p}.value.weight"] @ mix("v")
    r = torch.sigmoid(sd[f"{p}.receptance.weight"] @ mix("r"))
    w, u = -torch.exp(sd[f"{p}.time_decay"]), sd[f"{p}.time_first"]
    wkv, st[1], st[2], st[3] = wkv_step(k, v, w, u, st[1], st[2], st[3])
    st[0] = x
    return sd[f"{p}.output.weight"] @ (r * wkv)


def _ffn_step(x: Tensor, st: list[Tensor], sd: dict[str, Tensor], p: str) -> Tensor:
    xk = x * sd[f"{p}.time_mix_k"].flatten() + st[4] * (1 - sd[f"{p}.time_mix_k"].flatten())
    xr = x * sd[f"{p}.time_mix_r"].flatten() + st[4] * (1 - sd[f"{p}.time_mix_r"].flatten())
    st[4] = x
    k = torch.square(torch.relu(sd[f"{p}.key.weight"] @ xk))
    return torch.sigmoid(sd[f"{p}.receptance.weight"] @ xr) * (sd[f"{p}.value.weight"] @ k)


def reference_logits(sd: dict[str, Tensor], tokens: list[int]) -> tuple[Tensor, list[list[Tensor]]]:
    """Token-by-token RWKV-4 in fp32 straight from the state dict."""
    n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    c = sd["emb.weight"].shape[1]
    state = [
        [torch.zeros(c), torch.zeros(c), torch.zeros(c), torch.full((c,), EMPTY_PP), torch.zeros(c)]
        for _ in range(n_layer)
    ]
    out = []
    for tok in tokens:
        x = _ln(sd["emb.weight"][tok], sd, "blocks.0.ln0")
        for i in range(n_layer):
            x = x + _att_step(_ln(x, sd, f"blocks.{i}.ln1"), state[i], sd, f"blocks.{i}.att")
            x = x + _ffn_step(_ln(x, sd, f"blocks.{i}.ln2"), state[i], sd, f"blocks.{i}.ffn")
        out.append(sd["head.weight"] @ _ln(x, sd, "ln_out"))
    return torch.stack(out), state


def _close(actual: Tensor, expected: Tensor, rtol: float = 1e-5) -> None:
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("chunk_len", [1, 4, 7, 64])
def test_parallel_logits_match_sequential_reference(chunk_len: int) -> None:
    model = _tiny(seed=chunk_len, chunk_len=chunk_len)
    tokens = torch.randint(0, VOCAB, (2, 29), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(tokens)
    sd = model.checkpoint_state_dict()
    for b in range(tokens.shape[0]):
        expected, _ = reference_logits(sd, tokens[b].tolist())
        _close(logits[b], expected)


def test_final_state_matches_reference() -> None:
    model = _tiny(seed=3, chunk_len=6)
    tokens = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, state = model.forward_hidden(tokens)
    _, ref_state = reference_logits(model.checkpoint_state_dict(), tokens[0].tolist())
    for layer, ref in zip(state, ref_state, strict=True):
        for got, exp in zip(layer, ref, strict=True):
            _close(got[0], exp)


def test_carried_state_continues_the_sequence() -> None:
    model = _tiny(seed=4, chunk_len=8)
    tokens = torch.randint(0, VOCAB, (3, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole, _ = model.forward_hidden(tokens)
        first, state = model.forward_hidden(tokens[:, :13])
        second, _ = model.forward_hidden(tokens[:, 13:], state)
    _close(torch.cat([first, second], dim=1), whole)


@pytest.mark.parametrize("decay_scale", [30.0, 200.0])
def test_extreme_parameters_stay_finite_and_exact(decay_scale: float) -> None:
    """Decays from ~0 to -inf, large bonuses and keys: the log-space form must neither overflow nor NaN."""
    model = _tiny(seed=5, chunk_len=9, decay_scale=decay_scale)
    with torch.no_grad():
        for blk in model.blocks:
            blk.att.time_first.mul_(10)
            blk.att.key.weight.mul_(20)
    tokens = torch.randint(0, VOCAB, (1, 25), generator=torch.Generator().manual_seed(4))
    logits = model(tokens)
    assert torch.isfinite(logits).all()
    expected, _ = reference_logits(model.checkpoint_state_dict(), tokens[0].tolist())
    _close(logits[0].detach(), expected, rtol=1e-4)
    logits.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_wkv_gradients_match_sequential_autograd() -> None:
    gen = torch.Generator().manual_seed(7)
    b, t, c = 2, 11, 6
    td = (torch.randn(c, generator=gen) * 2).requires_grad_()
    tf = (torch.randn(c, generator=gen) * 2).requires_grad_()
    k = (torch.randn(b, t, c, generator=gen) * 3).requires_grad_()
    v = torch.randn(b, t, c, generator=gen).requires_grad_()
    out, _ = wkv_parallel(td, tf, k, v, chunk_len=4)
    grads = torch.autograd.grad(out.sin().sum(), (td, tf, k, v))
    ref = _wkv_sequential(td, tf, k, v)
    ref_grads = torch.autograd.grad(ref.sin().sum(), (td, tf, k, v))
    _close(out.detach(), ref.detach())
    for g, rg in zip(grads, ref_grads, strict=True):
        _close(g, rg, rtol=1e-4)


def _wkv_sequential(td: Tensor, tf: Tensor, k: Tensor, v: Tensor) -> Tensor:
    w = -torch.exp(td)
    aa = torch.zeros(k.shape[0], k.shape[2])
    bb, pp = aa.clone(), torch.full_like(aa, EMPTY_PP)
    outs = []
    for i in range(k.shape[1]):
        out, aa, bb, pp = wkv_step(k[:, i], v[:, i], w, tf, aa, bb, pp)
        outs.append(out)
    return torch.stack(outs, dim=1)


def test_training_step_has_finite_gradients_from_default_init() -> None:
    torch.manual_seed(0)
    model = RWKV4(TrainConfig(VOCAB, C, LAYERS, chunk_len=8))
    tokens = torch.randint(0, VOCAB, (4, 33))
    loss = model.loss(tokens[:, :-1], tokens[:, 1:])
    assert math.isclose(loss.item(), math.log(VOCAB), rel_tol=0.05)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["head.weight"].abs().sum() > 0


def test_state_dict_has_blinkdl_keys_and_shapes(tmp_path) -> None:
    model = RWKV4(TrainConfig(VOCAB, C, 2, FFN))
    path = tmp_path / "tiny.pth"
    model.save_checkpoint(path)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    expected = {
        "emb.weight": (VOCAB, C),
        "head.weight": (VOCAB, C),
        "ln_out.weight": (C,),
        "ln_out.bias": (C,),
        "blocks.0.ln0.weight": (C,),
        "blocks.0.ln0.bias": (C,),
    }
    for i in range(2):
        p = f"blocks.{i}"
        expected |= {f"{p}.{ln}.{wb}": (C,) for ln in ("ln1", "ln2") for wb in ("weight", "bias")}
        expected |= {f"{p}.att.time_decay": (C,), f"{p}.att.time_first": (C,)}
        expected |= {f"{p}.att.time_mix_{m}": (1, 1, C) for m in "kvr"}
        expected |= {f"{p}.att.{n}.weight": (C, C) for n in ("key", "value", "receptance", "output")}
        expected |= {f"{p}.ffn.time_mix_{m}": (1, 1, C) for m in "kr"}
        expected |= {
            f"{p}.ffn.key.weight": (FFN, C),
            f"{p}.ffn.value.weight": (C, FFN),
            f"{p}.ffn.receptance.weight": (C, C),
        }
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert all(v.dtype == torch.float32 for v in sd.values())
    again = RWKV4.from_state_dict(sd)
    tokens = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(again(tokens), model(tokens))


def test_engine_loads_checkpoint_and_matches_one_token_mode(tmp_path) -> None:
    from rwkv_stream import loading as engine

    model = _tiny(seed=11, chunk_len=4)
    path = tmp_path / "trained.pth"
    model.save_checkpoint(path)
    loaded = engine.load(path)
    tokens = torch.randint(0, VOCAB, (1, 17), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(tokens)[0]
        expected_hidden, _ = model.forward_hidden(tokens)
    state, rows, hidden_rows = None, [], []
    for tok in tokens[0].tolist():
        hidden, _ = loaded.forward_hidden([tok], state)
        logits, state = loaded.forward([tok], state)
        rows.append(logits[0])
        hidden_rows.append(hidden[0])
    _close(torch.stack(rows), expected)
    _close(torch.stack(hidden_rows), expected_hidden[0])
    whole, _ = loaded.forward(tokens[0].tolist())
    _close(whole, expected)


# ---------------------------------------------------------------------------------------------- the task


def test_transcript_labels_and_restore() -> None:
    from rwkv_stream.train import transcript

    words, end = transcript.parse('"Well, Mr. Knightley -- is it NOT so?" said Emma; "I\u2019m sure."')
    assert [w.text for w in words] == ["well", "mr", "knightley", "is", "it", "not", "so", "said", "emma",
                                       "i'm", "sure"]
    assert [w.label for w in words] == ["O-Cap", "COMMA-Cap", "O-Cap", "COMMA-lower", "O-lower", "O-UPPER",
                                        "O-lower", "QUESTION-lower", "O-Cap", "COMMA-Cap", "O-lower"]
    assert end == "PERIOD"
    restored = transcript.restore([w.text for w in words], [w.label for w in words], "PERIOD-lower")
    assert restored == "Well, Mr Knightley, is it NOT so? said Emma, I'm sure."
    assert transcript.normalize("Twenty-one years!  Who?") == "twenty one years who"
    assert len(transcript.LABELS) == 12


CORPUS = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
    "of a wife.",
    "However little known the feelings or views of such a man may be on his first entering a neighbourhood, this "
    "truth is so well fixed in the minds of the surrounding families.",
    '"My dear Mr. Bennet," said his lady to him one day, "have you heard that Netherfield Park is let at last?"',
    "Mr. Bennet replied that he had not. Emma Woodhouse, handsome, clever, and rich, seemed to unite some of the "
    "best blessings of existence.",
]


def _write_corpus(folder) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.txt").write_text("\n".join(CORPUS * 3) + "\n")
    (folder / "train.books.txt").write_text("\n".join((["Pride", "Pride", "Pride", "Emma"]) * 3) + "\n")
    (folder / "test.txt").write_text("\n".join(CORPUS) + "\n")
    (folder / "test.books.txt").write_text("Pride\nPride\nPride\nEmma\n")


def test_transcript_document_labels_first_tokens_and_end_marker(tmp_path) -> None:
    from rwkv_stream.tokenizer import load_tokenizer
    from rwkv_stream.train import data, transcript

    path = data.train_tokenizer([transcript.normalize(t) for t in CORPUS], 300, tmp_path / "tokenizer.json")
    tok = load_tokenizer(path)
    enc = data.WordEncoder(tok)
    doc = data.transcript_document(CORPUS[2:4], enc, cat=1, end_marks=[True, False])
    text = " ".join(transcript.normalize(p) for p in CORPUS[2:4])
    assert tok.decode(doc.ids) == " " + text.replace("last mr", "last\n mr") + "\n"
    assert doc.ids == tok.encode(tok.decode(doc.ids))  # word-by-word encoding equals whole-text encoding
    pairs = zip(doc.ids, doc.tags, strict=True)
    labelled = [(tok.decode([i]), transcript.LABELS[t]) for i, t in pairs if t != data.IGNORE]
    words = text.split()
    assert len(labelled) == len(words) + 2  # every word plus two end markers
    assert labelled[0][1] == "O-Cap" and " my".startswith(labelled[0][0])
    assert ("\n", "QUESTION-lower") in labelled and labelled[-1] == ("\n", "PERIOD-lower")
    after_marker = labelled[labelled.index(("\n", "QUESTION-lower")) + 1]
    assert after_marker[1] == "O-Cap" and " mr".startswith(after_marker[0])
    assert doc.cats == [1] * len(doc.ids)


def test_prf_and_micro_f1() -> None:
    from rwkv_stream.train.evaluate import micro_f1, prf

    gold, pred = ["O", "COMMA", "PERIOD", "O"], ["O", "PERIOD", "PERIOD", "COMMA"]
    report = prf(gold, pred, ["O", "COMMA", "PERIOD"])
    assert report["PERIOD"] == {"precision": 0.5, "recall": 1.0, "f1": 0.6667, "support": 1}
    assert report["COMMA"]["f1"] == 0.0
    assert micro_f1(gold, pred, ("COMMA", "PERIOD")) == round(2 * 1 / (3 + 2), 4)


# ---------------------------------------------------------------------------------------------- the command

TINY_FLAGS = ["--n-embd", "16", "--n-layer", "2", "--vocab-size", "300", "--batch-size", "2", "--ctx", "32",
              "--warmup", "1", "--checkpoint-every", "2", "--device", "cpu"]


def _train(*argv: str) -> int:
    from rwkv_stream.cli import main

    return main(["train", *argv])


def test_train_transcript_resumes_and_writes_a_bundle(tmp_path) -> None:
    from rwkv_stream.loading import load, load_source

    corpus, out = tmp_path / "corpus", tmp_path / "run"
    _write_corpus(corpus)
    common = ["--task", "transcript", "--corpus", str(corpus), "--group", "2", "--out", str(out), *TINY_FLAGS]
    assert _train(*common, "--steps", "2") == 0
    first = (out / "tokenizer.json").read_bytes()
    assert _train(*common, "--steps", "4", "--resume", "--bundle", str(tmp_path / "bundle"),
                  "--model-version", "9.9") == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4]  # one checkpoint per run: resumed at step 2, not from scratch
    assert (out / "tokenizer.json").read_bytes() == first
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"tagger", "baseline_majority", "baseline_rule", "classifier", "lm"} <= set(metrics)
    assert metrics["classifier"]["n_streams"] == 2
    engine = load(out / "model.pth")
    b = load_source(tmp_path / "bundle")
    assert b.manifest["model_version"] == "9.9" and b.manifest["info"]["lm"] == metrics["lm"]
    assert sorted(b.heads.heads) == ["classifier", "tagger"]
    assert b.heads.model_fingerprint == b.model.fingerprint
    ids = b.tokenizer.encode(" it is a truth")
    torch.testing.assert_close(b.model.forward(ids)[0], engine.forward(ids)[0], rtol=1e-4, atol=1e-4)


def test_train_records_jsonl_heads_on_frozen_model(tmp_path) -> None:
    corpus, out = tmp_path / "corpus", tmp_path / "lm"
    _write_corpus(corpus)
    assert _train("--task", "transcript", "--corpus", str(corpus), "--out", str(out), "--steps", "1",
                  *TINY_FLAGS) == 0
    records = [{"text": t, "tags": [[0, 2, "X"]], "cats": {"pos": float(i % 2), "neg": float(1 - i % 2)}}
               for i, t in enumerate(CORPUS)]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    heads_out = tmp_path / "heads"
    assert _train("--task", "records", "--train", str(jsonl), "--eval", str(jsonl), "--init", str(out / "model.pth"),
                  "--tokenizer", str(out / "tokenizer.json"), "--freeze-model", "--out", str(heads_out),
                  "--steps", "3", *TINY_FLAGS) == 0
    before = torch.load(out / "model.pth", weights_only=True)
    after = torch.load(heads_out / "model.pth", weights_only=True)
    for key, value in before.items():  # frozen: unchanged up to the fp16 rounding of the export
        torch.testing.assert_close(after[key], value.half().float() if value.dim() == 2 else value)
    spec = json.loads((heads_out / "heads" / "heads.json").read_text())["heads"]
    assert spec["tagger"]["labels"] == ["O", "X"] and spec["classifier"]["labels"] == ["neg", "pos"]
    metrics = json.loads((heads_out / "metrics.json").read_text())
    assert "accuracy" in metrics["tagger"] and metrics["classifier"]["n_streams"] == len(CORPUS)


def test_train_names_the_heads_as_the_user_says(tmp_path) -> None:
    from rwkv_stream.loading import load_source

    corpus, out = tmp_path / "corpus", tmp_path / "run"
    _write_corpus(corpus)
    assert _train("--task", "transcript", "--corpus", str(corpus), "--group", "2", "--out", str(out), "--steps", "1",
                  "--lookahead", "1", "--tag-head", "punct", "--cats-head", "novel", "--bundle", str(tmp_path / "b"),
                  *TINY_FLAGS) == 0
    spec = json.loads((out / "heads" / "heads.json").read_text())["heads"]
    assert sorted(spec) == ["novel", "punct", "punct+1"]
    assert spec["punct"]["kind"] == "tagger" and spec["novel"]["kind"] == "classifier"
    assert sorted(load_source(tmp_path / "b").heads.heads) == ["novel", "punct"]  # lookahead heads stay in OUT


@pytest.mark.parametrize(("flags", "message"), [
    (["--tag-head", "x", "--cats-head", "x"], "--tag-head and --cats-head both name head 'x'"),
    (["--cats-head", "tagger"], "both name head 'tagger'"),
    (["--tag-head", "a+1"], "--tag-head 'a+1': a head name must be"),
    (["--cats-head", ""], "--cats-head '': a head name must be"),
])
def test_train_refuses_clashing_or_bad_head_names_before_any_work(tmp_path, flags, message) -> None:
    corpus, out = tmp_path / "corpus", tmp_path / "run"
    _write_corpus(corpus)
    with pytest.raises(SystemExit, match=re.escape(message)) as err:
        _train("--task", "transcript", "--corpus", str(corpus), "--out", str(out), "--steps", "1", *flags, *TINY_FLAGS)
    assert "\n" not in str(err.value) and not out.exists()


def test_docbin_records_are_read_through_a_lazy_import(tmp_path) -> None:
    spacy = pytest.importorskip("spacy")
    from spacy.tokens import DocBin

    from rwkv_stream.train.data import read_records

    nlp = spacy.blank("en")
    doc = nlp("Emma lives in Highbury.")
    doc.ents = [doc.char_span(0, 4, "PER"), doc.char_span(14, 22, "LOC")]
    doc.cats = {"a": 1.0, "b": 0.0}
    db = DocBin()
    db.add(doc)
    db.to_disk(tmp_path / "x.spacy")
    records = read_records(tmp_path / "x.spacy")
    assert records == [{"text": "Emma lives in Highbury.", "tags": [[0, 4, "PER"], [14, 22, "LOC"]],
                        "cats": {"a": 1.0, "b": 0.0}}]


def test_training_code_does_not_import_spacy() -> None:
    import subprocess
    import sys

    code = ("import sys, rwkv_stream.cli, rwkv_stream.train.cli, rwkv_stream.train.data, rwkv_stream.train.evaluate;"
            "rwkv_stream.cli.build_parser(); assert 'spacy' not in sys.modules, 'spacy imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
