"""The adapter settings shared by LoRA and QLoRA (one dataclass, saved next to the adapter weights as JSON)."""

import json
import os
from dataclasses import asdict, dataclass, field

from cs336_basics.cli_support import UserError

# The projections of attention and MLP in both model families: cs336_basics (q/k/v_proj, output_proj, w1/w2/w3)
# and Hugging Face Llama/Qwen2/Mistral (q/k/v/o_proj, gate/up/down_proj). Embeddings and the LM head stay out.
DEFAULT_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "output_proj", "gate_proj", "up_proj",
                                    "down_proj", "w1", "w2", "w3")
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


@dataclass
class LoRAConfig:
    """LoRA (Hu et al. 2021): W x + (alpha / rank) B A dropout(x), A (rank, d_in), B (d_out, rank).

    `targets` are module-name patterns (see `peft.model.matches`): a pattern without a dot matches a module's own
    name (`q_proj`, `*_proj`), one with a dot the full dotted name (`layers.0.*`), `re:` a regular expression over
    the full name. `qlora` stores the targeted layers' weights in 4-bit NF4 (blocks of `block_size`, scales
    quantised again to 8 bits in blocks of `scale_block_size`) under the adapters.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    qlora: bool = False
    block_size: int = 64
    scale_block_size: int = 256
    wrapped: tuple[str, ...] = field(default_factory=tuple)  # filled in by inject_lora: the modules it wrapped

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        self.wrapped = tuple(self.wrapped)
        self.validate()

    def validate(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise UserError(f"--lora-rank must be a positive integer, got {self.rank}")
        if not self.alpha > 0:
            raise UserError(f"--lora-alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise UserError(f"--lora-dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise UserError("--lora-targets needs at least one pattern")
        for name in ("block_size", "scale_block_size"):
            value = getattr(self, name)
            if value <= 0 or value % 2:
                raise UserError(f"{name} must be a positive even number, got {value}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def save(self, directory: str | os.PathLike) -> str:
        path = os.path.join(os.fspath(directory), CONFIG_NAME)
        with open(path, "w") as f:
            json.dump(asdict(self), f, indent=2)
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "LoRAConfig":
        path = os.path.join(os.fspath(directory), CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} does not exist")
        with open(path) as f:
            data = json.load(f)
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)
