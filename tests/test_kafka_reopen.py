"""The same key ended and reopened within one poll, several times and for several keys, against the real broker
(the crash loop of issue 14 came from this): every output equals the streams fed alone, nothing is lost, in both
delivery modes, with a SIGKILL and a restart in the middle (the replay meets ended and reopened streams again).

Everything is produced before a consumer starts, so a key's ends and reopenings arrive in one poll (and, with
the default ``max_batch_records``, in one batch)."""

from __future__ import annotations

import random

import msgpack
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
SEED = 1131


def _reopening_key(key: str, rng: random.Random, cycles: int, *, last_open: bool) -> list[Planned]:
    """``cycles`` streams one after the other under one key, each of 1-3 fragments cut mid-word, each ended
    (the last one left open with ``last_open``); some by ``end`` on their last fragment, some by a bare
    ``action: end`` record after it."""
    plan: list[Planned] = []
    for c in range(cycles):
        still_open = last_open and c == cycles - 1
        bare_end = not still_open and rng.random() < 0.3
        plan += stream_script(key, rng, rng.randint(1, 3), end=not (still_open or bare_end))
        if bare_end:
            plan.append(Planned(key, schema.encode_input("", action="end")))
    return plan


def _half(rng: random.Random, keys: int, *, last_open: bool) -> list[Planned]:
    scripts = [_reopening_key(f"key-{i}", rng, rng.randint(3, 5), last_open=last_open and i % 2 == 0)
               for i in range(keys)]
    return interleave(scripts, rng)


@pytest.mark.parametrize("mode", ["at-least-once", "exactly-once"])
def test_end_and_reopen_within_one_poll_with_a_restart(kafka_bootstrap, tiny_bundle_dir, tmp_path, mode):
    print("seed", SEED, "mode", mode)
    rng = random.Random(SEED)
    name = unique_name("reopen")
    create_topic(kafka_bootstrap, f"{name}.in", partitions=2)
    args = dict(bootstrap_servers=kafka_bootstrap, group_id=name, input_topic=f"{name}.in",
                output_topic=f"{name}.out", dead_letter_topic=f"{name}.dlq", state_topic=f"{name}.state",
                bundle=tiny_bundle_dir, delivery=mode, instance_id="a", replication_factor=1, session_timeout_ms=6000,
                heartbeat_interval_ms=1000, transaction_timeout_ms=10000, torch_threads=1,
                checkpoint_interval_ms=250, log_level="INFO")
    # Half 1 leaves half of the keys open, so the restart restores open streams as well as ended ones.
    first = produce(kafka_bootstrap, args["input_topic"], _half(rng, 6, last_open=True))
    assert _reopenings(first) >= 12
    # Killed at its first offset commit: outputs (and, at-least-once, states with ended markers) are written,
    # the offsets are not, so the restarted member replays everything through ended and reopened streams.
    a = ConsumerProc(args, tmp_path / "a.log", faults="kill@before_commit=1")
    a.wait(180)
    assert "fault injection: SIGKILL" in a.log_text(), f"the kill point was not reached; log {a.log_path}"
    visible = len(read_topic(kafka_bootstrap, args["output_topic"], read_committed=True))
    # at-least-once: the outputs were flushed (the restart must skip them); exactly-once: its transaction aborts
    assert visible > 0 if mode == "at-least-once" else visible == 0

    second = produce(kafka_bootstrap, args["input_topic"], _half(rng, 6, last_open=False))
    ref = reference_outputs(tiny_bundle_dir, first + second)
    b = ConsumerProc(args, tmp_path / "b.log")
    b.wait_ready()
    wait_for_outputs(kafka_bootstrap, args["output_topic"], set(ref.outputs), read_committed=True, timeout_s=180,
                     alive=b.alive)
    assert b.terminate(60) == 0
    outs = wait_for_outputs(kafka_bootstrap, args["output_topic"], set(ref.outputs), read_committed=True,
                            timeout_s=30)
    counts = check_outputs(ref, outs, exactly_once=mode == "exactly-once")
    assert counts["outputs"] == len(first) + len(second)
    assert not ref.dead
    print(f"{name}: {counts}")


def _reopenings(records) -> int:
    """How many times a key's stream ended and the key came back (per input partition)."""
    ended: set[tuple[int, bytes]] = set()
    n = 0
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        key = (r.partition, r.key)
        n += key in ended
        ended.discard(key)
        value = msgpack.unpackb(r.value, raw=False)
        if value.get("end") or value.get("action") == "end":
            ended.add(key)
    return n
