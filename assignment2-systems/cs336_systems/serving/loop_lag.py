"""The HTTP server's event loop under load: `LoopLagMonitor` says how late a heartbeat on it runs (the
`event_loop_lag_seconds` metric); `StallSampler`, a watchdog thread, looks at the loop's thread while a beat is
overdue and records its innermost frames, once per stall, so that `GET /debug/loop_stalls` names what blocked
the loop (a burst of admissions, a slow write, a long parse) rather than only for how long."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
import traceback
from collections import deque
from typing import Any


class LoopLagMonitor:
    """How late a 10 ms heartbeat on the server's event loop runs: the time any ready callback (a chunk to
    write, a request to parse) may wait for the loop. `max_recent()` is the largest lag of the last
    `window_s` seconds. A chain of `call_at` timers, not a task, so a closing loop just drops it."""

    def __init__(self, interval_s: float = 0.01, window_s: float = 10.0):
        self.interval_s, self.window_s = interval_s, window_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._due = 0.0
        self._maxima: deque[tuple[float, float]] = deque()  # (time, lag), lags decreasing: a sliding-window max
        self.stalls = StallSampler(self)

    def ensure_started(self) -> None:
        """Starts the heartbeat on the running loop (the first request does: uvicorn may run without lifespan),
        and the stall sampler watching it."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._schedule()
            self.stalls.start(threading.get_ident())

    def pending(self) -> tuple[float, float]:
        """(when the pending beat was due, how overdue it is now), in the loop's clock; safe from other threads."""
        due = self._due
        return due, (max(0.0, time.monotonic() - due) if self._loop is not None else 0.0)

    def closed(self) -> bool:
        return self._loop is not None and self._loop.is_closed()

    def _schedule(self) -> None:
        self._due = self._loop.time() + self.interval_s
        self._loop.call_at(self._due, self._beat)

    def _beat(self) -> None:
        now = self._loop.time()
        self.record(now, max(0.0, now - self._due))
        self._schedule()

    def record(self, now: float, lag: float) -> None:
        while self._maxima and self._maxima[-1][1] <= lag:
            self._maxima.pop()
        self._maxima.append((now, lag))
        while self._maxima[0][0] < now - self.window_s:
            self._maxima.popleft()

    def max_recent(self) -> float | None:
        """The largest lag of the last `window_s` seconds, counting a beat that is overdue now; None before the
        heartbeat started."""
        if self._loop is None:
            return None
        now = self._loop.time()
        while self._maxima and self._maxima[0][0] < now - self.window_s:
            self._maxima.popleft()
        overdue = max(0.0, now - self._due)
        return max(overdue, self._maxima[0][1]) if self._maxima else overdue


class StallSampler:
    """Samples the loop thread's stack when `monitor`'s pending beat is `threshold_s` overdue (one sample per
    late beat), keeping the last `keep` samples. A daemon thread polling every `poll_s`; it ends with the loop.
    A stall inside C code that holds the interpreter lock is seen only when the lock comes back: its sample
    then shows where the loop went next."""

    def __init__(self, monitor: LoopLagMonitor, *, threshold_s: float = 0.05, poll_s: float = 0.01,
                 depth: int = 10, keep: int = 256):
        self.monitor, self.threshold_s, self.poll_s, self.depth = monitor, threshold_s, poll_s, depth
        self.samples: deque[dict[str, Any]] = deque(maxlen=keep)
        self._thread: threading.Thread | None = None

    def start(self, loop_thread_id: int) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, args=(loop_thread_id,), name="loop-stall-sampler",
                                            daemon=True)
            self._thread.start()

    def _watch(self, loop_thread_id: int) -> None:
        sampled_due = None
        while not self.monitor.closed():
            time.sleep(self.poll_s)
            due, overdue = self.monitor.pending()
            if overdue < self.threshold_s or due == sampled_due:
                continue
            frame = sys._current_frames().get(loop_thread_id)
            if frame is None:
                return  # the loop's thread has ended
            sampled_due = due
            stack = [f"{os.path.basename(f.filename)}:{f.lineno} {f.name}"
                     for f in traceback.extract_stack(frame)[-self.depth:]]
            self.samples.append({"at": time.monotonic(), "overdue_ms": overdue * 1e3, "stack": stack})

    def report(self, since: float | None = None, top: int = 5) -> dict[str, Any]:
        """Samples taken after `since` (time.monotonic), grouped by stack, most frequent first."""
        chosen = [s for s in list(self.samples) if since is None or s["at"] >= since]
        groups: dict[tuple[str, ...], dict[str, Any]] = {}
        for s in chosen:
            group = groups.setdefault(tuple(s["stack"]), {"count": 0, "max_overdue_ms": 0.0, "stack": s["stack"]})
            group["count"] += 1
            group["max_overdue_ms"] = max(group["max_overdue_ms"], s["overdue_ms"])
        ranked = sorted(groups.values(), key=lambda g: (-g["count"], -g["max_overdue_ms"]))
        return {"threshold_ms": self.threshold_s * 1e3, "samples": len(chosen), "stacks": ranked[:top]}
