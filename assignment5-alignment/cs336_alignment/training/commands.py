"""`cs336-align sft|ei|grpo|dpo`: load a model and data, build the loop's config from flags, run, save."""

import argparse
import os
from typing import Any

from cs336_alignment.cli_inputs import (
    check_checkpoint_file,
    check_model_flags,
    loading,
    model_label,
    read_records,
    values_checked_downstream,
)
from cs336_alignment.training.common import CHECKPOINT_NAME
from cs336_alignment.training.config_cli import add_config_arguments, config_from_args
from cs336_basics.cli_support import StopRequest, UserError, prepare_run_dir, refuse_overwriting_inputs
from cs336_basics.cli_support.atomic import RUN_MARKERS

LOOPS = ("sft", "ei", "grpo", "dpo")


def _config_class(name: str) -> type:
    from cs336_alignment.training import DPOConfig, EIConfig, GRPOConfig, SFTConfig

    return {"sft": SFTConfig, "ei": EIConfig, "grpo": GRPOConfig, "dpo": DPOConfig}[name]


def add_loop_parsers(sub: Any) -> None:
    helps = {
        "sft": "SFT on prompt/response pairs (or --packed: the supplement's instruction tuning)",
        "ei": "expert iteration on MATH-style questions",
        "grpo": "GRPO on MATH-style questions (native backend, or vLLM with weights pushed each step)",
        "dpo": "DPO on prompt/chosen/rejected pairs",
    }
    for name in LOOPS:
        p = sub.add_parser(name, help=helps[name], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.add_argument("--out-dir", required=True, help="checkpoint.pt, metrics.jsonl, generations.jsonl, config")
        p.add_argument("--model", help="Hugging Face model directory (local files only)")
        p.add_argument("--basics-run", help="cs336-basics run directory (config + checkpoint.pt)")
        p.add_argument("--basics-tokenizer", help="folder with the run's vocab.json and merges.txt")
        p.add_argument("--device", default="auto")
        p.add_argument("--dtype", default="float32", help="weights' dtype (training keeps fp32 master weights)")
        p.add_argument("--resume", action="store_true", help="continue from --out-dir/checkpoint.pt (exact)")
        p.add_argument("--overwrite", action="store_true",
                       help="start over in an --out-dir that already holds a run (its checkpoint and metrics go)")
        if name == "sft":
            p.add_argument("--data", required=True, help="JSONL with prompt and response fields")
            p.add_argument("--packed", action="store_true",
                           help="instruction tuning: Alpaca template, documents packed into --seq-length chunks")
            p.add_argument("--seq-length", type=int, default=512, help="--packed only")
        elif name == "dpo":
            p.add_argument("--data", required=True, help="JSONL with prompt, chosen and rejected fields")
        else:
            p.add_argument("--data", required=True, help="MATH-style JSONL (problem/question + answer or solution)")
        p.add_argument("--eval-data", help="held-out set (MATH-style; for dpo: preference pairs)")
        add_config_arguments(p, _config_class(name))
        p.set_defaults(func=run_loop)


def _load_policy(args: argparse.Namespace) -> tuple[Any, Any]:
    from cs336_alignment.models import load_model

    with loading(model_label(args.model, args.basics_run)):
        model, tokenizer = load_model(args.model, args.basics_run, args.basics_tokenizer, args.device, args.dtype)
    return model.train(), tokenizer


def _questions(path: str | None):
    from cs336_alignment.evaluation.datasets import load_math
    from cs336_alignment.prompts import format_prompt
    from cs336_alignment.training.eval_config import QuestionSet

    if path is None:
        return None
    rows = load_math(path)
    return QuestionSet([format_prompt("r1_zero", question=r["question"]) for r in rows], [r["answer"] for r in rows])


def _rows(path: str | None, fields: tuple[str, ...]) -> list[dict[str, str]] | None:
    if path is None:
        return None
    return [{f: str(row[f]) for f in fields} for row in read_records(path, fields)]


def _check_run_folder(args: argparse.Namespace) -> None:
    """Before anything is loaded or written: the output folder may hold a run only with --resume (continue) or
    --overwrite (start over), resuming needs a checkpoint, and no input may live where an output goes."""
    # With --overwrite the old run's files go only when the loop starts (RunDir), after data and model loaded.
    prepare_run_dir(args.out_dir, args.resume, args.overwrite, markers=() if args.overwrite else RUN_MARKERS)
    checkpoint = os.path.join(args.out_dir, CHECKPOINT_NAME)
    if args.resume and not os.path.isfile(checkpoint):
        raise UserError(f"nothing to resume: {args.out_dir} has no {CHECKPOINT_NAME}")
    if args.resume:
        check_checkpoint_file(checkpoint, "cannot resume")
    outputs = [os.path.join(args.out_dir, name) for name in ("checkpoint.pt", "metrics.jsonl", "config.json",
                                                             "generations.jsonl")]
    refuse_overwriting_inputs(outputs, [p for p in (args.data, args.eval_data) if p is not None])


def run_loop(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Validates flags, data and the output folder before loading the model, runs the loop, saves HF models with
    save_pretrained."""
    name = args.command
    config = config_from_args(_config_class(name), args)
    for path in (args.data, args.eval_data):
        if path is not None and not os.path.exists(path):
            raise FileNotFoundError(f"{path} does not exist")
    check_model_flags(args.model, args.basics_run, args.basics_tokenizer)
    _check_run_folder(args)
    if name == "sft" and args.packed and args.resume:
        raise UserError("--packed instruction tuning cannot --resume (start over with --overwrite)")
    stop = StopRequest()
    history, policy, tokenizer = _train(name, config, args, stop)
    if stop.requested:
        raise SystemExit(stop.exit_code)
    if args.model and hasattr(policy, "save_pretrained"):
        policy.save_pretrained(os.path.join(args.out_dir, "model"))
        tokenizer.save_pretrained(os.path.join(args.out_dir, "model"))
    last = [h for h in history if h.get("kind") == "eval"][-1:] or history[-1:]
    if last:
        print({k: v for k, v in last[0].items() if isinstance(v, int | float | str)})
    return history


def _train(name: str, config: Any, args: argparse.Namespace, stop: StopRequest) -> tuple[list[dict[str, Any]], Any,
                                                                                         Any]:
    """Loads data and model and runs loop `name`; while the loop runs, SIGINT/SIGTERM (`stop`) end it after the
    current step, checkpointed (loading is still interrupted at once by Ctrl-C)."""
    from cs336_alignment import training

    flags = {"overwrite": args.overwrite, "stop": stop}

    def loop(run: Any, *positional: Any, **keywords: Any) -> list[dict[str, Any]]:
        with stop, values_checked_downstream(f"{name} stopped"):
            return run(*positional, **keywords, **flags)

    if name == "sft" and args.packed:
        from cs336_alignment.sft_data import PackedSFTDataset

        policy, tokenizer = _load_policy(args)
        with loading(f"--data {args.data}"):
            dataset = PackedSFTDataset(tokenizer, args.data, args.seq_length, shuffle=True, seed=config.seed)
        packed = training.InstructionSFTConfig(
            learning_rate=config.learning_rate, seq_length=args.seq_length, train_batch_size=config.train_batch_size,
            gradient_accumulation_steps=config.gradient_accumulation_steps, num_steps=config.num_steps,
            max_grad_norm=config.max_grad_norm, precision=config.precision, seed=config.seed,
            time_budget_s=config.time_budget_s)
        history = loop(training.run_instruction_sft, policy, dataset, packed, args.out_dir)
    elif name == "sft":
        examples = _rows(args.data, ("prompt", "response"))
        eval_questions = _questions(args.eval_data)
        policy, tokenizer = _load_policy(args)
        history = loop(training.run_sft, policy, tokenizer, examples, config, eval_questions, args.out_dir,
                       args.resume)
    elif name in ("ei", "grpo"):
        train_questions, eval_questions = _questions(args.data), _questions(args.eval_data)
        policy, tokenizer = _load_policy(args)
        if name == "ei":
            history = loop(training.run_expert_iteration, policy, tokenizer, train_questions, config,
                           eval_questions, args.out_dir, args.resume)
        else:
            history = loop(training.run_grpo, policy, tokenizer, train_questions, config, eval_questions,
                           args.out_dir, args.resume, model_path=args.model)
    else:
        fields = ("prompt", "chosen", "rejected")
        train_pairs, eval_pairs = _rows(args.data, fields), _rows(args.eval_data, fields)
        policy, tokenizer = _load_policy(args)
        history = loop(training.run_dpo, policy, tokenizer, train_pairs, config, eval_pairs, args.out_dir,
                       args.resume)
    return history, policy, tokenizer
