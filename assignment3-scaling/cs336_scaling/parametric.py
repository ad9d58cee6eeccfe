"""Chinchilla approach 3: L(N, D) = E + A/N^α + B/D^β fitted with a Huber loss on log L.

As in Hoffmann et al. (2022): the parameters are (log A, log B, log E, α, β) so that log L̂ is a log-sum-exp,
the loss is Huber(δ) of the residual in log space (robust to the odd diverged run), and L-BFGS-B starts
from a grid of initialisations, keeping the best local optimum.
"""

import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np

from cs336_basics.cli_support import UserError


@dataclass(frozen=True)
class ParametricLaw:
    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, n: float | np.ndarray, d: float | np.ndarray) -> float | np.ndarray:
        return self.E + self.A / np.asarray(n, float) ** self.alpha + self.B / np.asarray(d, float) ** self.beta

    def n_opt(self, compute: float | np.ndarray) -> float | np.ndarray:
        """argmin_N L(N, C/6N): N_opt = G·(C/6)^(β/(α+β)), G = (αA / βB)^(1/(α+β))."""
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        return g * (np.asarray(compute, float) / 6) ** (self.beta / (self.alpha + self.beta))

    def d_opt(self, compute: float | np.ndarray) -> float | np.ndarray:
        return np.asarray(compute, float) / (6 * self.n_opt(compute))

    @property
    def a(self) -> float:
        """Exponent of N_opt ∝ C^a."""
        return self.beta / (self.alpha + self.beta)

    def to_dict(self) -> dict:
        return asdict(self)


def _huber(r: np.ndarray, delta: float) -> np.ndarray:
    absolute = np.abs(r)
    return np.where(absolute <= delta, 0.5 * r * r, delta * (absolute - 0.5 * delta))


def fit_parametric(n: np.ndarray, d: np.ndarray, loss: np.ndarray, delta: float = 1e-3,
                   inits: dict[str, list[float]] | None = None) -> tuple[ParametricLaw, float]:
    """Returns the law and its mean Huber objective. Needs runs that vary N and D independently."""
    from scipy.optimize import minimize  # here: scipy's import is slow, and most commands never fit
    from scipy.special import logsumexp

    log_n, log_d, log_l = (np.log(np.asarray(x, float)) for x in (n, d, loss))
    if len(log_l) < 5:
        raise UserError(f"approach 3 fits 5 parameters; got {len(log_l)} runs")
    grid = inits or {"a": [0.0, 5.0, 10.0, 20.0], "b": [0.0, 5.0, 10.0, 20.0], "e": [-1.0, 1.0],
                     "alpha": [0.2, 0.5], "beta": [0.2, 0.5]}

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        a, b, e, alpha, beta = theta
        terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
        pred = logsumexp(terms, axis=0)
        r = pred - log_l
        weights = np.exp(terms - pred)  # softmax: d pred / d (a, b, e)
        dh = np.clip(r, -delta, delta)  # Huber derivative
        grad = np.array([
            (dh * weights[0]).sum(), (dh * weights[1]).sum(), (dh * weights[2]).sum(),
            -(dh * weights[0] * log_n).sum(), -(dh * weights[1] * log_d).sum(),
        ]) / len(r)
        return float(_huber(r, delta).mean()), grad

    best_value, best_theta = math.inf, None
    bounds = [(-10, 60), (-10, 60), (-5, 5), (0.0, 2.5), (0.0, 2.5)]
    for start in itertools.product(grid["a"], grid["b"], grid["e"], grid["alpha"], grid["beta"]):
        # Tight tolerances: the objective is tiny (δ = 1e-3), so the defaults would stop short of the optimum.
        result = minimize(objective, np.array(start), jac=True, method="L-BFGS-B", bounds=bounds,
                          options={"ftol": 1e-15, "gtol": 1e-13, "maxiter": 2000})
        if result.fun < best_value:
            best_value, best_theta = float(result.fun), result.x
    a, b, e, alpha, beta = best_theta
    return ParametricLaw(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=float(alpha), beta=float(beta)), best_value
