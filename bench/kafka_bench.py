"""End-to-end benchmark of ``rwkv-stream consume`` with a real broker on this machine.

100 live streams (default) send transcript fragments at a steady rate; a downstream reader measures the time from
``producer.send`` to the output being readable (``read_committed``). Then the consumer is SIGKILLed and restarted
at once, and the recovery time is measured.

    .venv/bin/python bench/kafka_bench.py                       # shipped model, a fresh broker, 100 streams
    .venv/bin/python bench/kafka_bench.py --bundle DIR --delivery exactly-once --out result.json

Reports JSON: throughput (fragments/s, tokens/s), produce->output latency p50/p90/p99/max, and recovery after
SIGKILL (to the first new output, and until outputs are back under 100 ms).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the test harness (tests/kafka_harness.py) is not part of the package


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--echo-worker"]:
        return echo_worker(argv[1:])
    args = parse_args(argv)
    from kafka_harness import WORDS

    print(f"seed {args.seed}", file=sys.stderr)
    if args.synthetic:
        from kafka_harness import make_tiny_bundle

        layers, embd = (int(x) for x in args.synthetic.lower().split("x"))
        args.bundle = str(make_tiny_bundle(Path(tempfile.mkdtemp(prefix="rwkv-bench-bundle-")) / "bundle",
                                           n_layer=layers, n_embd=embd, vocab_size=2048))
    with Broker(args.bootstrap) as bootstrap:
        bench = Bench(args, bootstrap, WORDS)
        result = bench.run()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", default="shipped", help="bundle dir or 'shipped' (rwkv_stream/data/transcript-tagger)")
    p.add_argument("--synthetic", default=None, metavar="LAYERSxEMBD",
                   help="instead of --bundle: a random model of this shape (e.g. 4x192) with a small BPE and heads")
    p.add_argument("--bootstrap", default=None, help="use this broker instead of starting one")
    p.add_argument("--streams", type=int, default=100)
    p.add_argument("--rate-per-stream", type=float, default=2.0, help="fragments per second per stream")
    p.add_argument("--words-per-fragment", type=int, default=4)
    p.add_argument("--warmup", type=float, default=20.0,
                   help="seconds of traffic before measuring (a fresh broker JVM compiles for the first ~20 s)")
    p.add_argument("--duration", type=float, default=30.0, help="measured seconds before the kill")
    p.add_argument("--after-kill", type=float, default=20.0, help="seconds of streaming after the SIGKILL")
    p.add_argument("--no-kill", action="store_true")
    p.add_argument("--partitions", type=int, default=6)
    p.add_argument("--delivery", default="at-least-once", choices=["at-least-once", "exactly-once"])
    p.add_argument("--checkpoint-interval-ms", type=int, default=0, help="0: the consumer's default")
    p.add_argument("--static-membership", action="store_true", help="restart rejoins without a rebalance")
    p.add_argument("--echo", action="store_true",
                   help="baseline: a trivial poll->produce consumer instead of the processor (the Kafka floor)")
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("--log-dir", default=None)
    return p.parse_args(argv)


class Broker:
    """A fresh broker from scripts/kafka/broker.sh (stopped at exit), or the one given."""

    def __init__(self, bootstrap: str | None) -> None:
        self.bootstrap = bootstrap
        self.dir: Path | None = None

    def __enter__(self) -> str:
        if self.bootstrap:
            return self.bootstrap
        self.dir = Path(tempfile.mkdtemp(prefix="rwkv-kafka-bench-"))
        out = subprocess.run(["bash", str(REPO / "scripts/kafka/broker.sh"), "start", "--dir", str(self.dir)],
                             check=True, capture_output=True, text=True).stdout
        self.bootstrap = re.search(r"^BOOTSTRAP=(\S+)$", out, re.M).group(1)
        return self.bootstrap

    def __exit__(self, *exc: object) -> None:
        if self.dir is not None:
            subprocess.run(["bash", str(REPO / "scripts/kafka/broker.sh"), "stop", "--dir", str(self.dir)],
                           check=False, capture_output=True)


class Bench:
    def __init__(self, args: argparse.Namespace, bootstrap: str, words: tuple[str, ...]) -> None:
        self.args = args
        self.bootstrap = bootstrap
        self.words = words
        self.rng = random.Random(args.seed)
        self.name = f"bench-{int(time.time())}"
        self.sent: dict[tuple[int, int], float] = {}  # (partition, offset) -> send time
        # (receive time, latency s, tokens, processor's own latency s: polled -> output sent)
        self.received: list[tuple[float, float, int, float | None]] = []
        self.seen: set[tuple[int, int]] = set()
        self.early: dict[tuple[int, int], tuple[float, dict, int]] = {}  # outputs read before their input's ack
        self.lock = threading.Lock()
        self.log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="rwkv-kafka-bench-logs-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_port = _free_port()
        self.consumer_metrics: dict = {}
        self.gc_pauses: list[tuple[float, float]] = []  # (end time, seconds) of this process's collections
        self._gc_started = 0.0
        self.host = HostCpu()

    def _on_gc(self, phase: str, info: dict) -> None:
        """The load generator's own GC pauses stall its reader too: recorded, to tell them from the processor's."""
        now = time.perf_counter()
        if phase == "start":
            self._gc_started = now
        else:
            self.gc_pauses.append((time.time(), now - self._gc_started))

    # ---------------------------------------------------------------------------------------------- run
    def run(self) -> dict:
        gc.callbacks.append(self._on_gc)
        self.host.start()
        self._create_topic()
        consumer = self._start_consumer()
        assert consumer.wait_for_log('"state restored"', 120), f"consumer did not start: {self.log_dir}"
        traffic = Traffic(self)
        t0 = traffic.start()
        measure_from = t0 + self.args.warmup
        measure_to = measure_from + self.args.duration
        time.sleep(max(0.0, measure_to - time.time()))
        recovery = {}
        if not self.args.no_kill:
            recovery = self._kill_and_restart(consumer)
            consumer = recovery.pop("consumer")
        traffic.stop_producing()
        time.sleep(3.0)
        self.consumer_metrics = _scrape(self.metrics_port)
        consumer.terminate(60)
        traffic.close()
        self.host.stop()
        return self._report(measure_from, measure_to, recovery)

    def _start_consumer(self):
        from kafka_harness import ConsumerProc

        if self.args.echo:
            command = [sys.executable, __file__, "--echo-worker"]
            args = {"bootstrap": self.bootstrap, "input": f"{self.name}.in", "output": f"{self.name}.out",
                    "group": self.name}
            return ConsumerProc(args, self.log_dir / "consumer.log", command=command)
        return ConsumerProc(self._consumer_args(), self.log_dir / "consumer.log")

    def _consumer_args(self) -> dict:
        a = self.args
        return dict(bootstrap_servers=self.bootstrap, group_id=self.name, input_topic=f"{self.name}.in",
                    output_topic=f"{self.name}.out", dead_letter_topic=f"{self.name}.dlq",
                    state_topic=f"{self.name}.state", bundle=a.bundle, delivery=a.delivery, instance_id="bench",
                    replication_factor=1, torch_threads=a.torch_threads, dtype=a.dtype,
                    checkpoint_interval_ms=a.checkpoint_interval_ms, session_timeout_ms=6000,
                    heartbeat_interval_ms=1000, poll_timeout_ms=20, log_level="INFO",
                    metrics_port=self.metrics_port, metrics_addr="127.0.0.1",
                    static_membership=str(a.static_membership).lower())

    def _create_topic(self) -> None:
        from kafka import KafkaAdminClient

        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap)
        admin.create_topics({f"{self.name}.in": {"num_partitions": self.args.partitions, "replication_factor": 1}})
        admin.wait_for_topics([f"{self.name}.in"], timeout_ms=30000)
        admin.close()

    # ---------------------------------------------------------------------------------------------- traffic
    def on_sent(self, partition: int, offset: int, sent_at: float) -> None:
        """An input record was acknowledged; an output already read for it is counted now."""
        with self.lock:
            self.sent[(partition, offset)] = sent_at
            early = self.early.pop((partition, offset), None)
        if early is not None:
            self._count(sent_at, *early)

    def on_output(self, now: float, value: bytes, create_ms: int) -> None:
        """An output read at ``now``; its latency counts once, from the send of the input it answers."""
        from rwkv_stream.components.kafka.schema import decode_output

        out = decode_output(value)
        key = (out["partition"], out["offset"])
        with self.lock:
            if key in self.seen:  # an at-least-once duplicate after the kill
                return
            self.seen.add(key)
            sent = self.sent.get(key)
            if sent is None:  # read before the producer saw the acknowledgement
                self.early[key] = (now, out, create_ms)
                return
        self._count(sent, now, out, create_ms)

    def _count(self, sent: float, now: float, out: dict, create_ms: int) -> None:
        inner = out.get("latency_ms")
        # create_ms, the output's CreateTime: when the processor handed it to its producer (ms)
        self.received.append((now, now - sent, len(out["tokens"]), inner and inner / 1000, now - create_ms / 1000))

    def fragments(self) -> Iterator[tuple[str, str]]:
        """(stream, text) at each stream's next due time: ``rate_per_stream`` each, jittered +-20%."""
        interval = 1.0 / self.args.rate_per_stream
        next_at = {f"call-{i:03d}": time.time() + self.rng.uniform(0, interval) for i in range(self.args.streams)}
        while True:
            stream, due = min(next_at.items(), key=lambda kv: kv[1])
            delay = due - time.time()
            if delay > 0:
                time.sleep(min(delay, 0.05))
                continue
            yield stream, " " + " ".join(self.rng.choice(self.words) for _ in range(self.args.words_per_fragment))
            next_at[stream] = due + interval * self.rng.uniform(0.8, 1.2)

    # ---------------------------------------------------------------------------------------------- faults
    def _kill_and_restart(self, consumer) -> dict:
        killed_at = time.time()
        consumer.kill()
        restarted = self._start_consumer()
        time.sleep(self.args.after_kill)
        with self.lock:  # outputs of the new process: created after the kill (outputs in flight then do not count)
            after = [(t, lat) for t, lat, _, _, out_hop in self.received if t - out_hop > killed_at]
        first = min((t for t, _ in after), default=None)
        caught_up = next((t for t, lat in sorted(after) if lat < 0.1), None)
        return {
            "consumer": restarted,
            "first_output_after_kill_s": None if first is None else round(first - killed_at, 3),
            "caught_up_after_kill_s": None if caught_up is None else round(caught_up - killed_at, 3),
        }

    # ---------------------------------------------------------------------------------------------- report
    def _report(self, t0: float, t1: float, recovery: dict) -> dict:
        window = [(lat, tok, inner, out, t) for t, lat, tok, inner, out in self.received if t0 <= t < t1]
        lat = sorted(x[0] for x in window)
        inner = sorted(x[2] for x in window if x[2] is not None)
        out_path = sorted(x[3] for x in window)
        in_path = sorted(x[0] - x[3] - x[2] for x in window if x[2] is not None)

        def pct(q: float, values: list[float] = lat) -> float | None:
            return round(1000 * values[min(len(values) - 1, int(q * len(values)))], 2) if values else None

        seconds = t1 - t0
        return {
            "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "python": platform.python_version()},
            "bundle": "none (echo baseline)" if self.args.echo else (
                self.args.synthetic and f"random {self.args.synthetic}" or self.args.bundle),
            "delivery": self.args.delivery,
            "streams": self.args.streams,
            "offered_fragments_per_s": self.args.streams * self.args.rate_per_stream,
            "partitions": self.args.partitions,
            "checkpoint_interval_ms": self.args.checkpoint_interval_ms or "default",
            "static_membership": self.args.static_membership,
            "measured_s": seconds,
            "measured_from_unix": round(t0, 3),
            "host_cpu": self.host.summary(t0, t1),
            "fragments": len(window),
            "fragments_per_s": round(len(window) / seconds, 1),
            "tokens_per_s": round(sum(x[1] for x in window) / seconds, 1),
            "latency_ms": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "max": pct(1.0),
                           "mean": round(1000 * statistics.fmean(lat), 2) if lat else None},
            # inside the processor, from polled to the output handed to the producer
            "processor_latency_ms": {"p50": pct(0.5, inner), "p90": pct(0.9, inner), "p99": pct(0.99, inner)},
            # the two Kafka hops around it (ms clock resolution of the output's CreateTime): producer.send ->
            # polled by the processor (includes waiting while it is busy), output handed over -> read
            "input_hop_ms": {"p50": pct(0.5, in_path), "p90": pct(0.9, in_path), "p99": pct(0.99, in_path)},
            "output_hop_ms": {"p50": pct(0.5, out_path), "p90": pct(0.9, out_path), "p99": pct(0.99, out_path)},
            "slowest_1pct": _slowest(window, t0),
            "load_generator_gc_ms": _gc_summary([p for t, p in self.gc_pauses if t0 <= t < t1]),
            "recovery": recovery,
            "consumer_after_restart": self.consumer_metrics,
            "logs": str(self.log_dir),
        }


class Traffic:
    """The load generator: a producer and an output reader in this process (kafka-python, two threads).

    kafka-python's own metrics are off in both: they cost CPU on every request and record, on the 2 cores the
    processor and the broker share (the processor turns them off too)."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._read_outputs, daemon=True),
                        threading.Thread(target=self._produce, daemon=True)]

    def start(self) -> float:
        for thread in self.threads:
            thread.start()
        return time.time()

    def stop_producing(self) -> None:
        self.stop.set()
        self.threads[1].join(30)

    def close(self) -> None:
        self.threads[0].join(10)

    def _produce(self) -> None:
        from kafka import KafkaProducer
        from rwkv_stream.components.kafka.schema import encode_input

        b = self.bench
        producer = KafkaProducer(bootstrap_servers=b.bootstrap, acks="all", linger_ms=0, metrics_enabled=False)
        for stream, text in b.fragments():
            if self.stop.is_set():
                break
            sent_at = time.time()
            future = producer.send(f"{b.name}.in", key=stream.encode(), value=encode_input(text, ts_ms=sent_at * 1000))
            future.add_callback(lambda meta, sent_at=sent_at: b.on_sent(meta.partition, meta.offset, sent_at))
        producer.flush(30)
        producer.close(10)

    def _read_outputs(self) -> None:
        from kafka import KafkaConsumer, TopicPartition

        topic = f"{self.bench.name}.out"
        consumer = KafkaConsumer(bootstrap_servers=self.bench.bootstrap, group_id=None, enable_auto_commit=False,
                                 isolation_level="read_committed", fetch_max_wait_ms=10, metrics_enabled=False)
        while not consumer.partitions_for_topic(topic):
            time.sleep(0.05)
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        idle_since = None
        while True:
            batch = consumer.poll(timeout_ms=20)
            now = time.time()
            for records in batch.values():
                for rec in records:
                    self.bench.on_output(now, rec.value, rec.timestamp)
            if self.stop.is_set():
                idle_since = idle_since or now
                if batch:
                    idle_since = now
                if now - idle_since > 5.0:
                    break
        consumer.close()


class HostCpu:
    """All cores' use while the bench runs (/proc/stat every 0.5 s): how busy they were and how much time the
    hypervisor gave to others (steal), to tell a noisy run from a slow processor."""

    def __init__(self, every_s: float = 0.5) -> None:
        self.every_s = every_s
        self.samples: list[tuple[float, float, float]] = []  # (time, busy share, steal share) of the interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def summary(self, t0: float, t1: float) -> dict:
        window = [(busy, steal) for t, busy, steal in self.samples if t0 <= t < t1]
        if not window:
            return {}
        return {"busy_pct_mean": round(100 * statistics.fmean(b for b, _ in window), 1),
                "busy_pct_max": round(100 * max(b for b, _ in window), 1),
                "steal_pct_mean": round(100 * statistics.fmean(s for _, s in window), 2),
                "steal_pct_max": round(100 * max(s for _, s in window), 1)}

    def _sample(self) -> None:
        last = _cpu_times()
        while last is not None and not self._stop.wait(self.every_s):
            now = _cpu_times()
            total = sum(now) - sum(last)
            if total > 0:
                idle = (now[3] - last[3]) + (now[4] - last[4])  # idle + iowait
                steal = now[7] - last[7] if len(now) > 7 else 0
                self.samples.append((time.time(), (total - idle - steal) / total, steal / total))
            last = now


def _cpu_times() -> list[int] | None:
    try:
        return [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return None


def _gc_summary(pauses: list[float]) -> dict:
    return {"collections": len(pauses), "max": round(1000 * max(pauses, default=0.0), 2),
            "total": round(1000 * sum(pauses), 1)}


def _slowest(window: list[tuple], t0: float) -> dict:
    """Where the slowest 1% of fragments spent their time, and when they arrived (do they come in bursts?)."""
    slow = sorted(window, key=lambda x: -x[0])[: max(1, len(window) // 100)] if window else []
    timed = [x for x in slow if x[2] is not None]

    def mean_ms(values: list[float]) -> float | None:
        return round(1000 * statistics.fmean(values), 1) if values else None

    return {
        "n": len(slow),
        "mean_ms": {"end_to_end": mean_ms([x[0] for x in slow]),
                    "input_hop": mean_ms([x[0] - x[3] - x[2] for x in timed]),
                    "processor": mean_ms([x[2] for x in timed]), "output_hop": mean_ms([x[3] for x in slow])},
        "read_at_s": sorted(round(x[4] - t0, 2) for x in slow),
    }


def echo_worker(argv: list[str]) -> int:
    """The --echo baseline consumer: the processor's Kafka hops (poll, produce an output) without a model."""
    import msgpack
    from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

    p = argparse.ArgumentParser()
    for name in ("--bootstrap", "--input", "--output", "--group"):
        p.add_argument(name)
    a = p.parse_args(argv)
    admin = KafkaAdminClient(bootstrap_servers=a.bootstrap)
    n = len(admin.describe_topics([a.input])[0]["partitions"])
    with contextlib.suppress(Exception):  # exists after a restart
        admin.create_topics({a.output: {"num_partitions": n, "replication_factor": 1}})
    consumer = KafkaConsumer(a.input, bootstrap_servers=a.bootstrap, group_id=a.group, enable_auto_commit=True,
                             auto_offset_reset="earliest")
    while not consumer.partitions_for_topic(a.input):
        time.sleep(0.05)
    producer = KafkaProducer(bootstrap_servers=a.bootstrap, linger_ms=2, acks="all")
    print('"state restored"', flush=True)
    while True:
        for tp, records in consumer.poll(timeout_ms=20).items():
            for r in records:
                value = msgpack.packb({"v": 1, "partition": tp.partition, "offset": r.offset, "tokens": []})
                producer.send(a.output, key=r.key, value=value, partition=tp.partition)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _scrape(port: int) -> dict:
    """Checkpoint and in-consumer latency figures from the consumer's Prometheus endpoint."""
    import urllib.request

    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError as exc:
        return {"error": repr(exc)}
    values: dict[str, float] = {}
    buckets: dict[str, list[tuple[float, float]]] = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, value = line.rsplit(" ", 1)
        if "_bucket{" in name:
            base = name.split("_bucket{")[0]
            le = name.split('le="')[1].split('"')[0]
            buckets.setdefault(base, []).append((float("inf") if le == "+Inf" else float(le), float(value)))
        else:
            values[name] = float(value)

    def quantile(base: str, q: float) -> float | None:
        rows = sorted(buckets.get(base, []))
        total = rows[-1][1] if rows else 0
        return next((round(le * 1000, 1) for le, n in rows if n >= q * total), None) if total else None

    ckpt_n = values.get("rwkv_stream_checkpoint_seconds_count", 0)
    return {
        "processing_latency_ms_p50_le": quantile("rwkv_stream_processing_latency_seconds", 0.5),
        "processing_latency_ms_p99_le": quantile("rwkv_stream_processing_latency_seconds", 0.99),
        "checkpoints": ckpt_n,
        "checkpoint_mean_ms": round(1000 * values.get("rwkv_stream_checkpoint_seconds_sum", 0) / ckpt_n, 1)
        if ckpt_n else None,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
