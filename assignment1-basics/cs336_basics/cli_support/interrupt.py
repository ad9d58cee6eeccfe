"""SIGINT/SIGTERM as a request to stop that a training loop honours between steps.

    with StopRequest() as stop:
        for step in ...:
            train_step()
            if stop.requested:
                save_checkpoint(); break
    sys.exit(stop.exit_code)   # 130 for SIGINT, 143 for SIGTERM

A second SIGINT while a stop is pending raises KeyboardInterrupt (the user insists). Handlers are installed
only in the main thread and restored on exit.
"""

import signal
import sys
import threading
from types import FrameType


class StopRequest:
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, announce: bool = True):
        self.signum: int | None = None
        self.announce = announce
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 0 if self.signum is None else 128 + self.signum

    @property
    def name(self) -> str:
        return "" if self.signum is None else signal.Signals(self.signum).name

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        if self.announce:
            print(f"\n{signal.Signals(signum).name} received: finishing the current step and checkpointing "
                  "(Ctrl-C again to abort)", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
