"""The language-model training script as a library: config + presets, the loop, metrics.

`train` is imported on first use: the config alone (and so the CLI's flag checks) does not load torch.
"""

from typing import Any

from cs336_basics.training.config import PRESETS, TrainConfig

__all__ = ["PRESETS", "TrainConfig", "train"]


def __getattr__(name: str) -> Any:
    if name == "train":
        from cs336_basics.training.trainer import train

        return train
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
