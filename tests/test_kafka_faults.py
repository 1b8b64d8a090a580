"""Fault matrix for the Kafka stream processor, against the real broker, consumers as subprocesses (real SIGKILL).

Every scenario produces streams while faults hit, then recomputes the expected per-stream outputs from the input
topic (each stream fed alone) and checks the output topic: nothing lost, per-stream order, every output equal to
the uninterrupted computation (so states survived exactly), no duplicates in exactly-once mode (read_committed),
duplicates identical to the originals in at-least-once mode.

No test waits a fixed time for a consumer: each waits for a signal (the readiness file, an assignment or a
failure in the consumer's log), so they hold on a loaded machine too.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest

pytest.importorskip("kafka", reason="kafka-python not installed (pip install -e .[kafka])")

from kafka_broker import KafkaBroker, create_topic, unique_name  # noqa: E402  (fixtures: conftest plugin)
from kafka_harness import (  # noqa: E402
    ConsumerProc,
    Pacer,
    check_outputs,
    interleave,
    reference_outputs,
    stream_script,
    wait_for_outputs,
)

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]
MODES = ["at-least-once", "exactly-once"]
SEED = int(os.environ.get("RWKV_STREAM_TEST_SEED", "20261129"))


@pytest.fixture(scope="module")
def bundle_dir(tiny_bundle_dir) -> Path:
    return tiny_bundle_dir


class Scenario:
    """Topics, a paced producer, consumer subprocesses and the final verification of one fault test."""

    def __init__(self, bootstrap: str, bundle_dir: Path, log_dir: Path, mode: str, seed: int, *,
                 partitions: int = 3, n_streams: int = 12, n_fragments: int = 30, rate: float = 12.0) -> None:
        print(f"seed {seed} mode {mode}")
        self.bootstrap = bootstrap
        self.mode = mode
        self.rng = random.Random(seed)
        self.name = unique_name("fault")
        self.log = log_dir / f"{self.name}.log"
        create_topic(bootstrap, f"{self.name}.in", partitions=partitions)
        scripts = [stream_script(f"call-{i}", self.rng, n_fragments, end=i % 4 == 0,
                                 generate_every=6 if i % 3 == 1 else 0) for i in range(n_streams)]
        self.plan = interleave(scripts, self.rng)
        self.args = dict(bootstrap_servers=bootstrap, group_id=self.name, input_topic=f"{self.name}.in",
                         output_topic=f"{self.name}.out", dead_letter_topic=f"{self.name}.dlq",
                         state_topic=f"{self.name}.state", bundle=bundle_dir, delivery=mode, replication_factor=1,
                         session_timeout_ms=3000, heartbeat_interval_ms=500, transaction_timeout_ms=8000,
                         torch_threads=1, checkpoint_interval_ms=250, max_batch_records=64, log_level="INFO")
        self.pacer = Pacer(bootstrap, self.args["input_topic"], self.plan, rate)
        self.consumers: list[ConsumerProc] = []

    def start_producing(self) -> None:
        self.pacer.start()

    def consumer(self, instance: str = "a", faults: str = "", **overrides) -> ConsumerProc:
        log = self.log.with_name(f"{self.name}-{len(self.consumers)}-{instance}.log")
        proc = ConsumerProc({**self.args, "instance_id": instance, **overrides}, log, faults=faults)
        self.consumers.append(proc)
        return proc

    def ready(self, proc: ConsumerProc, timeout_s: float = 180.0, *, may_die: bool = False) -> None:
        """Wait for the consumer's readiness file (or, with ``may_die``, for its injected death)."""
        if may_die:
            deadline = time.monotonic() + timeout_s
            while proc.alive() and not proc.ready_path.exists():
                assert time.monotonic() < deadline, f"consumer not ready; log {proc.log_path}"
                time.sleep(0.05)
            return
        proc.wait_ready(timeout_s)

    def owns(self, procs: list[ConsumerProc], partitions: set[int], timeout_s: float = 120.0) -> None:
        """Wait until these consumers together hold these partitions (and each is ready)."""
        def probe() -> bool:
            held = set().union(*(p.owned_partitions() for p in procs))
            return held >= partitions and all(p.ready_path.exists() for p in procs)

        procs[0].wait_until(probe, f"partitions {sorted(partitions)} held by {len(procs)} consumer(s)", timeout_s)

    def finish(self, timeout_s: float = 120.0) -> dict[str, int]:
        """Wait for the producer and every output, stop the consumers gracefully, verify."""
        records = self.pacer.join()
        ref = reference_outputs(self.args["bundle"], records)
        if not any(c.alive() for c in self.consumers):
            self.ready(self.consumer("final"))
        outs = wait_for_outputs(self.bootstrap, self.args["output_topic"], set(ref.outputs), read_committed=True,
                                timeout_s=timeout_s)
        for c in self.consumers:
            if c.alive():
                assert c.terminate(60) == 0, f"graceful stop failed; log {c.log_path}"
        # Read again after the graceful stops: late duplicates must be checked too.
        outs = wait_for_outputs(self.bootstrap, self.args["output_topic"], set(ref.outputs), read_committed=True,
                                timeout_s=30)
        counts = check_outputs(ref, outs, exactly_once=self.mode == "exactly-once")
        print(f"{self.name}: {counts}")
        return counts

    def cleanup(self) -> None:
        for c in self.consumers:
            if c.alive():
                c.kill()


@pytest.fixture
def scenarios(tmp_path):
    made: list[Scenario] = []

    def make(*args, **kwargs) -> Scenario:
        s = Scenario(*args, log_dir=tmp_path, **kwargs)
        made.append(s)
        return s

    yield make
    for s in made:
        s.cleanup()


KILL_POINTS = {
    "at-least-once": ["kill@after_outputs_flush=2", "", "kill@batch_mid=3", "kill@after_state_write=2", "",
                      "kill@before_commit=2", "kill@after_commit=1"],
    "exactly-once": ["kill@after_state_write=2", "", "kill@batch_mid=3", "kill@before_commit=2", "",
                     "kill@after_commit=1"],
}


@pytest.mark.parametrize("mode", MODES)
def test_sigkill_at_random_points_then_restart(kafka_bootstrap, bundle_dir, scenarios, mode):
    """SIGKILL mid-batch, mid-checkpoint (injected at named points) and at random times, restart each time."""
    s = scenarios(kafka_bootstrap, bundle_dir, mode=mode, seed=SEED, n_fragments=30, rate=12)
    s.pacer.pause()  # input flows only while a consumer runs: each fault point has input to reach it with,
    s.start_producing()  # however slowly a loaded machine starts the consumers
    injected = 0
    for faults in KILL_POINTS[mode]:
        proc = s.consumer("a", faults=faults)
        s.ready(proc, may_die=bool(faults))
        s.pacer.resume()
        if faults:
            proc.wait(60)  # dies at the injected point (or is killed after 60 s)
            injected += "fault injection: SIGKILL" in proc.log_text()
        else:  # a random moment after it became ready (the fault's timing, not a wait for the consumer)
            time.sleep(s.rng.uniform(0.3, 2.0))
            proc.kill()
        s.pacer.pause()
    s.pacer.resume()
    assert injected >= len([f for f in KILL_POINTS[mode] if f]) - 1, "the injected kill points were not reached"
    s.finish()


@pytest.mark.parametrize("mode", MODES)
def test_consumers_join_and_leave_while_streams_flow(kafka_bootstrap, bundle_dir, scenarios, mode):
    """Two or three consumers: join, leave gracefully, get SIGKILLed, rejoin; partitions move every time."""
    s = scenarios(kafka_bootstrap, bundle_dir, mode=mode, seed=SEED + 1, partitions=4, n_fragments=30, rate=12)
    s.start_producing()
    every = {0, 1, 2, 3}
    a = s.consumer("a")
    s.ready(a)
    b = s.consumer("b")
    b.wait_until(b.owned_partitions, "an assignment for b")
    c = s.consumer("c")
    c.wait_until(c.owned_partitions, "an assignment for c")
    s.owns([a, b, c], every)
    assert b.terminate(60) == 0  # leaves gracefully: final checkpoint, partitions handed over
    s.owns([a, c], every)
    c.kill()  # dies: its partitions move after the session timeout
    s.owns([a], every)
    b = s.consumer("b")
    b.wait_until(b.owned_partitions, "an assignment for the new b")
    s.owns([a, b], every)
    assert a.terminate(60) == 0
    assert "partitions revoked" in a.log_text()
    s.finish()


@pytest.mark.parametrize("mode", MODES)
def test_broker_stop_and_restart(private_kafka_broker: KafkaBroker, bundle_dir, scenarios, mode):
    """The broker goes away for a while mid-stream and comes back on the same data dir."""
    broker = private_kafka_broker
    s = scenarios(broker.bootstrap, bundle_dir, mode=mode, seed=SEED + 2, n_fragments=20, rate=12)
    s.start_producing()
    proc = s.consumer("a")
    s.ready(proc)
    broker.stop()  # returns once the broker is down
    broker.start()  # returns once it serves again
    s.finish(timeout_s=180)
    assert proc.alive() or proc.proc.returncode == 0


@pytest.mark.parametrize("mode", MODES)
def test_injected_commit_failures(kafka_bootstrap, bundle_dir, scenarios, mode):
    """Half the offset (or transaction) commits fail; one consumer is SIGKILLed in between, so the input whose
    commit failed is replayed from older offsets."""
    s = scenarios(kafka_bootstrap, bundle_dir, mode=mode, seed=SEED + 3, n_fragments=20, rate=15)
    s.pacer.pause()  # input flows only while a consumer runs (left for the second one on a loaded machine)
    s.start_producing()
    proc = s.consumer("a", faults=f"commit_fail~0.5;seed={SEED}")
    s.ready(proc)
    s.pacer.resume()
    _wait_for_events(proc, "checkpoint failed", 2)
    s.pacer.pause()
    proc.kill()
    proc = s.consumer("a", faults=f"commit_fail~0.5;seed={SEED + 1}")
    s.ready(proc)
    s.pacer.resume()
    _wait_for_events(proc, "checkpoint failed", 1)
    s.finish()


@pytest.mark.parametrize("mode", MODES)
def test_stalled_consumer_is_fenced(kafka_bootstrap, bundle_dir, scenarios, mode):
    """A consumer frozen (SIGSTOP) past its session timeout loses its partitions to another; when it wakes up
    mid-batch it must not corrupt states or (exactly-once) publish anything."""
    s = scenarios(kafka_bootstrap, bundle_dir, mode=mode, seed=SEED + 4, partitions=2, n_fragments=25, rate=12)
    s.start_producing()
    a = s.consumer("a")
    s.ready(a)
    b = s.consumer("b")
    b.wait_until(b.owned_partitions, "an assignment for b")
    s.owns([a, b], {0, 1})
    a.signal(signal.SIGSTOP)
    s.owns([b], {0, 1})  # past a's session timeout: b takes everything
    a.signal(signal.SIGCONT)
    a.wait_until(lambda: _fenced_out(a), "a noticing that it was fenced out")
    s.finish()  # a exited 0 after SIGTERM, and every output checks out
    # After waking up, a found the group had moved on (kafka-python reports it as lost partitions, or as a
    # revocation followed by a new assignment, depending on the timing).
    assert _fenced_out(a)


def _fenced_out(proc: ConsumerProc) -> bool:
    text = proc.log_text()
    return ("partitions lost" in text or text.count('"state restored"') >= 2
            or "not a group member now" in text or "group membership changed" in text)


def _wait_for_events(proc: ConsumerProc, msg: str, n: int, timeout_s: float = 120.0) -> None:
    proc.wait_until(lambda: len(proc.events(msg)) >= n, f"{n} x {msg!r}", timeout_s)



def _retries(proc: ConsumerProc, during: str) -> list[dict]:
    return [e for e in proc.events("broker unavailable: retrying") if e.get("during") == during]


@pytest.mark.parametrize("mode", MODES)
def test_broker_down_at_startup(private_kafka_broker: KafkaBroker, bundle_dir, scenarios, mode):
    """The broker is unreachable when the processor starts: it retries with backoff, is not ready meanwhile,
    and carries on when the broker is back."""
    broker = private_kafka_broker
    s = scenarios(broker.bootstrap, bundle_dir, mode=mode, seed=SEED + 5, n_streams=6, n_fragments=8, rate=100)
    s.start_producing()
    s.pacer.join()
    broker.stop()
    proc = s.consumer("a")
    proc.wait_until(lambda: len(_retries(proc, "start-up")) >= 2, "two start-up retries")
    assert not proc.ready_path.exists()
    delays = [e["retry_in_s"] for e in _retries(proc, "start-up")]
    assert delays[1] > delays[0], f"backoff does not grow: {delays}"
    broker.start()
    s.ready(proc)
    s.finish(timeout_s=180)


@pytest.mark.parametrize("mode", MODES)
def test_broker_down_during_restore(private_kafka_broker: KafkaBroker, bundle_dir, scenarios, tmp_path, mode):
    """The broker goes away while the state topic is being read (held at the scan by a fault rule, so the
    outage hits it for sure): the restore is retried with backoff until the broker is back."""
    broker = private_kafka_broker
    s = scenarios(broker.bootstrap, bundle_dir, mode=mode, seed=SEED + 6, n_streams=6, n_fragments=8, rate=100)
    s.start_producing()
    s.pacer.join()
    first = s.consumer("a")
    s.ready(first)
    assert first.terminate(60) == 0  # leaves snapshots on the state topic to restore
    release = tmp_path / "release"
    proc = s.consumer("a", faults=f"hold@before_restore_scan={release}")
    proc.wait_until(lambda: proc.events("fault injection: holding"), "the restore to begin")
    broker.stop()
    release.touch()
    proc.wait_until(lambda: _retries(proc, "restore"), "a restore retry")
    assert not proc.ready_path.exists()
    broker.start()
    s.ready(proc)
    s.finish(timeout_s=180)
