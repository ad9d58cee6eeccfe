"""`--gc-interval`: Python's automatic garbage collection off while training, young-generation collections on a
schedule (cs336_basics/training/gc_schedule.py). Checked against the interpreter's own gc state and counters,
a real reference cycle, and the trainer's loss curve."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest

from cs336_basics.cli import main
from cs336_basics.cli_support import UserError
from cs336_basics.testing import one_thread  # noqa: F401 (autouse: one torch thread)
from cs336_basics.training.config import TrainConfig
from cs336_basics.training.gc_schedule import ScheduledGC
from cs336_basics.training.metrics import read_jsonl


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


@pytest.fixture
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("gc_data")
    ids = np.random.default_rng(0).integers(0, 64, size=20_000, dtype=np.uint16)
    np.save(root / "train.npy", ids[:16_000])
    np.save(root / "val.npy", ids[16_000:])
    return root


TINY = ["--vocab-size", "64", "--context-length", "16", "--d-model", "32", "--num-layers", "2", "--num-heads", "2",
        "--d-ff", "64", "--batch-size", "4", "--max-steps", "6", "--warmup-steps", "2", "--eval-interval", "6",
        "--eval-batches", "1", "--log-interval", "1", "--checkpoint-interval", "6", "--device", "cpu", "--no-progress"]


def _losses(data, out, *extra):
    assert main(["train", "--train-data", str(data / "train.npy"), "--val-data", str(data / "val.npy"),
                 "--out-dir", str(out), *TINY, *extra]) == 0
    return [r["loss"] for r in read_jsonl(str(out / "metrics.jsonl")) if r["split"] == "train"]


def test_trainer_with_a_gc_interval_keeps_the_curve_and_restores_the_collector(data, tmp_path, gc_enabled,
                                                                             monkeypatch):
    plain = _losses(data, tmp_path / "plain")
    calls = _counting_collect(monkeypatch)
    scheduled = _losses(data, tmp_path / "gc", "--gc-interval", "2")
    assert scheduled == plain  # when memory is freed changes no arithmetic
    assert calls.count((1,)) == 3  # after steps 2, 4 and 6
    assert gc.isenabled()
    assert main(["train", "--train-data", str(data / "train.npy"), "--val-data", str(data / "val.npy"),
                 "--out-dir", str(tmp_path / "bad"), *TINY, "--gc-interval", "-1"]) == 2
