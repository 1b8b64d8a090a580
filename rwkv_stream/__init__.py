"""rwkv-stream: RWKV checkpoints as live, per-stream RNNs with a constant cost per token."""

from .checkpoint import CheckpointError
from .config import ModelConfig, Rwkv7Config
from .loading import load
from .model import Model, StepOutput
from .models import RecurrentModel, Rwkv7Model
from .pool import StatePool
from .state import State, StateError

__all__ = [
    "CheckpointError",
    "Model",
    "ModelConfig",
    "RecurrentModel",
    "Rwkv7Config",
    "Rwkv7Model",
    "State",
    "StateError",
    "StatePool",
    "StepOutput",
    "load",
]
__version__ = "0.1.0"
