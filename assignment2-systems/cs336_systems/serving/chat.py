"""Chat messages -> one prompt string, the text the model continues.

An HF model whose tokenizer ships a `chat_template` is prompted exactly as it was fine-tuned (transformers
renders the Jinja template, with the assistant's generation prompt appended). Our own `cs336_basics` models have
no template of their own, so they get PLAIN: each message is a role tag on its own line, then its content and a
newline; the prompt ends with the tag of the turn the model is to write:

    <|system|>
    You are terse.
    <|user|>
    Hi!
    <|assistant|>

The tags are ordinary text to our byte-level tokenizers (not special tokens), so any run can read them; a model
fine-tuned on this layout ends its turn with its end-of-text token, which stops generation like any EOS.
"""

from __future__ import annotations

from typing import Any

ROLES = ("system", "developer", "user", "assistant", "tool")
GENERATION_PROMPT = "<|assistant|>\n"


def _check(messages: list[dict[str, str]]) -> None:
    if not messages:
        raise ValueError("messages must not be empty")
    for m in messages:
        if m.get("role") not in ROLES:
            raise ValueError(f"unknown message role {m.get('role')!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise ValueError("message content must be text")


def render_plain(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """The PLAIN layout above (`add_generation_prompt=False` leaves off the final assistant tag)."""
    _check(messages)
    text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
    return text + (GENERATION_PROMPT if add_generation_prompt else "")


def has_hf_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_hf(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The tokenizer's own Jinja template with the generation prompt, as text (not ids: the engine encodes).

    A template may refuse a conversation (many require user/assistant turns to alternate, some have no system
    role); its error becomes a one-line `ValueError`, which the server answers with HTTP 400.
    """
    _check(messages)
    if not has_hf_template(tokenizer):
        raise ValueError("this tokenizer has no chat_template")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja2's TemplateError (raise_exception in a template) and friends
        lines = str(e).strip().splitlines()
        raise ValueError(f"chat template refused the messages: {lines[0] if lines else type(e).__name__}") from e
    if not isinstance(text, str):
        raise ValueError(f"chat template returned {type(text).__name__}, not text")
    return text


def render(messages: list[dict[str, str]], hf_tokenizer: Any = None) -> str:
    """The HF tokenizer's template when it has one, else PLAIN: what `ServedModel.apply_chat_template` calls."""
    if hf_tokenizer is not None and has_hf_template(hf_tokenizer):
        return render_hf(hf_tokenizer, messages)
    return render_plain(messages)
