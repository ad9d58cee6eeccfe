"""Figures and the markdown summary of a demo run (matplotlib imported only here, with the Agg backend)."""

import os
from typing import Any

from cs336_basics.cli_support import save_figure


def plot_curves(results: dict[str, Any], out_dir: str) -> list[str]:
    """`a5_demo_reward.png` (held-out and rollout reward over GRPO steps, SFT start marked) and
    `a5_demo_entropy_length.png` (token entropy and response length over GRPO steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = results["curves"]["grpo_train"]
    evals = results["curves"]["grpo_eval"]
    held = results["heldout"]
    name = _method_name(results)
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4.2))
    if evals:
        ax.plot([e["step"] for e in evals], [e["reward"] for e in evals], "o-", label="held-out reward (T=1, in loop)")
        ax.plot([e["step"] for e in evals], [e["format_reward"] for e in evals], "s--", alpha=0.6,
                label="held-out format reward")
    if train:
        ax.plot([r["step"] for r in train], [r["reward_mean"] for r in train], alpha=0.4,
                label="rollout reward (training batch)")
    last = train[-1]["step"] if train else 0
    for kind, style in (("sampled", "tab:red"), ("greedy", "tab:green")):
        ax.scatter([0, last], [held["sft"][kind]["reward"], held["grpo"][kind]["reward"]], color=style, zorder=5,
                   marker="D", label=f"held-out {kind} (n={held['n']}): SFT start vs {name} end")
    ax.set_xlabel(f"{name} step")
    ax.set_ylabel("reward")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("R1-Zero-style reward, arithmetic word problems (step 0 = SFT model)")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "a5_demo_reward.png"))
    save_figure(fig, paths[-1], dpi=130)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
    if train:
        a1.plot([r["step"] for r in train], [r["token_entropy"] for r in train], label="rollouts (training)")
        a2.plot([r["step"] for r in train], [r["response_length"] for r in train], label="rollouts (training)")
    if evals:
        a1.plot([e["step"] for e in evals], [e["mean_token_entropy"] for e in evals], "o-", label="held-out")
        a2.plot([e["step"] for e in evals], [e["response_length"] for e in evals], "o-", label="held-out")
    a1.set_title("mean response-token entropy (nats)")
    a2.set_title("response length (tokens)")
    for a in (a1, a2):
        a.set_xlabel(f"{name} step")
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "a5_demo_entropy_length.png"))
    save_figure(fig, paths[-1], dpi=130)
    return paths


def _method_name(results: dict[str, Any]) -> str:
    """The RL stage's method as the figures and summary name it (runs from before the switch are GRPO)."""
    return {"grpo": "GRPO", "gspo": "GSPO", "ppo-rule": "PPO (rule)", "ppo-rm": "PPO (reward model)"}.get(
        results.get("method", "grpo"), "GRPO")


def _details(results: dict[str, Any]) -> str:
    c, method = results["config"], results.get("method", "grpo")
    if method == "grpo":
        return c["loss_type"]
    if method == "gspo":
        return f"gspo, clip {c['gspo_cliprange']:g}"
    reward = "reward model" if method == "ppo-rm" else "rule reward"
    return f"KL coef {c['ppo_kl_coef']:g}, λ {c['ppo_lam']:g}, {reward}"


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _pm(summary: dict[str, Any]) -> str:
    se = summary.get("reward_se")
    return _fmt(summary["reward"]) + (f" ± {se:.3f}" if se is not None else "")


def markdown_summary(results: dict[str, Any]) -> str:
    held = results["heldout"]
    name = _method_name(results)
    rows = ["| model | held-out reward (T=1) | format reward (T=1) | greedy reward | entropy | length |",
            "|---|---|---|---|---|---|"]
    for stage in ("sft", "grpo"):
        s, g = held[stage]["sampled"], held[stage]["greedy"]
        rows.append(f"| {'SFT start' if stage == 'sft' else name + ' end'} | {_pm(s)} | "
                    f"{_fmt(s['format_reward'])} | {_pm(g)} | {_fmt(s['mean_token_entropy'])} | "
                    f"{_fmt(s['response_length'])} |")
    tp = results["native_throughput"]
    guard = results.get("stopped_by_guard") or []
    pretrain = results["pretrain"]
    lines = [
        f"# Assignment 5 demo: pretrain -> SFT -> {name} on generated arithmetic word problems", "",
        f"Device: {results['device']}; seed {results['config']['seed']}; model "
        f"{results['model']['parameters'] / 1e6:.1f}M parameters (d_model {results['model']['d_model']}, "
        f"{results['model']['num_layers']} layers), vocab {results['tokenizer_vocab']}.", "",
        f"Pretraining: {pretrain['steps']} steps, {pretrain['tokens'] / 1e6:.1f}M tokens at "
        f"{pretrain['tokens_per_s'] / 1e3:.0f}k tokens/s. SFT: {results['sft_steps_run']} steps. "
        f"{name}: {results['grpo_steps_run']} steps (lr {results['config']['grpo_lr']:g}, {_details(results)})."
        + (f" Started from {results['started_from']}." if results.get("started_from") else ""), "",
        *([f"Reward model: {rm['train_pairs']} training pairs from {rm['rollouts']} SFT rollouts scored by the rule "
           f"reward; held-out pair accuracy {_fmt(rm['heldout_accuracy'])} on {rm['heldout_pairs']} pairs.", ""]
          if (rm := results.get("reward_model")) else []),
        *([f"**Stopped early by the time guard: {', '.join(guard)}.**", ""] if guard else []),
        f"Held-out set: {held['n']} problems; ± is one standard error.", "",
        *rows, "",
        f"Gain (held-out, paired): T=1 {results['reward_gain_sampled']:+.3f} ± "
        f"{results['reward_gain_sampled_se'] or 0:.3f}; greedy {results['reward_gain_greedy']:+.3f} ± "
        f"{results['reward_gain_greedy_se'] or 0:.3f}.", "",
        f"Native backend (KV cache) throughput: {tp['tokens_per_s']:.0f} tokens/s ({tp['rows']} rows x "
        f"{tp['new_tokens_per_row']} new tokens, {tp['decode_steps_per_s']:.1f} decoding steps/s); mean during "
        f"{name} rollouts: {_fmt(results['rollout_tokens_per_s_mean'])} tokens/s.", "",
        "Stage wall times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in results["timings_s"].items()), "",
    ]
    return "\n".join(lines)
