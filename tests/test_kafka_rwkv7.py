"""The real ``rwkv-stream consume`` processor (a subprocess) on an RWKV-7 bundle, against the real broker (issue 15).

An RWKV-7 (x070) bundle with the World tokenizer, a tagger and a classifier runs the whole processor: streams of
transcript fragments cut anywhere (non-ASCII included), some ending, some asking for generations, on two input
partitions, with ``max_streams=2`` so streams are evicted to the state topic and restored from it while they
flow; then a graceful stop, more input, and a new processor that restores every open stream from the state
topic. Every output must equal the stream fed alone through the session layer (the harness's reference:
:class:`StreamEngine` over :class:`SessionTable`, one stream at a time), and the reference itself must agree
with a bare :class:`SessionTable` fed each stream alone. Waits are on signals (readiness file, outputs, a
metrics scrape), never a fixed time.
"""

from __future__ import annotations

import random
import socket
import sys
import urllib.request
from pathlib import Path

import pytest
import torch

pytest.importorskip("kafka", reason="kafka-python not installed (pip install -e .[kafka])")

from kafka_broker import create_topic, unique_name  # noqa: E402  (fixtures: conftest plugin)
from kafka_harness import (  # noqa: E402
    ConsumerProc,
    InputRecord,
    Reference,
    check_outputs,
    interleave,
    produce,
    reference_outputs,
    stream_script,
    wait_for_outputs,
)
from rwkv_stream.components.kafka.schema import decode_output, parse_input  # noqa: E402

from rwkv_stream.bundle import write_bundle  # noqa: E402
from rwkv_stream.heads import Head, HeadSet  # noqa: E402
from rwkv_stream.loading import LoadedModel, load_source  # noqa: E402
from rwkv_stream.random_checkpoint import random_tensors, rwkv7_config  # noqa: E402
from rwkv_stream.sessions import Fragment, SessionTable  # noqa: E402
from rwkv_stream.tokenizer import load_tokenizer  # noqa: E402

pytestmark = [pytest.mark.kafka, pytest.mark.usefixtures("one_torch_thread")]
SEED = 2026_1203


@pytest.fixture(scope="module")
def bundle7(tmp_path_factory) -> Path:
    tok = load_tokenizer("world")
    cfg = rwkv7_config(2, 64, tok.vocab_size, rank_w=8, rank_a=8, rank_v=4, rank_g=16)
    torch.manual_seed(11)
    heads = HeadSet({"tags": Head("tagger", ["O", "CAP", "PUNCT", "NUM"], 64),
                     "intent": Head("classifier", ["neutral", "positive", "negative"], 64)})
    return write_bundle(tmp_path_factory.mktemp("kafka7") / "bundle", random_tensors(cfg, seed=41), "world", heads,
                        name="tiny-rwkv7-kafka")


@pytest.fixture(scope="module")
def loaded7(bundle7) -> LoadedModel:
    loaded = load_source(bundle7)
    assert loaded.model.family == "rwkv7"
    return loaded


def _consume_command() -> list[str]:
    """The installed ``rwkv-stream`` script beside this interpreter (``python -m rwkv_stream`` without one)."""
    script = Path(sys.executable).with_name("rwkv-stream")
    return [str(script), "consume"] if script.exists() else [sys.executable, "-m", "rwkv_stream", "consume"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int, name: str, **labels: str) -> float:
    """A sample from the processor's /metrics endpoint (0 when absent)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    total = 0.0
    for line in text.splitlines():
        if line.startswith(want + " ") or (not labels and line.startswith(name + "{")):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _bare_session_table_agrees(loaded: LoadedModel, records: list[InputRecord], ref: Reference) -> None:
    """Each stream alone through a bare SessionTable gives the reference's token ids, texts and offsets."""
    by_stream: dict[tuple[int, str], list[tuple[int, str, bool]]] = {}
    for rec in sorted(records, key=lambda r: (r.partition, r.offset)):
        frag = parse_input(rec.key, rec.value, max_fragment_chars=16384, max_generate_tokens=256)
        by_stream.setdefault((rec.partition, frag.stream), []).append((rec.offset, frag.text, frag.end))
    for key, frags in by_stream.items():
        table = SessionTable(loaded.model, loaded.tokenizer, heads=dict(loaded.heads.heads))
        for offset, text, end in frags:
            got = table.feed([Fragment(key, text, end, offset)])[0]
            want = ref.outputs[(key[0], offset)]["tokens"]
            assert [(t.id, t.text, t.start, t.end) for t in got.tokens] == \
                [(t["id"], t["text"], t["start"], t["end"]) for t in want], (key, offset)


@pytest.mark.parametrize("delivery", ["at-least-once", "exactly-once"])
def test_consume_runs_an_rwkv7_bundle_with_evictions_and_a_restart(kafka_bootstrap, bundle7, loaded7, tmp_path,
                                                                    delivery):
    name = unique_name("rwkv7")
    create_topic(kafka_bootstrap, f"{name}.in", partitions=2)
    rng = random.Random(SEED)
    scripts = [stream_script(f"call-{i}", rng, 6, end=i % 3 == 0, generate_every=3 if i % 4 == 1 else 0)
               for i in range(7)]
    plan = interleave(scripts, rng)
    half = len(plan) // 2
    port = _free_port()
    args = dict(bootstrap_servers=kafka_bootstrap, group_id=name, input_topic=f"{name}.in",
                output_topic=f"{name}.out", dead_letter_topic=f"{name}.dlq", state_topic=f"{name}.state",
                bundle=bundle7, delivery=delivery, replication_factor=1, session_timeout_ms=6000,
                heartbeat_interval_ms=1000, transaction_timeout_ms=10000, checkpoint_interval_ms=200,
                torch_threads=1, max_streams=2, max_batch_records=4, state_chunk_bytes=200_000,
                metrics_port=port, metrics_addr="127.0.0.1", log_level="INFO")
    read_committed = True
    first = produce(kafka_bootstrap, f"{name}.in", plan[:half])
    assert len({r.partition for r in first}) == 2

    def start(run: int) -> ConsumerProc:
        log = tmp_path / f"consume-{run}.log"
        proc = ConsumerProc({**args, "readiness_file": log.with_suffix(".ready")}, log, command=_consume_command())
        proc.wait_ready(180)
        return proc

    proc = start(0)
    try:
        wait_for_outputs(kafka_bootstrap, args["output_topic"], {(r.partition, r.offset) for r in first},
                         read_committed=read_committed, timeout_s=180, alive=proc.alive)
        # Streams beyond max_streams went to the state topic and came back from it for their next fragments
        # (their outputs, checked against the reference below, continue exactly).
        assert _scrape(port, "rwkv_stream_evictions_total", reason="lru") > 0, "max_streams=2 evicted nothing"
        proc.wait_until(lambda: _scrape(port, "rwkv_stream_snapshots_total") > 0, "a state snapshot", 60)
        assert proc.terminate(60) == 0, f"graceful stop failed; log {proc.log_path}"
    finally:
        proc.kill()
    rest = produce(kafka_bootstrap, f"{name}.in", plan[half:])
    records = first + rest
    ref = reference_outputs(loaded7, records)
    proc = start(1)
    try:
        outs = wait_for_outputs(kafka_bootstrap, args["output_topic"], set(ref.outputs),
                                read_committed=read_committed, timeout_s=180, alive=proc.alive)
        # the restarted processor found the open streams in the state topic on assignment
        proc.wait_until(lambda: _scrape(port, "rwkv_stream_restored_streams_total") > 0, "restored streams", 60)
        assert proc.terminate(60) == 0, f"graceful stop failed; log {proc.log_path}"
    finally:
        proc.kill()
    counts = check_outputs(ref, outs, exactly_once=delivery == "exactly-once")
    assert counts["outputs"] == len(records)
    decoded = [decode_output(v) for _p, v in outs]
    assert {d["fingerprint"] for d in decoded} == {loaded7.model.fingerprint}
    assert any(d["generated"] for d in decoded) and any(d["tokens"] for d in decoded)
    assert any(t["tags"] for d in decoded for t in d["tokens"])
    _bare_session_table_agrees(loaded7, records, ref)
