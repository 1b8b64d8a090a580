"""``rwkv-stream consume`` (also ``python -m rwkv_stream.components.kafka``) runs the Kafka stream processor;
``rwkv-stream kafka init-topics`` and ``rwkv-stream kafka dlq-replay`` administer its topics. Both commands are
registered by the ``consume`` entry point's :func:`register`."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from typing import Any

from .config import ConfigError, ConsumerConfig, load_config, parse_client_value, parse_value, setting_names

HELP = "tag/classify/generate transcript fragments from a Kafka topic, per-stream RWKV state (see docs/kafka.md)"
KAFKA_HELP = "administer the stream processor's topics: init-topics, dlq-replay (see docs/kafka.md)"
EXIT_CONFIG = 2


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("consume", help=HELP, description=HELP)
    add_arguments(parser)
    parser.set_defaults(handler=run_from_args)
    register_admin(subparsers)


def register_admin(subparsers: argparse._SubParsersAction) -> None:
    kafka = subparsers.add_parser("kafka", help=KAFKA_HELP, description=KAFKA_HELP)
    sub = kafka.add_subparsers(title="commands", metavar="COMMAND")
    init = sub.add_parser("init-topics", help="create the input, output, dead-letter and state topics")
    add_arguments(init)
    init.add_argument("--partitions", type=int, default=None,
                      help="input partitions (= maximum parallelism) when the input topic is created; the other "
                           "topics get the input topic's count")
    init.set_defaults(handler=init_topics_from_args)
    replay = sub.add_parser("dlq-replay", help="re-inject dead letters into the input topic")
    add_arguments(replay)
    replay.add_argument("--reason", action="append", default=[], help="only dead letters of this reason (repeatable)")
    replay.add_argument("--after-offset", type=int, default=-1,
                        help="skip dead letters at or below this offset (in every dead-letter partition)")
    replay.add_argument("--dry-run", action="store_true", help="count what would be replayed, send nothing")
    replay.set_defaults(handler=dlq_replay_from_args)
    kafka.set_defaults(handler=lambda _args: kafka.print_help() or EXIT_CONFIG)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML settings file (e.g. configs/consumer.toml)")
    defaults = ConsumerConfig()
    for name in setting_names():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, dest=name, default=None, metavar=name.upper(),
                            help=f"(env RWKV_STREAM_CONSUME_{name.upper()}; default {getattr(defaults, name)!r})")
    parser.add_argument("--client-option", action="append", default=[], metavar="OPTION=VALUE",
                        help="kafka-python client option (repeatable), e.g. security_protocol=SASL_SSL")


def config_from_args(args: argparse.Namespace) -> ConsumerConfig:
    overrides: dict[str, Any] = {}
    for name in setting_names():
        value = getattr(args, name, None)
        if value is not None:
            try:
                overrides[name] = parse_value(name, value)
            except ValueError as exc:
                raise ConfigError(f"--{name.replace('_', '-')}: {exc}") from None
    client = {}
    for item in args.client_option:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--client-option needs OPTION=VALUE, got {item!r}")
        client[key.strip()] = parse_client_value(value)
    return load_config(args.config, overrides=overrides, client_overrides=client)


class _Stopper:
    """SIGTERM/SIGINT handlers installed before anything slow (model loading, connecting): a signal that
    arrives early still means "stop cleanly", never a default death by the signal."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.target: Any = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, *_: Any) -> None:
        self.requested.set()
        if self.target is not None:
            self.target.stop()

    def attach(self, processor: Any) -> None:
        self.target = processor
        if self.requested.is_set():
            processor.stop()


def run_from_args(args: argparse.Namespace) -> int:
    stopper = _Stopper()
    from .metrics import setup_logging

    try:
        cfg = config_from_args(args)
    except (ConfigError, ValueError, OSError) as exc:
        print(f"rwkv-stream consume: invalid configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(cfg.log_level)
    if stopper.requested.is_set():
        return 0
    from .processor import Processor

    processor = Processor(cfg)
    stopper.attach(processor)
    try:
        return processor.run()
    except ConfigError as exc:
        print(f"rwkv-stream consume: invalid configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG


TOOL_BOOTSTRAP_TIMEOUT_MS = 5000  # one-shot commands: an unreachable cluster is an answer, not a wait


def _client_options(cfg: ConsumerConfig, known: dict[str, Any]) -> dict[str, Any]:
    """[client] options the client knows, with a short bootstrap timeout unless the user set one."""
    return {"bootstrap_timeout_ms": TOOL_BOOTSTRAP_TIMEOUT_MS,
            **{k: v for k, v in cfg.client.items() if k in known}}


def _unreachable(cfg: ConsumerConfig, command: str, exc: Exception) -> int:
    seconds = cfg.client.get("bootstrap_timeout_ms", TOOL_BOOTSTRAP_TIMEOUT_MS) / 1000
    print(f"rwkv-stream kafka {command}: no Kafka broker reachable at bootstrap_servers={cfg.bootstrap_servers!r} "
          f"within {seconds:g} s ({type(exc).__name__}); is the broker running, and is the address right?",
          file=sys.stderr)
    return EXIT_CONFIG


def _tool_config(args: argparse.Namespace, command: str) -> ConsumerConfig | None:
    """The configuration of a one-shot kafka command, or None after saying in one line why it is invalid."""
    try:
        return config_from_args(args)
    except (ConfigError, ValueError) as exc:
        print(f"rwkv-stream kafka {command}: {exc}", file=sys.stderr)
        return None


def _admin(cfg: ConsumerConfig) -> Any:
    from kafka import KafkaAdminClient

    return KafkaAdminClient(bootstrap_servers=cfg.bootstrap_servers, client_id="rwkv-stream-admin",
                            **_client_options(cfg, KafkaAdminClient.DEFAULT_CONFIG))


def init_topics_from_args(args: argparse.Namespace) -> int:
    from kafka.errors import KafkaConnectionError, KafkaTimeoutError

    from .topics import init_topics

    cfg = _tool_config(args, "init-topics")
    if cfg is None:
        return EXIT_CONFIG
    try:
        admin = _admin(cfg)
        try:
            report = init_topics(admin, cfg, args.partitions)
        finally:
            admin.close()
    except (KafkaTimeoutError, KafkaConnectionError) as exc:
        return _unreachable(cfg, "init-topics", exc)
    except (ConfigError, ValueError) as exc:
        print(f"rwkv-stream kafka init-topics: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(json.dumps(report, indent=2))
    return 0


def dlq_replay_from_args(args: argparse.Namespace) -> int:
    from kafka import KafkaConsumer, KafkaProducer
    from kafka.errors import KafkaConnectionError, KafkaTimeoutError

    from .replay import replay

    cfg = _tool_config(args, "dlq-replay")
    if cfg is None:
        return EXIT_CONFIG
    try:
        consumer = KafkaConsumer(bootstrap_servers=cfg.bootstrap_servers, group_id=None, enable_auto_commit=False,
                                 isolation_level="read_committed",
                                 **_client_options(cfg, KafkaConsumer.DEFAULT_CONFIG))
        producer = KafkaProducer(bootstrap_servers=cfg.bootstrap_servers, acks="all",
                                 **_client_options(cfg, KafkaProducer.DEFAULT_CONFIG))
    except (KafkaTimeoutError, KafkaConnectionError) as exc:
        return _unreachable(cfg, "dlq-replay", exc)
    try:
        report = replay(consumer, producer, cfg.dead_letter_topic, cfg.input_topic, reasons=set(args.reason),
                        after_offset=args.after_offset, dry_run=args.dry_run)
    finally:
        consumer.close()
        producer.close(timeout=10)
    print(json.dumps(report.to_dict(), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rwkv_stream.components.kafka", description=HELP)
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
