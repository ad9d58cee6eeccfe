"""The loss-spike guard: an update whose loss or gradient norm jumps far above its running average is skipped.

A single bad batch (or the start of an instability) can push the weights somewhere the run never recovers
from; skipping that one update costs a batch of data. The averages are bias-corrected exponential moving
averages of the steps that were taken; the guard only acts once `warmup_steps` steps have built them.
Non-finite values are left alone: fp16's loss scaler skips those itself, and the trainer's divergence check
reports a NaN loss.
"""

import math


class SpikeGuard:
    def __init__(self, multiple: float, warmup_steps: int, decay: float = 0.99):
        self.multiple, self.warmup_steps, self.decay = multiple, warmup_steps, decay
        self.taken = 0  # steps folded into the averages
        self.loss_ema = self.norm_ema = 0.0
        self.skipped = 0

    @property
    def enabled(self) -> bool:
        return self.multiple > 0

    def averages(self) -> tuple[float, float]:
        correction = 1.0 - self.decay**self.taken
        return self.loss_ema / correction, self.norm_ema / correction

    def allows(self, loss: float, grad_norm: float) -> bool:
        """Whether to take this update; a rejected one is counted in `skipped` and not averaged."""
        if not self.enabled or not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return True
        if self.taken >= max(self.warmup_steps, 1):
            loss_avg, norm_avg = self.averages()
            if loss > self.multiple * loss_avg or grad_norm > self.multiple * norm_avg:
                self.skipped += 1
                return False
        self.taken += 1
        self.loss_ema = self.decay * self.loss_ema + (1.0 - self.decay) * loss
        self.norm_ema = self.decay * self.norm_ema + (1.0 - self.decay) * grad_norm
        return True

    def state_dict(self) -> dict:
        return {"taken": self.taken, "loss_ema": self.loss_ema, "norm_ema": self.norm_ema, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.taken, self.loss_ema = state["taken"], state["loss_ema"]
        self.norm_ema, self.skipped = state["norm_ema"], state["skipped"]
