"""Chinchilla approach 2: the loss-minimising model size of each isoFLOP profile, then power laws in C.

Each run is {"parameters": N, "compute_budget": C, "final_loss": L} (the course's isoflops_curves.json
format). D = C / (6N) throughout.
"""

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

import numpy as np

from cs336_basics.cli_support import UserError, reading, save_figure


@dataclass(frozen=True)
class Run:
    parameters: float
    compute_budget: float
    final_loss: float


@dataclass(frozen=True)
class PowerLaw:
    """y = k · C^exponent, fitted as a straight line in log-log space."""

    k: float
    exponent: float
    r2: float

    def __call__(self, compute: float | np.ndarray) -> float | np.ndarray:
        return self.k * np.asarray(compute, dtype=float) ** self.exponent


@dataclass(frozen=True)
class Optimum:
    compute_budget: float
    n_opt: float
    loss: float

    @property
    def d_opt(self) -> float:
        return self.compute_budget / (6 * self.n_opt)


FIELDS = ("parameters", "compute_budget", "final_loss")


def load_runs(path: str) -> list[Run]:
    """The runs of a JSON file, every one checked (an object with three positive finite numbers): anything
    else is a one-line error naming the file and the run."""
    with reading(path), open(path, encoding="utf-8") as f:
        rows = json.load(f)
    if not isinstance(rows, list) or not rows:
        raise UserError(f"{path}: expected a non-empty JSON array of runs")
    return [_run(path, i, row) for i, row in enumerate(rows)]


def _run(path: str, index: int, row: object) -> Run:
    if not isinstance(row, dict):
        raise UserError(f"{path}: run {index} is not an object with {', '.join(FIELDS)}")
    missing = [key for key in FIELDS if key not in row]
    if missing:
        raise UserError(f"{path}: run {index} lacks {', '.join(missing)}")
    try:
        values = [float(row[key]) for key in FIELDS]
    except (TypeError, ValueError):
        raise UserError(f"{path}: run {index} has a value that is not a number") from None
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise UserError(f"{path}: run {index} needs positive finite {', '.join(FIELDS)}, got {values}")
    return Run(*values)


def group_by_budget(runs: list[Run]) -> dict[float, list[Run]]:
    groups: dict[float, list[Run]] = defaultdict(list)
    for run in runs:
        groups[run.compute_budget].append(run)
    return {c: sorted(groups[c], key=lambda r: r.parameters) for c in sorted(groups)}


def profile_optimum(runs: list[Run], method: Literal["min", "quadratic"] = "min") -> Optimum:
    """Lowest-loss run (the handout's recommendation) or the vertex of L = a·x² + b·x + c with x = ln N.

    The quadratic falls back to the minimum when the parabola opens downwards or its vertex lies outside
    the sampled sizes (an extrapolated vertex is not a measurement).
    """
    best = min(runs, key=lambda r: r.final_loss)
    if method == "min" or len(runs) < 3:
        return Optimum(best.compute_budget, best.parameters, best.final_loss)
    if method != "quadratic":
        raise ValueError(f"method must be 'min' or 'quadratic', got {method!r}")
    x = np.log([r.parameters for r in runs])
    y = np.array([r.final_loss for r in runs])
    a, b, c = np.polyfit(x, y, 2)
    if a <= 0 or not x.min() <= -b / (2 * a) <= x.max():
        return Optimum(best.compute_budget, best.parameters, best.final_loss)
    vertex = -b / (2 * a)
    return Optimum(best.compute_budget, float(math.exp(vertex)), float(c - b * b / (4 * a)))


def fit_power_law(compute: np.ndarray, values: np.ndarray) -> PowerLaw:
    """Least squares on log y = log k + a·log C (equal weight to every decade, as the fit is read on a log plot)."""
    log_c, log_y = np.log(np.asarray(compute, float)), np.log(np.asarray(values, float))
    if len(log_c) < 2:
        raise UserError("a power law needs runs at two compute budgets or more")
    exponent, intercept = np.polyfit(log_c, log_y, 1)
    residual = log_y - (intercept + exponent * log_c)
    total = ((log_y - log_y.mean()) ** 2).sum()
    r2 = 1.0 - (residual**2).sum() / total if total > 0 else 1.0
    return PowerLaw(float(math.exp(intercept)), float(exponent), float(r2))


@dataclass(frozen=True)
class IsoFLOPsFit:
    optima: list[Optimum]
    n_law: PowerLaw
    d_law: PowerLaw

    def predict(self, compute: float) -> dict:
        return {"compute": compute, "n_opt": float(self.n_law(compute)), "d_opt": float(self.d_law(compute))}


def fit_isoflops(runs: list[Run], method: Literal["min", "quadratic"] = "min") -> IsoFLOPsFit:
    optima = [profile_optimum(group, method) for group in group_by_budget(runs).values()]
    compute = np.array([o.compute_budget for o in optima])
    return IsoFLOPsFit(
        optima,
        fit_power_law(compute, np.array([o.n_opt for o in optima])),
        fit_power_law(compute, np.array([o.d_opt for o in optima])),
    )


def _save(fig, out_path: str) -> None:
    """`save_figure`, with an extension matplotlib cannot write reported as a `UserError`."""
    try:
        save_figure(fig, out_path, dpi=130)
    except ValueError as error:
        if isinstance(error, UserError):
            raise
        raise UserError(f"cannot write figure {out_path}: {error}") from error


def plot_law(fit: IsoFLOPsFit, which: Literal["n", "d"], out_path: str, extrapolate_to: float = 1e24,
             title: str = "") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    law = fit.n_law if which == "n" else fit.d_law
    points = np.array([o.n_opt if which == "n" else o.d_opt for o in fit.optima])
    compute = np.array([o.compute_budget for o in fit.optima])
    grid = np.logspace(np.log10(compute.min()) - 0.3, np.log10(extrapolate_to) + 0.2, 200)
    label = "N_opt (parameters)" if which == "n" else "D_opt (tokens)"
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.loglog(compute, points, "o", label=f"isoFLOP optima ({len(points)} budgets)")
    ax.loglog(grid, law(grid), "-", label=f"fit: {law.k:.3g}·C^{law.exponent:.3f} (R²={law.r2:.3f})")
    for target in (1e23, 1e24):
        ax.loglog([target], [law(target)], "s", color="C3")
        ax.annotate(f"{float(law(target)):.3g}", (target, float(law(target))), textcoords="offset points",
                    xytext=(-60, 6), fontsize=8)
    ax.set_xlabel("compute budget C (FLOPs)")
    ax.set_ylabel(label)
    ax.set_title(title or f"Compute-optimal {label.split()[0]} vs compute")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, out_path)
    return out_path


def plot_profiles(runs: list[Run], out_path: str, title: str = "IsoFLOP profiles") -> str:
    """Loss vs N per budget, the optimum of each marked: the raw material of approach 2."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group_by_budget(runs)
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for i, (compute, group) in enumerate(groups.items()):
        color = plt.cm.viridis(i / max(1, len(groups) - 1))
        ax.semilogx([r.parameters for r in group], [r.final_loss for r in group], "o-", color=color, ms=3,
                    label=f"C={compute:.0e}")
        best = profile_optimum(group)
        ax.semilogx([best.n_opt], [best.loss], "*", color=color, ms=11, mec="k")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("final loss")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    _save(fig, out_path)
    return out_path
