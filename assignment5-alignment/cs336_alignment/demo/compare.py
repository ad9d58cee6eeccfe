"""The head-to-head of the RL methods (`multi methods`): per seed one SFT start, then every method from it with
the same rollout budget; gathered into `a5_methods.json` (per-method, per-seed held-out reward curves, start and
end rewards, budgets, the reward model's held-out pair accuracy), `a5_methods.md` (the table, ± one standard
error across seeds) and `a5_methods_<card>.png` (mean curve and ±1 SE band per method).

Held-out reward is always the rule reward, whatever the method trained on: the curves are the loops' in-loop
evaluations (T=1, the first `n_eval_in_loop` held-out problems, one sampling seed for every evaluation), the
table's start and end the whole held-out set (T=1 and greedy).
"""

import json
import math
import os
import re
import shutil
from typing import Any

from cs336_basics.cli_support import atomic_path, atomic_write, save_figure

NAME = "a5_methods"
LABELS = {"grpo": "GRPO", "gspo": "GSPO", "ppo-rule": "PPO (rule reward)", "ppo-rm": "PPO (reward model)"}


def standard_error(values: list[float]) -> float | None:
    """Sample standard deviation / sqrt(n) (None below two values)."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def summary(values: list[float]) -> dict[str, Any]:
    return {"mean": sum(values) / len(values), "se": standard_error(values), "values": values}


def card_slug(device: str) -> str:
    """"NVIDIA H100 80GB HBM3" -> "h100", "NVIDIA H200" -> "h200", "cpu" -> "cpu"."""
    found = re.search(r"\b([a-z]{1,2}\d{2,4})\b", device.lower())
    return found.group(1) if found else re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") or "unknown"


def per_run(results: dict[str, Any]) -> dict[str, Any]:
    """What the comparison keeps of one (seed, method) run."""
    held = results["heldout"]
    return {
        "curve": [{"step": e["step"], "reward": e["reward"]} for e in results["curves"]["grpo_eval"]],
        "start": held["sft"]["sampled"]["reward"], "end": held["grpo"]["sampled"]["reward"],
        "start_greedy": held["sft"]["greedy"]["reward"], "end_greedy": held["grpo"]["greedy"]["reward"],
        "budget": results["budget"], "reward_model": results.get("reward_model"),
        "stopped_by_guard": results.get("stopped_by_guard", []), "wall_s": results["timings_s"]["total"],
        "drift": drift(results),
    }


def drift(results: dict[str, Any], window: int = 4) -> dict[str, Any]:
    """What a run optimised against what it became: the training reward it was given (the reward model's score
    for ppo-rm, else the rule reward) over its first and last `window` steps, and the held-out format reward and
    response length at start and end. A reward that rises while the held-out rule reward falls is exploitation."""
    train = results["curves"]["grpo_train"]
    given = [r["score_mean"] if r.get("score_mean") is not None else r["reward_mean"] for r in train]
    held = results["heldout"]
    out: dict[str, Any] = {
        "trained_reward_first": sum(given[:window]) / len(given[:window]) if given else None,
        "trained_reward_last": sum(given[-window:]) / len(given[-window:]) if given else None,
        "kl_last": train[-1].get("kl") if train else None,
    }
    for key in ("format_reward", "response_length"):
        out[f"{key}_start"], out[f"{key}_end"] = held["sft"]["sampled"][key], held["grpo"]["sampled"][key]
    return out


def compare(runs: dict[tuple[int, str], dict[str, Any]], seeds: list[int], methods: list[str]) -> dict[str, Any]:
    """The comparison of finished runs keyed by (seed, method); seeds or methods with a missing run are named
    and left out of the means (a method's means use only the seeds it finished)."""
    first = next(iter(runs.values()))
    out: dict[str, Any] = {
        "kind": "methods", "device": first["device"], "card": card_slug(first["device"]), "seeds": seeds,
        "methods": methods, "missing": [f"seed{s}/{m}" for s in seeds for m in methods if (s, m) not in runs],
        "heldout_n": first["heldout"]["n"], "curve_n": first["config"]["n_eval_in_loop"],
        "config": {k: v for k, v in first["config"].items() if k not in ("method", "seed")},
        "budget_rule": "every method: the same number of RL rollout batches of the same number of responses, each "
                       "capped at the same max_new_tokens, from the same SFT start per seed; generated tokens are "
                       "counted per step as mean response length x responses (not equalised: lengths are the "
                       "policy's); the reward model's SFT-policy rollouts (ppo-rm) are counted apart",
        "per_method": {},
    }
    for method in methods:
        done = {s: per_run(runs[(s, method)]) for s in seeds if (s, method) in runs}
        if not done:
            continue
        entry: dict[str, Any] = {"seeds": {str(s): r for s, r in done.items()}}
        for key in ("start", "end", "start_greedy", "end_greedy"):
            entry[key] = summary([r[key] for r in done.values()])
        entry["gain"] = summary([r["end"] - r["start"] for r in done.values()])
        entry["gain_greedy"] = summary([r["end_greedy"] - r["start_greedy"] for r in done.values()])
        steps = sorted(set.intersection(*({p["step"] for p in r["curve"]} for r in done.values())))
        entry["curve_mean"] = []
        for step in steps:
            values = [next(p["reward"] for p in r["curve"] if p["step"] == step) for r in done.values()]
            entry["curve_mean"].append({"step": step, "mean": sum(values) / len(values),
                                        "se": standard_error(values), "n": len(values)})
        accuracies = [r["reward_model"]["heldout_accuracy"] for r in done.values()
                      if r["reward_model"] and r["reward_model"]["heldout_accuracy"] is not None]
        entry["reward_model_heldout_accuracy"] = summary(accuracies) if accuracies else None
        out["per_method"][method] = entry
    out["checks"] = checks(out)
    out["winner"] = winner(out)
    return out


def checks(comparison: dict[str, Any]) -> dict[str, Any]:
    """Whether the comparison is fair as run: one rollout budget for every run, and within each seed every
    method's curve starting from the same held-out reward (the same SFT start, evaluated the same way)."""
    runs = [(int(s), m, r) for m, e in comparison["per_method"].items() for s, r in e["seeds"].items()]
    budgets = {(r["budget"]["rl_steps"], r["budget"]["rollouts"], r["budget"]["max_new_tokens"]) for _, _, r in runs}
    same_start = all(len({(r["curve"][0]["reward"], r["start"], r["start_greedy"]) for s2, _, r in runs if s2 == s})
                     == 1 for s in {s for s, _, _ in runs})
    return {"same_rollout_budget": len(budgets) == 1, "same_start_within_seed": same_start,
            "stopped_by_guard": sorted(f"seed{s}/{m}" for s, m, r in runs if r["stopped_by_guard"])}


def winner(comparison: dict[str, Any]) -> dict[str, Any] | None:
    """The method with the highest mean end reward (whole held-out set, T=1) and its margin over the runner-up,
    with the standard error of the per-seed differences (paired: both start from each seed's one SFT model)."""
    ranked = sorted(comparison["per_method"].items(), key=lambda item: -item[1]["end"]["mean"])
    if not ranked:
        return None
    best, entry = ranked[0]
    result: dict[str, Any] = {"method": best, "end": entry["end"]["mean"], "gain": entry["gain"]["mean"]}
    if len(ranked) > 1:
        second, other = ranked[1]
        seeds = sorted(set(entry["seeds"]) & set(other["seeds"]))
        diffs = [entry["seeds"][s]["end"] - other["seeds"][s]["end"] for s in seeds]
        result.update({"runner_up": second, "margin": sum(diffs) / len(diffs) if diffs else None,
                       "margin_se": standard_error(diffs)})
    return result


def _pm(s: dict[str, Any] | None, signed: bool = False) -> str:
    if s is None:
        return "–"
    value = f"{s['mean']:+.3f}" if signed else f"{s['mean']:.3f}"
    return value + (f" ± {s['se']:.3f}" if s["se"] is not None else "")


def markdown(comparison: dict[str, Any]) -> str:
    c = comparison
    lines = [f"# Assignment 5 demo: GRPO vs GSPO vs PPO (rule reward) vs PPO (reward model), {c['card'].upper()}", "",
             f"Device: {c['device']}; seeds {', '.join(map(str, c['seeds']))}, one SFT start per seed shared by "
             f"every method; held-out reward is the rule reward on {c['heldout_n']} problems (T=1 one sample each, "
             f"and greedy); ± is one standard error across seeds.", "",
             f"Budget: {c['budget_rule']}.", "",
             "| method | RL rollouts | generated tokens | optimizer steps | start, T=1 | end, T=1 | gain, T=1 | "
             "end, greedy | gain, greedy | RM held-out pair accuracy |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for method, e in c["per_method"].items():
        budgets = [r["budget"] for r in e["seeds"].values()]
        tokens = sum(b["generated_tokens"] for b in budgets) / len(budgets)
        lines.append(f"| {LABELS.get(method, method)} | {budgets[0]['rollouts']} | {tokens:,.0f} | "
                     f"{budgets[0]['optimizer_steps']} | {_pm(e['start'])} | {_pm(e['end'])} | "
                     f"**{_pm(e['gain'], True)}** | {_pm(e['end_greedy'])} | {_pm(e['gain_greedy'], True)} | "
                     f"{_pm(e['reward_model_heldout_accuracy'])} |")
    lines += ["", "What each method was given and what it became (means over seeds): the training reward over the "
              "first and last 4 RL steps (the reward model's score for PPO (reward model), else the rule reward), "
              "then the held-out (T=1) format reward and response length at start and end.", "",
              "| method | training reward, first → last | format reward, start → end | response tokens, start → end "
              "| KL to the start (nats per response), last step |", "|---|---:|---:|---:|---:|"]
    for method, e in c["per_method"].items():
        d = [r["drift"] for r in e["seeds"].values() if r.get("drift")]
        if not d:
            continue

        def num(key: str, spec: str, rows: list[dict[str, Any]] = d) -> str:
            value = _mean_of(rows, key)
            return "–" if value is None else format(value, spec)

        lines.append(f"| {LABELS.get(method, method)} | {num('trained_reward_first', '.3f')} → "
                     f"{num('trained_reward_last', '.3f')} | {num('format_reward_start', '.3f')} → "
                     f"{num('format_reward_end', '.3f')} | {num('response_length_start', '.1f')} → "
                     f"{num('response_length_end', '.1f')} | {num('kl_last', '.2f')} |")
    w, k = c["winner"], c["checks"]
    notes = ["", f"Checks: same rollout budget for every run: {'yes' if k['same_rollout_budget'] else 'NO'}; "
             f"every method starts from the same held-out reward within each seed: "
             f"{'yes' if k['same_start_within_seed'] else 'NO'}."]
    if k["stopped_by_guard"]:
        notes.append(f"**Stopped early by the time guard (budgets differ): {', '.join(k['stopped_by_guard'])}.**")
    if c["missing"]:
        notes.append(f"**Missing (failed) runs: {', '.join(c['missing'])}; see their log.txt.**")
    rm = [r["reward_model"] for e in c["per_method"].values() for r in e["seeds"].values() if r["reward_model"]]
    if rm:
        notes.append(f"Reward model (ppo-rm): {rm[0]['rollouts']} SFT-policy rollouts on {rm[0]['questions']} "
                     f"questions per seed, {sum(r['train_pairs'] for r in rm) / len(rm):.0f} training pairs and "
                     f"{sum(r['heldout_pairs'] for r in rm) / len(rm):.0f} held-out pairs (on "
                     f"{rm[0]['heldout_questions']} questions it never trained on) on average"
                     + ("; gold answers added to each group (tiny mode)" if rm[0].get("gold_answers_added") else "")
                     + _fit_note(rm) + ".")
    if w and w.get("runner_up"):
        margin = f"{w['margin']:+.3f}" + (f" ± {w['margin_se']:.3f}" if w["margin_se"] is not None else "")
        notes.append(f"Highest mean end reward (T=1): **{LABELS.get(w['method'], w['method'])}**, {w['end']:.3f}; "
                     f"ahead of {LABELS.get(w['runner_up'], w['runner_up'])} by {margin} (paired over seeds).")
    return "\n".join([*lines, *notes, ""])


def _mean_of(rows: list[dict[str, Any]], key: str) -> float | None:
    """The mean of `key` over the rows that have it, None when none does."""
    values = [r[key] for r in rows if r.get(key) is not None]
    return sum(values) / len(values) if values else None


def _fit_note(rm: list[dict[str, Any]]) -> str:
    """Training-batch against held-out accuracy: a reward model that learned its pairs but not the task is the
    one PPO can exploit."""
    train, held = _mean_of(rm, "train_accuracy_last"), _mean_of(rm, "heldout_accuracy")
    if train is None or held is None:
        return ""
    return f"; pair accuracy on its last training batch {train:.2f}, on the held-out pairs {held:.2f}"


def plot(comparison: dict[str, Any], path: str) -> None:
    """One panel: each method's mean held-out reward curve over RL steps with a ±1 SE band across seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = comparison
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for i, (method, e) in enumerate(c["per_method"].items()):
        steps = [p["step"] for p in e["curve_mean"]]
        mean = [p["mean"] for p in e["curve_mean"]]
        se = [p["se"] or 0.0 for p in e["curve_mean"]]
        ax.plot(steps, mean, "o-", ms=3, color=f"C{i}", label=f"{LABELS.get(method, method)} "
                f"(end {e['end']['mean']:.3f})")
        ax.fill_between(steps, [m - s for m, s in zip(mean, se, strict=True)],
                        [m + s for m, s in zip(mean, se, strict=True)], color=f"C{i}", alpha=0.2, lw=0)
    budget = next(iter(next(iter(c["per_method"].values()))["seeds"].values()))["budget"]
    ax.set_xlabel(f"RL step ({budget['rollouts_per_step']} rollouts each, at most {budget['max_new_tokens']} tokens)")
    ax.set_ylabel(f"held-out rule reward (T=1, {c['curve_n']} problems)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(f"Same SFT start and rollout budget, {len(c['seeds'])} seeds (mean ± 1 SE), {c['card'].upper()}",
                 fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=130)


def write(comparison: dict[str, Any], root: str, fig_dir: str | None = None) -> dict[str, str]:
    """`a5_methods.json`, `a5_methods.md` and `a5_methods_<card>.png` into `root` (the figure also into
    `fig_dir`); returns their paths."""
    paths = {"json": os.path.join(root, f"{NAME}.json"), "md": os.path.join(root, f"{NAME}.md"),
             "png": os.path.join(root, f"{NAME}_{comparison['card']}.png")}
    with atomic_write(paths["json"]) as f:
        json.dump(comparison, f, indent=1, default=float)
    with atomic_write(paths["md"]) as f:
        f.write(markdown(comparison))
    plot(comparison, paths["png"])
    if fig_dir:
        os.makedirs(fig_dir, exist_ok=True)
        paths["fig"] = os.path.join(fig_dir, os.path.basename(paths["png"]))
        with atomic_path(paths["fig"]) as tmp:
            shutil.copy(paths["png"], tmp)
    return paths
