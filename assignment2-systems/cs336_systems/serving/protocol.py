"""OpenAI's wire format for `/v1/completions`, `/v1/chat/completions` and `/v1/models`, as pydantic models.

Requests are validated strictly (`"max_tokens": "16"` is a type error, not 16): a wrong type or shape is a
schema error (HTTP 422), while a well-typed value outside its range (`temperature: 3`) is a bad value (HTTP 400,
raised here as `BadRequest` naming the parameter). Range checks live in `to_sampling_params`, not in pydantic
constraints, so that the two kinds of error stay apart. Unknown fields are ignored (as vLLM does); known OpenAI
fields this server does not implement (logprobs, penalties, echo, tools, ...) are accepted only at their
neutral values and refused otherwise, so a client never silently gets something other than what it asked for.

Extensions (vLLM's names): `ignore_eos`, `stop_token_ids`, and `return_token_ids` (each choice, streamed or
not, also carries the token ids it adds: load generators count tokens exactly with it).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from cs336_systems.serving.params import MAX_N, SamplingParams

INT64 = 2**63


class BadRequest(ValueError):
    """A well-formed request with a value this server refuses (HTTP 400), naming the parameter when known."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool | None = False


class _SamplingFields(_Strict):
    """What both endpoints share: the model, sampling knobs, streaming and the extensions."""

    model: str | None = None  # None: the served model (vLLM's leniency; OpenAI requires it)
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # extensions
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    return_token_ids: bool = False

    def _unsupported(self) -> list[tuple[str, bool]]:
        return [
            ("presence_penalty", self.presence_penalty not in (None, 0)),
            ("frequency_penalty", self.frequency_penalty not in (None, 0)),
            ("logit_bias", bool(self.logit_bias)),
        ]

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options is not None and self.stream_options.include_usage)

    def sampling_params(self, max_tokens: int, *, vocab_size: int | None = None) -> SamplingParams:
        """The engine's `SamplingParams`, every range checked here first so the error names its parameter."""
        for name, used in self._unsupported():
            if used:
                raise BadRequest(f"{name} is not supported by this server", name)
        if self.stream_options is not None and not self.stream:
            raise BadRequest("stream_options is only allowed when stream is true", "stream_options")
        temperature = 1.0 if self.temperature is None else self.temperature
        top_p = 1.0 if self.top_p is None else self.top_p
        n = 1 if self.n is None else self.n
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        checks = [
            (max_tokens >= 1, f"max_tokens must be >= 1, got {max_tokens}", "max_tokens"),
            (0 <= temperature <= 2, f"temperature must be in [0, 2], got {temperature}", "temperature"),
            (0 < top_p <= 1, f"top_p must be in (0, 1], got {top_p}", "top_p"),
            (1 <= n <= MAX_N, f"n must be in [1, {MAX_N}], got {n}", "n"),
            (self.seed is None or -INT64 <= self.seed < INT64, f"seed must fit in 64 bits, got {self.seed}", "seed"),
            (all(stop), "stop sequences must be non-empty strings", "stop"),
            (len(stop) <= 4, f"at most 4 stop sequences, got {len(stop)}", "stop"),
            (vocab_size is None or all(0 <= t < vocab_size for t in self.stop_token_ids or []),
             f"stop_token_ids must be in [0, {vocab_size})", "stop_token_ids"),
        ]
        for ok, message, param in checks:
            if not ok:
                raise BadRequest(message, param)
        try:
            return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, n=n, seed=self.seed,
                                  stop=stop, stop_token_ids=list(self.stop_token_ids or []),
                                  ignore_eos=self.ignore_eos)
        except ValueError as e:
            raise BadRequest(str(e)) from e


# ------------------------------------------------------------------------------------------------ completions
class CompletionRequest(_SamplingFields):
    # a string, a list of token ids, or a batch of either
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def _unsupported(self) -> list[tuple[str, bool]]:
        return [*super()._unsupported(), ("echo", bool(self.echo)), ("logprobs", self.logprobs is not None),
                ("best_of", self.best_of not in (None, 1, self.n)), ("suffix", bool(self.suffix))]

    def prompts(self) -> list[str | list[int]]:
        """The batch of prompts, each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise BadRequest("prompt must not be empty", "prompt")
        if isinstance(p[0], int):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class _Choice(BaseModel):
    """Drops the `token_ids` extension when it was not asked for (None), keeps every other null."""

    @model_serializer(mode="wrap")
    def _drop_absent_token_ids(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        if data.get("token_ids") is None:
            data.pop("token_ids", None)
        return data


class CompletionChoice(_Choice):
    index: int
    text: str
    logprobs: None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = None


class Completion(BaseModel):
    """Both the whole response (`stream: false`) and each streamed chunk: OpenAI uses one object for both."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


# ----------------------------------------------------------------------------------------------------- chat
class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message's text; content parts must all be `{"type": "text"}` (this server reads no images)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        texts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadRequest(f"only text content parts are supported, got type {part.get('type')!r}",
                                 "messages")
            texts.append(part["text"])
        return "".join(texts)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_tokens: int | None = None  # None: as many as the context leaves
    max_completion_tokens: int | None = None  # OpenAI's newer name; wins when both are given
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None

    def _unsupported(self) -> list[tuple[str, bool]]:
        fmt = self.response_format
        return [*super()._unsupported(), ("logprobs", bool(self.logprobs)), ("top_logprobs", bool(self.top_logprobs)),
                ("tools", bool(self.tools)), ("tool_choice", self.tool_choice not in (None, "none")),
                ("response_format", fmt is not None and fmt.get("type") != "text")]

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def message_dicts(self) -> list[dict[str, str]]:
        """`[{"role", "content"}]` with text content, what chat templates take."""
        if not self.messages:
            raise BadRequest("messages must not be empty", "messages")
        return [{"role": m.role, "content": m.text()} for m in self.messages]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Choice):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class Delta(BaseModel):
    """A streamed message fragment: the first one of a choice carries the role, later ones only content, the
    last one is empty (with the choice's finish_reason). Absent keys are left out, as OpenAI does."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(_Choice):
    index: int
    delta: Delta
    logprobs: None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


# --------------------------------------------------------------------------------------------- models, errors
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "cs336"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"
