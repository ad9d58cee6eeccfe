"""The handout's experiments as sweeps of `train` runs, each drawing its learning curves into fig/.

    cs336-basics sweep lr --train-data ... --val-data ... --values 3e-4 1e-3 3e-3 1e-2 3e-2
    cs336-basics sweep batch-size --values 1 8 32 64 128 256 ...   (steps scaled to keep the token budget)
    cs336-basics sweep ablations ...                                (no RMSNorm, post-norm, NoPE, SiLU FFN)
"""

import dataclasses
import json
import math
import os

from cs336_basics.cli_support import UserError, atomic_write, prepare_run_dir
from cs336_basics.plotting import check_image_path, plot_runs
from cs336_basics.training.config import config_from_preset

# The handout's ablations; the SiLU FFN gets d_ff = 4·d_model so its parameters match SwiGLU's 3·d_model·(8/3)·d_model.
ABLATIONS = {
    "baseline": {},
    "no-rmsnorm": {"norm": "none"},
    "post-norm": {"norm": "post"},
    "nope": {"position": "none"},
    "silu-ffn": {"ffn": "silu", "d_ff": None},  # None: filled with 4·d_model below
}


def parse_values(kind: str, values: list[str]) -> list[str]:
    """The sweep's --values checked before any run starts: learning rates finite and > 0, batch sizes integers
    >= 1, ablations known names; none repeated (two runs would share a folder)."""
    if kind == "ablations":
        names = values or list(ABLATIONS)
        unknown = [n for n in names if n not in ABLATIONS]
        if unknown:
            raise UserError(f"--values: unknown ablation(s) {', '.join(unknown)}; choose from {', '.join(ABLATIONS)}")
        keys: list = names
    elif kind in ("lr", "batch-size"):
        if not values:
            raise UserError(f"sweep {kind} needs --values")
        names, keys = values, [_number(kind, v) for v in values]
    else:
        raise UserError(f"unknown sweep {kind!r}")
    repeated = sorted({n for n, k in zip(names, keys, strict=True) if keys.count(k) > 1})
    if repeated:
        raise UserError(f"--values repeats a value: {', '.join(repeated)}")
    return names


def _number(kind: str, text: str) -> float:
    """One --values entry checked and as a number (so 1e-3 and 0.001 count as the same run)."""
    try:
        value = float(text) if kind == "lr" else int(text)
    except ValueError:
        need = "a number" if kind == "lr" else "an integer"
        raise UserError(f"--values: {text!r} is not {need}") from None
    if kind == "lr" and not (math.isfinite(value) and value > 0):
        raise UserError(f"--values: learning rates must be finite and > 0, got {text}")
    if kind == "batch-size" and value < 1:
        raise UserError(f"--values: batch sizes must be >= 1, got {text}")
    return value


def _variants(kind: str, names: list[str], base) -> dict[str, dict]:
    if kind == "lr":
        return {f"lr={v}": {"lr_max": float(v), "lr_min": float(v) / 10} for v in names}
    if kind == "batch-size":
        budget = base.max_steps * base.batch_size
        return {f"batch={v}": {"batch_size": int(v), "max_steps": math.ceil(budget / int(v))} for v in names}
    return {n: {k: (4 * base.d_model if v is None else v) for k, v in ABLATIONS[n].items()} for n in names}


def run_sweep(kind: str, values: list[str], preset: str, out_root: str, figure: str, **overrides) -> dict:
    """Trains every variant into out_root/kind/<label>/, redrawing `figure` after each run and writing
    out_root/kind/summary.json at the end (each replaced whole, never left half-written)."""
    names = parse_values(kind, values)
    check_image_path(figure)
    for folder in (os.path.dirname(os.path.abspath(figure)), os.path.join(out_root, kind)):
        os.makedirs(folder, exist_ok=True)  # a file in the way fails now, not after the first run has trained
    from cs336_basics.training import train  # torch: loaded once the sweep's values are known to be good

    base = config_from_preset(preset, **overrides)
    variants = _variants(kind, names, base)
    configs = {label: dataclasses.replace(base, out_dir=os.path.join(out_root, kind, label.replace("=", "_")),
                                          **change) for label, change in variants.items()}  # all checked first
    for config in configs.values():  # an earlier sweep's runs need --resume/--overwrite: known before any trains
        if not config.overwrite:
            prepare_run_dir(config.out_dir, resume=config.resume, overwrite=False)
    results, run_dirs = {}, []
    for label, config in configs.items():
        try:
            results[label] = train(config)
        except FloatingPointError as e:  # a diverged run is a result of the sweep, not a failure
            results[label] = {"diverged": str(e)}
        run_dirs.append(config.out_dir)
        plot_runs(run_dirs, figure, labels=list(configs)[: len(run_dirs)], title=f"{kind} sweep ({preset})",
                  allow_empty=True)
    with atomic_write(os.path.join(out_root, kind, "summary.json")) as f:
        json.dump(results, f, indent=2, default=str)
    return results
