"""Test harness (tests and bench/ only, not installed): a tiny model bundle, input scripts, reference outputs.

The reference feeds every stream alone, fragment by fragment, through a fresh :class:`StreamEngine`: that is
what the processor must reproduce however it batches, crashes, restarts or rebalances.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rwkv_stream.components.kafka.engine import StepItem, StreamEngine
from rwkv_stream.components.kafka.schema import (
    BadInput,
    GenerationRequest,
    decode_output,
    encode_input,
    encode_output,
    parse_input,
    without_timing,
)

from rwkv_stream.bundle import write_bundle
from rwkv_stream.config import ModelConfig
from rwkv_stream.heads import Head, HeadSet
from rwkv_stream.loading import LoadedModel, load_source
from rwkv_stream.random_checkpoint import random_tensors

_TEXT = (
    "the so um and yes we can of course I think that is right well you know it was really good okay "
    "let me check the order number please hold on one moment thank you very much for calling today "
    "Müller café naïve 東京 🙂 shipping refund account password email address tomorrow morning 42 1999 , . ?"
)
WORDS = tuple(_TEXT.split(" "))
TAGGER_LABELS = ["O", "CAP", "PUNCT", "NUM"]
CLASSIFIER_LABELS = ["neutral", "positive", "negative"]


def make_tiny_bundle(directory: str | Path, *, vocab_size: int = 320, n_layer: int = 2, n_embd: int = 32,
                     seed: int = 0) -> Path:
    """A random RWKV-4 model, a byte-level BPE trained on :data:`WORDS` and random heads, as a bundle."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    rng = random.Random(seed)
    tok.train_from_iterator([" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(400)], trainer)
    tok_file = directory / "tokenizer.src.json"
    tok.save(str(tok_file))
    config = ModelConfig(n_layer=n_layer, n_embd=n_embd, vocab_size=tok.get_vocab_size(), ffn_dim=4 * n_embd)
    torch.manual_seed(seed)
    heads = HeadSet({"tags": Head("tagger", TAGGER_LABELS, n_embd), "intent": Head("classifier", CLASSIFIER_LABELS,
                                                                                   n_embd)})
    write_bundle(directory, random_tensors(config, seed=seed), tok_file, heads, name="tiny-test")
    tok_file.unlink()
    return directory


# ------------------------------------------------------------------------------------------ input scripts
@dataclass
class Planned:
    """One input record to produce: key (stream id) and value bytes."""

    stream: str
    value: bytes
    key: bytes | None = None

    @property
    def key_bytes(self) -> bytes | None:
        return self.key if self.key is not None else self.stream.encode()


def stream_script(stream: str, rng: random.Random, n_fragments: int, *, end: bool = False,
                  generate_every: int = 0) -> list[Planned]:
    """Fragments of a random transcript cut at random character positions (mid-word, mid-emoji-free)."""
    text = " ".join(rng.choice(WORDS) for _ in range(n_fragments * 3))
    cuts = sorted(rng.sample(range(1, len(text)), n_fragments - 1)) if n_fragments > 1 else []
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    out = []
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        gen = None
        if generate_every and (i + 1) % generate_every == 0:
            gen = GenerationRequest(max_tokens=4, temperature=0.8, top_p=0.9)
        out.append(Planned(stream, encode_input(piece, end=end and last, generate=gen)))
    return out


def interleave(scripts: list[list[Planned]], rng: random.Random) -> list[Planned]:
    """Merge per-stream scripts at random, keeping each stream's order."""
    queues = [list(s) for s in scripts if s]
    out = []
    while queues:
        q = rng.choice(queues)
        out.append(q.pop(0))
        if not q:
            queues.remove(q)
    return out


# ------------------------------------------------------------------------------------------ reference
@dataclass
class InputRecord:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass
class Reference:
    outputs: dict[tuple[int, int], dict[str, Any]]  # (partition, offset) -> output value without timing
    dead: dict[tuple[int, int], str]  # (partition, offset) -> dead-letter reason
    streams: dict[tuple[int, str], list[int]]  # (partition, stream) -> input offsets in order


def reference_outputs(bundle: LoadedModel | str | Path, records: Iterable[InputRecord], *,
                      max_fragment_chars: int = 16384, max_generate_tokens: int = 256,
                      heads: list[str] | None = None) -> Reference:
    """What the processor must output: every stream fed alone, in input order."""
    if not isinstance(bundle, LoadedModel):
        bundle = load_source(bundle)
    engine = StreamEngine(bundle, heads, max_streams=1 << 20)
    ref = Reference({}, {}, {})
    for rec in sorted(records, key=lambda r: (r.partition, r.offset)):
        try:
            frag = parse_input(rec.key, rec.value, max_fragment_chars=max_fragment_chars,
                               max_generate_tokens=max_generate_tokens)
        except BadInput as exc:
            ref.dead[(rec.partition, rec.offset)] = exc.reason
            continue
        key = (rec.partition, frag.stream)
        result = engine.step([StepItem(key, frag.text, frag.end, rec.offset, frag.generate, frag.final)])[0]
        value = encode_output(stream=frag.stream, partition=rec.partition, offset=rec.offset, tokens=result.tokens,
                              cats=result.cats, generated=result.generated, end=frag.end, held_back=result.held_back,
                              fingerprint=engine.fingerprint, latency_ms=0.0, restored=result.restored,
                              is_final=result.final)
        ref.outputs[(rec.partition, rec.offset)] = without_timing(decode_output(value))
        ref.streams.setdefault(key, []).append(rec.offset)
    return ref


def check_outputs(ref: Reference, outputs: list[tuple[int, bytes]], *, exactly_once: bool) -> dict[str, int]:
    """Compare output records (in topic order, with their output partition) with the reference.

    Checks: no output lost; with ``exactly_once`` no duplicate; otherwise every duplicate equals the original
    (timing fields aside); every output equals the reference; per stream, first occurrences follow input
    order. Raises AssertionError with the first problems; returns counts.
    """
    report = verify_outputs(ref, outputs, exactly_once=exactly_once)
    if report["problems"]:
        problems = report["problems"]
        raise AssertionError(f"{report['problem_count']} problems:\n" + "\n".join(problems[:20]))
    return {"outputs": report["outputs"], "duplicates": report["duplicates"]}


def verify_outputs(ref: Reference, outputs: list[tuple[int, bytes]], *, exactly_once: bool) -> dict[str, Any]:
    """The verifier's counts, without raising: ``outputs`` (distinct inputs with an output), ``lost``,
    ``duplicates``, ``differing_duplicates``, ``mismatched`` (first output differs from the reference),
    ``unexpected`` (an output the reference does not produce), ``out_of_order`` (per stream, first outputs not
    in input order), and ``problems``: descriptions of the first ones (duplicates count as problems only with
    ``exactly_once``)."""
    problems: list[str] = []
    counts = dict.fromkeys(("duplicates", "differing_duplicates", "mismatched", "unexpected", "out_of_order"), 0)
    seen: dict[tuple[int, int], dict[str, Any]] = {}
    last_offset: dict[tuple[int, str], int] = {}

    def problem(kind: str, text: str) -> None:
        counts[kind] += 1
        problems.append(text)

    for _out_partition, raw in outputs:
        value = without_timing(decode_output(raw))
        pk = (value["partition"], value["offset"])
        if pk in seen:
            counts["duplicates"] += 1
            if value != seen[pk]:
                problem("differing_duplicates", f"duplicate output for input {pk} differs from the original")
            elif exactly_once:
                problems.append(f"duplicate output for input {pk}")
            continue
        seen[pk] = value
        expected = ref.outputs.get(pk)
        if expected is None:
            problem("unexpected", f"output for input {pk}, which the reference does not produce")
        elif value != expected:
            problem("mismatched", f"output for input {pk} differs from the reference: {_diff(expected, value)}")
        sk = (value["partition"], value["stream"])
        if pk[1] <= last_offset.get(sk, -1):
            problem("out_of_order", f"stream {sk}: output for offset {pk[1]} after offset {last_offset[sk]}")
        last_offset[sk] = max(pk[1], last_offset.get(sk, -1))
    missing = sorted(set(ref.outputs) - set(seen))
    if missing:
        problems.append(f"{len(missing)} outputs lost, e.g. {missing[:5]}")
    return {"outputs": len(seen), "lost": len(missing), **counts, "problem_count": len(problems),
            "problems": problems[:20]}


def _diff(expected: dict[str, Any], got: dict[str, Any]) -> str:
    keys = [k for k in expected if expected.get(k) != got.get(k)]
    return "; ".join(f"{k}: expected {expected.get(k)!r:.200} got {got.get(k)!r:.200}" for k in keys)


# ------------------------------------------------------------------------------------------ Kafka helpers
def produce(bootstrap: str, topic: str, plan: list[Planned], *, producer: Any = None, ts: bool = False,
            headers: list[tuple[str, bytes]] | None = None) -> list[InputRecord]:
    """Send planned records (keyed, default partitioner) and return them with their partitions and offsets."""
    import time

    from kafka import KafkaProducer

    own = producer is None
    producer = producer or KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    futures = []
    for p in plan:
        value = p.value
        if ts:
            import msgpack

            obj = msgpack.unpackb(value, raw=False)
            obj["ts"] = time.time() * 1000
            value = msgpack.packb(obj, use_bin_type=True)
        futures.append((p, value, producer.send(topic, key=p.key_bytes, value=value, headers=headers)))
    producer.flush(timeout=60)
    out = []
    for p, value, f in futures:
        meta = f.get(timeout=60)
        out.append(InputRecord(meta.partition, meta.offset, p.key_bytes, value))
    if own:
        producer.close(timeout=10)
    return out


def read_topic(bootstrap: str, topic: str, *, read_committed: bool = False, timeout_s: float = 30.0
               ) -> list[tuple[int, int, bytes | None, bytes | None]]:
    """Every record of a topic up to its current end: (partition, offset, key, value), per partition in order."""
    import time

    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                             isolation_level="read_committed" if read_committed else "read_uncommitted")
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        out = []
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < ends[tp] for tp in tps):
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic} did not reach its end offsets {ends}")
            for tp, records in consumer.poll(timeout_ms=200).items():
                out.extend((tp.partition, r.offset, r.key, r.value) for r in records)
        return out
    finally:
        consumer.close()


# ------------------------------------------------------------------------------------------ processes
class ConsumerProc:
    """``python -m rwkv_stream.components.kafka`` as a subprocess (so SIGKILL is real), logging to a file."""

    def __init__(self, args: dict[str, Any], log_path: str | Path, *, faults: str = "",
                 env: dict[str, str] | None = None, command: list[str] | None = None) -> None:
        import os
        import subprocess
        import sys

        self.log_path = Path(log_path)
        self.ready_path = self.log_path.with_suffix(".ready")
        if command is None:  # the processor writes this file while it is ready
            args = {**args, "readiness_file": self.ready_path}
        cmd = command or [sys.executable, "-m", "rwkv_stream.components.kafka"]
        for name, value in args.items():
            cmd += [f"--{name.replace('_', '-')}", str(value)]
        full_env = {**os.environ, **(env or {})}
        full_env.pop("RWKV_STREAM_KAFKA_FAULTS", None)
        if faults:
            full_env["RWKV_STREAM_KAFKA_FAULTS"] = faults
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in wait()/kill()
        self._log.write(f"=== start faults={faults!r}\n".encode())
        self._log.flush()
        self._start_size = self.log_path.stat().st_size
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=full_env)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(self._start_size)
            return f.read().decode("utf-8", "replace")

    def wait_for_log(self, needle: str, timeout_s: float = 60.0) -> bool:
        import time

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if needle in self.log_text():
                return True
            if not self.alive():
                return needle in self.log_text()
            time.sleep(0.05)
        return False

    def wait_until(self, probe: Any, what: str, timeout_s: float = 120.0) -> None:
        """Wait for ``probe()`` to be true (a readiness signal, never a fixed time); fail if the process exits."""
        import time

        deadline = time.monotonic() + timeout_s
        while not probe():
            if not self.alive():
                raise AssertionError(f"processor exited (rc {self.proc.returncode}) waiting for {what}; "
                                     f"log {self.log_path}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} after {timeout_s:.0f} s; log {self.log_path}")
            time.sleep(0.05)

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Until the readiness file exists: a stable group member, every assigned partition restored."""
        self.wait_until(self.ready_path.exists, "readiness file", timeout_s)

    def events(self, msg: str) -> list[dict[str, Any]]:
        """This run's JSON log lines with this message."""
        import json

        out = []
        for line in self.log_text().splitlines():
            if line.startswith("{") and f'"msg": "{msg}"' in line:
                out.append(json.loads(line))
        return out

    def owned_partitions(self) -> set[int]:
        """Input partitions this member holds now, from its assignment/revocation log lines."""
        import json

        owned: set[int] = set()
        for line in self.log_text().splitlines():
            if not line.startswith("{"):
                continue
            event = json.loads(line)
            if event.get("msg") == "partitions assigned":
                owned |= set(event["partitions"])
            elif event.get("msg") in ("partitions revoked", "partitions lost"):
                owned -= set(event["partitions"])
        return owned

    def signal(self, sig: int) -> None:
        import os

        if self.alive():
            os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        import signal as _signal

        self.signal(_signal.SIGKILL)
        self.wait(10)

    def terminate(self, timeout_s: float = 60.0) -> int | None:
        import signal as _signal

        self.signal(_signal.SIGTERM)
        return self.wait(timeout_s)

    def wait(self, timeout_s: float) -> int | None:
        import subprocess

        try:
            rc = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(timeout=10)
        self._log.close()
        return rc


class Pacer:
    """Produce planned records in a background thread at a steady rate; records what was sent where."""

    def __init__(self, bootstrap: str, topic: str, plan: list[Planned], rate_per_s: float, *, ts: bool = True,
                 producer_options: dict[str, Any] | None = None) -> None:
        import threading

        from kafka import KafkaProducer

        self.plan = plan
        self.rate = rate_per_s
        self.topic = topic
        self.ts = ts
        self.sent: list[tuple[Planned, bytes, Any]] = []
        self.producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0, retries=2147483647,
                                      max_block_ms=120000, request_timeout_ms=30000, delivery_timeout_ms=300000,
                                      **(producer_options or {}))
        self.error: BaseException | None = None
        self._go = threading.Event()  # cleared: production paused (see pause())
        self._go.set()
        self._thread = threading.Thread(target=self._run, name="pacer", daemon=True)

    def start(self) -> Pacer:
        self._thread.start()
        return self

    def _run(self) -> None:
        import time

        import msgpack

        next_at = time.monotonic()
        try:
            for p in self.plan:
                self._go.wait()
                next_at = max(next_at, time.monotonic() - 1.0)  # after a pause, no burst to catch up
                delay = next_at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                next_at += 1 / self.rate
                value = p.value
                if self.ts:
                    obj = msgpack.unpackb(value, raw=False)
                    if isinstance(obj, dict) and "v" in obj:
                        obj["ts"] = time.time() * 1000
                        value = msgpack.packb(obj, use_bin_type=True)
                self.sent.append((p, value, self.producer.send(self.topic, key=p.key_bytes, value=value)))
            self.producer.flush(timeout=300)
        except BaseException as exc:
            self.error = exc

    def done(self) -> bool:
        return not self._thread.is_alive()

    def pause(self) -> None:
        """Hold the remaining records back (e.g. while no consumer runs, so that input is left for later fault
        points however slowly the machine gets through the earlier ones)."""
        self._go.clear()

    def resume(self) -> None:
        self._go.set()

    def join(self, timeout_s: float = 300.0) -> list[InputRecord]:
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise TimeoutError("producer did not finish")
        if self.error is not None:
            raise self.error
        out = []
        for p, value, future in self.sent:
            meta = future.get(timeout=60)
            out.append(InputRecord(meta.partition, meta.offset, p.key_bytes, value))
        self.producer.close(timeout=10)
        return out


def wait_for_outputs(bootstrap: str, topic: str, expected: set[tuple[int, int]], *, read_committed: bool,
                     timeout_s: float, poll_s: float = 0.5, alive: Any = None) -> list[tuple[int, bytes]]:
    """Poll an output topic until every expected (input partition, offset) has an output. ``alive``: a probe
    of the processor; waiting fails at once when it says the processor has exited."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        if alive is not None and not alive():
            raise AssertionError("the processor exited while outputs were awaited")
        rows = read_topic(bootstrap, topic, read_committed=read_committed)
        outs = [(p, v) for p, _o, _k, v in rows]
        got = {(d["partition"], d["offset"]) for d in (decode_output(v) for _p, v in outs)}
        if expected <= got:
            return outs
        if time.monotonic() > deadline:
            missing = sorted(expected - got)
            raise TimeoutError(f"{len(missing)} of {len(expected)} outputs missing after {timeout_s:.0f} s, "
                               f"e.g. {missing[:5]}")
        time.sleep(poll_s)
