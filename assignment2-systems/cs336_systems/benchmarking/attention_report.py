"""Markdown tables and a figure from the JSON that `benchmarking.attention` writes (no GPU needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cs336_basics.cli_support import save_figure

LABELS = {
    "triton": "ours, Triton",
    "fa3": "ours, Hopper (Gluon forward)",
    "triton_tma": "ours, Triton (TMA-reduced dQ)",
    "triton_concurrent": "ours, Triton (two-stream backward)",
    "triton_atomic": "ours, Triton (atomic dQ)",
    "pytorch_fa2": "ours, PyTorch",
    "naive": "naive PyTorch",
    "sdpa_flash": "SDPA flash",
    "sdpa_cudnn": "SDPA cuDNN",
    "sdpa_efficient": "SDPA efficient",
}


OURS = ("triton", "fa3", "triton_tma", "triton_concurrent", "triton_atomic")  # the GPU kernels (not the PyTorch twin)
SDPA = ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient")
PASSES = {"fwd": "forward", "bwd": "backward", "fwd_bwd": "forward+backward"}


def ratios_to_best_sdpa(grid: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per grid point, pass and one of our implementations: its time ÷ the fastest SDPA backend's at that point
    and pass (which backend that was), where both ran."""
    out = []
    points = dict.fromkeys((r["dtype"], r["d"], r["seq"]) for r in grid)
    for dtype, d, seq in points:
        here = {r["impl"]: r for r in grid if (r["dtype"], r["d"], r["seq"]) == (dtype, d, seq)
                and r.get("status") == "ok"}
        for key in PASSES:
            sdpa = {name: here[name][key] for name in SDPA if name in here}
            if not sdpa:
                continue
            best = min(sdpa, key=sdpa.get)
            for impl in OURS:
                if impl in here:
                    out.append({"dtype": dtype, "d": d, "seq": seq, "pass": key, "impl": impl,
                                "ratio": here[impl][key] / sdpa[best], "best_sdpa": best})
    return out


def _ratio_markdown(ratios: list[dict[str, Any]]) -> list[str]:
    impls = [i for i in OURS if any(r["impl"] == i for r in ratios)]
    lines = ["## Ours ÷ the fastest SDPA backend at each point (below 1: ours is faster)", "",
             "Cells: forward / backward / forward+backward; the fastest backend of forward+backward in brackets.", ""]
    for dtype in dict.fromkeys(r["dtype"] for r in ratios):
        lines += [f"### {dtype}", "", "| d | seq | " + " | ".join(LABELS.get(i, i) for i in impls) + " |",
                  "|---:|---:|" + "---|" * len(impls)]
        for d, seq in dict.fromkeys((r["d"], r["seq"]) for r in ratios if r["dtype"] == dtype):
            cells = []
            for impl in impls:
                mine = {r["pass"]: r for r in ratios
                        if (r["dtype"], r["d"], r["seq"], r["impl"]) == (dtype, d, seq, impl)}
                if not mine:
                    cells.append("—")
                    continue
                parts = " / ".join(f"{mine[k]['ratio']:.2f}" if k in mine else "—" for k in PASSES)
                best = mine.get("fwd_bwd", {}).get("best_sdpa", "")
                cells.append(f"{parts} [{best.removeprefix('sdpa_')}]" if best else parts)
            lines.append(f"| {d} | {seq} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _cell(row: dict[str, Any], key: str) -> str:
    return f"{row[key]:.3f}" if row.get("status") == "ok" else "—"


def _status_note(row: dict[str, Any]) -> str:
    s = row.get("status", "")
    return "" if s == "ok" else s.split(":")[0]


def markdown(results: dict[str, Any]) -> str:
    env = results.get("env", {})
    lines = [
        "# FlashAttention-2 benchmark",
        "",
        f"{env.get('gpu', '?')}, torch {env.get('torch', '?')}, Triton {env.get('triton', '?')}, "
        f"{env.get('date', '')}. Median of `triton.testing.do_bench` runs, milliseconds; backward = "
        "`torch.autograd.grad` on a retained graph; forward runs with autograd on.",
        "",
    ]
    if "autotune" in results:
        bench = results.get("do_bench_ms", {})
        lines += [
            f"Our Triton tiles: {'autotuned' if results['autotune'] else 'first config of each list (no autotuning)'};"
            f" grid do_bench warm-up {bench.get('warmup', '?')} ms, repetitions {bench.get('rep', '?')} ms"
            " (leaderboard: 100 / 1000 ms).",
            "",
        ]
    lb = results.get("leaderboard")
    if lb:
        s = lb["shape"]
        lines += [
            f"## Leaderboard shape: batch {s['batch']}, {s['heads']} heads, seq {s['seq']}, d_head {s['d']}, "
            f"{s['dtype']}, causal={s['causal']}",
            "",
            "| implementation | forward ms | backward ms | forward+backward ms | fwd+bwd TFLOP/s | note |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for row in lb["rows"]:
            tf = f"{row['tflops']['fwd_bwd']:.0f}" if "tflops" in row else "—"
            lines.append(
                f"| {LABELS.get(row['impl'], row['impl'])} | {_cell(row, 'fwd')} | {_cell(row, 'bwd')} | "
                f"{_cell(row, 'fwd_bwd')} | {tf} | {_status_note(row)} |"
            )
        harness = {k: v for k, v in lb.items() if k.startswith("course_harness_ms")}
        if harness:
            lines += ["", "Course leaderboard harness (`torch.compile(apply)`, 3-D (16, 16384, 64), "
                      "`o.sum().backward()`):", ""]
            for key, val in harness.items():
                impl = key.removeprefix("course_harness_ms").removeprefix("_") or "triton"
                val = f"{val:.3f} ms" if isinstance(val, float) else val
                lines.append(f"- {LABELS.get(impl, impl)}: {val}")
        if lb.get("checks"):
            lines += ["", "Agreement on fresh inputs (relative Frobenius error, bf16):", ""]
            for name, errs in lb["checks"].items():
                parts = ", ".join(f"{k} {v:.1e}" for k, v in errs.items() if not k.endswith("_finite"))
                lines.append(f"- {name}: {parts}")
        lines.append("")
    grid = results.get("grid")
    if grid:
        impls = list(dict.fromkeys(r["impl"] for r in grid))
        lines += [
            f"## Grid ({results.get('grid_name', '')}): batch 1, one head, causal; cells are forward / backward / "
            "forward+backward ms",
            "",
        ]
        for dtype in dict.fromkeys(r["dtype"] for r in grid):
            lines += [
                f"### {dtype}",
                "",
                "| d | seq | " + " | ".join(LABELS.get(i, i) for i in impls) + " |",
                "|---:|---:|" + "---|" * len(impls),
            ]
            keys = list(dict.fromkeys((r["d"], r["seq"]) for r in grid if r["dtype"] == dtype))
            for d, seq in keys:
                cells = []
                for impl in impls:
                    row = next((r for r in grid
                                if r["dtype"] == dtype and r["d"] == d and r["seq"] == seq and r["impl"] == impl), {})
                    if row.get("status") == "ok":
                        cells.append(f"{row['fwd']:.3g} / {row['bwd']:.3g} / {row['fwd_bwd']:.3g}")
                    else:
                        cells.append(_status_note(row) or "—")
                lines.append(f"| {d} | {seq} | " + " | ".join(cells) + " |")
            lines.append("")
        ratios = ratios_to_best_sdpa(grid)
        if ratios:
            lines += _ratio_markdown(ratios)
    return "\n".join(lines)


def figure(results: dict[str, Any], path: Path) -> bool:
    """Forward+backward time against sequence length, one panel per (dtype, d); False when there is no grid."""
    grid = results.get("grid")
    if not grid:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["dtype"], r["d"]) for r in grid))
    dtypes = list(dict.fromkeys(p[0] for p in panels))
    dims = list(dict.fromkeys(p[1] for p in panels))
    fig, axes = plt.subplots(len(dtypes), len(dims), figsize=(4 * len(dims), 3.4 * len(dtypes)), squeeze=False)
    for (dtype, d), ax in zip(
        [(t, d) for t in dtypes for d in dims], [a for row in axes for a in row], strict=True
    ):
        for i, impl in enumerate(dict.fromkeys(r["impl"] for r in grid)):
            pts = sorted(
                (r["seq"], r["fwd_bwd"])
                for r in grid
                if r["dtype"] == dtype and r["d"] == d and r["impl"] == impl and r.get("status") == "ok"
            )
            if pts:
                # one colour per implementation in every panel, also where some have no points (n/a, OOM)
                ax.plot(*zip(*pts, strict=True), marker="o", ms=3, color=f"C{i}", label=LABELS.get(impl, impl))
        ax.set(xscale="log", yscale="log", title=f"{dtype}, d={d}", xlabel="sequence length")
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    for row in axes:
        row[0].set_ylabel("forward+backward ms")
        row[0].legend(fontsize=7)
    fig.suptitle(f"Causal attention, batch 1 ({results.get('env', {}).get('gpu', '')})")
    fig.tight_layout()
    save_figure(fig, path)
    return True


def ratio_figure(results: dict[str, Any], path: Path) -> bool:
    """Our time ÷ the fastest SDPA backend's against sequence length, one panel per (dtype, d), a line per our
    implementation and pass; 1 is drawn. False when the grid has no point with both."""
    ratios = ratios_to_best_sdpa(results.get("grid") or [])
    if not ratios:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = list(dict.fromkeys(r["dtype"] for r in ratios))
    dims = list(dict.fromkeys(r["d"] for r in ratios))
    impls = [i for i in OURS if any(r["impl"] == i for r in ratios)]
    styles = {"fwd_bwd": "-", "fwd": "--", "bwd": ":"}
    fig, axes = plt.subplots(len(dtypes), len(dims), figsize=(4 * len(dims), 3.4 * len(dtypes)), squeeze=False)
    for (dtype, d), ax in zip([(t, d) for t in dtypes for d in dims], [a for row in axes for a in row], strict=True):
        for i, impl in enumerate(impls):
            for key, style in styles.items():
                pts = sorted((r["seq"], r["ratio"]) for r in ratios
                             if (r["dtype"], r["d"], r["impl"], r["pass"]) == (dtype, d, impl, key))
                if pts:
                    ax.plot(*zip(*pts, strict=True), style, marker="o", ms=3, color=f"C{i}",
                            label=f"{LABELS.get(impl, impl)}, {PASSES[key]}")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set(yscale="log", title=f"{dtype}, d={d}", xlabel="sequence length")
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    for row in axes:
        row[0].set_ylabel("ours ÷ fastest SDPA backend")
    axes[0][0].legend(fontsize=6)
    fig.suptitle(f"Causal attention, batch 1: below 1 ours is faster ({results.get('env', {}).get('gpu', '')})")
    fig.tight_layout()
    save_figure(fig, path)
    return True
