"""Approach 2 and 3 recover the exponents of data drawn from a known Chinchilla-form law."""

import json
import math

import numpy as np
import pytest

from cs336_scaling.isoflops import Run, fit_isoflops, fit_power_law, load_runs, profile_optimum
from cs336_scaling.parametric import ParametricLaw, fit_parametric

TRUE = ParametricLaw(E=1.7, A=400.0, B=1200.0, alpha=0.34, beta=0.36)  # a = β/(α+β) = 0.514


def synthetic_runs(law: ParametricLaw, budgets, per_budget=15, span=30.0, noise=0.0, seed=0) -> list[Run]:
    """Each profile log-spaced around the law's own optimum, as a well-designed isoFLOP sweep would be."""
    rng = np.random.default_rng(seed)
    runs = []
    for c in budgets:
        centre = float(law.n_opt(c))
        for n in np.logspace(math.log10(centre / span), math.log10(centre * span), per_budget):
            loss = float(law.loss(n, c / (6 * n))) * math.exp(noise * rng.standard_normal())
            runs.append(Run(float(n), float(c), loss))
    return runs


def test_power_law_exact():
    c = np.logspace(15, 20, 6)
    law = fit_power_law(c, 3.0 * c**0.47)
    assert law.exponent == pytest.approx(0.47, abs=1e-9)
    assert law.k == pytest.approx(3.0, rel=1e-6)
    assert law.r2 == pytest.approx(1.0)
    with pytest.raises(ValueError, match="two compute budgets"):
        fit_power_law(c[:1], c[:1])


def test_quadratic_vertex_and_fallback():
    n = np.logspace(6, 9, 7)
    runs = [Run(float(x), 1e18, 3.0 + 0.1 * (math.log(x) - math.log(4e7)) ** 2) for x in n]
    assert profile_optimum(runs, "quadratic").n_opt == pytest.approx(4e7, rel=1e-6)
    assert profile_optimum(runs, "quadratic").loss == pytest.approx(3.0, abs=1e-9)
    # a monotone profile has its vertex outside the sampled sizes: fall back to the best run
    monotone = [Run(float(x), 1e18, 5.0 - 0.1 * math.log(x)) for x in n]
    assert profile_optimum(monotone, "quadratic").n_opt == pytest.approx(n[-1])


@pytest.mark.parametrize("method", ["min", "quadratic"])
def test_approach2_recovers_exponents(method):
    runs = synthetic_runs(TRUE, np.logspace(17, 21, 9), per_budget=25, noise=0.002, seed=1)
    fit = fit_isoflops(runs, method)
    tolerance = 0.03 if method == "min" else 0.01
    assert fit.n_law.exponent == pytest.approx(TRUE.a, abs=tolerance)
    assert fit.d_law.exponent == pytest.approx(1 - TRUE.a, abs=tolerance)
    assert fit.predict(1e23)["n_opt"] == pytest.approx(float(TRUE.n_opt(1e23)), rel=0.3)


def test_approach3_recovers_law():
    runs = synthetic_runs(TRUE, np.logspace(16, 20, 5), per_budget=9, noise=0.003, seed=2)
    n = np.array([r.parameters for r in runs])
    d = np.array([r.compute_budget for r in runs]) / (6 * n)
    grid = {"a": [3.0, 8.0], "b": [3.0, 8.0], "e": [0.0, 1.0], "alpha": [0.2, 0.5], "beta": [0.2, 0.5]}
    law, objective = fit_parametric(n, d, np.array([r.final_loss for r in runs]), inits=grid)
    assert objective < 1e-4
    assert law.a == pytest.approx(TRUE.a, abs=0.03)
    assert abs(law.E - TRUE.E) < 0.15
    assert float(law.n_opt(1e21)) == pytest.approx(float(TRUE.n_opt(1e21)), rel=0.3)


def test_approach3_is_robust_to_an_outlier():
    runs = synthetic_runs(TRUE, np.logspace(16, 20, 5), per_budget=9, seed=3)
    runs[7] = Run(runs[7].parameters, runs[7].compute_budget, runs[7].final_loss * 1.8)  # a diverged run
    n = np.array([r.parameters for r in runs])
    law, _ = fit_parametric(n, np.array([r.compute_budget for r in runs]) / (6 * n),
                            np.array([r.final_loss for r in runs]),
                            inits={"a": [3.0, 8.0], "b": [3.0, 8.0], "e": [0.0, 1.0], "alpha": [0.2, 0.5],
                                   "beta": [0.2, 0.5]})
    assert law.alpha == pytest.approx(TRUE.alpha, abs=0.03) and law.beta == pytest.approx(TRUE.beta, abs=0.03)


def test_law_optimum_is_the_minimum():
    c = 1e20
    grid = np.logspace(8, 11, 3001)
    assert grid[np.argmin(TRUE.loss(grid, c / (6 * grid)))] == pytest.approx(float(TRUE.n_opt(c)), rel=0.01)


def test_load_runs(tmp_path):
    path = tmp_path / "runs.json"
    path.write_text(json.dumps([{"parameters": 5e7, "compute_budget": 6e18, "final_loss": 7.19}]))
    assert load_runs(str(path)) == [Run(5e7, 6e18, 7.19)]
    path.write_text(json.dumps([{"params": 1}]))
    with pytest.raises(ValueError, match="lack"):
        load_runs(str(path))


def test_isoflops_cli_writes_figures(tmp_path, capsys):
    from cs336_scaling.cli import main

    path = tmp_path / "curves.json"
    runs = synthetic_runs(TRUE, [1e18, 1e19, 1e20], per_budget=7)
    path.write_text(json.dumps([{"parameters": r.parameters, "compute_budget": r.compute_budget,
                                 "final_loss": r.final_loss} for r in runs]))
    out = tmp_path / "fig"
    assert main(["isoflops", "--data", str(path), "--out-dir", str(out), "--json", str(tmp_path / "s.json")]) == 0
    assert {p.name for p in out.iterdir()} == {"a3_isoflops_n_opt.png", "a3_isoflops_d_opt.png",
                                                "a3_isoflops_profiles.png"}
    summary = json.loads((tmp_path / "s.json").read_text())
    assert [p["compute"] for p in summary["predictions"]] == [1e23, 1e24]
    assert "C=1e+23: N_opt" in capsys.readouterr().out
