"""GRPO pinned down so that a defect cannot hide behind tuning (tiny cs336_basics models, CPU, seconds).

* Gradients: every parameter's accumulated gradient after `grpo_microbatch_train_step` (and after the loop's
  own train step) equals the gradient of a surrogate written out here by hand, response by response on its own
  unpadded ids: -(1/B) Σ_i (1/n_i) Σ_t w_it log π(y_it), with the per-token weight w (reward, advantage, or the
  importance-weighted advantage with the clip rule applied explicitly) and n_i the length or the constant.
* Bandit: with rollouts sampled from the live policy restricted to a few fixed strings, `run_grpo` must move
  the policy onto the rewarded string, on- and off-policy.
* Optimizer: a fresh AdamW's first step moves every weight by the full lr whatever the gradient's scale (why
  a large lr can wreck a pretrained policy in a couple of steps), and `warmup_steps` scales that first step.
* Masks: rollouts from the real native sampler (ended by EOS, by a stop string kept or cut, by max_tokens)
  become training rows whose mask covers exactly the response, as the tokens the policy sampled; re-encoding
  the text instead would often train on other tokens.
"""

from dataclasses import replace

import pytest
import torch

from cs336_alignment.generation import Completion, NativeBackend, SamplingParams
from cs336_alignment.grpo import grpo_microbatch_train_step
from cs336_alignment.lm import BasicsCausalLM
from cs336_alignment.logprobs import get_response_log_probs
from cs336_alignment.rollouts import sample_rollouts
from cs336_alignment.testing import basics_tokenizer, hf_tokenizer, tiny_basics_lm
from cs336_alignment.text_tokenizer import BasicsTokenizer
from cs336_alignment.tokenization import tokenize_prompt_and_output, tokenize_prompt_and_sampled_output
from cs336_alignment.training import GRPOConfig, run_grpo
from cs336_alignment.training.common import clip_and_step, make_adamw
from cs336_alignment.training.eval_config import QuestionSet
from cs336_alignment.training.grpo_loop import grpo_train_on_rollouts, rollout_training_batch
from cs336_basics.testing import one_thread  # noqa: F401 (autouse: one torch thread)


@pytest.fixture(scope="module")
def tok() -> BasicsTokenizer:
    return BasicsTokenizer(basics_tokenizer())


def make_policy(tok: BasicsTokenizer, seed: int = 0, dtype: torch.dtype = torch.float32) -> BasicsCausalLM:
    return BasicsCausalLM(tiny_basics_lm(len(tok), seed=seed, context_length=64)).to(dtype).train()


def token_log_probs(policy: BasicsCausalLM, prompt_ids: list[int], response_ids: list[int]) -> torch.Tensor:
    """log π(y_t | prompt, y_<t) for each response token: one plain forward of the raw LM on this pair alone."""
    ids = torch.tensor([prompt_ids + response_ids])
    logp = torch.log_softmax(policy.model(ids), dim=-1)[0]
    positions = torch.arange(len(prompt_ids) - 1, len(prompt_ids) + len(response_ids) - 1)
    return logp[positions, torch.tensor(response_ids)]


# ---- gradients against a hand-written surrogate ---------------------------------------------------------

PROMPTS = ["Question 1: what is 1 plus 4?", "Question 12: what?", "what is 3 plus 6?", "Question 7"]
RESPONSES = [" <answer> 5 </answer>", " The quick brown fox jumps", " 9",
             " <think> reasoning </think> <answer> 9 </answer>"]
RAW_REWARDS = torch.tensor([1.0, 0.0, 0.5, 1.0], dtype=torch.float64)
ADVANTAGES = torch.tensor([0.8, -1.2, 0.3, -0.4], dtype=torch.float64)
CLIPRANGE = 0.2
# log π_old - log π per token, cycling along the tokens so that ratios r = π/π_old fall above 1+ε (1.65),
# inside the range (1.105, 0.95) and below 1-ε (0.67): min() picks the clipped term at r = 1.65 when A > 0 and
# at r = 0.67 when A < 0; at the other out-of-range ratio the unclipped term is the smaller and still has a
# gradient.
OLD_OFFSETS = (-0.5, -0.1, 0.05, 0.4)
LOSS_TYPES = ["no_baseline", "reinforce_with_baseline", "grpo_clip", "grpo_no_clip"]


def old_offsets(rows: int, width: int) -> torch.Tensor:
    return torch.tensor([[OLD_OFFSETS[(i + j) % 4] for j in range(width)] for i in range(rows)],
                        dtype=torch.float64)


def assert_grad_close(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    """Float64 weights, but cs336_basics does its norms and softmax in float32: agreement to ~1e-6 relative
    (a wrong weight, normaliser or mask is off by percents)."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()),
                               msg=lambda m: f"{name}: {m}")


def hand_surrogate(
    policy: BasicsCausalLM, tok: BasicsTokenizer, loss_type: str, constant: float | None, offsets: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """-(1/B) Σ_i (1/n_i) Σ_t w_it log π(y_it) with w detached; returns it and each response's active-token mask.

    w is the raw reward (no_baseline), the advantage (reinforce_with_baseline), A r (grpo_no_clip) or, for
    grpo_clip, A r where the unclipped term r A is the smaller one (A > 0 and r <= 1+ε, or A < 0 and r >= 1-ε)
    and 0 where min() picks the constant clipped term. n_i is response i's token count or the constant.
    """
    total = torch.zeros((), dtype=torch.float64)
    active_masks = []
    for i, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES, strict=True)):
        p, r = tok.encode(prompt), tok.encode(response)
        logp = token_log_probs(policy, p, r)
        # Response token t is predicted at column len(p) - 1 + t of the shifted, right-padded batch.
        old = logp.detach() + offsets[i, len(p) - 1 : len(p) - 1 + len(r)]
        ratio = torch.exp(logp.detach() - old)
        a = ADVANTAGES[i]
        active = (ratio <= 1 + CLIPRANGE) if a > 0 else (ratio >= 1 - CLIPRANGE)
        weight = {
            "no_baseline": RAW_REWARDS[i].expand(len(r)),
            "reinforce_with_baseline": a.expand(len(r)),
            "grpo_no_clip": a * ratio,
            "grpo_clip": torch.where(active, a * ratio, torch.zeros_like(ratio)),
        }[loss_type]
        active_masks.append(active)
        n = len(r) if constant is None else constant
        total = total - (weight * logp).sum() / n
    return total / len(PROMPTS), active_masks


@pytest.mark.parametrize("constant", [None, 7.0], ids=["masked_mean", "masked_normalize"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_microbatch_gradients_match_the_hand_written_surrogate(tok, loss_type, constant):
    policy = make_policy(tok, seed=11, dtype=torch.float64)
    batch = tokenize_prompt_and_output(PROMPTS, RESPONSES, tok)
    lengths = [len(tok.encode(r)) for r in RESPONSES]
    assert len(set(lengths)) == len(lengths)  # unequal lengths: a wrong per-sequence normaliser shows
    offsets = old_offsets(*batch["labels"].shape)
    for rows in (slice(0, 2), slice(2, 4)):  # two micro-batches accumulated into one step
        logp = get_response_log_probs(policy, batch["input_ids"][rows], batch["labels"][rows])["log_probs"]
        grpo_microbatch_train_step(
            logp, batch["response_mask"][rows], gradient_accumulation_steps=2, loss_type=loss_type,
            raw_rewards=RAW_REWARDS[rows, None], advantages=ADVANTAGES[rows, None],
            old_log_probs=logp.detach() + offsets[rows], cliprange=CLIPRANGE, normalize_constant=constant,
        )
    surrogate, active = hand_surrogate(policy, tok, loss_type, constant, offsets)
    if loss_type == "grpo_clip":  # both branches of the min occur, so the clip rule is exercised
        flat = torch.cat(active)
        assert flat.any() and not flat.all()
    params = list(policy.parameters())
    expected = torch.autograd.grad(surrogate, params)
    for (name, param), grad in zip(policy.named_parameters(), expected, strict=True):
        assert_grad_close(param.grad, grad, name)


class GradientRecorder:
    """Stands in for the optimizer: keeps the gradients of each step and leaves the weights alone."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params
        self.param_groups: list[dict] = [{"params": params, "lr": 0.0}]
        self.seen: list[list[torch.Tensor]] = []

    def step(self) -> None:
        self.seen.append([p.grad.clone() for p in self.params])

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None


@pytest.mark.parametrize("normalization", ["masked_mean", "masked_normalize"])
def test_the_loops_train_step_takes_the_hand_written_gradient(tok, normalization):
    """The loop's wiring (labels, masks, advantage rows, the length constant, accumulation) on one step."""
    policy = make_policy(tok, seed=12, dtype=torch.float64)
    batch = tokenize_prompt_and_output(PROMPTS, RESPONSES, tok)
    config = GRPOConfig(rollout_batch_size=4, group_size=2, train_batch_size=4, gradient_accumulation_steps=2,
                        loss_type="reinforce_with_baseline", length_normalization=normalization,
                        sampling_max_tokens=7, max_grad_norm=0.0)
    recorder = GradientRecorder(list(policy.parameters()))
    grpo_train_on_rollouts(policy, recorder, batch, ADVANTAGES, RAW_REWARDS, config, seed=0)
    constant = 7.0 if normalization == "masked_normalize" else None
    surrogate, _ = hand_surrogate(policy, tok, "reinforce_with_baseline", constant,
                                  old_offsets(*batch["labels"].shape))
    expected = torch.autograd.grad(surrogate, recorder.params)
    assert len(recorder.seen) == 1
    for (name, _), got, want in zip(policy.named_parameters(), recorder.seen[0], expected, strict=True):
        assert_grad_close(got, want, name)


# ---- a bandit: the loop must find the rewarded string -------------------------------------------------

ARMS = (" lazy dog", " jumps over", " brown fox", " Below is")  # two tokens each: a random policy is ~uniform
REWARDED = " brown fox"
BANDIT_TRAIN = [f"Question {i}: what is {i} plus {i + 3}?" for i in range(4)]
BANDIT_HELD_OUT = [f"Question {i}: what is {i} plus {i + 3}?" for i in range(10, 14)]


@torch.no_grad()
def arm_probabilities(policy: BasicsCausalLM, tok: BasicsTokenizer, prompt: str) -> torch.Tensor:
    """π(arm | prompt) renormalised over the arms, each arm's log-likelihood from a plain forward."""
    p = tok.encode(prompt)
    scores = torch.stack([token_log_probs(policy, p, tok.encode(arm)).sum() for arm in ARMS])
    return torch.softmax(scores.double(), dim=0)


def rewarded_probability(policy: BasicsCausalLM, tok: BasicsTokenizer, prompts: list[str]) -> float:
    return sum(float(arm_probabilities(policy, tok, p)[ARMS.index(REWARDED)]) for p in prompts) / len(prompts)


class BanditBackend:
    """Samples every completion from the live policy restricted to ARMS, seeded by `params.seed`."""

    def __init__(self, policy: BasicsCausalLM, tok: BasicsTokenizer):
        self.policy, self.tok = policy, tok

    def generate(self, prompts: list[str], params: SamplingParams) -> list[Completion]:
        generator = torch.Generator().manual_seed(params.seed)
        out = []
        for index, prompt in enumerate(prompts):
            picks = torch.multinomial(arm_probabilities(self.policy, self.tok, prompt), params.n, replacement=True,
                                      generator=generator)
            out += [Completion(index, ARMS[k], self.tok.encode(ARMS[k]), "stop") for k in picks.tolist()]
        return out


def bandit_reward(response: str, truth: str) -> dict[str, float]:
    return {"reward": float(response == REWARDED)}


BANDIT_CASES = {
    "reinforce_on_policy": dict(loss_type="reinforce_with_baseline"),
    "grpo_clip_on_policy": dict(loss_type="grpo_clip"),
    "grpo_clip_off_policy": dict(loss_type="grpo_clip", epochs_per_rollout_batch=2, train_batch_size=8,
                                 gradient_accumulation_steps=1),
}


@pytest.mark.parametrize("case", list(BANDIT_CASES))
def test_grpo_learns_the_rewarded_arm_of_a_bandit(tok, case):
    policy = make_policy(tok, seed=21)
    start = rewarded_probability(policy, tok, BANDIT_HELD_OUT)
    assert 0.15 < start < 0.35  # about 1/4
    settings = dict(n_grpo_steps=30, learning_rate=1e-3, rollout_batch_size=16, group_size=8, train_batch_size=16,
                    gradient_accumulation_steps=2, sampling_max_tokens=8, seed=0)
    config = GRPOConfig(**{**settings, **BANDIT_CASES[case]})
    history = run_grpo(policy, tok, QuestionSet(BANDIT_TRAIN, [""] * 4), config, backend=BanditBackend(policy, tok),
                       reward_fn=bandit_reward)
    held_out = rewarded_probability(policy, tok, BANDIT_HELD_OUT)
    train = rewarded_probability(policy, tok, BANDIT_TRAIN)
    assert held_out > 0.9 and train > 0.9, f"π(rewarded arm): {start:.3f} -> {held_out:.3f} held out, {train:.3f} train"
    assert history[-1]["reward_mean"] > 0.8
    assert all(h["sampled_ids_fraction"] == 1.0 and h["noncanonical_fraction"] == 0.0 for h in history)
    if case == "grpo_clip_off_policy":  # four updates per rollout batch, the later ones really off-policy
        assert all(h["optimizer_steps"] == 4 for h in history)
        assert max(abs(h["ratio_mean"] - 1) for h in history) > 1e-3


# ---- the first optimizer steps: why a large lr wrecks a policy at once, and what warm-up changes -------

ADAM_EPS = 1e-8  # torch.optim.AdamW's default, which make_adamw keeps


def surrogate_gradient_step(policy: BasicsCausalLM, tok: BasicsTokenizer, scale: float) -> None:
    surrogate, _ = hand_surrogate(policy, tok, "reinforce_with_baseline", None, old_offsets(4, 64))
    (scale * surrogate).backward()


def first_adam_update(policy: BasicsCausalLM, tok: BasicsTokenizer, lr: float, scale: float,
                      max_grad_norm: float | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(gradients the optimizer saw, weight change) of one step of the loop's fresh AdamW on a GRPO loss."""
    before = [p.detach().clone() for p in policy.parameters()]
    optimizer = make_adamw(policy, lr, weight_decay=0.0, beta1=0.9, beta2=0.95)
    surrogate_gradient_step(policy, tok, scale)
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(list(policy.parameters()), max_grad_norm)
    grads = [p.grad.clone() for p in policy.parameters()]
    clip_and_step(policy, optimizer, None)
    return grads, [p.detach() - b for p, b in zip(policy.parameters(), before, strict=True)]


def test_a_fresh_adams_first_step_moves_every_weight_by_lr_whatever_the_gradient(tok):
    lr = 1e-4
    steps = {}
    for scale, clip in ((1.0, None), (1000.0, None), (1.0, 0.1)):  # as is, a 1000x loss, clipped to norm 0.1
        grads, delta = first_adam_update(make_policy(tok, seed=31, dtype=torch.float64), tok, lr, scale, clip)
        # Step 1 of Adam by hand: m̂ = g, v̂ = g², so the update is -lr g / (|g| + eps): a sign step.
        for g, d in zip(grads, delta, strict=True):
            torch.testing.assert_close(d, -lr * g / (g.abs() + ADAM_EPS), rtol=1e-6, atol=1e-12)
        seen, moved = torch.cat([g.flatten() for g in grads]), torch.cat([d.flatten() for d in delta])
        nonzero = seen != 0
        assert nonzero.float().mean() > 0.5
        # Gradients span orders of magnitude, yet nearly every weight with one moves by the full lr.
        assert seen[nonzero].abs().max() / seen[nonzero].abs().min() > 1e4
        assert (moved[nonzero].abs() > 0.99 * lr).float().mean() > 0.98
        steps[scale, clip] = seen, moved
    seen, moved = steps[1.0, None]
    assert float(torch.linalg.vector_norm(seen)) > 1.0  # so clipping to 0.1 shrinks the gradient >10x
    for other_seen, other_moved in (steps[1000.0, None], steps[1.0, 0.1]):
        same = other_seen.abs().minimum(seen.abs()) > 1e-5  # away from Adam's eps the steps are identical
        assert same.float().mean() > 0.6
        torch.testing.assert_close(other_moved[same], moved[same], rtol=1e-3, atol=0.0)


class SnapshotBackend(BanditBackend):
    """The bandit sampler, also keeping the policy's weights as each rollout batch is drawn."""

    def __init__(self, policy: BasicsCausalLM, tok: BasicsTokenizer):
        super().__init__(policy, tok)
        self.snapshots: list[list[torch.Tensor]] = []

    def generate(self, prompts: list[str], params: SamplingParams) -> list[Completion]:
        self.snapshots.append([p.detach().clone() for p in self.policy.parameters()])
        return super().generate(prompts, params)


def test_warmup_scales_the_loops_first_steps(tok):
    lr, warmup = 1e-4, 4
    policy = make_policy(tok, seed=32, dtype=torch.float64)
    backend = SnapshotBackend(policy, tok)
    config = GRPOConfig(n_grpo_steps=3, learning_rate=lr, warmup_steps=warmup, rollout_batch_size=16, group_size=8,
                        train_batch_size=16, gradient_accumulation_steps=2, sampling_max_tokens=8)
    history = run_grpo(policy, tok, QuestionSet(BANDIT_TRAIN, [""] * 4), config, backend=backend,
                       reward_fn=bandit_reward)
    assert [h["lr"] for h in history] == pytest.approx([lr / 4, lr / 2, 3 * lr / 4], rel=1e-12)
    first = torch.cat([(b - a).flatten() for a, b in zip(*backend.snapshots[:2], strict=True)])
    moved = first[first != 0].abs()
    assert moved.numel() > first.numel() // 2
    assert moved.max() <= lr / warmup * (1 + 1e-6)
    assert (moved > 0.99 * lr / warmup).float().mean() > 0.99


# ---- response masks of real sampled rollouts --------------------------------------------------------------

STOP = "e"  # one common character: stop strings end inside multi-character tokens ("er", " the") as well
MIN_TOKENS = 4  # the loop's default: EOS and stop strings do not count before the 4th token


@pytest.fixture(scope="module")
def sampler(tok: BasicsTokenizer) -> BasicsCausalLM:
    """A random tiny LM with its EOS logit raised by 3, so rollouts end by EOS, by the stop string or by length."""
    policy = make_policy(tok, seed=41).eval()
    bias = torch.zeros(len(tok))
    bias[tok.eos_token_id] = 3.0
    policy.model.lm_head.register_forward_hook(lambda module, inputs, logits: logits + bias)
    return policy


class RecordingBackend:
    """Passes generation through and keeps the completions, finish reasons and sampled ids included."""

    def __init__(self, backend: NativeBackend):
        self.backend = backend
        self.completions: list[Completion] = []

    def generate(self, prompts: list[str], params: SamplingParams) -> list[Completion]:
        self.completions = self.backend.generate(prompts, params)
        return self.completions


def sample_as_grpo_step_does(policy: BasicsCausalLM, tok: BasicsTokenizer, include_stop: bool):
    """Rollouts with the loop's sampling settings (stop string swapped) → the batch `grpo_step` trains on."""
    config = GRPOConfig(sampling_max_tokens=12, sampling_min_tokens=MIN_TOKENS, stop=(STOP,))
    params = replace(config.rollout_params(seed=3), include_stop_str_in_output=include_stop)
    backend = RecordingBackend(NativeBackend(policy, tok, batch_size=64))
    rollouts = sample_rollouts(backend, BANDIT_TRAIN, [""] * 4, 16, params)
    return rollouts, backend.completions, rollout_training_batch(rollouts, tok)


def finish_kind(tok: BasicsTokenizer, completion: Completion, include_stop: bool) -> str:
    if completion.finish_reason == "length":
        return "length"
    cut = tok.decode(completion.token_ids) != completion.text  # the stop string, or what follows it, was cut
    return "stop string" if cut or (include_stop and completion.text.endswith(STOP)) else "eos"


@pytest.mark.parametrize("include_stop", [True, False], ids=["stop_in_text", "stop_cut"])
def test_sampled_rollouts_are_trained_on_exactly_their_sampled_response_tokens(tok, sampler, include_stop):
    rollouts, completions, batch = sample_as_grpo_step_does(sampler, tok, include_stop)
    pad = tok.pad_token_id
    kinds = set()
    with torch.no_grad():
        train_logp = get_response_log_probs(sampler, batch["input_ids"], batch["labels"])["log_probs"]
    for row, (prompt, text, completion) in enumerate(zip(rollouts.prompts, rollouts.responses, completions,
                                                         strict=True)):
        kind = finish_kind(tok, completion, include_stop)
        kinds.add(kind)
        p, sampled = tok.encode(prompt), completion.token_ids
        ids = torch.cat([batch["input_ids"][row, :1], batch["labels"][row]]).tolist()
        mask, labels = batch["response_mask"][row], batch["labels"][row]
        n = int(mask.sum())
        # The prompt comes first, unmasked; the mask is one run starting at the first response label; the
        # labels after it are padding.
        assert ids[: len(p)] == p
        assert mask.nonzero().flatten().tolist() == list(range(len(p) - 1, len(p) - 1 + n))
        assert labels[len(p) - 1 + n :].eq(pad).all()
        masked = labels[mask].tolist()
        # The masked labels are what the sampler drew, cut to the run that spells the response text.
        assert masked == sampled[:n] and n >= 1
        # (Dropping its last token would lose text, unless that token adds no character: a byte of a longer one.)
        shorter = tok.decode(masked[:-1])
        assert tok.decode(masked).startswith(text)
        assert not shorter.startswith(text) or shorter == tok.decode(masked)
        if kind == "stop string":  # ended by the first stop string completed in the 4th token or later
            assert tok.decode(sampled).startswith(text if include_stop else text + STOP)
            assert len(text) >= len(tok.decode(sampled[: MIN_TOKENS - 1]))
            assert not include_stop or (text.endswith(STOP) and n >= MIN_TOKENS)
        else:  # EOS (never in the ids) or max_tokens: every sampled token, spelling exactly the text, which
            # has no stop string from the 4th token on
            assert masked == sampled and tok.decode(masked) == text
            assert STOP not in text[len(tok.decode(sampled[: MIN_TOKENS - 1])) :]
        # So the training log-probs are those of the sampled tokens, as one plain forward gives them.
        torch.testing.assert_close(train_logp[row][mask].double(), token_log_probs(sampler, p, masked).double(),
                                   rtol=1e-5, atol=1e-5)
    assert kinds == {"eos", "stop string", "length"}
    assert batch["sampled"].all()


def test_retokenising_sampled_text_often_changes_the_tokens(tok, sampler):
    """Why the loop trains on sampled ids: re-encoding the text (the string path) trains on other tokens."""
    rollouts, completions, batch = sample_as_grpo_step_does(sampler, tok, include_stop=True)
    by_text = tokenize_prompt_and_output(rollouts.prompts, rollouts.responses, tok)
    differs = [by_text["labels"][row][by_text["response_mask"][row]].tolist()
               != batch["labels"][row][batch["response_mask"][row]].tolist() for row in range(len(completions))]
    assert batch["noncanonical"].tolist() == differs
    broken_utf8 = ["\ufffd" in r for r in rollouts.responses]
    assert sum(differs) > len(differs) // 2  # a random policy samples stray bytes and non-canonical splits
    assert any(d and not b for d, b in zip(differs, broken_utf8, strict=True))


@pytest.mark.parametrize("kind", ["basics", "hf"])
def test_sampled_ids_are_cut_to_the_returned_text_by_hand_made_cases(tok, kind):
    """What a backend may return beyond the text, and what the training batch keeps of it (vLLM's tokenizers
    are Hugging Face ones; the native backend's may be either)."""
    tokenizer = tok if kind == "basics" else hf_tokenizer()

    def enc(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    answer = enc(" <answer> 5 </answer>")  # ' <', 'answer', '>', ' 5', ' </', 'answer', '>'
    broken = enc(" 5") + enc("中")[:2]  # max_tokens ended inside a three-byte character
    cases = [  # (text, sampled ids, ids to train on, re-encoding the text gives other ids)
        (" <answer> 5 </answer>", [*answer, tokenizer.eos_token_id], answer, False),  # vLLM keeps EOS
        (" <answer> 5 ", answer, answer[:5], True),  # stop "</answer>" cut: ' </' straddles, kept
        (" <answer> 5 </ans", answer[:6], answer[:6], True),  # stop "</ans" ends inside 'answer'
        (" brown fox", enc(" b") + enc("rown") + enc(" fox"), enc(" b") + enc("rown") + enc(" fox"), True),
        (tokenizer.decode(broken), broken, broken, True),  # the last byte adds no character, still sampled
        (" brown fox", [0], enc(" brown fox"), False),  # ids that do not spell the text: re-encoded
    ]
    texts = [c[0] for c in cases]
    batch = tokenize_prompt_and_sampled_output(["Question 1"] * len(cases), texts, [c[1] for c in cases],
                                               tokenizer)
    for row, (_, _, expected, noncanonical) in enumerate(cases):
        assert batch["labels"][row][batch["response_mask"][row]].tolist() == expected
        assert bool(batch["noncanonical"][row]) == noncanonical
    assert batch["sampled"].tolist() == [True] * 5 + [False]
    # Without sampled ids it is the string path exactly.
    plain = tokenize_prompt_and_sampled_output(["Question 1"] * len(cases), texts, [None] * len(cases), tokenizer)
    by_text = tokenize_prompt_and_output(["Question 1"] * len(cases), texts, tokenizer)
    assert all(torch.equal(plain[k], by_text[k]) for k in by_text) and not plain["sampled"].any()


@pytest.mark.parametrize("skip", [True, False])
def test_a_batch_without_signal_leaves_the_policy_and_optimizer_alone(tok, skip):
    """All rewards of every group equal: every advantage is 0, so the gradient is exactly 0. Stepping Adam
    anyway would replay the momentum of earlier steps (what drove the lr 3e-4 sweep run from broken answers to
    no format at all); with `skip_steps_without_signal` the weights and optimizer state stay put."""
    policy = make_policy(tok, seed=7)
    prompts = ["Question 1: what is 1 plus 4?"] * 4
    batch = tokenize_prompt_and_output(prompts, [" Answer: 5", " The quick", " Answer: 5", " brown fox"], tok)
    config = GRPOConfig(rollout_batch_size=4, group_size=4, train_batch_size=4, gradient_accumulation_steps=2,
                        learning_rate=1e-3, skip_steps_without_signal=skip)
    optimizer = make_adamw(policy, config.learning_rate, 0.0, 0.9, 0.95)
    signal = torch.tensor([1.0, -1.0, 1.0, -1.0])
    grpo_train_on_rollouts(policy, optimizer, batch, signal, signal, config, seed=0)  # builds Adam momentum
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    steps_before = [s["step"].item() for s in optimizer.state.values()]
    flat = torch.zeros(4)
    [record] = grpo_train_on_rollouts(policy, optimizer, batch, flat, torch.ones(4), config, seed=0, steps_before=1)
    moved = max((policy.state_dict()[k] - v).abs().max().item() for k, v in before.items())
    if skip:
        assert moved == 0.0 and record["skipped_step"] == 1.0 and record["grad_norm"] == 0.0
        assert [s["step"].item() for s in optimizer.state.values()] == steps_before
    else:  # the counterfactual the skip exists for: no gradient, yet the weights move by about lr
        assert record["grad_norm"] == 0.0 and record["skipped_step"] == 0.0 and moved > 0.5 * config.learning_rate
