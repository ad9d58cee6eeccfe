"""Every training hyperparameter in one dataclass, plus named presets (the handout's configurations)."""

import dataclasses
from dataclasses import dataclass
from typing import Literal

from cs336_basics.model import TransformerConfig


@dataclass
class TrainConfig:
    # data: 1-D uint16 token files (.npy or raw), e.g. from `cs336-basics encode`
    train_data: str = ""
    val_data: str = ""
    out_dir: str = "runs/default"
    # model (see TransformerConfig; norm/position/ffn are the handout's ablations)
    vocab_size: int = 10_000
    context_length: int = 256
    d_model: int = 512
    num_layers: int = 4
    num_heads: int = 16
    d_ff: int = 1344
    rope_theta: float = 10_000.0
    norm: Literal["pre", "post", "none"] = "pre"
    position: Literal["rope", "none"] = "rope"
    ffn: Literal["swiglu", "silu"] = "swiglu"
    use_torch_sdpa: bool = True
    # optimisation
    batch_size: int = 128
    max_steps: int = 10_000
    lr_max: float = 2e-3
    lr_min: float = 2e-4
    warmup_steps: int = 200
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    # evaluation, logging, checkpoints
    eval_interval: int = 500
    eval_batches: int = 20
    log_interval: int = 10
    checkpoint_interval: int = 1000
    resume: bool = False
    stop_after_steps: int = 0  # end this invocation early (0: never); `resume` continues the same schedule
    time_limit_s: float = 0.0  # end gracefully with a checkpoint after this many seconds (0: no limit)
    # system
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False
    tf32: bool = True
    seed: int = 0
    peak_flops: float = 0.0  # accelerator peak FLOP/s for MFU; 0 = look up by device name
    wandb: bool = False
    wandb_project: str = "cs336-basics"
    progress: bool = True

    def __post_init__(self):
        positive = ("batch_size", "max_steps", "eval_interval", "eval_batches", "log_interval",
                    "checkpoint_interval")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.lr_min <= self.lr_max:
            raise ValueError(f"need 0 <= lr_min <= lr_max, got {self.lr_min}, {self.lr_max}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        self.model_config()  # validates the architecture fields

    def model_config(self) -> TransformerConfig:
        names = {f.name for f in dataclasses.fields(TransformerConfig)} - {"rmsnorm_eps"}
        return TransformerConfig(**{name: getattr(self, name) for name in names})

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.context_length


# The handout's TinyStories model: ≈17M non-embedding parameters, 327,680,000 tokens (10,000 × 128 × 256).
PRESETS: dict[str, dict] = {
    "tinystories-17m": dict(vocab_size=10_000, context_length=256, d_model=512, num_layers=4, num_heads=16,
                            d_ff=1344, batch_size=128, max_steps=10_000, lr_max=2e-3, lr_min=2e-4,
                            warmup_steps=200, eval_interval=500, checkpoint_interval=1000),
    # The handout's low-resource (CPU / Apple silicon) variant: 40M tokens.
    "tinystories-17m-lowres": dict(vocab_size=10_000, context_length=256, d_model=512, num_layers=4,
                                   num_heads=16, d_ff=1344, batch_size=32, max_steps=5_000, lr_max=1e-3,
                                   lr_min=1e-4, warmup_steps=100, eval_interval=250, checkpoint_interval=500),
    # OpenWebText with the same architecture and token budget, 32K vocabulary.
    "owt": dict(vocab_size=32_000, context_length=256, d_model=512, num_layers=4, num_heads=16, d_ff=1344,
                batch_size=128, max_steps=10_000, lr_max=2e-3, lr_min=2e-4, warmup_steps=200,
                eval_interval=500, checkpoint_interval=1000),
    # Leaderboard starting point (OWT, 1.5 H100-hours): wider/deeper model, longer context, compiled, stops
    # at the time limit with a checkpoint. Not yet measured on the full budget; tune lr and steps from sweeps.
    "owt-leaderboard": dict(vocab_size=32_000, context_length=512, d_model=768, num_layers=12, num_heads=12,
                            d_ff=2048, batch_size=64, max_steps=40_000, lr_max=1.5e-3, lr_min=1.5e-4,
                            warmup_steps=1_000, weight_decay=0.1, eval_interval=1_000, checkpoint_interval=2_000,
                            compile=True, time_limit_s=5_400),
    # The quickstart's small model: trains on two CPU cores in about a minute.
    "quickstart": dict(vocab_size=1_000, context_length=128, d_model=128, num_layers=3, num_heads=4, d_ff=384,
                       batch_size=16, max_steps=400, lr_max=3e-3, lr_min=3e-4, warmup_steps=30, eval_interval=50,
                       eval_batches=8, log_interval=10, checkpoint_interval=200, weight_decay=0.1),
}


def config_from_preset(preset: str | None, **overrides) -> TrainConfig:
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    return TrainConfig(**{**(PRESETS[preset] if preset else {}), **overrides})
