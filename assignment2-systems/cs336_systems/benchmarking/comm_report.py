"""Markdown tables and figures for the all-reduce and DDP benchmarks (pure rendering from their JSON)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cs336_basics.cli_support import save_figure


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _header(results: dict[str, Any], title: str) -> list[str]:
    env = results.get("env", {})
    return [f"# {title}", "", f"{env.get('gpu', '?')}, torch {env.get('torch', '?')}, {env.get('date', '')}.", ""]


def allreduce_markdown(results: dict[str, Any]) -> str:
    cfg = results["config"]
    lines = _header(results, "All-reduce benchmark (`cs336-systems bench-allreduce`)")
    lines += [
        f"float32 tensors; {cfg['warmup']} warm-up and {cfg['iters']} timed all-reduces per size; time = slowest "
        "rank per iteration (synchronised), mean ± std. algbw = bytes / time; busbw = algbw × 2(n−1)/n "
        "(ring all-reduce link traffic, comparable across world sizes). 1 MB = 2^20 bytes.",
        "",
        "| backend | world | size MiB | time ms | algbw GB/s | busbw GB/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for run in results["runs"]:
        if run["status"] != "ok":
            lines.append(f"| {run['backend']} | {run['world_size']} | — | {run['status']} | — | — |")
            continue
        for r in run["rows"]:
            lines.append(f"| {run['backend']} | {run['world_size']} | {r['size_mb']:g} | "
                         f"{r['mean_ms']:.3f} ± {r['std_ms']:.3f} | {r['algbw_gbps']:.2f} | {r['busbw_gbps']:.2f} |")
    return "\n".join(lines) + "\n"


def allreduce_figure(results: dict[str, Any], path: Path) -> bool:
    runs = [r for r in results["runs"] if r["status"] == "ok"]
    if not runs:
        return False
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, run in enumerate(runs):
        xs = [r["size_mb"] for r in run["rows"]]
        style = "-" if run["backend"] == "nccl" else "--"
        label = f"{run['backend']} n={run['world_size']}"
        a1.plot(xs, [r["mean_ms"] for r in run["rows"]], style, marker="o", ms=3, color=f"C{i}", label=label)
        a2.plot(xs, [r["busbw_gbps"] for r in run["rows"]], style, marker="o", ms=3, color=f"C{i}", label=label)
    a1.set(xscale="log", yscale="log", xlabel="tensor MiB", ylabel="ms", title="all-reduce time")
    a2.set(xscale="log", yscale="log", xlabel="tensor MiB", ylabel="GB/s", title="bus bandwidth")
    for a in (a1, a2):
        a.grid(alpha=0.3)
    a1.legend(fontsize=7)
    fig.suptitle(f"All-reduce, float32 ({results['env'].get('gpu', '')})")
    fig.tight_layout()
    save_figure(fig, path)
    return True


def _ms(d: dict[str, float]) -> str:
    return f"{d['mean_ms']:.2f} ± {d['std_ms']:.2f}"


def _g(v: float | None) -> str:
    """MiB in, a readable size out (GiB from 1 GiB up)."""
    if v is None:
        return "—"
    return f"{v / 1024:.2f} GiB" if v >= 1024 else f"{v:.2f} MiB"


def ddp_markdown(results: dict[str, Any]) -> str:
    cfg = results["config"]
    lines = _header(results, "DDP benchmark (`cs336-systems bench-ddp`)")
    lines += [
        f"Model {cfg['size']} ({results.get('n_params', 0) / 1e6:.1f}M parameters), context {cfg['context']}, "
        f"batch {cfg['batch_size']} per rank, {cfg['precision']}, {cfg['backend']} × {cfg['world_size']} ranks; "
        f"{cfg['warmup']} warm-up and {cfg['steps']} timed steps, per step the slowest rank, mean ± std ms. "
        "Phases are timed by CUDA events on the compute stream (host timers on CPU), so they add no "
        "synchronisation. *exposed comm* = end of backward → end of `finish_gradient_synchronization`; "
        "*comm alone* = the same collectives back to back with nothing to overlap; *hidden* = 1 − exposed / alone; "
        "*overhead* = step time − the no-communication step.",
        "",
    ]
    if results.get("status", "ok") != "ok":
        lines += [f"Run failed: {results['status']}", ""]
    lines += ["| variant | step ms | forward | backward | exposed comm | share of step | optimizer | comm alone | "
              "hidden | overhead |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for v in results.get("variants", []):
        if v.get("status") != "ok":
            lines.append(f"| {v['label']} | {v.get('status')} |  |  |  |  |  |  |  |  |")
            continue
        hidden = "—" if v["hidden_share"] is None else f"{100 * v['hidden_share']:.0f}%"
        overhead = f"{v['overhead_vs_none_ms']:.2f}" if "overhead_vs_none_ms" in v else "—"
        lines.append(f"| {v['label']} | {_ms(v['total'])} | {v['forward']['mean_ms']:.2f} | "
                     f"{v['backward']['mean_ms']:.2f} | {v['grad_sync']['mean_ms']:.2f} | "
                     f"{100 * v['grad_sync']['mean_ms'] / v['total']['mean_ms']:.0f}% | "
                     f"{v['optimizer']['mean_ms']:.2f} | {v['comm_alone_ms']:.2f} | {hidden} | {overhead} |")
    mem = results.get("memory", [])
    if mem:
        lines += ["", "## Memory per rank", "",
                  "After init = `torch.cuda.memory_allocated` once the model is wrapped and the optimizer made "
                  "(FSDP has by then freed the full weights it was built with); peaks = "
                  "`torch.cuda.max_memory_allocated` since then, just before and just after the optimizer step "
                  "(over two steps). Held = bytes in this rank's parameters, gradients "
                  "and optimizer state; theory = fp32 parameters + gradients + two AdamW moments, divided by the "
                  "world size where the setup shards them (ZeRO-1: optimizer state; FSDP: all three).", "",
                  "| setup | rank | after init | peak before step | peak after step | params held / theory | "
                  "grads held / theory | opt. state held / theory | total held / theory |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for m in mem:
            if m.get("status") != "ok":
                lines.append(f"| {m['setup']} | {m['rank']} | {m.get('status')} |  |  |  |  |  |  |")
                continue
            t = m["theory_mib"]
            held = m["params_mib"] + m["grads_mib"] + m["optimizer_state_mib"]
            lines.append(
                f"| {m['setup']} | {m['rank']} | {_g(m['after_init_mib'])} | {_g(m['before_step_peak_mib'])} | "
                f"{_g(m['after_step_peak_mib'])} | {_g(m['params_mib'])} / {_g(t['params'])} | "
                f"{_g(m['grads_mib'])} / {_g(t['grads'])} | {_g(m['optimizer_state_mib'])} / "
                f"{_g(t['optimizer_state'])} | {_g(held)} / {_g(t['total'])} |")
    return "\n".join(lines) + "\n"


def ddp_figure(results: dict[str, Any], path: Path) -> bool:
    """Stacked phases per variant (exposed communication in red) and the hidden share."""
    rows = [v for v in results.get("variants", []) if v.get("status") == "ok"]
    if not rows:
        return False
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    labels = [v["label"] for v in rows]
    bottom = [0.0] * len(rows)
    colors = {"forward": "C0", "backward": "C2", "grad_sync": "C3", "optimizer": "C1"}
    names = {"forward": "forward", "backward": "backward", "grad_sync": "exposed comm", "optimizer": "optimizer"}
    for phase in ("forward", "backward", "grad_sync", "optimizer"):
        vals = [v[phase]["mean_ms"] for v in rows]
        a1.bar(labels, vals, bottom=bottom, color=colors[phase], label=names[phase])
        bottom = [b + x for b, x in zip(bottom, vals, strict=True)]
    a1.set(ylabel="ms per step", title="step phases (slowest rank)")
    a1.legend(fontsize=7)
    a1.tick_params(axis="x", rotation=45, labelsize=7)
    hid = [(v["label"], 100 * v["hidden_share"]) for v in rows if v["hidden_share"] is not None]
    if hid:
        a2.bar([h[0] for h in hid], [h[1] for h in hid], color="C4")
        a2.axhline(90, color="k", lw=0.8, ls="--")
    a2.set(ylabel="% of communication hidden", ylim=(0, 100), title="hidden behind backward")
    a2.tick_params(axis="x", rotation=45, labelsize=7)
    cfg = results["config"]
    fig.suptitle(f"DDP, {cfg['size']} ctx {cfg['context']}, {cfg['backend']} × {cfg['world_size']} "
                 f"({results['env'].get('gpu', '')})")
    fig.tight_layout()
    save_figure(fig, path)
    return True
