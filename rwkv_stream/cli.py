"""The ``rwkv-stream`` command. Engine commands live here; integrations add theirs through the
``rwkv_stream.commands`` entry point group (each entry is a ``register(subparsers)`` function), so the engine
never imports spaCy or Kafka."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from importlib.metadata import EntryPoint, PackageNotFoundError, entry_points
from importlib.metadata import version as metadata_version
from typing import NoReturn

from .checkpoint import CheckpointError
from .config import WEIGHT_FORMATS
from .state import StateError

Handler = Callable[[argparse.Namespace], int | None]


def main(argv: list[str] | None = None) -> int:
    """Run a command. A user's mistake (a bad path, value or configuration, a missing extra) is one line on
    stderr naming it, and exit status 2; ``--debug`` shows the traceback instead."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(f"rwkv-stream: {one_line(exc)}", file=sys.stderr)
        return 2 if isinstance(exc, USER_ERRORS) else 1


# What a user gets wrong: bad sources, states, values, files, configurations, extras not installed.
USER_ERRORS: tuple[type[BaseException], ...] = (CheckpointError, StateError, ValueError, OSError, ImportError,
                                                 LookupError)
EXTRAS = {"spacy": "spacy", "thinc": "spacy", "kafka": "kafka", "prometheus_client": "kafka", "crc32c": "kafka",
          "cupy": "gpu", "pyrwkv_tokenizer": "world"}


def one_line(exc: BaseException) -> str:
    """The error as one line; a missing optional module names the extra that installs it."""
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        extra = EXTRAS.get(exc.name.split(".")[0])
        if extra:
            return f"{exc.name} is not installed: pip install 'rwkv-stream[{extra}]'"
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return f"no such file: {exc.filename}"
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, USER_ERRORS) else f"{type(exc).__name__}: {text} (rerun with --debug for details)"


class OneLineErrors(argparse.ArgumentParser):
    """argparse, but a usage error is one line (subcommand parsers inherit the class)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(prog="rwkv-stream", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"rwkv-stream {version()}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    _add_info(sub)
    _add_generate(sub)
    _add_bench(sub)
    _add_train(sub)
    for ep in sorted(entry_points(group="rwkv_stream.commands"), key=lambda e: e.name):
        _register_plugin(sub, ep)
    return parser


def _register_plugin(sub: argparse._SubParsersAction, ep: EntryPoint) -> None:
    try:
        ep.load()(sub)
    except ImportError as exc:  # an integration whose extra isn't installed
        p = sub.add_parser(ep.name, help=f"(unavailable: {exc})")
        p.set_defaults(handler=lambda _args, exc=exc, name=ep.name: _unavailable(name, exc))


def _unavailable(name: str, exc: Exception) -> int:
    print(f"rwkv-stream {name} is unavailable: {one_line(exc)}", file=sys.stderr)
    return 2


def version() -> str:
    try:
        return metadata_version("rwkv-stream")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="load a checkpoint or bundle and print its shapes and fingerprint")
    p.add_argument("path", help="'shipped', 'shipped:NAME', a bundle dir, a .pth/.safetensors file or an HF dir")
    p.set_defaults(handler=_info)


def _info(args: argparse.Namespace) -> int:
    from .loading import load_source

    loaded = load_source(args.path, require_tokenizer=False)
    config, tokenizer = loaded.model.config, loaded.tokenizer
    info = {**config.to_dict(), "fingerprint": loaded.model.fingerprint, "state_bytes": config.state_floats * 4,
            "heads": sorted(loaded.heads.heads), "tokenizer": type(tokenizer).__name__ if tokenizer else None}
    print(json.dumps(info, indent=2))
    return 0


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="continue a prompt with a model (streams the text as it is decoded)")
    p.add_argument("prompt")
    p.add_argument("--model", default="shipped",
                   help="'shipped' (default), 'shipped:NAME', a bundle dir, a checkpoint or an HF dir")
    p.add_argument("--tokenizer", default=None, help="'world' or a tokenizer.json (checkpoints only)")
    p.add_argument("--max-tokens", type=int, default=40)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=WEIGHT_FORMATS)
    p.set_defaults(handler=_generate)


def _generate(args: argparse.Namespace) -> int:
    from .generate import SamplingConfig, generate_text
    from .loading import load_source

    loaded = load_source(args.model, tokenizer=args.tokenizer, dtype=args.dtype)
    model, tokenizer = loaded.model, loaded.need_tokenizer()
    sampling = SamplingConfig(args.max_tokens, args.temperature, args.top_p, seed=args.seed)
    print(args.prompt, end="", flush=True)
    for piece in generate_text(model, tokenizer, args.prompt, sampling):
        print(piece, end="", flush=True)
    print()
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="CPU benchmark against HF transformers and the rwkv package (JSON)")
    from .bench import add_arguments

    add_arguments(p)
    p.set_defaults(handler=lambda a: __import__("rwkv_stream.bench", fromlist=["run"]).run(a))


def _add_train(sub: argparse._SubParsersAction) -> None:
    try:
        from .train.cli import add_arguments
    except ImportError:
        return
    p = sub.add_parser("train", help="train an RWKV-4 model and task heads (parallel mode)")
    add_arguments(p)


if __name__ == "__main__":
    sys.exit(main())
