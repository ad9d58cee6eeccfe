"""Markdown tables and a figure from the serving benchmark's JSON (no GPU, no server needed).

The JSON: `{"env", "workload", "models": [{"name", "info", "points": [...]}]}`, one point per (system,
concurrency) with `output_tokens_per_s`, `ttft_ms`/`itl_ms` percentiles and KV memory (`kv_used_bytes` for the
server: peak blocks x bytes per block; `kv_contiguous_bytes` for every system: what a contiguous pre-allocation
for the same batch would reserve).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from cs336_basics.cli_support import save_figure

SYSTEMS = ("server", "engine", "hf", "nonpaged")
LABELS = {
    "server": "ours: continuous batching, paged KV",
    "engine": "ours: the same engine without HTTP",
    "hf": "HF generate, static batches",
    "nonpaged": "ours: static batches, contiguous KV",
}


def _num(x: Any, fmt: str = ".1f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return format(x, fmt)


def _mib(x: Any) -> str:
    return "—" if x is None else f"{x / 2**20:.3g}"


def markdown(results: dict[str, Any]) -> str:
    env, wl = results.get("env", {}), results.get("workload", {})
    lines = [
        "# Serving benchmark: continuous batching + paged KV vs static batching",
        "",
        f"{env.get('gpu', env.get('device', '?'))}, torch {env.get('torch', '?')}, "
        f"transformers {env.get('transformers', '?')}, {env.get('date', '')}.",
        "",
        f"Workload: seed {wl.get('seed', '?')}, prompt lengths uniform in {wl.get('prompt_len_range', '?')}, output "
        f"lengths uniform in {wl.get('output_len_range', '?')} (`ignore_eos`, greedy), random token-id prompts; "
        f"requests per concurrency {wl.get('num_requests', '?')}, replayed in a closed loop (a new request when one "
        "finishes). The static-batching baselines take the same requests in arrival order in batches of the "
        "concurrency, each decoded for its longest output; only each request's own tokens count. TTFT/ITL of "
        "the baselines are per decoding step from the batch's start. KV used: the server's peak blocks x bytes "
        "per block; contiguous: batch x (longest prompt + longest output) x bytes per token, the largest batch.",
        "",
    ]
    for m in results.get("models", []):
        info = m.get("info", {})
        lines += [
            f"## {m['name']}",
            "",
            f"{info.get('source', '')}; {_num(info.get('parameters', math.nan) / 1e6, '.1f')}M parameters, "
            f"{info.get('dtype', '?')}, context {info.get('context_length', '?')}, KV "
            f"{info.get('kv_bytes_per_token', '?')} bytes/token"
            + (f", block size {info['block_size']}" if info.get("block_size") else "")
            + (f" ({info['note']})" if info.get("note") else "")
            + ".",
            "",
            "| concurrency | system | requests | output tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | "
            "KV used MiB | contiguous KV MiB | note |",
            "|---:|---|---:|---:|---|---|---:|---:|---|",
        ]
        points = sorted(m.get("points", []), key=lambda p: (p["concurrency"], SYSTEMS.index(p["system"])
                                                          if p["system"] in SYSTEMS else 9))
        for p in points:
            if p.get("status", "ok") != "ok":
                lines.append(f"| {p['concurrency']} | {LABELS.get(p['system'], p['system'])} | — | — | — | — | — | — "
                             f"| {p['status']} |")
                continue
            ttft, itl = p.get("ttft_ms", {}), p.get("itl_ms", {})
            note = f"{p['errors']} failed" if p.get("errors") else _step_note(p.get("steps"))
            lines.append(
                f"| {p['concurrency']} | {LABELS.get(p['system'], p['system'])} | {p['num_requests']} | "
                f"{_num(p.get('output_tokens_per_s'), '.0f')} | {_num(ttft.get('p50'))} / {_num(ttft.get('p99'))} | "
                f"{_num(itl.get('p50'), '.2f')} / {_num(itl.get('p99'), '.2f')} | {_mib(p.get('kv_used_bytes'))} | "
                f"{_mib(p.get('kv_contiguous_bytes'))} | {note} |"
            )
        lines.append("")
    return "\n".join(lines)


def _step_note(steps: dict[str, Any] | None) -> str:
    """Where the engine's time went: prefill passes and decode windows, their seconds and average sizes."""
    if not steps:
        return ""
    pre, dec = steps["prefill"], steps["decode"]
    parts = []
    if pre["passes"]:
        parts.append(f"{pre['passes']} prefills, {pre['seconds']:.2f} s, {pre['rows'] / pre['passes']:.0f} tokens each")
    if dec["passes"]:
        parts.append(f"{dec['passes']} decode windows, {dec['seconds']:.2f} s, "
                     f"{1e3 * dec['seconds'] / dec['passes']:.1f} ms each")
    return "; ".join(parts)


def figure(results: dict[str, Any], path: Path) -> bool:
    """Per model: output tokens/s and p99 ITL against concurrency, one line per system. False without points
    (or without matplotlib)."""
    models = [m for m in results.get("models", []) if any(p.get("status", "ok") == "ok" for p in m.get("points", []))]
    if not models:
        return False
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(models), 2, figsize=(10, 3.6 * len(models)), squeeze=False)
    for (ax_tp, ax_itl), m in zip(axes, models, strict=True):
        for i, system in enumerate(SYSTEMS):
            pts = sorted((p["concurrency"], p["output_tokens_per_s"], p.get("itl_ms", {}).get("p99", math.nan))
                         for p in m["points"] if p["system"] == system and p.get("status", "ok") == "ok")
            if not pts:
                continue
            xs = [c for c, _, _ in pts]
            ax_tp.plot(xs, [t for _, t, _ in pts], marker="o", color=f"C{i}", label=LABELS[system])
            ax_itl.plot(xs, [q for _, _, q in pts], marker="o", color=f"C{i}", label=LABELS[system])
        ax_tp.set(title=f"{m['name']}: throughput", xlabel="concurrency", ylabel="output tokens/s")
        ax_itl.set(title=f"{m['name']}: p99 ITL", xlabel="concurrency", ylabel="p99 ITL (ms)")
        levels = sorted({p["concurrency"] for p in m["points"]})
        for ax in (ax_tp, ax_itl):
            ax.set_xscale("log", base=2)
            ax.set_xticks(levels, [str(c) for c in levels])
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
        ax_tp.legend(fontsize=7)
    env = results.get("env", {})
    fig.suptitle(f"Serving: continuous batching vs static batching ({env.get('gpu', env.get('device', ''))})")
    fig.tight_layout()
    save_figure(fig, path)
    return True
