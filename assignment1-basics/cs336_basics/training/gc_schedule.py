"""Python's cyclic garbage collector on a schedule during training.

Why: a GPU-bound step keeps the host only a little ahead of the GPU (the launch queue is finite), so a pause of
the host longer than that lead idles the GPU. Python's collector decides on its own when to walk the heap, and a
collection of the oldest generation walks every tracked object that torch, Inductor's generated code and the
data pipeline have left (millions): tens of milliseconds at moments nobody chose. With an interval N > 0 the
automatic collector is off while training runs, one full collection happens before the first step, and a
collection of the young generations (cheap: only what the last steps allocated) runs every N steps, so cycles
made by the steps are still freed. Reference cycles that survive into the old generation are collected only
again when the context ends, which for a training loop's steady state (no growing object graph) is harmless.
Measured on the owt-leaderboard step (H100): no old-generation collection ran while it was timed, and the
schedule left the step within ±0.2 ms (benchmarks/NOTES_throughput.md); it is for loops that do make garbage.
"""

from __future__ import annotations

import gc
import time


class ScheduledGC:
    """`with ScheduledGC(interval) as collector: ... collector.step(done)`; interval 0 leaves Python's
    automatic collection alone (and `step` does nothing)."""

    def __init__(self, interval: int):
        if interval < 0:
            raise ValueError(f"gc interval must be >= 0 (0: Python's automatic collection), got {interval}")
        self.interval = interval
        self.collections = 0  # scheduled young-generation collections so far
        self._was_enabled: bool | None = None

    def __enter__(self) -> ScheduledGC:
        if self.interval > 0 and self._was_enabled is None:
            self._was_enabled = gc.isenabled()
            gc.collect()
            gc.disable()
        return self

    def step(self, done: int) -> None:
        """Called after step `done` (1-based count of finished steps)."""
        if self.interval > 0 and done % self.interval == 0:
            gc.collect(1)
            self.collections += 1

    def __exit__(self, *exc) -> None:
        if self._was_enabled is not None:
            if self._was_enabled:
                gc.enable()
            self._was_enabled = None


class CollectionLog:
    """Every collection Python's cyclic collector runs while the context is open, as dicts of generation, start
    (seconds from the context's start, perf_counter clock), duration and objects collected: to line a stall of
    a timed loop up with the collections that ran in it (`gc.callbacks`)."""

    def __init__(self):
        self.events: list[dict] = []
        self.origin = 0.0  # perf_counter at the context's start
        self.origin_unix = 0.0  # the same moment on the wall clock (to line the log up with other tools' logs)
        self._started: float | None = None

    def _callback(self, phase: str, info: dict) -> None:
        now = time.perf_counter()
        if phase == "start":
            self._started = now
        elif self._started is not None:
            self.events.append({"generation": info["generation"], "start_s": self._started - self.origin,
                                "duration_ms": (now - self._started) * 1e3, "collected": info["collected"]})
            self._started = None

    def __enter__(self) -> CollectionLog:
        self.origin, self.origin_unix = time.perf_counter(), time.time()
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._callback)
