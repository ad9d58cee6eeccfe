"""The language-model training script as a library: config + presets, the loop, metrics."""

from cs336_basics.training.config import PRESETS, TrainConfig
from cs336_basics.training.trainer import train

__all__ = ["PRESETS", "TrainConfig", "train"]
