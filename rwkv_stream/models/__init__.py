"""Model families, one module each, behind one interface (:class:`RecurrentModel`).

Adding a family (RWKV-5, RWKV-6) means one module with a :class:`RecurrentModel` subclass, its config class
in :mod:`rwkv_stream.config`, its tensor names and shapes in :mod:`rwkv_stream.checkpoint`, and an entry in
:data:`FAMILIES`; nothing else in the engine switches on the version.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import AnyConfig
from .base import LogitsMode, Ragged, RecurrentModel, StepOutput, weights_fingerprint
from .rwkv4 import Rwkv4Model
from .rwkv7 import Rwkv7Model

FAMILIES: dict[str, type[RecurrentModel]] = {Rwkv4Model.family: Rwkv4Model, Rwkv7Model.family: Rwkv7Model}


def build_model(
    tensors: dict[str, Tensor],
    config: AnyConfig,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
) -> RecurrentModel:
    """The model of ``config``'s family over canonical ``tensors``."""
    return FAMILIES[config.family](tensors, config, device=device, dtype=dtype)


__all__ = [
    "FAMILIES",
    "LogitsMode",
    "Ragged",
    "RecurrentModel",
    "Rwkv4Model",
    "Rwkv7Model",
    "StepOutput",
    "build_model",
    "weights_fingerprint",
]
