"""Learning curves from one or more runs' metrics.jsonl: loss against steps and against wall-clock time."""

import os

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt

from cs336_basics.training.metrics import read_jsonl


def plot_runs(run_dirs: list[str], out_path: str, labels: list[str] | None = None, title: str = "") -> str:
    labels = labels or [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for run_dir, label in zip(run_dirs, labels, strict=True):
        path = os.path.join(run_dir, "metrics.jsonl")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
        records = read_jsonl(path)
        for split, style in (("train", "-"), ("val", "o-")):
            rows = [r for r in records if r["split"] == split]
            if not rows:
                continue
            (line,) = by_step.plot([r["step"] for r in rows], [r["loss"] for r in rows], style,
                                   label=f"{label} {split}", markersize=3, alpha=0.6 if split == "train" else 1)
            by_time.plot([r["wall_s"] / 60 for r in rows], [r["loss"] for r in rows], style,
                         color=line.get_color(), markersize=3, alpha=0.6 if split == "train" else 1)
    by_step.set_xlabel("step")
    by_time.set_xlabel("wall-clock (minutes)")
    by_step.set_ylabel("loss (nats/token)")
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
    by_step.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path
