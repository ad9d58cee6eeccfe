"""Training loops (SFT, expert iteration, GRPO/GSPO, DPO, ORPO, reward model, PPO): thin layers over the
`cs336_alignment` primitives.

Each loop takes an in-memory policy, tokenizer and data plus a config dataclass, so tests and the demo call it
directly; `cs336_alignment.cli` wraps them as `cs336-align sft|ei|grpo|dpo|orpo|ppo|reward-model`.
"""

from cs336_alignment.training.dpo_loop import DPOConfig, run_dpo
from cs336_alignment.training.ei_loop import EIConfig, run_expert_iteration
from cs336_alignment.training.grpo_loop import GRPOConfig, run_grpo
from cs336_alignment.training.orpo_loop import ORPOConfig, run_orpo
from cs336_alignment.training.ppo_loop import PPOConfig, run_ppo
from cs336_alignment.training.reward_model_loop import RewardModelConfig, run_reward_model
from cs336_alignment.training.sft_loop import InstructionSFTConfig, SFTConfig, run_instruction_sft, run_sft

__all__ = [
    "DPOConfig",
    "EIConfig",
    "GRPOConfig",
    "InstructionSFTConfig",
    "ORPOConfig",
    "PPOConfig",
    "RewardModelConfig",
    "SFTConfig",
    "run_dpo",
    "run_expert_iteration",
    "run_grpo",
    "run_instruction_sft",
    "run_orpo",
    "run_ppo",
    "run_reward_model",
    "run_sft",
]
