"""Where the model classes used to live; kept so ``rwkv_stream.model.Model`` and friends stay importable.

The families live in :mod:`rwkv_stream.models` (``rwkv4.py``, ``rwkv7.py``) behind
:class:`~rwkv_stream.models.base.RecurrentModel`; ``Model`` is the RWKV-4 class, as it always was. Load any
family with :func:`rwkv_stream.load` or build one with :func:`rwkv_stream.models.build_model`.
"""

from __future__ import annotations

from .models import build_model
from .models.base import LN_EPS, LogitsMode, Ragged, RecurrentModel, StepOutput, token_shift, weights_fingerprint
from .models.rwkv4 import Rwkv4Model, _load_cuda_kernels
from .models.rwkv7 import Rwkv7Model

Model = Rwkv4Model

__all__ = [
    "LN_EPS",
    "LogitsMode",
    "Model",
    "Ragged",
    "RecurrentModel",
    "Rwkv4Model",
    "Rwkv7Model",
    "StepOutput",
    "_load_cuda_kernels",
    "build_model",
    "token_shift",
    "weights_fingerprint",
]
