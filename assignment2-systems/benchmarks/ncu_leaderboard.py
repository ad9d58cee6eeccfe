"""Hardware counters of every kernel in one leaderboard forward+backward (batch 1, 16 heads, 16 384 tokens, d 64,
bf16, causal): ours (Triton forward, dQ and dK/dV kernels), the Gluon Hopper forward and dK/dV kernels (fa3-v2's and
the pipelined fa3-v5 and v6), cuDNN's.

NOTES.md has explained our kernels' times by counting cycles (tensor-core work, exponentials, issued
instructions) and by timing variants; this reads the counters instead: tensor-pipe and MUFU activity, issue-slot
use, achieved occupancy, shared-memory traffic and why warps stall, for ours and cuDNN's side by side. Three
steps, run on the GPU machine by `bash .ci/device-runs ncu`:

    ncu --query-metrics > Q.txt                                   # what this ncu/GPU calls its metrics
    python3 ncu_leaderboard.py metrics Q.txt                      # -> the --metrics list (only names Q.txt has)
    ncu --clock-control none --profile-from-start off --metrics LIST --csv --page raw --log-file RAW.csv \\
        python3 ncu_leaderboard.py run                            # one profiled fwd+bwd per implementation
    python3 ncu_leaderboard.py summarize RAW.csv --json OUT.json  # table + JSON

Only the calls between `cudaProfilerStart` and `cudaProfilerStop` are profiled: each implementation is warmed
up (autotuned, compiled) first, so the counters are of the kernels the timing runs use.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path

# the counters read for each kernel, by base name; each is kept only if this ncu lists it (names differ by version)
WANTED = {
    "gpu__time_duration": "sum",
    "sm__cycles_elapsed": "avg.per_second",  # the SM clock while it ran
    "sm__warps_active": "avg.pct_of_peak_sustained_active",  # achieved occupancy
    "smsp__issue_active": "avg.pct_of_peak_sustained_active",  # issue slots used
    "smsp__inst_executed": "sum",
    "sm__pipe_tensor_op_gmma_cycles_active": "avg.pct_of_peak_sustained_active",
    "sm__pipe_tensor_op_hmma_cycles_active": "avg.pct_of_peak_sustained_active",
    "sm__inst_executed_pipe_xu": "avg.pct_of_peak_sustained_active",  # MUFU (exp2)
    "sm__inst_executed_pipe_fma": "avg.pct_of_peak_sustained_active",
    "sm__inst_executed_pipe_alu": "avg.pct_of_peak_sustained_active",
    "sm__pipe_shared_cycles_active": "avg.pct_of_peak_sustained_active",
    "l1tex__data_pipe_lsu_wavefronts_mem_shared": "sum",
    "l1tex__data_bank_conflicts_pipe_lsu_mem_shared": "sum",
    "sm__ops_path_tensor_src_bf16_dst_fp32": "sum",
    "lts__t_bytes": "sum",
    "dram__bytes": "sum",
    "launch__registers_per_thread": "",
    "launch__occupancy_limit_registers": "",
    "launch__shared_mem_per_block_dynamic": "",
    "launch__grid_size": "",
    "launch__block_size": "",
}
# why warps wait: one ratio per reason (warps stalled for it per issued instruction)
STALL = re.compile(r"^(smsp__average_warps_issue_stalled_[a-z_]+_per_issue_active)\b")


def metric_list(query_text: str) -> list[str]:
    """The --metrics names for this ncu: WANTED's that its --query-metrics lists, plus every stall reason."""
    names = {line.split()[0] for line in query_text.splitlines() if line.strip()}
    out = [f"{base}.{suffix}" if suffix else base for base, suffix in WANTED.items() if base in names]
    stalls = sorted({m.group(1) for line in query_text.splitlines() if (m := STALL.match(line.strip()))})
    return out + [f"{s}.ratio" for s in stalls]


def classify(kernel: str) -> str:
    """Which implementation and which pass a kernel belongs to, from its name."""
    rules = [("flash_fwd_hopper", "gluon forward"), ("flash_bwd_dkdv_hopper_v5", "gluon v5 dK/dV"),
             ("flash_bwd_dkdv_hopper_v6", "gluon v6 dK/dV"), ("flash_bwd_dq_hopper", "gluon dQ (+D)"),
             ("flash_bwd_dkdv_hopper", "gluon dK/dV"),
             ("flash_fwd_kernel", "triton forward"), ("flash_bwd_dq_desc", "triton dQ (+D)"),
             ("flash_bwd_dkdv_desc", "triton dK/dV"), ("flash_bwd_dq_kernel", "triton dQ (pointers)"),
             ("flash_bwd_dkdv_kernel", "triton dK/dV (pointers)"), ("preprocess", "triton preprocess")]
    for needle, label in rules:
        if needle in kernel:
            return label
    low = kernel.lower()
    if "cudnn" in low or "sm90" in low or "fmha" in low or "flash" in low:
        return "cudnn " + ("backward" if ("bprop" in low or "bwd" in low or "dgrad" in low) else
                           "forward" if ("fprop" in low or "fwd" in low) else "helper")
    return "other"


def parse_raw(path: Path) -> tuple[list[dict[str, str]], dict[str, str]]:
    """ncu's `--csv --page raw`: a header row of metric names, a row of units, then one row per kernel; ncu's own
    log lines (starting with '==') may precede it. Returns the kernels' rows (name -> cell) and the units row."""
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln and not ln.startswith("==")]
    rows = list(csv.reader(lines))
    if len(rows) < 3:
        raise SystemExit(f"{path}: no kernel rows (did ncu profile anything? see the call's log)")
    header, units = rows[0], rows[1]
    return [dict(zip(header, row, strict=False)) for row in rows[2:]], dict(zip(header, units, strict=False))


def _num(value: str) -> float | None:
    try:
        return float(value.replace(",", ""))
    except (AttributeError, ValueError):
        return None


TO_MICROSECONDS = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3}


def summarize(kernels: list[dict[str, str]], units: dict[str, str]) -> list[dict]:
    """One record per kernel: its name, class, and every metric as a number where it is one (durations in µs)."""
    out = []
    for rec in kernels:
        name = rec.get("Kernel Name", "?")
        metrics = {k: _num(v) for k, v in rec.items() if "__" in k}
        duration = metrics.get("gpu__time_duration.sum")
        if duration is not None:
            metrics["gpu__time_duration.sum"] = duration * TO_MICROSECONDS.get(units.get("gpu__time_duration.sum"), 1.0)
        out.append({"kernel": name[:160], "class": classify(name), "metrics": metrics})
    return out


COLUMNS = [("µs", "gpu__time_duration.sum"), ("MHz", "sm__cycles_elapsed.avg.per_second"),
           ("regs", "launch__registers_per_thread"), ("occ %", "sm__warps_active.avg.pct_of_peak_sustained_active"),
           ("issue %", "smsp__issue_active.avg.pct_of_peak_sustained_active"),
           ("gmma %", "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active"),
           ("xu %", "sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active"),
           ("fma %", "sm__inst_executed_pipe_fma.avg.pct_of_peak_sustained_active"),
           ("smem %", "sm__pipe_shared_cycles_active.avg.pct_of_peak_sustained_active")]


def table(records: list[dict]) -> str:
    lines = ["| kernel | " + " | ".join(c for c, _ in COLUMNS) + " | top stalls (warps per issue) |",
             "|---|" + "---:|" * len(COLUMNS) + "---|"]
    for rec in records:
        m = rec["metrics"]
        cells = []
        for label, key in COLUMNS:
            value = m.get(key)
            if value is None:
                cells.append("")
            elif label == "MHz":
                cells.append(f"{value / 1e6:.0f}" if value > 1e5 else f"{value:.0f}")
            else:
                cells.append(f"{value:.1f}" if value < 1000 else f"{value:.0f}")
        stalls = sorted(((v, k) for k, v in m.items() if k.startswith("smsp__average_warps_issue_stalled")
                         and v is not None), reverse=True)[:4]
        top = ", ".join(f"{k.removeprefix('smsp__average_warps_issue_stalled_').split('_per_issue')[0]} {v:.2f}"
                        for v, k in stalls)
        lines.append(f"| {rec['class']} | " + " | ".join(cells) + f" | {top} |")
    return "\n".join(lines)


def run(skip: re.Pattern | None = None) -> None:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from cs336_systems.benchmarking.attention import LEADERBOARD, _inputs
    from cs336_systems.flash_attention import FlashAttentionTriton, hopper_impl
    from cs336_systems.flash_attention.hopper_impl import FlashAttentionHopper

    lb = LEADERBOARD
    q, k, v, do = _inputs((lb["batch"], lb["heads"], lb["seq"], lb["d"]), getattr(torch, lb["dtype"]))
    causal = lb["causal"]

    def cudnn(a, b, c):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return sdpa(a, b, c, is_causal=causal)

    def gluon(a, b, c):  # fa3-v1's forward, the Triton dQ kernel, fa3-v2's dK/dV kernel
        hopper_impl.set_backward_enabled(True)
        hopper_impl.set_forward_kernel("v1")
        hopper_impl.set_dq_kernel("triton")
        hopper_impl.set_backward_kernel("v2")
        return FlashAttentionHopper.apply(a, b, c, causal)

    def pipelined(kernel: str, dq: str = "triton"):  # the pipelined backward kernels behind the Triton forward
        def attn(a, b, c):
            hopper_impl.set_backward_enabled(True)
            hopper_impl.set_backward_kernel(kernel)
            hopper_impl.set_dq_kernel(dq)
            hopper_impl.set_forward_kernel("triton")
            return FlashAttentionHopper.apply(a, b, c, causal)
        return attn

    impls = [("cs336-fa2 (triton)", lambda a, b, c: FlashAttentionTriton.apply(a, b, c, causal)),
             ("cs336-fa3 (gluon fwd, triton dQ, gluon dK/dV)", gluon), ("sdpa cudnn", cudnn),
             ("cs336-fa3 (triton fwd and dQ, gluon v5 dK/dV)", pipelined("v5")),
             ("cs336-fa3 (triton fwd and dQ, gluon v6 dK/dV)", pipelined("v6")),
             ("cs336-fa3 (triton fwd, gluon dQ, gluon v5 dK/dV)", pipelined("v5", "gluon"))]
    for name, attn in impls:
        if skip is not None and skip.search(name):
            continue
        for _ in range(3):  # autotune / compile outside the profiled range
            torch.autograd.grad(attn(q, k, v), (q, k, v), do)
        torch.cuda.synchronize()
        print(f"profiling {name}", flush=True)
        torch.cuda.cudart().cudaProfilerStart()
        torch.autograd.grad(attn(q, k, v), (q, k, v), do)
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_metrics = sub.add_parser("metrics", help="print the --metrics list for this ncu")
    p_metrics.add_argument("query", type=Path, help="output of `ncu --query-metrics`")
    p_run = sub.add_parser("run", help="the profiled program (run it under ncu)")
    p_run.add_argument("--skip", type=re.compile, metavar="REGEX", help="leave out the implementations it matches")
    p_sum = sub.add_parser("summarize", help="ncu's raw CSV -> table and JSON")
    p_sum.add_argument("raw", type=Path)
    p_sum.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.cmd == "metrics":
        names = metric_list(args.query.read_text(errors="replace"))
        if not names:
            raise SystemExit(f"{args.query}: no known metric names in it")
        print(",".join(names))
    elif args.cmd == "run":
        run(args.skip)
    else:
        records = summarize(*parse_raw(args.raw))
        text = table(records)
        print(text)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"kernels": records, "table": text}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
