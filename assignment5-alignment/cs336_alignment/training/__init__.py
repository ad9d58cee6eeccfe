"""Training loops (SFT, expert iteration, GRPO, DPO): thin layers over the `cs336_alignment` primitives.

Each loop takes an in-memory policy, tokenizer and data plus a config dataclass, so tests and the demo call it
directly; `cs336_alignment.cli` wraps them as `cs336-align sft|ei|grpo|dpo`.
"""

from cs336_alignment.training.dpo_loop import DPOConfig, run_dpo
from cs336_alignment.training.ei_loop import EIConfig, run_expert_iteration
from cs336_alignment.training.grpo_loop import GRPOConfig, run_grpo
from cs336_alignment.training.sft_loop import InstructionSFTConfig, SFTConfig, run_instruction_sft, run_sft

__all__ = [
    "DPOConfig",
    "EIConfig",
    "GRPOConfig",
    "InstructionSFTConfig",
    "SFTConfig",
    "run_dpo",
    "run_expert_iteration",
    "run_grpo",
    "run_instruction_sft",
    "run_sft",
]
