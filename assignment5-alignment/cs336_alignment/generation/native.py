"""Batched sampling with a KV cache on any HF causal LM or the cs336_basics LM (CPU or GPU, no vLLM)."""

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from cs336_alignment.generation.params import Completion, SamplingParams
from cs336_alignment.generation.steppers import make_stepper
from cs336_alignment.lm import model_device
from cs336_alignment.text_tokenizer import encode, pad_token_id, stop_token_ids
from cs336_basics.decoding import sample_next_token


def find_stop(text: str, stops: Sequence[str], after: int = 0) -> tuple[int, str] | None:
    """(index, stop string) of the earliest stop string in `text` that ends after its first `after`
    characters, or None."""
    hits = [(i, s) for s in stops if (i := text.find(s, max(0, after - len(s) + 1))) >= 0]
    return min(hits) if hits else None


class NativeBackend:
    """Generates completions in batches of `batch_size` rows (prompts x n), one cached forward per token.

    EOS ends a completion and is not part of its text; with `min_tokens` EOS is masked out until then.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, batch_size: int = 16):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    def generate(self, prompts: Sequence[str], params: SamplingParams) -> list[Completion]:
        """`params.n` completions per prompt, prompt-major; a seed makes the whole call reproducible."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a sequence of strings, not one string")
        encoded = [encode(self.tokenizer, p, add_special_tokens=True) for p in prompts]
        if any(not ids for ids in encoded):
            raise ValueError("every prompt must encode to at least one token")
        requests = [(i, ids) for i, ids in enumerate(encoded) for _ in range(params.n)]
        device = model_device(self.model)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=device).manual_seed(params.seed)
        was_training = self.model.training
        self.model.eval()
        # Batches of similar prompt lengths waste less compute on padding; results go back in request order.
        order = sorted(range(len(requests)), key=lambda r: len(requests[r][1]))
        results: list[Completion | None] = [None] * len(requests)
        try:
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                for r, completion in zip(chunk, self._generate_batch([requests[r] for r in chunk], params, generator),
                                         strict=True):
                    results[r] = completion
        finally:
            self.model.train(was_training)
        return [c for c in results if c is not None]

    @torch.no_grad()
    def _generate_batch(
        self, requests: list[tuple[int, list[int]]], params: SamplingParams, generator: torch.Generator | None
    ) -> list[Completion]:
        device = model_device(self.model)
        batch, longest = len(requests), max(len(ids) for _, ids in requests)
        pad = pad_token_id(self.tokenizer)
        tokens = torch.full((batch, longest), pad, dtype=torch.long, device=device)
        mask = torch.zeros((batch, longest), dtype=torch.bool, device=device)
        for row, (_, ids) in enumerate(requests):
            tokens[row, longest - len(ids) :] = torch.tensor(ids, device=device)
            mask[row, longest - len(ids) :] = True

        stepper = make_stepper(self.model)
        budget = stepper.budget(longest, params.max_tokens)
        if budget == 0:
            raise ValueError(f"a prompt of {longest} tokens leaves no room to generate in the model's context")
        eos = sorted(stop_token_ids(self.tokenizer))
        window = 2 * max((len(s) for s in params.stop), default=0) + 8
        outputs: list[list[int]] = [[] for _ in range(batch)]
        texts: list[str | None] = [None] * batch
        finished = [False] * batch
        logits: Tensor = stepper.start(tokens, mask, budget)
        for step in range(budget):
            logits = logits.float()
            if step < params.min_tokens and eos:
                logits[:, eos] = float("-inf")
            chosen = sample_next_token(logits, params.temperature, params.top_p, generator)
            for row, token in enumerate(chosen.tolist()):
                if finished[row]:
                    continue
                if token in eos:
                    finished[row] = True
                    continue
                outputs[row].append(token)
                if params.stop and len(outputs[row]) >= params.min_tokens:
                    texts[row] = self._cut_at_stop(outputs[row], params, window)
                    finished[row] = texts[row] is not None
            if all(finished) or step == budget - 1:
                break
            feed = torch.where(torch.tensor(finished, device=device), torch.full_like(chosen, pad), chosen)
            logits = stepper.step(feed)

        results = []
        for row, (index, _) in enumerate(requests):
            text = texts[row]
            if text is None:
                text = self.tokenizer.decode(outputs[row], skip_special_tokens=True)
            reason = "stop" if finished[row] else "length"
            results.append(Completion(index, text, outputs[row], reason))
        return results

    def _cut_at_stop(self, ids: list[int], params: SamplingParams, window: int) -> str | None:
        """The completion's text cut at its first stop string, or None while no stop string has appeared.

        As in vLLM, a stop string counts only if it ends in the `min_tokens`-th token or later: one completed
        earlier is ignored (else a response could be cut shorter than `min_tokens`, even to nothing)."""
        if find_stop(self.tokenizer.decode(ids[-window:], skip_special_tokens=True), params.stop) is None:
            return None
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        before_min = len(self.tokenizer.decode(ids[: params.min_tokens - 1], skip_special_tokens=True)) \
            if params.min_tokens > 1 else 0
        hit = find_stop(text, params.stop, after=before_min)
        if hit is None:
            return None
        index, stop = hit
        return text[: index + len(stop)] if params.include_stop_str_in_output else text[:index]
