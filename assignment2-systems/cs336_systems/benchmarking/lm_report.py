"""Markdown tables and a figure from `bench-model` results (pure rendering: no GPU, no timing)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cs336_basics.cli_support import save_figure

MODE_LABELS = {"forward": "forward", "forward_backward": "fwd+bwd", "train_step": "train step"}


def _cell(r: dict[str, Any] | None) -> str:
    if r is None:
        return "—"
    if r.get("status") != "ok":
        return str(r.get("status", "?")).split(":")[0]
    return f"{r['mean_ms']:.2f} ± {r['std_ms']:.2f}"


def _mem(r: dict[str, Any] | None) -> str:
    if r is None or r.get("status") != "ok" or "peak_allocated_mib" not in r:
        return "—"
    return f"{r['peak_allocated_mib'] / 1024:.2f}"


def _order(row: dict[str, Any]) -> tuple:
    """Table order: model size as in the handout, then context, precision, compile mode."""
    from cs336_systems.benchmarking.model_sizes import MODEL_SIZES

    sizes = list(MODEL_SIZES)
    return (sizes.index(row["size"]) if row["size"] in sizes else len(sizes), row["context"], row["precision"],
            row["compile"])


def markdown(results: dict[str, Any]) -> str:
    env, cfg = results["env"], results["config"]
    modes = cfg["modes"]
    lines = [
        "# Language-model benchmark (`cs336-systems bench-model`)",
        "",
        f"{env.get('gpu', '?')}, torch {env.get('torch', '?')}, {env.get('date', '')}. Batch {cfg['batch_size']}, "
        f"vocab {cfg['vocab_size']}, {cfg['warmup']} warm-up steps, mean ± std over {cfg['steps']} synchronised "
        "steps, milliseconds. Backward ≈ fwd+bwd − forward; optimizer ≈ train step − fwd+bwd (AdamW). "
        f"Forward runs with autograd {'off' if cfg.get('forward_no_grad') else 'on'}. Peak memory: "
        "`torch.cuda.max_memory_allocated` over the measured steps, GiB.",
        "",
        "| size | params | context | precision | compile | "
        + " | ".join(f"{MODE_LABELS[m]} ms" for m in modes)
        + " | backward ms | optimizer ms | "
        + " | ".join(f"peak GiB {MODE_LABELS[m]}" for m in modes)
        + " |",
        "|---|---:|---:|---|---|" + "---:|" * (2 * len(modes) + 2),
    ]
    for row in sorted(results["rows"], key=_order):
        m = row["modes"]
        params = f"{row['params'] / 1e6:.0f}M" if "params" in row else "—"
        bwd = f"{row['backward_ms']:.2f}" if "backward_ms" in row else "—"
        opt = f"{row['optimizer_ms']:.2f}" if "optimizer_ms" in row else "—"
        lines.append(
            f"| {row['size']} | {params} | {row['context']} | {row['precision']} | {row['compile']} | "
            + " | ".join(_cell(m.get(k)) for k in modes)
            + f" | {bwd} | {opt} | "
            + " | ".join(_mem(m.get(k)) for k in modes)
            + " |"
        )
    warm = [
        (row, mode, r["warmup_ms"])
        for row in results["rows"] for mode, r in row["modes"].items()
        if r.get("status") == "ok" and r.get("warmup_ms")
    ]
    if warm:
        lines += ["", "## Warm-up steps (ms, in order) against the measured mean", "",
                  "| point | mode | warm-up steps | measured mean |", "|---|---|---|---:|"]
        for row, mode, w in warm:
            lines.append(f"| {row['size']} ctx{row['context']} {row['precision']} {row['compile']} | "
                         f"{MODE_LABELS[mode]} | {', '.join(f'{t:.1f}' for t in w)} | "
                         f"{row['modes'][mode]['mean_ms']:.2f} |")
    snaps = [r["memory_snapshot"] for row in results["rows"] for r in row["modes"].values() if "memory_snapshot" in r]
    if snaps:
        lines += ["", "Memory-history snapshots (open at https://pytorch.org/memory_viz):", ""]
        lines += [f"- `{Path(s).name}`" for s in snaps]
    return "\n".join(lines) + "\n"


def figure(results: dict[str, Any], path: Path) -> bool:
    """Mean step time against context length, one panel per mode, a line per (size, precision, compile)."""
    rows = [r for r in results["rows"] if any(v.get("status") == "ok" for v in r["modes"].values())]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = results["config"]["modes"]
    fig, axes = plt.subplots(1, len(modes), figsize=(4.5 * len(modes), 3.8), squeeze=False)
    series = list(dict.fromkeys((r["size"], r["precision"], r["compile"]) for r in rows))
    sizes = list(dict.fromkeys(s[0] for s in series))
    styles = {("fp32", "eager"): "-", ("bf16", "eager"): "--", ("fp32", "compiled"): ":", ("bf16", "compiled"): "-."}
    for ax, mode in zip(axes[0], modes, strict=True):
        for size, prec, comp in series:
            pts = sorted((r["context"], r["modes"][mode]["mean_ms"]) for r in rows
                         if (r["size"], r["precision"], r["compile"]) == (size, prec, comp)
                         and r["modes"].get(mode, {}).get("status") == "ok")
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", ms=3, color=f"C{sizes.index(size)}",
                        linestyle=styles[(prec, comp)], label=f"{size} {prec} {comp}")
        ax.set(xscale="log", yscale="log", title=MODE_LABELS[mode], xlabel="context length", ylabel="ms per step")
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.suptitle(f"cs336_basics LM, batch {results['config']['batch_size']} ({results['env'].get('gpu', '')})")
    fig.tight_layout()
    save_figure(fig, path)
    return True
