"""CS336 assignment 5: alignment (SFT, expert iteration, GRPO, DPO)."""
