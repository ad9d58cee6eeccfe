"""`cs336-align sft|ei|grpo|dpo|orpo|ppo|reward-model`: load a model and data, build the loop's config from flags,
optionally wrap the model in LoRA/QLoRA adapters, run, save."""

import argparse
import contextlib
import copy
import json
import os
from dataclasses import asdict
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
from cs336_alignment.training.parallel import PARALLEL_CHOICES, PARALLEL_LOOPS
from cs336_basics.cli_support import StopRequest, UserError, prepare_run_dir, refuse_overwriting_inputs
from cs336_basics.cli_support.atomic import RUN_MARKERS

LOOPS = ("sft", "ei", "grpo", "dpo", "orpo", "ppo", "reward-model")
PAIR_LOOPS = ("dpo", "orpo", "reward-model")
REWARD_MODEL_INFO = "reward_model.json"
ADAPTER_DIR = "adapter"


def _config_class(name: str) -> type:
    from cs336_alignment import training

    return {"sft": training.SFTConfig, "ei": training.EIConfig, "grpo": training.GRPOConfig,
            "dpo": training.DPOConfig, "orpo": training.ORPOConfig, "ppo": training.PPOConfig,
            "reward-model": training.RewardModelConfig}[name]


def _add_lora_arguments(p: argparse.ArgumentParser) -> None:
    from cs336_alignment.peft import DEFAULT_TARGETS

    group = p.add_argument_group("LoRA / QLoRA (cs336_alignment.peft)")
    group.add_argument("--lora-rank", type=int, help="train rank-r adapters instead of every weight")
    group.add_argument("--lora-alpha", type=float, default=16.0, help="the update is scaled by alpha / rank")
    group.add_argument("--lora-dropout", type=float, default=0.0)
    group.add_argument("--lora-targets", nargs="+", default=list(DEFAULT_TARGETS),
                       help="module-name patterns: `q_proj`, `*_proj` (a module's own name), `layers.0.*` "
                            "(dotted suffix), `re:<regex>` (full name)")
    group.add_argument("--qlora", action="store_true", help="targeted base weights in 4-bit NF4 under the adapters")


def _lora_config(args: argparse.Namespace):
    """The adapter settings (checked before any model is loaded), or None without --lora-rank."""
    from cs336_alignment.peft import LoRAConfig

    if args.lora_rank is None:
        if args.qlora:
            raise UserError("--qlora needs --lora-rank (QLoRA trains adapters over the 4-bit weights)")
        return None
    return LoRAConfig(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                      targets=tuple(args.lora_targets), qlora=args.qlora)


def _add_parallel_arguments(p: argparse.ArgumentParser, name: str) -> None:
    group = p.add_argument_group("data parallel (torchrun; see cs336_alignment/training/parallel.py)")
    group.add_argument("--parallel", choices=PARALLEL_CHOICES, default="none",
                       help=f"ddp: one rank per GPU under `torchrun --nproc_per_node N -m cs336_alignment {name}`, "
                            "each training on its share of every global batch")
    group.add_argument("--dist-timeout-s", type=float, default=3600.0,
                       help="longest wait in a collective; must cover rank 0's rollouts and evaluations")


def add_loop_parsers(sub: Any) -> None:
    helps = {
        "sft": "SFT on prompt/response pairs (or --packed: the supplement's instruction tuning)",
        "ei": "expert iteration on MATH-style questions",
        "grpo": "GRPO on MATH-style questions (native backend, or vLLM with weights pushed each step)",
        "dpo": "DPO on prompt/chosen/rejected pairs",
        "orpo": "ORPO (SFT + odds-ratio preference loss, no reference) on prompt/chosen/rejected pairs",
        "ppo": "PPO (KL-penalised reward, GAE, value head) on MATH-style questions; rule reward or --reward-model",
        "reward-model": "a Bradley-Terry reward model (value head on the LM) on prompt/chosen/rejected pairs",
    }
    for name in LOOPS:
        p = sub.add_parser(name, help=helps[name], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.add_argument("--out-dir", required=True, help="checkpoint.pt, metrics.jsonl, generations.jsonl, config")
        p.add_argument("--model", help="Hugging Face model directory (local files only)")
        p.add_argument("--basics-run", help="cs336-basics run directory (config + checkpoint.pt)")
        p.add_argument("--basics-tokenizer", help="folder with the run's vocab.json and merges.txt")
        p.add_argument("--device", default="auto")
        p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="float32",
                       help="weights' dtype (training keeps fp32 master weights)")
        p.add_argument("--resume", action="store_true", help="continue from --out-dir/checkpoint.pt (exact)")
        p.add_argument("--overwrite", action="store_true",
                       help="start over in an --out-dir that already holds a run (its checkpoint and metrics go)")
        if name == "sft":
            p.add_argument("--data", required=True, help="JSONL with prompt and response fields")
            p.add_argument("--packed", action="store_true",
                           help="instruction tuning: Alpaca template, documents packed into --seq-length chunks")
            p.add_argument("--seq-length", type=int, default=512, help="--packed only")
        elif name in PAIR_LOOPS:
            p.add_argument("--data", required=True, help="JSONL with prompt, chosen and rejected fields")
        else:
            p.add_argument("--data", required=True, help="MATH-style JSONL (problem/question + answer or solution)")
        if name == "ppo":
            p.add_argument("--reward-model", help="output folder of `cs336-align reward-model` (with --reward model)")
        p.add_argument("--eval-data", help="held-out set (MATH-style; for dpo, orpo, reward-model: preference pairs)")
        if name in PARALLEL_LOOPS:
            _add_parallel_arguments(p, name)
        _add_lora_arguments(p)
        add_config_arguments(p, _config_class(name))
        p.set_defaults(func=run_loop)


def _load_policy(args: argparse.Namespace) -> tuple[Any, Any]:
    """The model and tokenizer, with adapters injected when --lora-rank is given (a reward model's trunk too)."""
    from cs336_alignment.models import load_model
    from cs336_alignment.peft import inject_lora

    with loading(model_label(args.model, args.basics_run)):
        model, tokenizer = load_model(args.model, args.basics_run, args.basics_tokenizer, args.device, args.dtype)
    if args.lora is not None:
        inject_lora(model, args.lora)
    if args.command == "reward-model":
        from cs336_alignment.reward_model import RewardModel

        model = RewardModel(model)  # the new head stays trainable
    return model.train(), tokenizer


def load_reward_model(directory: str, device: str = "auto") -> tuple[Any, Any]:
    """A reward model written by `cs336-align reward-model --out-dir DIR`: its base model (the paths recorded in
    reward_model.json), its adapters if it had any, and its trained weights from DIR/checkpoint.pt."""
    from cs336_alignment.lm import model_device
    from cs336_alignment.models import load_model
    from cs336_alignment.peft import LoRAConfig, inject_lora
    from cs336_alignment.reward_model import RewardModel
    from cs336_basics.checkpoint import load_checkpoint_state

    info_path = os.path.join(directory, REWARD_MODEL_INFO)
    with loading(f"--reward-model {directory}"):
        with open(info_path) as f:
            info = json.load(f)
        backbone, tokenizer = load_model(info["model"], info["basics_run"], info["basics_tokenizer"], device,
                                         info.get("dtype", "float32"))
        if info.get("lora"):
            lora = LoRAConfig(**{**info["lora"], "targets": tuple(info["lora"]["targets"])})
            lora.targets = tuple(f"re:{name.replace('.', '[.]')}" for name in lora.wrapped)
            inject_lora(backbone, lora)
        model = RewardModel(backbone)
        state = load_checkpoint_state(os.path.join(directory, CHECKPOINT_NAME), map_location=model_device(backbone))
        model.load_state_dict(state["model"])
    return model.eval(), tokenizer


def _check_reward_model_dir(directory: str) -> None:
    for name in (REWARD_MODEL_INFO, CHECKPOINT_NAME):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise UserError(f"--reward-model {directory} has no {name} (expected the output of "
                            f"`cs336-align reward-model`)")


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


@contextlib.contextmanager
def _reported_by_rank_0():
    """Errors every rank of a torchrun launch meets alike (flags, files, the launch): rank 0 reports them."""
    from cs336_basics.training.distributed import env_rank

    try:
        yield
    except Exception as e:
        if env_rank() != 0:
            e.reported_elsewhere = True
        raise


def _start_parallel(name: str, config: Any, args: argparse.Namespace):
    """The launch checked (one line each), this rank's device chosen; the group is started by the caller."""
    from cs336_alignment.models import resolve_device
    from cs336_alignment.training import parallel
    from cs336_basics.training.distributed import rank_device, read_launch

    mode = getattr(args, "parallel", "none")
    launch = read_launch()
    if name not in PARALLEL_LOOPS:
        return launch, None
    parallel.check_launch(mode, launch, name, config.gradient_accumulation_steps, config.train_batch_size)
    parallel.check_rollout_device(getattr(config, "rollout_device", None), mode, launch)
    if mode == "none":
        return launch, None
    if name == "sft" and args.packed:
        raise UserError("--packed instruction tuning does not run with --parallel ddp yet")
    if name == "dpo" and config.reference_device is not None:
        raise UserError("--reference-device with --parallel ddp: each rank keeps its own reference on its own GPU")
    device = rank_device(resolve_device(args.device), launch, mode)
    args.device = str(device)
    return launch, device


def run_loop(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Validates flags, data and the output folder before loading the model, runs the loop, saves HF models with
    save_pretrained. Under torchrun (`--parallel ddp`) every rank runs this; rank 0 alone writes."""
    from cs336_alignment.training import parallel

    with _reported_by_rank_0():
        launch, device = _check_loop(args)
    dist = parallel.single_process() if device is None else \
        parallel.start(args.parallel, device, args.dist_timeout_s, launch)
    stop = StopRequest()
    with dist.failures_as_one_line():
        history, policy, tokenizer = _train(args.command, args.config, args, stop, dist)
    dist.close()
    if stop.requested:
        raise SystemExit(stop.exit_code)
    if dist.is_main:
        _save_outputs(history, policy, tokenizer, args)
    return history


def _check_numbers(args: argparse.Namespace, config: Any) -> None:
    """Flags outside the loops' configs, and settings the rollout sampler would refuse only once the loop runs
    (after the model is loaded and the run folder written)."""
    import math

    if getattr(args, "seq_length", 1) < 1:
        raise UserError(f"--seq-length must be >= 1, got {args.seq_length}")
    timeout = getattr(args, "dist_timeout_s", 1.0)
    if not (math.isfinite(timeout) and timeout > 0):
        raise UserError(f"--dist-timeout-s must be finite and > 0, got {timeout}")
    low, high = getattr(config, "sampling_min_tokens", None), getattr(config, "sampling_max_tokens", None)
    if low is not None and high is not None and low > high:
        raise UserError(f"--sampling-min-tokens ({low}) must not exceed --sampling-max-tokens ({high})")
    from cs336_alignment.models import resolve_device

    resolve_device(args.device)


def _check_loop(args: argparse.Namespace):
    name = args.command
    config = args.config = config_from_args(_config_class(name), args)
    _check_numbers(args, config)
    for path in (args.data, args.eval_data):
        if path is not None and not os.path.exists(path):
            raise FileNotFoundError(f"{path} does not exist")
    check_model_flags(args.model, args.basics_run, args.basics_tokenizer)
    args.lora = _lora_config(args)
    if args.lora is not None and getattr(config, "backend", None) == "vllm":
        # vLLM's engine takes plain weights; pushing a wrapped model's state (base + adapters) is not wired up.
        raise UserError("--lora-rank cannot be used with --backend vllm yet (use --backend native)")
    if args.lora is not None and getattr(config, "backend", None) == "auto":
        config.backend = "native"
    if name == "ppo":
        if config.reward == "model" and not args.reward_model:
            raise UserError("--reward model needs --reward-model DIR (the output of `cs336-align reward-model`)")
        if args.reward_model:
            _check_reward_model_dir(args.reward_model)
    _check_run_folder(args)
    if name == "sft" and args.packed and args.resume:
        raise UserError("--packed instruction tuning cannot --resume (start over with --overwrite)")
    return _start_parallel(name, config, args)


def _save_outputs(history: list[dict[str, Any]], policy: Any, tokenizer: Any, args: argparse.Namespace) -> None:
    name = args.command
    if args.lora is not None:
        _save_adapted(policy, tokenizer, args)
    elif args.model and hasattr(policy, "save_pretrained"):
        policy.save_pretrained(os.path.join(args.out_dir, "model"))
        tokenizer.save_pretrained(os.path.join(args.out_dir, "model"))
    if name == "reward-model":
        info = {"model": _absolute(args.model), "basics_run": _absolute(args.basics_run),
                "basics_tokenizer": _absolute(args.basics_tokenizer), "dtype": args.dtype,
                "lora": None if args.lora is None else asdict(args.lora)}
        with open(os.path.join(args.out_dir, REWARD_MODEL_INFO), "w") as f:
            json.dump(info, f, indent=2)
    last = [h for h in history if h.get("kind") == "eval"][-1:] or history[-1:]
    if last:
        print({k: v for k, v in last[0].items() if isinstance(v, int | float | str)})


def _absolute(path: str | None) -> str | None:
    return None if path is None else os.path.abspath(path)


def _save_adapted(model: Any, tokenizer: Any, args: argparse.Namespace) -> None:
    """After a LoRA run: the adapters alone in OUT/adapter/; with full-precision base weights also the merged
    model, as a Hugging Face folder (OUT/model) or a cs336-basics run (OUT/merged/checkpoint.pt) that
    `cs336-align eval` reads. A reward model keeps its checkpoint only (see `load_reward_model`)."""
    import torch

    from cs336_alignment.lm import BasicsCausalLM
    from cs336_alignment.peft import save_adapters, unload_lora
    from cs336_basics.checkpoint import save_checkpoint

    backbone = getattr(model, "backbone", model)
    save_adapters(backbone, os.path.join(args.out_dir, ADAPTER_DIR), args.lora)
    if args.lora.qlora or args.command == "reward-model":
        return
    merged = unload_lora(copy.deepcopy(backbone), merge=True)
    if args.model and hasattr(merged, "save_pretrained"):
        merged.save_pretrained(os.path.join(args.out_dir, "model"))
        tokenizer.save_pretrained(os.path.join(args.out_dir, "model"))
    elif isinstance(merged, BasicsCausalLM):
        core = merged.model
        save_checkpoint(core, torch.optim.SGD(core.parameters(), lr=0.0), 0,
                        os.path.join(args.out_dir, "merged", CHECKPOINT_NAME),
                        extra={"model_config": core.config.to_dict()})


def _train(name: str, config: Any, args: argparse.Namespace, stop: StopRequest, dist: Any = None
           ) -> tuple[list[dict[str, Any]], Any, Any]:
    """Loads data and model and runs loop `name`; while the loop runs, SIGINT/SIGTERM (`stop`) end it after the
    current step, checkpointed (loading is still interrupted at once by Ctrl-C)."""
    from cs336_alignment import training

    flags = {"overwrite": args.overwrite, "stop": stop}
    parallel = {"dist": dist} if name in PARALLEL_LOOPS else {}

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
                       args.resume, **parallel)
    elif name in ("ei", "grpo"):
        train_questions, eval_questions = _questions(args.data), _questions(args.eval_data)
        policy, tokenizer = _load_policy(args)
        if name == "ei":
            history = loop(training.run_expert_iteration, policy, tokenizer, train_questions, config,
                           eval_questions, args.out_dir, args.resume, **parallel)
        else:
            history = loop(training.run_grpo, policy, tokenizer, train_questions, config, eval_questions,
                           args.out_dir, args.resume, model_path=args.model, **parallel)
    elif name == "ppo":
        train_questions, eval_questions = _questions(args.data), _questions(args.eval_data)
        reward_model, reward_tokenizer = load_reward_model(args.reward_model, args.device) if \
            config.reward == "model" else (None, None)
        policy, tokenizer = _load_policy(args)
        history = loop(training.run_ppo, policy, tokenizer, train_questions, config, eval_questions, args.out_dir,
                       args.resume, reward_model=reward_model, reward_tokenizer=reward_tokenizer,
                       model_path=args.model)
    else:
        fields = ("prompt", "chosen", "rejected")
        train_pairs, eval_pairs = _rows(args.data, fields), _rows(args.eval_data, fields)
        policy, tokenizer = _load_policy(args)
        run = {"dpo": training.run_dpo, "orpo": training.run_orpo, "reward-model": training.run_reward_model}[name]
        history = loop(run, policy, tokenizer, train_pairs, config, eval_pairs, args.out_dir, args.resume, **parallel)
    return history, policy, tokenizer
