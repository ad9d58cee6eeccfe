"""Evaluation commands: MATH-style, GSM8K, MMLU, AlpacaEval generation and a SimpleSafetyTests-style check."""

from cs336_alignment.evaluation.tasks import TASKS, eval_alpaca, eval_gsm8k, eval_math, eval_mmlu, eval_safety

__all__ = ["TASKS", "eval_alpaca", "eval_gsm8k", "eval_math", "eval_mmlu", "eval_safety"]
