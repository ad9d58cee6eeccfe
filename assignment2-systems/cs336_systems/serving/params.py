"""What a request asks for, and what the engine hands back step by step."""

from dataclasses import dataclass, field

MAX_N = 16  # samples per request: each one is a full sequence in the batch


@dataclass
class SamplingParams:
    """OpenAI's sampling knobs. `temperature` 0 is greedy; `ignore_eos` (a vLLM extension) keeps generating
    past the end-of-text token, which load tests with random-weight models need for fixed output lengths."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1,
             f"max_tokens must be >= 1, got {self.max_tokens}"),
            (0 <= self.temperature <= 2, f"temperature must be in [0, 2], got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (isinstance(self.n, int) and 1 <= self.n <= MAX_N, f"n must be in [1, {MAX_N}], got {self.n}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop sequences must be non-empty strings"),
            (len(self.stop) <= 4, f"at most 4 stop sequences, got {len(self.stop)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class CompletionOutput:
    """One of a request's n samples: cumulative text/ids, what is new since the last report, and why it ended
    ("stop": end-of-text, a stop token or stop string; "length": max_tokens; None: still running)."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
