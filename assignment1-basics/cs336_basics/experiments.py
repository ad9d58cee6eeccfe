"""The handout's experiments as sweeps of `train` runs, each drawing its learning curves into fig/.

    cs336-basics sweep lr --train-data ... --val-data ... --values 3e-4 1e-3 3e-3 1e-2 3e-2
    cs336-basics sweep batch-size --values 1 8 32 64 128 256 ...   (steps scaled to keep the token budget)
    cs336-basics sweep ablations ...                                (no RMSNorm, post-norm, NoPE, SiLU FFN)
"""

import dataclasses
import json
import math
import os

from cs336_basics.plotting import plot_runs
from cs336_basics.training import train
from cs336_basics.training.config import config_from_preset

# The handout's ablations; the SiLU FFN gets d_ff = 4·d_model so its parameters match SwiGLU's 3·d_model·(8/3)·d_model.
ABLATIONS = {
    "baseline": {},
    "no-rmsnorm": {"norm": "none"},
    "post-norm": {"norm": "post"},
    "nope": {"position": "none"},
    "silu-ffn": {"ffn": "silu", "d_ff": None},  # None: filled with 4·d_model below
}


def _variants(kind: str, values: list[str], base) -> dict[str, dict]:
    if kind == "lr":
        return {f"lr={v}": {"lr_max": float(v), "lr_min": float(v) / 10} for v in values}
    if kind == "batch-size":
        budget = base.max_steps * base.batch_size
        return {f"batch={v}": {"batch_size": int(v), "max_steps": math.ceil(budget / int(v))} for v in values}
    if kind == "ablations":
        names = values or list(ABLATIONS)
        unknown = set(names) - set(ABLATIONS)
        if unknown:
            raise ValueError(f"unknown ablations {sorted(unknown)}; choose from {list(ABLATIONS)}")
        return {n: {k: (4 * base.d_model if v is None else v) for k, v in ABLATIONS[n].items()} for n in names}
    raise ValueError(f"unknown sweep {kind!r}")


def run_sweep(kind: str, values: list[str], preset: str, out_root: str, figure: str, **overrides) -> dict:
    base = config_from_preset(preset, **overrides)
    variants = _variants(kind, values, base)
    if not variants:
        raise ValueError("give --values for this sweep")
    results, run_dirs = {}, []
    for label, change in variants.items():
        run_dir = os.path.join(out_root, kind, label.replace("=", "_"))
        config = dataclasses.replace(base, out_dir=run_dir, **change)
        try:
            results[label] = train(config)
        except FloatingPointError as e:  # a diverged run is a result of the sweep, not a failure
            results[label] = {"diverged": str(e)}
        run_dirs.append(run_dir)
        plot_runs(run_dirs, figure, labels=list(variants)[: len(run_dirs)], title=f"{kind} sweep ({preset})")
    with open(os.path.join(out_root, kind, "summary.json"), "w") as f:
        json.dump(results, f, indent=2, default=str)
    return results
