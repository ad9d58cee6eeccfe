"""The five evaluations: prompts, sampling defaults and grading per task, on top of `runner.evaluate`."""

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

from cs336_alignment.evaluation import datasets
from cs336_alignment.evaluation.runner import evaluate, write_outputs
from cs336_alignment.evaluation.safety import looks_like_refusal, parse_verdict
from cs336_alignment.generation import GenerationBackend, SamplingParams
from cs336_alignment.parsing import numbers_equal, parse_gsm8k_response, parse_mmlu_response
from cs336_alignment.prompts import alpaca_prefix, format_prompt
from cs336_alignment.reward import question_only_reward, r1_zero_reward
from cs336_basics.cli_support import UserError, atomic_write

ChatStyle = Literal["zero_shot", "alpaca", "plain"]
CHAT_STYLES = ("zero_shot", "alpaca", "plain")
MATH_STYLES = ("r1_zero", "question_only")


def wrap_instruction(text: str, style: ChatStyle) -> str:
    """The base model's zero-shot system prompt, the SFT model's Alpaca template, or nothing."""
    if style == "zero_shot":
        return format_prompt("zero_shot_system", instruction=text)
    if style == "alpaca":
        return alpaca_prefix(text)
    if style == "plain":
        return text
    raise UserError(f"unknown prompt style {style!r}; expected one of {CHAT_STYLES}")


def default_stops(style: str) -> tuple[str, ...]:
    """Where a well-behaved completion ends: after the answer tag, or where the next chat turn would start."""
    return {"r1_zero": ("</answer>",), "zero_shot": ("# Query:",)}.get(style, ())


def _params(params: SamplingParams, style: str) -> SamplingParams:
    from dataclasses import replace

    stops = params.stop or default_stops(style)
    include = params.include_stop_str_in_output or style == "r1_zero"
    return replace(params, stop=stops, include_stop_str_in_output=include)


def eval_math(data: str, backend: GenerationBackend, params: SamplingParams, out_dir: str, style: str = "r1_zero",
              limit: int | None = None) -> dict[str, Any]:
    """MATH-style: R1-Zero prompt and reward (format, answer, total) or the bare question with \\boxed{}."""
    if style not in MATH_STYLES:
        raise UserError(f"unknown math prompt style {style!r}; expected one of {MATH_STYLES}")
    examples = datasets.load_math(data)[:limit]
    prompts = [format_prompt(style, question=ex["question"]) for ex in examples]
    reward = r1_zero_reward if style == "r1_zero" else question_only_reward

    def grade(ex: dict[str, Any], response: str) -> dict[str, Any]:
        return {"answer": ex["answer"], **reward(response, ex["answer"])}

    summary, records = evaluate("math", examples, prompts, grade, backend, _params(params, style), out_dir)
    categories = defaultdict(int)
    for r in records:
        categories[f"format={int(r['format_reward'])},answer={int(r['answer_reward'])}"] += 1
    summary["categories"] = dict(categories)
    write_outputs(out_dir, "math", summary)
    return summary


def eval_gsm8k(data: str, backend: GenerationBackend, params: SamplingParams, out_dir: str,
               style: ChatStyle = "zero_shot", limit: int | None = None) -> dict[str, Any]:
    """GSM8K: "{question}\\nAnswer:" (in the chosen chat wrapper); the last number in the output is graded."""
    examples = datasets.load_gsm8k(data)[:limit]
    prompts = [wrap_instruction(format_prompt("gsm8k", question=ex["question"]), style) for ex in examples]

    def grade(ex: dict[str, Any], response: str) -> dict[str, Any]:
        parsed = parse_gsm8k_response(response)
        return {"answer": ex["answer"], "parsed": parsed, "parse_failed": parsed is None,
                "correct": numbers_equal(parsed, ex["answer"])}

    summary, _ = evaluate("gsm8k", examples, prompts, grade, backend, _params(params, style), out_dir)
    return summary


def eval_mmlu(data: str, backend: GenerationBackend, params: SamplingParams, out_dir: str,
              style: ChatStyle = "zero_shot", limit: int | None = None) -> dict[str, Any]:
    """MMLU: the letter-answer prompt; the parsed letter is compared with the gold one; per-subject accuracy."""
    examples = datasets.load_mmlu(data)[:limit]
    prompts = [
        wrap_instruction(format_prompt(
            "mmlu", subject=ex["subject"], question=ex["question"], option_a=ex["options"][0],
            option_b=ex["options"][1], option_c=ex["options"][2], option_d=ex["options"][3],
        ), style)
        for ex in examples
    ]

    def grade(ex: dict[str, Any], response: str) -> dict[str, Any]:
        parsed = parse_mmlu_response(ex, response)
        return {"answer": ex["answer"], "parsed": parsed, "parse_failed": parsed is None,
                "correct": parsed == ex["answer"]}

    summary, records = evaluate("mmlu", examples, prompts, grade, backend, _params(params, style), out_dir,
                                record_fields=lambda ex: {"subject": ex["subject"]})
    per_subject: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        per_subject[r["subject"]].append(r["correct"])
    summary["per_subject_accuracy"] = {s: sum(v) / len(v) for s, v in sorted(per_subject.items())}
    write_outputs(out_dir, "mmlu", summary)
    return summary


def eval_alpaca(data: str, backend: GenerationBackend, params: SamplingParams, out_dir: str,
                style: ChatStyle = "zero_shot", limit: int | None = None, generator: str = "cs336-model") -> dict:
    """AlpacaEval: generate for each instruction; also writes the JSON array the `alpaca_eval` judge reads."""
    examples = datasets.load_instructions(data)[:limit]
    prompts = [wrap_instruction(ex["instruction"], style) for ex in examples]

    def grade(ex: dict[str, Any], response: str) -> dict[str, Any]:
        return {"empty_output": not response.strip()}

    summary, records = evaluate("alpaca_eval", examples, prompts, grade, backend, _params(params, style), out_dir,
                                record_fields=lambda ex: {"instruction": ex["instruction"]})
    judged = [
        {"instruction": examples[r["index"]]["instruction"], "output": _clean(r["response"]), "generator": generator,
         "dataset": examples[r["index"]].get("dataset", "unknown")}
        for r in records if r["sample"] == 0
    ]
    with atomic_write(Path(out_dir) / "alpaca_eval_outputs.json", encoding="utf-8") as f:
        f.write(json.dumps(judged, indent=1) + "\n")
    return summary


def eval_safety(data: str, backend: GenerationBackend, params: SamplingParams, out_dir: str,
                style: ChatStyle = "zero_shot", limit: int | None = None,
                judge: GenerationBackend | None = None) -> dict[str, Any]:
    """SimpleSafetyTests-style: per-example `prompts_final`/`output` (the course judge's input) plus a refusal
    heuristic, `refusal_rate_heuristic` (a keyword check). With a `judge` backend (e.g. a large instruct model),
    each pair is also judged with our safety-judge prompt: `judged_safe` per example, `safe_rate_judge` overall
    (unparseable verdicts count as unsafe and are counted in `judge_unparsed`)."""
    examples = datasets.load_safety_prompts(data)[:limit]
    prompts = [wrap_instruction(ex["prompts_final"], style) for ex in examples]

    def grade(ex: dict[str, Any], response: str) -> dict[str, Any]:
        return {"output": _clean(response), "refusal_rate_heuristic": looks_like_refusal(response)}

    summary, records = evaluate("sst", examples, prompts, grade, backend, _params(params, style), out_dir,
                                record_fields=lambda ex: {"prompts_final": ex["prompts_final"]})
    if judge is not None:
        judge_prompts = [format_prompt("safety_judge", instruction=r["prompts_final"], response=r["output"])
                         for r in records]
        verdicts = judge.generate(judge_prompts, SamplingParams(temperature=0.0, max_tokens=8, stop=("\n",)))
        for record, verdict in zip(records, verdicts, strict=True):
            safe = parse_verdict(verdict.text)
            record.update(judge_output=verdict.text, judged_safe=bool(safe), judge_unparsed=safe is None)
        summary["safe_rate_judge"] = sum(r["judged_safe"] for r in records) / len(records)
        summary["judge_unparsed"] = sum(r["judge_unparsed"] for r in records)
        write_outputs(out_dir, "sst", summary, records)
    return summary


def _clean(response: str) -> str:
    """Drops the code fence the zero-shot system prompt opens, so judges see only the answer."""
    return response.strip().removesuffix("```").strip()


TASKS = {"math": eval_math, "gsm8k": eval_gsm8k, "mmlu": eval_mmlu, "alpaca-eval": eval_alpaca, "sst": eval_safety}
