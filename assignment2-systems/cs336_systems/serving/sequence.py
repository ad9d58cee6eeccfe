"""A request (prompt + sampling parameters) and its n sequences, as the scheduler and engine track them."""

import enum
import itertools
import time
from dataclasses import dataclass, field

from cs336_systems.serving.params import SamplingParams

_seq_ids = itertools.count(1)


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One sample. `token_ids` is prompt + output; the first `num_cached` of them have keys/values in the pool,
    so a decode step feeds token `num_cached` and a (re)prefill feeds them all."""

    request: "Request"
    index: int
    token_ids: list[int]
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    num_cached: int = 0
    # Tokens of launched decode windows that the host has not read yet (asynchronous scheduling; else 0): the
    # device already holds them, so the next window starts `num_inflight` positions further on.
    num_inflight: int = 0
    status: Status = Status.WAITING
    finish_reason: str | None = None
    forks_pending: int = 0  # samples still to split off this one after its prompt is prefilled
    text: str = ""  # detokenized output so far (cut at a stop string when one appears)
    emitted_chars: int = 0  # how much of `text` the client has been sent
    emitted_tokens: int = 0
    detokenizer: object = None

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: float = field(default_factory=time.monotonic)
    seqs: list[Sequence] = field(default_factory=list)
    generators: list | None = None  # one torch.Generator per sample when the request carries a seed
    end_ids: frozenset[int] = frozenset()  # token ids that end a sample: stop_token_ids, and eos unless ignored

    @property
    def finished(self) -> bool:
        return len(self.seqs) == self.params.n and all(s.finished for s in self.seqs)
