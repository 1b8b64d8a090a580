"""A real single-node Kafka broker for tests, and kafka-python helpers around it.

The broker is Apache Kafka 4.x in KRaft mode (broker and controller in one JVM) on 127.0.0.1, run by
``scripts/kafka/broker.sh`` from the Maven Central jars (``scripts/kafka/pom.xml``). Nothing is mocked.

Fixtures (make them visible with ``pytest_plugins = ["kafka_broker"]`` in ``tests/conftest.py`` or in a
test module; importing the fixture functions into several modules instead would start one broker each):

* ``kafka_broker`` (session): the broker named by ``RWKV_STREAM_KAFKA_BOOTSTRAP`` when that is set (a broker
  started by the test script), otherwise one started here and stopped at the end of the session. Shared by
  all tests: use unique topic and group names (:func:`unique_name`).
* ``kafka_bootstrap`` (session): its ``host:port`` string.
* ``private_kafka_broker`` (function): a broker of its own, for fault tests that stop, restart or kill it.

Only a missing ``java`` skips; any other failure to start is an error, with the broker log tail in it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BROKER_SH = REPO_ROOT / "scripts" / "kafka" / "broker.sh"
ENV_BOOTSTRAP = "RWKV_STREAM_KAFKA_BOOTSTRAP"
ENV_DIR = "RWKV_STREAM_KAFKA_DIR"


def kafka_home() -> Path:
    return Path(os.environ.get("RWKV_STREAM_KAFKA_HOME", REPO_ROOT / ".kafka"))


class KafkaBrokerError(RuntimeError):
    """The broker could not be started or stopped; the message carries broker.sh's output and log tail."""


def _read_env(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep:
            env[key.strip()] = value.strip()
    return env


def _find_run_dir(bootstrap: str) -> Path | None:
    """The run dir (under .kafka) of a running broker.sh broker with this bootstrap address, if any."""
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR])
    for env_file in sorted(kafka_home().glob("run-*/broker.env")):
        try:
            if _read_env(env_file).get("BOOTSTRAP") == bootstrap:
                return env_file.parent
        except OSError:
            continue
    return None


def port_open(address: str, timeout: float = 0.5) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except OSError:
        return False


class KafkaBroker:
    """One broker.sh broker, identified by its run dir (data, logs, server.properties with its ports).

    ``stop()`` then ``start()`` (or ``restart()``) brings it back on the same data dir and the same ports,
    so clients keep their bootstrap address. ``owned`` is False for a broker someone else started
    (``RWKV_STREAM_KAFKA_BOOTSTRAP``): :meth:`close` leaves it running.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike | None = None,
        *,
        bootstrap: str | None = None,
        owned: bool = True,
        start_timeout: float = 120.0,
        stop_timeout: float = 30.0,
    ):
        if run_dir is None and bootstrap is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            run_dir = kafka_home() / f"run-pytest-{stamp}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.run_dir = Path(run_dir).resolve() if run_dir is not None else None
        self._bootstrap = bootstrap
        self.owned = owned
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout

    @classmethod
    def external(cls, bootstrap: str) -> KafkaBroker:
        """A broker started elsewhere. restart/stop work only when its run dir can be found
        (``RWKV_STREAM_KAFKA_DIR``, or a ``.kafka/run-*/broker.env`` with this bootstrap)."""
        return cls(_find_run_dir(bootstrap), bootstrap=bootstrap, owned=False)

    # -- state -----------------------------------------------------------------------------------

    @property
    def bootstrap(self) -> str:
        if self._bootstrap is None:
            raise KafkaBrokerError("broker not started yet")
        return self._bootstrap

    @property
    def log_path(self) -> Path | None:
        return self.run_dir / "logs" / "server.log" if self.run_dir else None

    @property
    def pid(self) -> int | None:
        if self.run_dir is None or not (self.run_dir / "broker.env").exists():
            return None
        pid = _read_env(self.run_dir / "broker.env").get("PID")
        return int(pid) if pid else None

    def is_running(self) -> bool:
        if self.run_dir is None:
            return self._bootstrap is not None and port_open(self._bootstrap)
        return self._sh("status", "--dir", str(self.run_dir), check=False).returncode == 0

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    # -- control ---------------------------------------------------------------------------------

    def _sh(self, *args: str, check: bool = True, timeout: float | None = None) -> subprocess.CompletedProcess:
        env = dict(os.environ)
        env.setdefault("KAFKA_START_TIMEOUT", str(int(self.start_timeout)))
        env.setdefault("KAFKA_STOP_TIMEOUT", str(int(self.stop_timeout)))
        proc = subprocess.run(
            ["bash", str(BROKER_SH), *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout or self.start_timeout + 120,
        )
        if check and proc.returncode != 0:
            raise KafkaBrokerError(
                f"broker.sh {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}"
            )
        return proc

    def _need_dir(self, what: str) -> Path:
        if self.run_dir is None:
            raise KafkaBrokerError(
                f"cannot {what} the broker at {self._bootstrap}: its run dir is unknown (set {ENV_DIR})"
            )
        return self.run_dir

    def start(self) -> str:
        """Start (or find already running) the broker; returns the bootstrap address."""
        if self.run_dir is None:
            if not port_open(self.bootstrap):
                raise KafkaBrokerError(f"no broker listening on {self.bootstrap} ({ENV_BOOTSTRAP})")
            return self.bootstrap
        proc = self._sh("start", "--dir", str(self.run_dir))
        match = re.search(r"^BOOTSTRAP=(\S+)$", proc.stdout, re.M)
        if not match:
            raise KafkaBrokerError(f"broker.sh start printed no BOOTSTRAP line:\n{proc.stdout}{proc.stderr}")
        self._bootstrap = match.group(1)
        return self._bootstrap

    def stop(self) -> None:
        """Graceful stop (SIGTERM, SIGKILL after stop_timeout). The data dir and ports are kept."""
        self._sh("stop", "--dir", str(self._need_dir("stop")), timeout=self.stop_timeout + 30)

    def restart(self) -> str:
        """stop() then start() on the same data dir and ports; returns the (unchanged) bootstrap."""
        self._need_dir("restart")
        self.stop()
        return self.start()

    def kill(self) -> None:
        """SIGKILL the broker JVM (a crash, no controlled shutdown); start() brings it back."""
        pid = self.pid
        if pid is None:
            raise KafkaBrokerError("broker not running (no broker.env)")
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        raise KafkaBrokerError(f"pid {pid} still alive 30 s after SIGKILL")

    def close(self) -> None:
        """Stop the broker if this object started it; leave an external one alone."""
        if self.owned and self.run_dir is not None:
            self.stop()

    def __enter__(self) -> KafkaBroker:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"KafkaBroker(bootstrap={self._bootstrap!r}, run_dir={str(self.run_dir)!r}, owned={self.owned})"


# -- kafka-python helpers ----------------------------------------------------------------------------


def unique_name(prefix: str = "t") -> str:
    """A topic / group / transactional id that no other test uses on the shared broker."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def admin_client(bootstrap: str, **kwargs):
    from kafka import KafkaAdminClient

    kwargs.setdefault("request_timeout_ms", 10000)
    kwargs.setdefault("client_id", "rwkv-stream-tests")
    return KafkaAdminClient(bootstrap_servers=bootstrap, **kwargs)


def create_topic(
    bootstrap: str,
    name: str,
    partitions: int = 1,
    compacted: bool = False,
    config: dict[str, str] | None = None,
    *,
    exist_ok: bool = False,
    timeout: float = 30.0,
) -> str:
    """Create a topic (replication factor 1) and wait until every partition has a leader.

    ``compacted`` sets ``cleanup.policy=compact``; ``config`` adds or overrides topic configs
    (values are strings, e.g. ``{"segment.ms": "1000", "min.cleanable.dirty.ratio": "0.01"}``).
    """
    from kafka.errors import TopicAlreadyExistsError

    configs = {"cleanup.policy": "compact"} if compacted else {}
    configs.update({k: str(v) for k, v in (config or {}).items()})
    admin = admin_client(bootstrap)
    try:
        try:
            admin.create_topics(
                {name: {"num_partitions": partitions, "replication_factor": 1, "configs": configs}},
                timeout_ms=int(timeout * 1000),
            )
        except TopicAlreadyExistsError:
            if not exist_ok:
                raise
        admin.wait_for_topics([name], timeout_ms=int(timeout * 1000))
    finally:
        admin.close()
    return name


def prime_metadata(consumer, topics) -> None:
    """Load the metadata of ``topics`` into a subscribed KafkaConsumer *before* its first poll().

    Works around a kafka-python 3.0.12 race: if the group leader joins before the subscribed topics'
    metadata arrived, it assigns nothing ("No partition metadata for topic ..."), then rejoins because
    its metadata changed; if that rejoin is still in flight when poll(timeout_ms) expires, the result is
    dropped and the consumer stays with an empty assignment (heartbeats disabled) for good. Seen with
    poll timeouts of 5-200 ms on a freshly created topic. Loading the metadata first avoids the rejoin.
    """
    for topic in topics:
        deadline = time.monotonic() + 10
        while not consumer.partitions_for_topic(topic) and time.monotonic() < deadline:
            time.sleep(0.05)


def _wait(probe, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            last = probe()
            if last is None:
                return
        except Exception as exc:  # coordinator not available / loading: retry
            last = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} not ready after {timeout:.0f} s: {last!r}")
        time.sleep(0.2)


def wait_for_group_coordinator(bootstrap: str, group_id: str = "rwkv-stream-probe", timeout: float = 30.0) -> None:
    """Block until the group coordinator answers for ``group_id`` (creates and loads __consumer_offsets
    on a fresh broker; about a second the first time, instant afterwards)."""
    admin = admin_client(bootstrap)

    def probe():
        error = admin.describe_groups([group_id])[group_id].get("error")
        # An unknown group is fine: the coordinator answered.
        return None if error is None or "GroupIdNotFound" in error else error

    try:
        _wait(probe, "group coordinator", timeout)
    finally:
        admin.close()


def wait_for_transaction_coordinator(
    bootstrap: str, transactional_id: str = "rwkv-stream-probe", timeout: float = 30.0
) -> None:
    """Block until the transaction coordinator answers (creates and loads __transaction_state)."""
    from kafka.errors import TransactionalIdNotFoundError

    admin = admin_client(bootstrap)

    def probe():
        with contextlib.suppress(TransactionalIdNotFoundError):  # unknown id: the coordinator answered
            admin.describe_transactions([transactional_id])
        return None

    try:
        _wait(probe, "transaction coordinator", timeout)
    finally:
        admin.close()


# -- pytest fixtures ---------------------------------------------------------------------------------

_SESSION_BROKER: KafkaBroker | None = None


def _skip_without_java() -> None:
    if shutil.which("java") is None:
        pytest.skip(f"Kafka tests need Java 17+ on PATH for the real broker (or {ENV_BOOTSTRAP}=host:port)")


def session_broker() -> KafkaBroker:
    """The process-wide shared broker (started on first use); the fixture below wraps it."""
    global _SESSION_BROKER
    if _SESSION_BROKER is None:
        bootstrap = os.environ.get(ENV_BOOTSTRAP)
        if bootstrap:
            broker = KafkaBroker.external(bootstrap)
        else:
            _skip_without_java()
            broker = KafkaBroker()
            # prune run dirs of earlier sessions (stopped ones; the newest 5 stay for their logs)
            broker._sh("clean", "--keep", "5", check=False)
        broker.start()
        _SESSION_BROKER = broker
    return _SESSION_BROKER


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[KafkaBroker]:
    """The shared broker for the test session (see the module docstring)."""
    global _SESSION_BROKER
    broker = session_broker()
    yield broker
    if _SESSION_BROKER is broker:
        _SESSION_BROKER = None
        broker.close()


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_broker: KafkaBroker) -> str:
    return kafka_broker.bootstrap


@pytest.fixture
def private_kafka_broker() -> Iterator[KafkaBroker]:
    """A broker for this test alone (about 5 s to start): stop/restart/kill it freely."""
    _skip_without_java()
    broker = KafkaBroker()
    broker.start()
    try:
        yield broker
    finally:
        broker.close()
