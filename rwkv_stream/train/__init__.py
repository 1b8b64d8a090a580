"""Training: RWKV-4 in parallel mode with BlinkDL checkpoint names."""

from rwkv_stream.train.model import RWKV4, TrainConfig, config_from_state_dict, wkv_parallel

__all__ = ["RWKV4", "TrainConfig", "config_from_state_dict", "wkv_parallel"]
