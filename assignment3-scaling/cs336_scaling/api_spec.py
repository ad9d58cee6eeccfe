"""The training API's contract: parameter ranges, allowed budgets and error messages, shared by client and server.

The ranges and message wording follow the course handout (§3.1), e.g. "d_model must be in range [64, 1024],
got 9999" and "Invalid API key provided: …". The wording of the budget refusal is ours (the handout only says
that queries past the budget are refused).
"""

from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass

from cs336_basics.cli_support import UserError, bounded, check_ranges

INT_RANGES: dict[str, tuple[int, int]] = {"d_model": (64, 1024), "num_layers": (2, 24), "num_heads": (2, 16)}
LEARNING_RATE_RANGE = (1e-4, 1e-3)
BATCH_SIZES = (128, 256)
TRAIN_FLOPS = tuple(int(x) for x in (1e13, 3e13, 6e13, 1e14, 3e14, 6e14, 1e15, 3e15, 6e15, 1e16,
                                     3e16, 6e16, 1e17, 3e17, 6e17, 1e18))
DEFAULT_BUDGET = 2e18
CONTEXT_LENGTH = 512
VOCAB_SIZE = 32_000
PARAMETERS = ("d_model", "num_layers", "num_heads", "batch_size", "learning_rate", "train_flops")


class APIError(Exception):
    """An error the API reports as {"message": ...}; `status` is the HTTP status it comes with."""

    def __init__(self, message: str, status: int = 404):
        super().__init__(message)
        self.message, self.status = message, status


class BudgetExceededError(APIError):
    def __init__(self, message: str):
        super().__init__(message, status=403)


def invalid_key_message(api_key: str) -> str:
    return f"Invalid API key provided: {api_key}"


def budget_message(train_flops: float, used: float, budget: float) -> str:
    return (f"Budget exceeded: this query needs {train_flops:.3g} FLOPs but only {budget - used:.3g} of the "
            f"{budget:.3g}-FLOP budget remain")


@dataclass(frozen=True)
class RunConfig:
    """One query: a model shape, its optimiser settings and the training FLOPs (C = 6·N·D).

    Any configuration the model can be built and trained with (`train` and `profile` may leave the API's
    ranges); `validate` applies the API's narrower contract.
    """

    d_model: int = bounded(MISSING, ge=1)
    num_layers: int = bounded(MISSING, ge=1)
    num_heads: int = bounded(MISSING, ge=1)
    batch_size: int = bounded(MISSING, ge=1)
    learning_rate: float = bounded(MISSING, gt=0)
    train_flops: int = bounded(MISSING, gt=0)

    def __post_init__(self):
        check_ranges(self)
        if self.d_model % self.num_heads:
            raise UserError(f"--d-model ({self.d_model}) must be divisible by --num-heads ({self.num_heads})")

    @property
    def non_embedding_params(self) -> int:
        """12·n_layer·d_model², the handout's count (attention 4d², FFN 8d² per layer)."""
        return 12 * self.num_layers * self.d_model**2

    @property
    def tokens(self) -> float:
        return self.train_flops / (6 * self.non_embedding_params)

    def to_dict(self) -> dict:
        return asdict(self)

    def key(self) -> str:
        """Canonical text of the configuration: equal queries (however spelled) share one key."""
        return ",".join(f"{name}={getattr(self, name)!r}" for name in PARAMETERS)


def _as_int(name: str, value) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise APIError(f"{name} must be an integer, got {value}") from None
    if not number.is_integer():
        raise APIError(f"{name} must be an integer, got {value}")
    return int(number)


def _as_float(name: str, value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise APIError(f"{name} must be a number, got {value}") from None


def validate(params: Mapping) -> RunConfig:
    """Checks a query like the API does (first offending parameter wins) and returns it normalised."""
    for name in PARAMETERS:
        if params.get(name) is None:
            raise APIError(f"missing required parameter {name}", status=422)
    values: dict = {}
    for name, (low, high) in INT_RANGES.items():
        values[name] = _as_int(name, params[name])
        if not low <= values[name] <= high:
            raise APIError(f"{name} must be in range [{low}, {high}], got {params[name]}")
    values["batch_size"] = _as_int("batch_size", params["batch_size"])
    if values["batch_size"] not in BATCH_SIZES:
        raise APIError(f"batch_size must be one of {list(BATCH_SIZES)}, got {params['batch_size']}")
    values["learning_rate"] = _as_float("learning_rate", params["learning_rate"])
    low, high = LEARNING_RATE_RANGE
    if not low <= values["learning_rate"] <= high:
        raise APIError(f"learning_rate must be in range [{low}, {high}], got {params['learning_rate']}")
    if values["d_model"] % values["num_heads"]:  # the model splits d_model into num_heads equal heads
        raise APIError(f"d_model must be divisible by num_heads, got d_model={params['d_model']}, "
                       f"num_heads={params['num_heads']}")
    values["train_flops"] = _as_int("train_flops", params["train_flops"])
    if values["train_flops"] not in TRAIN_FLOPS:
        allowed = ", ".join(f"{x:.0e}" for x in TRAIN_FLOPS)
        raise APIError(f"train_flops must be one of [{allowed}], got {params['train_flops']}")
    return RunConfig(**values)
