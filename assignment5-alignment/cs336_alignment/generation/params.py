"""What every generation backend takes (sampling settings) and gives back (completions)."""

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol


@dataclass(frozen=True)
class SamplingParams:
    """vLLM-compatible sampling settings; temperature 0 is greedy decoding.

    `min_tokens` forbids EOS (and ignores stop strings) until that many tokens exist; `stop` strings end a
    completion and are cut from its text unless `include_stop_str_in_output`; `n` completions per prompt.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    min_tokens: int = 0
    stop: tuple[str, ...] = field(default_factory=tuple)
    include_stop_str_in_output: bool = False
    n: int = 1
    seed: int | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1 or self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise ValueError(f"need 0 <= min_tokens <= max_tokens and max_tokens >= 1, got "
                             f"{self.min_tokens}, {self.max_tokens}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")


@dataclass
class Completion:
    """One sampled continuation of prompt `prompt_index`; `finish_reason` is "stop" (EOS or a stop string)
    or "length" (max_tokens or the model's context ran out)."""

    prompt_index: int
    text: str
    token_ids: list[int]
    finish_reason: Literal["stop", "length"]


class GenerationBackend(Protocol):
    def generate(self, prompts: Sequence[str], params: SamplingParams) -> list[Completion]:
        """`n` completions per prompt, prompt-major: [p0 c0, p0 c1, ..., p1 c0, ...]."""
        ...
