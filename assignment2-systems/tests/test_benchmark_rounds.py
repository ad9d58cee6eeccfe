"""`round_robin`: the timing rounds the leaderboard benchmarks use against a GPU clock that drifts."""

import itertools
import statistics

import pytest

from cs336_systems.benchmarking.common import round_robin


def drifting_measure(true_ms: dict[str, float], drift_per_call: float):
    """A fake timer whose every measurement is slower than the last by `drift_per_call` (a heating GPU)."""
    calls = itertools.count()

    def measure(name: str) -> dict[str, float]:
        slowdown = 1 + drift_per_call * next(calls)
        return {"fwd_ms": true_ms[name] * slowdown, "both_ms": 3 * true_ms[name] * slowdown}
    return measure


def test_each_round_is_a_rotation_and_every_sample_is_kept():
    names = ["a", "b", "c", "d", "e", "f"]
    means, orders, samples = round_robin(names, 3, drifting_measure(dict.fromkeys(names, 1.0), 0.01))
    assert orders == [names, names[2:] + names[:2], names[4:] + names[:4]]
    assert [sorted(order) for order in orders] == [names] * 3
    assert {name: len(runs) for name, runs in samples.items()} == dict.fromkeys(names, 3)
    for name in names:
        for key in ("fwd_ms", "both_ms"):
            assert means[name][key] == pytest.approx(statistics.fmean(run[key] for run in samples[name]), rel=1e-12)


def test_rotating_the_order_spreads_the_drift_that_one_fixed_pass_charges_to_the_last_name():
    names = ["first", "middle", "last"]
    same_cost = dict.fromkeys(names, 1.0)
    single, _, _ = round_robin(names, 1, drifting_measure(same_cost, 0.05))
    assert single["last"]["fwd_ms"] / single["first"]["fwd_ms"] == pytest.approx(1.10)  # two calls of drift
    rotated, _, _ = round_robin(names, 3, drifting_measure(same_cost, 0.05))
    for name in names:  # each name ran first, middle and last once: a steady drift cancels
        assert rotated[name]["fwd_ms"] == pytest.approx(rotated["first"]["fwd_ms"], rel=1e-12)
    real = {"first": 1.0, "middle": 1.0, "last": 0.95}  # the last one truly 5% faster
    single, _, _ = round_robin(names, 1, drifting_measure(real, 0.05))
    assert single["last"]["fwd_ms"] > single["first"]["fwd_ms"]  # one fixed pass ranks it slowest
    rotated, _, _ = round_robin(names, 3, drifting_measure(real, 0.05))
    assert rotated["last"]["fwd_ms"] / rotated["first"]["fwd_ms"] == pytest.approx(0.95)


def test_round_robin_refuses_an_empty_plan():
    with pytest.raises(ValueError, match="at least one round"):
        round_robin(["a"], 0, lambda name: {"ms": 1.0})
    with pytest.raises(ValueError, match="at least one round"):
        round_robin([], 2, lambda name: {"ms": 1.0})


def _host_overhead_script(monkeypatch):
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "attention_host_overhead.py"
    spec = importlib.util.spec_from_file_location("attention_host_overhead", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_host_overhead_rounds_keep_medians_every_round_and_one_profile(monkeypatch):
    """`attention_host_overhead.measure_rounds`: each implementation once per rotated round, each time the median
    of its rounds, the host profile taken in the first round only, a failing implementation kept with its
    reason and no times."""
    import argparse
    import types

    module = _host_overhead_script(monkeypatch)
    calls = []
    fake_us = {"a": [10.0, 30.0, 20.0], "b": [5.0, 6.0, 100.0]}  # per call of each name, in call order

    def fake_measure(name, seq, d, n_calls, profile_top):
        calls.append((name, profile_top))
        if name == "broken":
            return {"impl": name, "seq": seq, "d": d, "status": "n/a: not on this GPU"}
        value = fake_us[name][sum(1 for called, _ in calls if called == name) - 1]
        row = {"impl": name, "seq": seq, "d": d, "status": "ok", **{key: value for key in module.TIMES}}
        if profile_top:
            row["fwd_host_profile"] = ["profiled"]
        return row

    monkeypatch.setattr(module, "measure", fake_measure)
    args = argparse.Namespace(rounds=3, d=64, calls=7)
    rows = module.measure_rounds(["a", "b", "broken"], 128, args, profile_top=5)
    assert [name for name, _ in calls] == ["a", "b", "broken", "b", "broken", "a", "broken", "a", "b"]
    assert [top for name, top in calls if name == "a"] == [5, 0, 0]  # profiled once, in its first round
    by_name = {row["impl"]: types.SimpleNamespace(**row) for row in rows}
    assert by_name["a"].fwd_host_us == 20.0 and by_name["a"].bwd_gpu_us_rounds == [10.0, 30.0, 20.0]
    assert by_name["b"].bwd_host_us == 6.0  # a median: one slow round does not move it
    assert by_name["a"].fwd_host_profile == ["profiled"]
    assert by_name["broken"].status == "n/a: not on this GPU" and not hasattr(by_name["broken"], "fwd_host_us")
