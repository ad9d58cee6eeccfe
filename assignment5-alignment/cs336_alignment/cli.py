"""`cs336-align`: evaluation, the training loops (sft, ei, grpo, dpo, orpo, ppo, reward-model), reward grading
and the packaged prompts."""

import argparse
import json
import os
from dataclasses import dataclass
from typing import Any

from cs336_alignment.cli_inputs import (
    check_model_flags,
    loading,
    model_label,
    require_file,
    values_checked_downstream,
)
from cs336_alignment.evaluation.runner import markdown_table
from cs336_basics.cli_support import (
    OneLineParser,
    UserError,
    bounded,
    check_output,
    check_ranges,
    refuse_overwriting_inputs,
    run_command,
)

PROG = "cs336-align"

TASK_DEFAULTS = {  # (prompt style, temperature, max tokens): MATH samples as the handout says, the rest greedy
    "math": ("r1_zero", 1.0, 1024),
    "gsm8k": ("zero_shot", 0.0, 512),
    "mmlu": ("zero_shot", 0.0, 256),
    "alpaca-eval": ("zero_shot", 0.0, 1024),
    "sst": ("zero_shot", 0.0, 512),
}


@dataclass
class EvalFlags:
    """`cs336-align eval`'s numeric flags and their valid ranges (checked before any model is loaded)."""

    limit: int | None = bounded(None, ge=1)
    temperature: float | None = bounded(None, ge=0)
    top_p: float = bounded(1.0, gt=0, le=1)
    max_tokens: int | None = bounded(None, ge=1)
    min_tokens: int = bounded(0, ge=0)
    n: int = bounded(1, ge=1)
    seed: int | None = bounded(None, ge=0)
    batch_size: int = bounded(16, ge=1)

    def __post_init__(self) -> None:
        check_ranges(self)


def _vllm(model: str, **kwargs: Any):
    """vLLM missing or unusable is the environment's state, not a bug: one line."""
    from cs336_alignment.generation import make_backend

    try:
        return make_backend("vllm", model, **kwargs)
    except (RuntimeError, ImportError) as e:
        raise UserError(f"--backend vllm: {str(e).strip().splitlines()[0] if str(e).strip() else e!r}") from e


def _build_backend(args):
    from cs336_alignment.generation import make_backend

    if args.backend == "vllm":
        if not args.model:
            raise UserError("--backend vllm needs --model (a Hugging Face model directory)")
        return _vllm(args.model, seed=args.seed or 0)
    from cs336_alignment.models import load_model

    with loading(model_label(args.model, args.basics_run)):
        model, tokenizer = load_model(args.model, args.basics_run, args.basics_tokenizer, args.device, args.dtype)
    return make_backend("native", model, tokenizer, batch_size=args.batch_size)


def _build_judge(args):
    from cs336_alignment.generation import make_backend

    if args.judge_backend == "vllm":
        return _vllm(args.judge_model, seed=args.seed or 0)
    from cs336_alignment.models import load_hf

    with loading(f"--judge-model {args.judge_model}"):
        model, tokenizer = load_hf(args.judge_model, args.device, args.dtype)
    return make_backend("native", model, tokenizer, batch_size=args.batch_size)


def _eval_outputs(out: str, task: str) -> list[str]:
    names = [f"{task}_results.jsonl", f"{task}_summary.json", f"{task}_summary.md"]
    if task == "alpaca-eval":
        names.append("alpaca_eval_outputs.json")
    return [os.path.join(out, name) for name in names]


def _check_eval_paths(args) -> None:
    """Data present, an output folder that is a folder, and no output that would overwrite an input."""
    if args.task != "mmlu":  # MMLU also takes a folder of CSVs
        require_file(args.data, "data file")
    elif not os.path.exists(args.data):
        raise FileNotFoundError(f"{args.data} does not exist")
    check_output(args.out, "--out", folder=True)  # a file in the way found now, not after the generation
    outputs = _eval_outputs(args.out, args.task)
    refuse_overwriting_inputs(outputs, [args.data])
    existing = [os.path.basename(path) for path in outputs if os.path.exists(path)]
    if existing and not args.overwrite:
        raise UserError(f"--out {args.out} already holds {', '.join(existing)} of an earlier {args.task} "
                        f"evaluation; pass --overwrite to replace them")


def cmd_eval(args) -> dict:
    from cs336_alignment.evaluation import TASKS
    from cs336_alignment.generation import SamplingParams

    EvalFlags(args.limit, args.temperature, args.top_p, args.max_tokens, args.min_tokens, args.n, args.seed,
              args.batch_size)
    _check_eval_paths(args)  # fail before spending time on loading a model
    if args.backend == "native":
        check_model_flags(args.model, args.basics_run, args.basics_tokenizer)
        from cs336_alignment.models import resolve_device

        resolve_device(args.device)
    if args.judge_model and args.task != "sst":
        raise UserError("--judge-model applies to the sst task only")
    if args.judge_model and args.judge_backend == "native":
        check_model_flags(args.judge_model, None, None, flag="--judge-model")
    style, temperature, max_tokens = TASK_DEFAULTS[args.task]
    with values_checked_downstream("sampling settings"):  # e.g. --min-tokens above --max-tokens
        params = SamplingParams(
            temperature=temperature if args.temperature is None else args.temperature,
            top_p=args.top_p,
            max_tokens=max_tokens if args.max_tokens is None else args.max_tokens,
            min_tokens=args.min_tokens,
            stop=tuple(args.stop or ()),
            n=args.n,
            seed=args.seed,
        )
    backend = _build_backend(args)
    kwargs = {"style": args.style or style, "limit": args.limit}
    if args.judge_model:
        kwargs["judge"] = _build_judge(args)
    with values_checked_downstream(f"cannot evaluate {args.data}"):
        summary = TASKS[args.task](args.data, backend, params, args.out, **kwargs)
    print(markdown_table(summary))
    return summary


def cmd_grade(args) -> dict:
    from cs336_alignment.reward import question_only_reward, r1_zero_reward

    reward = r1_zero_reward if args.reward == "r1_zero" else question_only_reward
    scores = reward(args.response, args.truth)
    print(json.dumps(scores))
    return scores


def cmd_prompt(args) -> str:
    from cs336_alignment.prompts import load_prompt

    text = load_prompt(args.name)
    print(text)
    return text


DTYPES = ("auto", "float32", "bfloat16", "float16")


def build_parser() -> argparse.ArgumentParser:
    from cs336_alignment.prompts import PROMPT_NAMES

    parser = OneLineParser(prog="cs336-align", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("eval", help="generate on an evaluation set and grade it")
    p.add_argument("task", choices=sorted(TASK_DEFAULTS))
    p.add_argument("--data", required=True, help="JSONL/CSV file (MMLU: a CSV or a folder of CSVs)")
    p.add_argument("--out", required=True, help="folder for <task>_results.jsonl and <task>_summary.{json,md}")
    p.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run of this task")
    p.add_argument("--model", help="Hugging Face model directory")
    p.add_argument("--basics-run", help="cs336-basics run directory (config + checkpoint.pt)")
    p.add_argument("--basics-tokenizer", help="folder with the run's vocab.json and merges.txt")
    p.add_argument("--backend", choices=("native", "vllm"), default="native")
    p.add_argument("--style", help="prompt style: r1_zero|question_only (math); zero_shot|alpaca|plain (others)")
    p.add_argument("--limit", type=int, help="evaluate only the first N examples")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--min-tokens", type=int, default=0)
    p.add_argument("--stop", action="append", help="stop string (repeatable; default depends on the style)")
    p.add_argument("--n", type=int, default=1, help="samples per prompt")
    p.add_argument("--seed", type=int)
    p.add_argument("--batch-size", type=int, default=16, help="native backend rows per batch")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=DTYPES, default="auto")
    p.add_argument("--judge-model", help="sst only: Hugging Face directory of an LM that judges safe/unsafe")
    p.add_argument("--judge-backend", choices=("native", "vllm"), default="native")
    p.set_defaults(func=cmd_eval)

    from cs336_alignment.training.commands import add_loop_parsers

    add_loop_parsers(sub)

    p = sub.add_parser("grade", help="score one response with the R1-Zero-style reward")
    p.add_argument("--response", required=True)
    p.add_argument("--truth", required=True)
    p.add_argument("--reward", choices=("r1_zero", "question_only"), default="r1_zero")
    p.set_defaults(func=cmd_grade)

    p = sub.add_parser("prompt", help="print a packaged prompt template")
    p.add_argument("name", choices=PROMPT_NAMES)
    p.set_defaults(func=cmd_prompt)
    return parser


def run(argv: list[str] | None = None):
    """Parses and runs one command; returns its result (summaries for `eval`), for scripts and tests.

    The shared error boundary (`run_command`) turns expected failures into one `cs336-align: error:` line and
    SystemExit(2); a training loop stopped by SIGINT/SIGTERM ends with SystemExit(130/143) after its checkpoint.
    """
    args = build_parser().parse_args(argv)
    result: dict[str, Any] = {}

    def call() -> None:
        result["value"] = args.func(args)

    code = run_command(PROG, call)
    if code:
        raise SystemExit(code)
    return result.get("value")


def main(argv: list[str] | None = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    main()
