"""Learning curves from one or more runs' metrics.jsonl: loss against steps and against wall-clock time.

matplotlib (a second to import) is loaded only once the inputs have been read and checked, so a bad run
folder is reported at once.
"""

import os
from typing import Any

from cs336_basics.cli_support import UserError, save_figure
from cs336_basics.training.metrics import read_jsonl

SPLITS = ("train", "val")
NUMERIC = ("step", "loss", "wall_s")


def loss_records(run_dir: str, allow_empty: bool = False) -> dict[str, list[dict[str, Any]]]:
    """The train and val records of a run's metrics.jsonl. A missing log, a record that is not an object, a
    loss record without numeric step/loss/wall_s or (unless `allow_empty`) no loss record at all is a
    `UserError` naming the file, not a KeyError or a silently missing curve."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isdir(run_dir):
        raise UserError(f"run folder {run_dir} does not exist" if not os.path.exists(run_dir)
                        else f"{run_dir} is a file; --runs takes run folders (the --out-dir of `train`)")
    if not os.path.isfile(path):
        raise UserError(f"no metrics.jsonl in {run_dir}")
    rows: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
    for number, record in enumerate(read_jsonl(path), start=1):
        if not isinstance(record, dict):
            raise UserError(f"{path}: record {number} is not a JSON object")
        if record.get("split") not in SPLITS:
            continue  # events and other record kinds are not curves
        missing = [k for k in NUMERIC if isinstance(record.get(k), bool) or not isinstance(record.get(k), int | float)]
        if missing:
            raise UserError(f"{path}: record {number} has no numeric {', '.join(missing)}")
        rows[record["split"]].append(record)
    if not allow_empty and not any(rows.values()):
        raise UserError(f"{path} holds no train or val loss records")
    return rows


def check_image_path(out_path: str) -> None:
    """A figure path matplotlib can write: a known image extension, not a folder."""
    from matplotlib.backend_bases import FigureCanvasBase

    if os.path.isdir(out_path):
        raise UserError(f"{out_path} is a folder; expected an image path")
    extension = os.path.splitext(out_path)[1].lstrip(".").lower()
    supported = FigureCanvasBase.get_supported_filetypes()
    if extension not in supported:
        raise UserError(f"cannot write a .{extension} image ({out_path}); use one of "
                        f"{', '.join('.' + e for e in sorted(supported))}")


def plot_runs(run_dirs: list[str], out_path: str, labels: list[str] | None = None, title: str = "",
              allow_empty: bool = False) -> str:
    """Draws the runs' curves into `out_path`, which changes only once the whole figure is written.
    `allow_empty` lets a run without loss records (a sweep's run that diverged at once) draw no curve."""
    labels = labels or [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    if len(labels) != len(run_dirs):
        raise UserError(f"{len(labels)} label(s) for {len(run_dirs)} run(s)")
    curves = [loss_records(run_dir, allow_empty) for run_dir in run_dirs]  # every input read before anything is drawn
    check_image_path(out_path)
    plt = _pyplot()
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for rows_by_split, label in zip(curves, labels, strict=True):
        for split, style in (("train", "-"), ("val", "o-")):
            rows = rows_by_split[split]
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
    return save_figure(fig, out_path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt
