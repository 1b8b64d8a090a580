"""A record must never be able to kill the processor: one whose processing raises (a poison record, injected
with the ``fail@text=`` fault rule) goes to the dead-letter topic, everything else is processed as usual.

Real broker, consumers as subprocesses. The first consumer is SIGKILLed at the moment the failure is noticed
(before the rollback); a restarted one must not crash-loop: it finds the poison records by itself, dead-letters
them and produces every other output, checked against the streams fed alone without the poison records."""

from __future__ import annotations

import random

import pytest

pytest.importorskip("kafka", reason="kafka-python not installed (pip install -e .[kafka])")

from kafka_broker import create_topic, unique_name  # noqa: E402  (fixtures: conftest plugin)
from kafka_harness import (  # noqa: E402
    ConsumerProc,
    Planned,
    check_outputs,
    interleave,
    produce,
    read_topic,
    reference_outputs,
    stream_script,
    wait_for_outputs,
)
from rwkv_stream.components.kafka import schema  # noqa: E402

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]
SEED = 1130
POISON = "POISON-7f3a"


def _args(bootstrap: str, name: str, bundle_dir, mode: str) -> dict:
    return dict(bootstrap_servers=bootstrap, group_id=name, input_topic=f"{name}.in", output_topic=f"{name}.out",
                dead_letter_topic=f"{name}.dlq", state_topic=f"{name}.state", bundle=bundle_dir, delivery=mode,
                instance_id="a", replication_factor=1, session_timeout_ms=6000, heartbeat_interval_ms=1000,
                transaction_timeout_ms=10000, torch_threads=1, checkpoint_interval_ms=250, max_batch_records=32,
                log_level="INFO")


def _plan(rng: random.Random) -> list[Planned]:
    scripts = [stream_script(f"call-{i}", rng, 8, end=i % 3 == 0) for i in range(8)]
    scripts[0].insert(3, Planned("call-0", schema.encode_input(f"{POISON} one ")))
    scripts[3].insert(5, Planned("call-3", schema.encode_input(f" two {POISON}")))  # a stream that ends later
    return interleave(scripts, rng)


def _dead_letters(bootstrap: str, topic: str, read_committed: bool) -> list[dict]:
    return [schema.decode_dead_letter(v) for _p, _o, _k, v in read_topic(bootstrap, topic,
                                                                         read_committed=read_committed)]


@pytest.mark.parametrize("mode", ["at-least-once", "exactly-once"])
def test_poison_record_goes_to_dead_letter_and_never_kills(kafka_bootstrap, tiny_bundle_dir, tmp_path, mode):
    print("seed", SEED, "mode", mode)
    name = unique_name("poison")
    create_topic(kafka_bootstrap, f"{name}.in", partitions=2)
    records = produce(kafka_bootstrap, f"{name}.in", _plan(random.Random(SEED)))
    poison = {(r.partition, r.offset) for r in records if POISON.encode() in (r.value or b"")}
    assert len(poison) == 2
    ref = reference_outputs(tiny_bundle_dir, [r for r in records if (r.partition, r.offset) not in poison])
    args = _args(kafka_bootstrap, name, tiny_bundle_dir, mode)

    first = ConsumerProc(args, tmp_path / "first.log", faults=f"fail@text={POISON};kill@processing_error=1")
    first.wait(180)  # dies at the injected point: the moment the failure is noticed
    assert "fault injection: SIGKILL" in first.log_text(), f"the poison record was not met; log {first.log_path}"

    second = ConsumerProc(args, tmp_path / "second.log", faults=f"fail@text={POISON}")
    second.wait_ready()
    exactly_once = mode == "exactly-once"
    wait_for_outputs(kafka_bootstrap, args["output_topic"], set(ref.outputs), read_committed=True, timeout_s=180,
                     alive=second.alive)
    second.wait_until(lambda: {(d["partition"], d["offset"]) for d in _dead_letters(
        kafka_bootstrap, args["dead_letter_topic"], read_committed=True)} >= poison, "the poison dead letters")
    assert second.alive(), f"the processor exited; log {second.log_path}"
    assert second.terminate(60) == 0
    assert len(second.events("processing failed: rolling back to isolate the failing record")) >= 2

    outs = wait_for_outputs(kafka_bootstrap, args["output_topic"], set(ref.outputs), read_committed=True,
                            timeout_s=30)
    counts = check_outputs(ref, outs, exactly_once=exactly_once)  # no output for the poison records either
    letters = _dead_letters(kafka_bootstrap, args["dead_letter_topic"], read_committed=True)
    by_record = {}
    for letter in letters:
        record = (letter["partition"], letter["offset"])
        assert record in poison and letter["reason"] == schema.PROCESSING_ERROR
        assert letter["detail"].startswith("InjectedProcessingError: ") and "\n" not in letter["detail"]
        assert record not in by_record or by_record[record] == letter, "a duplicate dead letter differs"
        by_record[record] = letter
    assert set(by_record) == poison
    originals = {(r.partition, r.offset): r for r in records}
    assert all(letter["value"] == originals[record].value for record, letter in by_record.items())
    if exactly_once:
        assert len(letters) == len(poison), f"duplicate dead letters under exactly-once: {len(letters)}"
    print(f"{name}: {counts}, dead letters {len(letters)}")
