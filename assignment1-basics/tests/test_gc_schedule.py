"""`--gc-interval`: Python's automatic garbage collection off while training, young-generation collections on a
schedule (cs336_basics/training/gc_schedule.py). Checked against the interpreter's own gc state and counters,
a real reference cycle, and the trainer's loss curve."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import weakref

import pytest

from cs336_basics.cli import main
from cs336_basics.cli_support import UserError
from cs336_basics.testing import one_thread  # noqa: F401 (autouse: one torch thread)
from cs336_basics.training.config import TrainConfig
from cs336_basics.training.gc_schedule import CollectionLog, ScheduledGC
from tests.test_throughput_flags import ROOT, TINY, _losses, data  # noqa: F401 (data: the token fixture)


@pytest.fixture
def gc_enabled():
    was = gc.isenabled()
    gc.enable()
    yield
    (gc.enable if was else gc.disable)()


def _counting_collect(monkeypatch) -> list:
    calls = []
    real = gc.collect

    def collect(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(gc, "collect", collect)
    return calls


class _Node:
    def __init__(self):
        self.me = self  # a reference cycle: only the cyclic collector frees it


def test_interval_zero_leaves_automatic_collection_alone(gc_enabled, monkeypatch):
    calls = _counting_collect(monkeypatch)
    with ScheduledGC(0) as collector:
        assert gc.isenabled()
        for done in range(1, 101):
            collector.step(done)
    assert gc.isenabled() and calls == [] and collector.collections == 0


def test_interval_disables_then_collects_young_generations_every_n_steps(gc_enabled, monkeypatch):
    calls = _counting_collect(monkeypatch)
    with ScheduledGC(4) as collector:
        assert not gc.isenabled()
        assert calls == [()]  # one full collection before the first step
        for done in range(1, 11):
            collector.step(done)
    assert calls[1:] == [(1,), (1,)]  # after steps 4 and 8
    assert collector.collections == 2
    assert gc.isenabled()  # restored


def test_a_cycle_made_by_a_step_is_freed_at_the_next_scheduled_collection(gc_enabled):
    with ScheduledGC(3) as collector:
        node = _Node()
        alive = weakref.ref(node)
        del node
        collector.step(1)
        collector.step(2)
        assert alive() is not None  # automatic collection is off: the cycle waits for the schedule
        collector.step(3)
        assert alive() is None


def test_exit_restores_a_collector_that_was_already_off(monkeypatch):
    was = gc.isenabled()
    gc.disable()
    try:
        with ScheduledGC(2):
            pass
        assert not gc.isenabled()
    finally:
        (gc.enable if was else gc.disable)()


def test_bad_intervals_are_refused():
    with pytest.raises(ValueError, match=">= 0"):
        ScheduledGC(-1)
    with pytest.raises(UserError):
        TrainConfig(gc_interval=-5)


def test_trainer_with_a_gc_interval_keeps_the_curve_and_restores_the_collector(data, tmp_path, gc_enabled,  # noqa: F811
                                                                             monkeypatch):
    plain = _losses(data, tmp_path / "plain")
    calls = _counting_collect(monkeypatch)
    scheduled = _losses(data, tmp_path / "gc", "--gc-interval", "2")
    assert scheduled == plain  # when memory is freed changes no arithmetic
    assert calls.count((1,)) == 3  # after steps 2, 4 and 6
    assert gc.isenabled()
    assert main(["train", "--train-data", str(data / "train.npy"), "--val-data", str(data / "val.npy"),
                 "--out-dir", str(tmp_path / "bad"), *TINY, "--gc-interval", "-1"]) == 2


def test_collection_log_records_each_collection_with_its_generation():
    with CollectionLog() as log:
        gc.collect(0)
        gc.collect(2)
    ours = [e for e in log.events if e["generation"] in (0, 2)]
    assert [e["generation"] for e in ours][-2:] == [0, 2]
    assert all(e["duration_ms"] >= 0 and e["start_s"] >= 0 for e in log.events)
    assert log._callback not in gc.callbacks  # removed on exit
    count = len(log.events)
    gc.collect()
    assert len(log.events) == count  # nothing recorded after the context


def test_step_benchmark_traces_steps_and_collections_on_cpu(tmp_path):
    """--trace-steps: one duration per traced step after the first, one issue time per step, and the scheduled
    collections of --set gc_interval=2 among the recorded ones (generation 1, every second step)."""
    out = tmp_path / "flags.json"
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_step_flags.py"), "--tiny", "--device", "cpu",
                    "--steps", "3", "--windows", "2", "--warmup", "1", "--variants", "baseline,fused",
                    "--set", "gc_interval=2", "--trace-steps", "--out", str(out)],
                   check=True, env=env, timeout=300, capture_output=True)
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    for row in rows.values():
        trace = row["trace"]
        assert len(trace["issued_s"]) == 6 and len(trace["step_ms"]) == 5
        assert trace["issued_s"] == sorted(trace["issued_s"]) and all(ms > 0 for ms in trace["step_ms"])
        # the origin on the wall clock: before the run's file was written, within the test's five minutes
        assert 0 < out.stat().st_mtime - trace["origin_unix"] < 300
        # steps 2..7 ran in the traced context (warm-up included): scheduled collections after 2, 4, 6
        assert [e["generation"] for e in trace["collections"]].count(1) >= 3
