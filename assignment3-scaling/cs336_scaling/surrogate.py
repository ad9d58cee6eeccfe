"""A documented stand-in for the course's training runs: a parametric law of (N, D, lr, batch, shape) + noise.

    L = min(ln V, [E + A/N^α + B/D^β] · (1 + P)) + ε,  N = 12·n_layer·d_model², D = C / 6N
    P = k_lr·ln²(lr / lr*(N)) + k_bs·ln²(bs / bs*(D)) + k_ar·ln²((d_model/n_layer) / 64) + k_h·ln²(d_head / 64)
    lr*(N) = 1e-3 · (N / 1e7)^(−0.3)  (small models would like more than the API's 1e-3 allows)
    bs*(D) = 180 · (D / 1e9)^0.2
    ε ~ Normal(0, σ) seeded by (seed, configuration), so a configuration always returns the same loss.

With the Chinchilla constants (E, A, B, α, β) = (1.69, 406.4, 410.7, 0.34, 0.28) the compute-optimal size grows
as C^(β/(α+β)) = C^0.452; `true_optimum` finds the optimum within the API's ranges by search, which is what a
study is scored against.
"""

import hashlib
import math
from dataclasses import asdict, dataclass

import numpy as np

from cs336_basics.cli_support import bounded, check_ranges
from cs336_scaling.api_spec import BATCH_SIZES, INT_RANGES, LEARNING_RATE_RANGE, VOCAB_SIZE, RunConfig


@dataclass(frozen=True)
class SurrogateLaw:
    E: float = 1.69
    A: float = 406.4
    B: float = 410.7
    alpha: float = 0.34
    beta: float = 0.28
    lr_ref: float = 1e-3  # lr* at N = n_ref
    n_ref: float = 1e7
    lr_exponent: float = -0.3
    k_lr: float = 0.012
    bs_ref: float = 180.0  # bs* at D = 1e9 tokens
    bs_exponent: float = 0.2
    k_bs: float = 0.01
    k_aspect: float = 0.004
    k_head: float = 0.003
    noise: float = bounded(0.01, ge=0)
    seed: int = 0

    def __post_init__(self):
        check_ranges(self)

    def best_lr(self, n: float) -> float:
        return self.lr_ref * (n / self.n_ref) ** self.lr_exponent

    def best_batch(self, d: float) -> float:
        return self.bs_ref * (d / 1e9) ** self.bs_exponent

    def base(self, n: float, d: float) -> float:
        return self.E + self.A / n**self.alpha + self.B / d**self.beta

    def penalty(self, config: RunConfig) -> float:
        n, d = config.non_embedding_params, config.tokens
        return (self.k_lr * math.log(config.learning_rate / self.best_lr(n)) ** 2
                + self.k_bs * math.log(config.batch_size / self.best_batch(d)) ** 2
                + self.k_aspect * math.log(config.d_model / config.num_layers / 64) ** 2
                + self.k_head * math.log(config.d_model / config.num_heads / 64) ** 2)

    def expected_loss(self, config: RunConfig) -> float:
        n, d = config.non_embedding_params, config.tokens
        return min(math.log(VOCAB_SIZE), self.base(n, d) * (1 + self.penalty(config)))

    def loss(self, config: RunConfig) -> float:
        digest = hashlib.sha256(f"{self.seed}|{config.key()}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        return float(self.expected_loss(config) + self.noise * rng.standard_normal())

    def to_dict(self) -> dict:
        return asdict(self)


def best_shape(n_target: float) -> tuple[int, int, int]:
    """(d_model, num_layers, num_heads) within the API's ranges with 12·L·d² nearest n_target in log,
    preferring d_model/num_layers near 64 and d_head = 64 (the surrogate's, and common practice's, sweet spot)."""
    best, best_score = (64, 2, 2), math.inf
    (d_lo, d_hi), (l_lo, l_hi), (h_lo, h_hi) = INT_RANGES["d_model"], INT_RANGES["num_layers"], INT_RANGES["num_heads"]
    for layers in range(l_lo, l_hi + 1):
        for d_model in range(d_lo, d_hi + 1, 64):
            heads = min(h_hi, max(h_lo, d_model // 64))
            n = 12 * layers * d_model**2
            score = abs(math.log(n / n_target)) + 0.05 * abs(math.log(d_model / layers / 64))
            if score < best_score:
                best, best_score = (d_model, layers, heads), score
    return best


def true_optimum(law: SurrogateLaw, compute: float, points: int = 400) -> dict:
    """The surrogate's compute-optimal run at `compute` within the API's ranges (lr clipped to the range,
    the better of the two batch sizes, the ideal shape), found by a dense search over N."""
    lo, hi = LEARNING_RATE_RANGE
    n_min = 12 * INT_RANGES["num_layers"][0] * INT_RANGES["d_model"][0] ** 2
    n_max = 12 * INT_RANGES["num_layers"][1] * INT_RANGES["d_model"][1] ** 2
    best = None
    for n in np.logspace(math.log10(n_min), math.log10(n_max), points):
        d = compute / (6 * n)
        lr = min(hi, max(lo, law.best_lr(n)))
        for bs in BATCH_SIZES:
            p = law.k_lr * math.log(lr / law.best_lr(n)) ** 2 + law.k_bs * math.log(bs / law.best_batch(d)) ** 2
            loss = min(math.log(VOCAB_SIZE), law.base(n, d) * (1 + p))
            if best is None or loss < best["loss"]:
                best = {"n_opt": float(n), "d_opt": float(d), "loss": float(loss), "learning_rate": lr,
                        "batch_size": bs}
    return best
