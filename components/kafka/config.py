"""Settings of ``rwkv-stream consume``: defaults < TOML file < environment < command-line flags.

Every setting ``name`` is also the environment variable ``RWKV_STREAM_CONSUME_<NAME>`` and the flag ``--<name>``
(underscores become dashes). Kafka client options (security settings included) go to the ``[client]`` table,
to ``RWKV_STREAM_CONSUME_CLIENT_<OPTION>`` variables or to ``--client-option option=value``; they are passed to
kafka-python's consumer, producer and admin client as they are (each gets the options it knows).
"""

from __future__ import annotations

import difflib
import json
import os
import socket
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from rwkv_stream.config import WEIGHT_FORMATS

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ENV_PREFIX = "RWKV_STREAM_CONSUME_"
CLIENT_ENV_PREFIX = "RWKV_STREAM_CONSUME_CLIENT_"
DELIVERY_MODES = ("at-least-once", "exactly-once")
ASSIGNORS = ("cooperative-sticky", "range", "roundrobin")
OUTPUT_FORMATS = ("msgpack", "json")
TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list"}


class ConfigError(ValueError):
    """An invalid configuration (a setting, or topics that do not fit it): the processor exits (code 2)."""


@dataclass
class ConsumerConfig:
    # Kafka
    bootstrap_servers: str = "127.0.0.1:9092"
    group_id: str = "rwkv-stream"
    input_topic: str = "transcripts"
    output_topic: str = "transcripts.out"
    dead_letter_topic: str = "transcripts.dlq"
    state_topic: str = "transcripts.state"
    create_topics: bool = True
    replication_factor: int = -1  # for topics this process creates; -1 = the broker's default
    delivery: str = "at-least-once"
    instance_id: str = ""  # stable per replica (pod name); default: host name
    static_membership: bool = False  # group.instance.id = instance_id: a restart rejoins without a rebalance
    transactional_id: str = ""  # exactly-once; default <group_id>-<instance_id>
    transaction_timeout_ms: int = 60000
    isolation_level: str = "read_committed"
    assignor: str = "cooperative-sticky"
    session_timeout_ms: int = 45000
    heartbeat_interval_ms: int = 3000
    max_poll_interval_ms: int = 300000
    client: dict[str, Any] = field(default_factory=dict)
    # Model
    bundle: str = "shipped"
    heads: list[str] = field(default_factory=list)  # empty: all heads of the bundle
    device: str = "cpu"
    dtype: str = "float32"
    torch_threads: int = 0  # 0: torch's default
    # Processing
    max_batch_records: int = 512
    max_poll_records: int = 2048  # per poll; what exceeds a batch waits in memory (see max_buffered_records)
    max_batch_chars: int = 262144
    max_streams: int = 4096
    poll_timeout_ms: int = 50
    max_buffered_records: int = 5000
    max_fragment_chars: int = 16384
    max_generate_tokens: int = 256
    output_format: str = "msgpack"  # or "json" (outputs and dead letters); inputs may be either, per record
    idle_ttl_s: float = 600.0
    # Checkpoints and state
    checkpoint_interval_ms: int = 0  # 0: 5000 at-least-once (replay cost), 200 exactly-once (output latency)
    checkpoint_records: int = 2000
    state_chunk_bytes: int = 512 * 1024
    state_compress_over: int = 64 * 1024
    state_cache_bytes: int = 256 << 20
    restore_timeout_s: float = 120.0
    # Operations
    metrics_port: int = 0  # 0: no Prometheus endpoint
    metrics_addr: str = "0.0.0.0"
    log_level: str = "INFO"
    readiness_file: str = ""  # exists (one JSON line) exactly while the processor is ready
    broker_retry_max_s: float = 30.0  # cap of the exponential backoff while the broker is unreachable

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        try:
            self._validate()
        except ConfigError:
            raise
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def _validate(self) -> None:
        if self.output_format not in OUTPUT_FORMATS:
            raise ValueError(f"output_format must be one of {OUTPUT_FORMATS}, not {self.output_format!r}")
        if self.broker_retry_max_s <= 0:
            raise ValueError(f"broker_retry_max_s must be positive, got {self.broker_retry_max_s}")
        if self.dtype not in WEIGHT_FORMATS:
            raise ValueError(f"dtype must be one of {WEIGHT_FORMATS}, not {self.dtype!r}")
        if self.delivery not in DELIVERY_MODES:
            raise ValueError(f"delivery must be one of {DELIVERY_MODES}, not {self.delivery!r}")
        if self.assignor not in ASSIGNORS:
            raise ValueError(f"assignor must be one of {ASSIGNORS}, not {self.assignor!r}")
        if self.isolation_level not in ("read_committed", "read_uncommitted"):
            raise ValueError(f"isolation_level must be read_committed or read_uncommitted: {self.isolation_level!r}")
        topics = [self.input_topic, self.output_topic, self.dead_letter_topic, self.state_topic]
        if len(set(topics)) != 4:
            raise ValueError(f"input, output, dead-letter and state topics must differ: {topics}")
        for name in ("max_batch_records", "max_streams", "max_buffered_records", "max_fragment_chars",
                     "checkpoint_records", "state_chunk_bytes", "max_generate_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    @property
    def exactly_once(self) -> bool:
        return self.delivery == "exactly-once"

    @property
    def resolved_checkpoint_interval_ms(self) -> int:
        if self.checkpoint_interval_ms > 0:
            return self.checkpoint_interval_ms
        return 200 if self.exactly_once else 5000

    @property
    def resolved_instance_id(self) -> str:
        return self.instance_id or socket.gethostname()

    @property
    def resolved_transactional_id(self) -> str:
        return self.transactional_id or f"{self.group_id}-{self.resolved_instance_id}"


def setting_names() -> list[str]:
    return [f.name for f in fields(ConsumerConfig) if f.name != "client"]


def _field_type(name: str) -> type:
    default = next(f for f in fields(ConsumerConfig) if f.name == name)
    value = default.default if default.default is not MISSING else default.default_factory()  # type: ignore[misc]
    return type(value)


def parse_value(name: str, text: str) -> Any:
    """A setting's value from an environment variable or flag string."""
    kind = _field_type(name)
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name}: expected a boolean, got {text!r}")
    if kind is list:
        return [s.strip() for s in text.split(",") if s.strip()]
    return kind(text)


def parse_client_value(text: str) -> Any:
    """Client options from strings: JSON when it parses (numbers, booleans, lists), else the string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def load_config(path: str | Path | None = None, env: dict[str, str] | None = None,
                overrides: dict[str, Any] | None = None, client_overrides: dict[str, Any] | None = None
                ) -> ConsumerConfig:
    env = dict(os.environ) if env is None else env
    values: dict[str, Any] = {}
    client: dict[str, Any] = {}
    if path:
        data = _read_toml(Path(path))
        client.update(data.pop("client", {}))
        values.update(data)
    for name in setting_names():
        if ENV_PREFIX + name.upper() in env:
            values[name] = parse_value(name, env[ENV_PREFIX + name.upper()])
    for key, text in env.items():
        if key.startswith(CLIENT_ENV_PREFIX):
            client[key[len(CLIENT_ENV_PREFIX):].lower()] = parse_client_value(text)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    client.update(client_overrides or {})
    check_client_options(client)
    return ConsumerConfig(**values, client=client)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    tables = {k for k, v in data.items() if isinstance(v, dict)} - {"client"}
    if tables:
        raise ConfigError(f"{path}: unknown table(s) {sorted(tables)}; the only table is [client]")
    for name, value in data.items():
        if name == "client":
            continue
        if name not in setting_names():
            raise ConfigError(f"{path}: unknown setting {name!r}{_did_you_mean(name, setting_names())}")
        _check_type(name, value, f"{path}: ")
    return data


def _check_type(name: str, value: Any, where: str = "") -> None:
    kind = _field_type(name)
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise ConfigError(f"{where}{name} must be {TYPE_NAMES.get(kind, kind.__name__)}, got {value!r}")


def known_client_options() -> set[str]:
    """Every option kafka-python's consumer, producer or admin client knows."""
    from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

    return set(KafkaConsumer.DEFAULT_CONFIG) | set(KafkaProducer.DEFAULT_CONFIG) | set(KafkaAdminClient.DEFAULT_CONFIG)


def check_client_options(client: dict[str, Any]) -> None:
    """Refuse an option no Kafka client knows: it would be silently ignored. A processor setting found in
    [client] is almost always a key written after the ``[client]`` table header, where TOML puts it."""
    known = known_client_options()
    for name in client:
        if name in known:
            continue
        if name in setting_names():
            raise ConfigError(f"{name!r} is a processor setting but sits in [client]: in TOML every key after the "
                              "[client] header belongs to that table; move it above [client]")
        raise ConfigError(f"unknown Kafka client option {name!r} in [client]{_did_you_mean(name, sorted(known))}")


def _did_you_mean(name: str, choices: list[str] | set[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
