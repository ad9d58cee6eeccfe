"""The real trainer: trains the API's model variant for a query's FLOPs on a token file (GPU, bf16 autocast).

Tokens D = train_flops / (6·N) with N = 12·n_layer·d_model² (the API's accounting), steps = ⌈D / (batch·ctx)⌉.
AdamW (weight decay 0.01, cs336_basics'), clipping 1.0, cosine from lr to lr/10 over the run, no warm-up.
The reported loss is the mean loss over `eval_batches` held-out batches with dropout off (a less noisy
"final training loss": same distribution, no dropout noise).
"""

import math
import time
from dataclasses import MISSING, dataclass

import numpy as np
import torch

from cs336_basics.cli_support import UserError, bounded, check_ranges
from cs336_basics.data import get_batch, load_tokens
from cs336_basics.optim import AdamW, clip_gradients, get_lr_cosine_schedule
from cs336_scaling.api_spec import RunConfig
from cs336_scaling.model import APIModelConfig, APITransformerLM
from cs336_scaling.tokens import EVAL_FRACTION, check_tokens


@dataclass
class RealTrainer:
    """Checked when built (ranges, device, the token file), so `serve` fails at startup, not on every query."""

    tokens_path: str
    vocab_size: int = bounded(MISSING, ge=1)
    context_length: int = bounded(512, ge=1)
    device: str = "auto"
    eval_batches: int = bounded(8, ge=1)
    max_steps: int | None = bounded(None, ge=1)  # a cap for smoke tests only; it breaks the FLOP accounting
    seed: int = 0
    compile: bool = False
    log_every: int = bounded(0, ge=0)

    def __post_init__(self):
        check_ranges(self)
        device = self._device_or_error()
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {self.device}: CUDA is not available here")
        check_tokens(self.tokens_path, self.vocab_size, self.context_length)

    def _device_or_error(self) -> torch.device:
        try:
            return self._device()
        except RuntimeError as error:
            raise UserError(f"--device {self.device}: {error}") from error

    def _device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def __call__(self, run: RunConfig) -> float:
        return self.train(run)["loss"]

    def train(self, run: RunConfig) -> dict:
        device = self._device()
        tokens = load_tokens(self.tokens_path)
        split = int(len(tokens) * (1 - EVAL_FRACTION))
        train_tokens, eval_tokens = tokens[:split], tokens[split:]
        torch.manual_seed(self.seed)
        generator = torch.Generator().manual_seed(self.seed)
        config = APIModelConfig(self.vocab_size, self.context_length, run.d_model, run.num_layers, run.num_heads)
        model = APITransformerLM(config).to(device)
        step_fn = torch.compile(model) if self.compile else model
        optimizer = AdamW(model.parameters(), lr=run.learning_rate, weight_decay=0.01)
        steps = max(1, math.ceil(run.tokens / (run.batch_size * self.context_length)))
        if self.max_steps is not None:
            steps = min(steps, self.max_steps)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
        started = time.perf_counter()
        model.train()
        for step in range(steps):
            lr = get_lr_cosine_schedule(step, run.learning_rate, run.learning_rate / 10, 0, max(1, steps - 1))
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = get_batch(train_tokens, run.batch_size, self.context_length, device, generator)
            with autocast:
                logits = step_fn(x)
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            clip_gradients(model.parameters(), 1.0)
            optimizer.step()
            if self.log_every and (step % self.log_every == 0 or step == steps - 1):
                print(f"  step {step + 1}/{steps} loss {loss.item():.4f} lr {lr:.2e}", flush=True)
        model.eval()
        losses = []
        eval_generator = torch.Generator().manual_seed(self.seed + 1)
        with torch.no_grad(), autocast:
            for _ in range(self.eval_batches):
                x, y = get_batch(eval_tokens, min(run.batch_size, 64), self.context_length, device, eval_generator)
                logits = model(x)
                losses.append(torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten()).item())
        if device.type == "cuda":
            torch.cuda.synchronize()
        return {"loss": float(np.mean(losses)), "steps": steps, "seconds": time.perf_counter() - started,
                "tokens": steps * run.batch_size * self.context_length, "device": str(device)}
