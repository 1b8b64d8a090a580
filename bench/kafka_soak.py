"""Soak test of ``rwkv-stream consume``: N minutes of random SIGKILLs and SIGSTOP freezes of processor members
while a producer streams, then the verifier's counts as JSON.

    .venv/bin/python bench/kafka_soak.py --minutes 10 --delivery at-least-once
    .venv/bin/python bench/kafka_soak.py --minutes 10 --delivery exactly-once --out soak-eos.json

A fresh broker (scripts/kafka/broker.sh, in a temporary dir; or ``--bootstrap``), the tiny test model (or
``--bundle``), ``--members`` processor subprocesses in one group. Every few seconds (random) a chaos event hits
1-3 members: SIGKILL (restarted after 0-5 s with the same instance id) or SIGSTOP for longer than the session
timeout (then SIGCONT: the member comes back as a zombie that must be fenced). Streams end and reopen under the
same key. At the end every member is woken or restarted, every output awaited, the members stopped with SIGTERM,
and the output topic (``read_committed``) compared with every stream fed alone (tests/kafka_harness.py):
``lost``, ``duplicates`` (must be 0 with exactly-once; identical ones are allowed with at-least-once),
``differing_duplicates``, ``mismatched``, ``unexpected``, ``out_of_order`` (per key), and the members that
exited on their own (``unexpected_exits``). Exit code 0 when the verifier found no problem.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the test harness (tests/kafka_harness.py) is not part of the package


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="chaos duration")
    p.add_argument("--delivery", choices=["at-least-once", "exactly-once"], default="at-least-once")
    p.add_argument("--members", type=int, default=3)
    p.add_argument("--partitions", type=int, default=6)
    p.add_argument("--streams", type=int, default=60, help="stream keys")
    p.add_argument("--rate", type=float, default=15.0, help="input records per second")
    p.add_argument("--session-timeout-ms", type=int, default=6000)
    p.add_argument("--event-every-s", type=float, nargs=2, default=(4.0, 12.0), metavar=("MIN", "MAX"),
                   help="seconds between chaos events (uniform)")
    p.add_argument("--bundle", default=None, help="model bundle (default: the tiny test model)")
    p.add_argument("--bootstrap", default=None, help="use this broker instead of starting one")
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--drain-timeout-s", type=float, default=600.0)
    p.add_argument("--work-dir", default=None, help="logs and the broker's data (default: a temporary dir)")
    p.add_argument("--out", default=None, help="write the JSON report here too")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------ the plan
def make_plan(rng: random.Random, n_records: int, n_keys: int) -> list[Any]:
    """About ``n_records`` fragments over ``n_keys`` keys; each key carries streams of 3-30 fragments one after
    the other (ended, then reopened under the same key)."""
    from kafka_harness import interleave, stream_script

    per_key = max(1, n_records // n_keys)
    scripts = []
    for k in range(n_keys):
        script: list[Any] = []
        while len(script) < per_key:
            n = min(rng.randint(3, 30), per_key - len(script))
            last = len(script) + n >= per_key
            script += stream_script(f"soak-{k}", rng, n, end=not last or rng.random() < 0.5,
                                    generate_every=7 if k % 5 == 0 else 0)
        scripts.append(script)
    return interleave(scripts, rng)


# ------------------------------------------------------------------------------------------ members
@dataclass
class Member:
    instance: str
    log_dir: Path
    args: dict[str, Any]
    proc: Any = None
    starts: int = 0
    frozen_until: float | None = None
    restart_at: float | None = None
    expected_exit: bool = False
    unexpected_exits: list[int] = field(default_factory=list)

    def start(self) -> None:
        from kafka_harness import ConsumerProc

        self.starts += 1
        self.proc = ConsumerProc({**self.args, "instance_id": self.instance},
                                 self.log_dir / f"{self.instance}-{self.starts}.log")
        self.expected_exit = False
        self.restart_at = None

    def running(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def kill(self, restart_at: float) -> None:
        self.expected_exit = True
        self.proc.kill()
        self.frozen_until = None
        self.restart_at = restart_at

    def freeze(self, until: float) -> None:
        self.proc.signal(signal.SIGSTOP)
        self.frozen_until = until

    def thaw(self) -> None:
        self.proc.signal(signal.SIGCONT)
        self.frozen_until = None

    def check_exit(self, now: float) -> None:
        """A member that exited without being killed: note it and restart it."""
        if self.proc is not None and not self.proc.alive() and not self.expected_exit:
            self.unexpected_exits.append(self.proc.proc.returncode)
            print(f"[soak] {self.instance} exited on its own (rc {self.proc.proc.returncode}): "
                  f"{self.proc.log_path}", file=sys.stderr)
            self.expected_exit = True
            self.restart_at = now


class Chaos:
    def __init__(self, members: list[Member], rng: random.Random, session_timeout_s: float,
                 every_s: tuple[float, float]) -> None:
        self.members = members
        self.rng = rng
        self.session_timeout_s = session_timeout_s
        self.every_s = every_s
        self.kills = 0
        self.freezes = 0
        self.events: list[dict[str, Any]] = []
        self.next_event = time.monotonic() + rng.uniform(*every_s)

    def tick(self, now: float) -> None:
        for m in self.members:
            m.check_exit(now)
            if m.frozen_until is not None and now >= m.frozen_until:
                m.thaw()
            if m.restart_at is not None and now >= m.restart_at:
                m.start()
        if now >= self.next_event:
            self._event(now)
            self.next_event = now + self.rng.uniform(*self.every_s)

    def _event(self, now: float) -> None:
        targets = [m for m in self.members if m.running() and m.frozen_until is None]
        if not targets:
            return
        victims = self.rng.sample(targets, self.rng.randint(1, min(3, len(targets))))
        kind = self.rng.choice(["kill", "freeze"])
        for m in victims:
            if kind == "kill":
                m.kill(now + self.rng.uniform(0.0, 5.0))
                self.kills += 1
            else:
                m.freeze(now + self.session_timeout_s + self.rng.uniform(1.0, 5.0))
                self.freezes += 1
        self.events.append({"t": round(now, 1), "kind": kind, "members": [m.instance for m in victims]})
        print(f"[soak] {kind} {[m.instance for m in victims]}", file=sys.stderr)

    def settle(self) -> None:
        """Wake every frozen member and restart every dead one."""
        for m in self.members:
            if m.frozen_until is not None:
                m.thaw()
            m.check_exit(time.monotonic())
            if not m.running():
                m.start()


# ------------------------------------------------------------------------------------------ the run
def start_broker(work_dir: Path) -> tuple[str, Path]:
    run_dir = work_dir / "broker"
    out = subprocess.run(["bash", str(REPO / "scripts/kafka/broker.sh"), "start", "--dir", str(run_dir)],
                         capture_output=True, text=True, check=True).stdout
    bootstrap = next(line.split("=", 1)[1] for line in out.splitlines() if line.startswith("BOOTSTRAP="))
    return bootstrap, run_dir


def stop_broker(run_dir: Path) -> None:
    subprocess.run(["bash", str(REPO / "scripts/kafka/broker.sh"), "stop", "--dir", str(run_dir)],
                   capture_output=True, check=False)


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    return {"cpu": cpu, "cores": os.cpu_count(), "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from kafka_broker import create_topic
    from kafka_harness import (
        Pacer,
        make_tiny_bundle,
        read_topic,
        reference_outputs,
        verify_outputs,
        wait_for_outputs,
    )

    rng = random.Random(args.seed)
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="rwkv-soak-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    bundle = args.bundle or str(make_tiny_bundle(work_dir / "bundle"))
    broker_dir = None
    bootstrap = args.bootstrap
    if bootstrap is None:
        bootstrap, broker_dir = start_broker(work_dir)
    name = f"soak-{args.delivery}-{args.seed}-{int(time.time())}"
    members: list[Member] = []
    t0 = time.monotonic()
    try:
        create_topic(bootstrap, f"{name}.in", partitions=args.partitions)
        common = dict(bootstrap_servers=bootstrap, group_id=name, input_topic=f"{name}.in",
                      output_topic=f"{name}.out", dead_letter_topic=f"{name}.dlq", state_topic=f"{name}.state",
                      bundle=bundle, delivery=args.delivery, replication_factor=1,
                      session_timeout_ms=args.session_timeout_ms, heartbeat_interval_ms=args.session_timeout_ms // 6,
                      transaction_timeout_ms=10000, torch_threads=1, checkpoint_interval_ms=500, log_level="INFO")
        members = [Member(f"m{i}", work_dir, common) for i in range(args.members)]
        for m in members:
            m.start()
        for m in members:
            m.proc.wait_ready(300)
        plan = make_plan(rng, int(args.rate * args.minutes * 60), args.streams)
        pacer = Pacer(bootstrap, common["input_topic"], plan, args.rate).start()
        chaos = Chaos(members, rng, args.session_timeout_ms / 1000, tuple(args.event_every_s))
        deadline = time.monotonic() + args.minutes * 60
        while time.monotonic() < deadline and not pacer.done():
            chaos.tick(time.monotonic())
            time.sleep(0.1)
        chaos.settle()
        records = pacer.join(600)
        chaos_s = time.monotonic() - t0
        print(f"[soak] chaos over after {chaos_s:.0f} s: {chaos.kills} kills, {chaos.freezes} freezes, "
              f"{len(records)} inputs; computing the reference", file=sys.stderr)
        ref = reference_outputs(bundle, records)
        drained = True
        try:
            wait_for_outputs(bootstrap, common["output_topic"], set(ref.outputs), read_committed=True,
                             timeout_s=args.drain_timeout_s, poll_s=2.0)
        except TimeoutError as exc:
            drained = False
            print(f"[soak] {exc}", file=sys.stderr)
        exit_codes = []
        for m in members:
            m.check_exit(time.monotonic())
            m.expected_exit = True
            exit_codes.append(m.proc.terminate(120) if m.running() else m.proc.proc.returncode)
        rows = read_topic(bootstrap, common["output_topic"], read_committed=True, timeout_s=120)
        report = verify_outputs(ref, [(p, v) for p, _o, _k, v in rows], exactly_once=args.delivery == "exactly-once")
        dead = read_topic(bootstrap, common["dead_letter_topic"], read_committed=True, timeout_s=60)
        return {
            "delivery": args.delivery, "minutes": args.minutes, "members": args.members,
            "partitions": args.partitions, "streams": args.streams, "rate_per_s": args.rate,
            "session_timeout_ms": args.session_timeout_ms, "seed": args.seed,
            "inputs": len(records), "kills": chaos.kills, "freezes": chaos.freezes, "events": len(chaos.events),
            "member_starts": sum(m.starts for m in members),
            "unexpected_exits": sum(len(m.unexpected_exits) for m in members),
            "exit_codes_at_sigterm": exit_codes, "drained": drained, "dead_letters": len(dead),
            **{k: v for k, v in report.items() if k != "problems"}, "problems": report["problems"][:5],
            "wall_s": round(time.monotonic() - t0, 1), "machine": machine(), "work_dir": str(work_dir),
        }
    finally:
        for m in members:
            if m.proc is not None and m.proc.alive():
                m.proc.signal(signal.SIGCONT)
                m.proc.kill()
        if broker_dir is not None:
            stop_broker(broker_dir)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    ok = (report["drained"] and report["problem_count"] == 0 and report["unexpected_exits"] == 0
          and all(rc == 0 for rc in report["exit_codes_at_sigterm"]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
