"""Kafka stream processor: transcript fragments in, per-stream RWKV tags/cats/generations out.

``rwkv-stream consume --config configs/consumer.toml``; see docs/kafka.md. Needs the ``kafka`` extra
(kafka-python, prometheus-client); the engine pieces live in :mod:`.engine` and never import Kafka.
"""

from .config import ConsumerConfig, load_config
from .schema import SCHEMA_VERSION, BadInput, Fragment, GenerationRequest, decode_output, encode_input

__all__ = [
    "SCHEMA_VERSION",
    "BadInput",
    "ConsumerConfig",
    "Fragment",
    "GenerationRequest",
    "decode_output",
    "encode_input",
    "load_config",
]
