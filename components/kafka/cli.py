"""``rwkv-stream consume``: run the Kafka stream processor (also ``python -m rwkv_stream.components.kafka``)."""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

from .config import ConsumerConfig, load_config, parse_client_value, parse_value, setting_names

HELP = "tag/classify/generate transcript fragments from a Kafka topic, per-stream RWKV state (see docs/kafka.md)"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("consume", help=HELP, description=HELP)
    add_arguments(parser)
    parser.set_defaults(handler=run_from_args)


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
            overrides[name] = parse_value(name, value)
    client = {}
    for item in args.client_option:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--client-option needs OPTION=VALUE, got {item!r}")
        client[key.strip()] = parse_client_value(value)
    return load_config(args.config, overrides=overrides, client_overrides=client)


def run_from_args(args: argparse.Namespace) -> int:
    from .metrics import setup_logging
    from .processor import Processor

    cfg = config_from_args(args)
    setup_logging(cfg.log_level)
    processor = Processor(cfg)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: processor.stop())
    return processor.run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rwkv_stream.components.kafka", description=HELP)
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
