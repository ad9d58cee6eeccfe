"""The demonstration's settings: one dataclass and its presets (`h200`: the GRPO run of a few minutes;
`methods`: the GRPO / GSPO / PPO (rule) / PPO (reward model) head-to-head, sized for one H100 call; `cpu-smoke`
and `tiny`: CPU checks that the chain runs).

Step counts decide how long every stage trains, so a seed fixes the run; `time_budget_s` is only a guard that
stops a stage early (and says so in the results) on a machine much slower than the preset was tuned for.
"""

from dataclasses import dataclass, fields, replace

from cs336_basics.cli_support import UserError, bounded, check_ranges

METHODS = ("grpo", "gspo", "ppo-rule", "ppo-rm")


@dataclass
class DemoConfig:
    """Every random choice of a run (problems, splits, slips, initial weights, batches, rollouts) follows `seed`."""

    seed: int = bounded(0, ge=0)
    device: str = "auto"
    deterministic: bool = True  # deterministic CUDA kernels, so one seed gives one set of numbers
    time_budget_s: float = bounded(900.0, gt=0)  # a guard, not a schedule (see the module docstring)
    # data
    max_steps_per_problem: int = bounded(4, ge=1)
    error_rate: float = bounded(0.3, ge=0, le=1)  # share of pretraining and SFT traces with one arithmetic slip
    n_pretrain_problems: int = bounded(150_000, ge=1)
    n_sft_examples: int = bounded(2048, ge=1)
    n_grpo_questions: int = bounded(20_000, ge=1)  # taken from the pool after the SFT examples
    n_heldout: int = bounded(1024, ge=1)
    vocab_size: int = bounded(600, ge=257)
    encode_workers: int = bounded(8, ge=1)
    # model (cs336_basics TransformerLM)
    d_model: int = bounded(384, ge=1)
    num_layers: int = bounded(6, ge=1)
    num_heads: int = bounded(6, ge=1)
    d_ff: int = bounded(1024, ge=1)
    context_length: int = bounded(256, ge=1)
    # pretraining on plain problem + reasoning text
    pretrain_batch_size: int = bounded(128, ge=1)
    pretrain_lr: float = bounded(1e-3, gt=0)
    pretrain_warmup: int = bounded(100, ge=0)
    # short on purpose: the SFT start is still a poor calculator (headroom for GRPO)
    pretrain_steps: int = bounded(500, ge=1)
    # SFT into the R1-Zero format (deliberately short)
    sft_steps: int = bounded(40, ge=1)
    sft_batch_size: int = bounded(64, ge=1)
    sft_grad_accum: int = bounded(1, ge=1)
    sft_lr: float = bounded(2e-4, gt=0)
    # The RL method of the stage after SFT (see METHODS); every method below shares the rollout budget
    # (grpo_steps rollout batches of rollout_batch_size responses, max_new_tokens each) and the optimizer
    # settings (lr, train_batch_size, grad accumulation, epochs per rollout batch, clip range).
    method: str = "grpo"
    # GRPO (and the RL stage's shared settings)
    grpo_steps: int = bounded(120, ge=1)
    grpo_lr: float = bounded(3e-5, gt=0)  # chosen by the H200 sweep (results/a5_lr_sweep.json)
    grpo_warmup_steps: int = bounded(0, ge=0)
    rollout_batch_size: int = bounded(256, ge=1)
    group_size: int = bounded(8, ge=1)
    train_batch_size: int = bounded(256, ge=1)
    grpo_grad_accum: int = bounded(2, ge=1)
    epochs_per_rollout_batch: int = bounded(1, ge=1)
    loss_type: str = "reinforce_with_baseline"
    cliprange: float = bounded(0.2, ge=0)
    max_new_tokens: int = bounded(96, ge=1)
    # GSPO: the sequence-level ratio stays near 1, so its clip range is far smaller (the paper's is 3e-4..4e-4)
    gspo_cliprange: float = bounded(4e-4, ge=0)
    # PPO (both rewards): lr, rollout size, epochs, train batch and clip range are the shared fields above
    ppo_samples_per_prompt: int = bounded(1, ge=1)
    ppo_kl_coef: float = bounded(0.05, ge=0)
    ppo_vf_coef: float = bounded(0.1, ge=0)
    ppo_lam: float = bounded(0.95, ge=0, le=1)
    # the reward model of ppo-rm: SFT-policy rollouts on rm_questions training questions, rm_group_size each,
    # scored by the rule reward, turned into pairs within each group; the last rm_heldout_fraction of the
    # groups give the held-out pairs
    rm_questions: int = bounded(512, ge=2)
    rm_group_size: int = bounded(8, ge=2)
    rm_max_pairs_per_group: int = bounded(8, ge=1)
    rm_heldout_fraction: float = bounded(0.125, gt=0, lt=1)
    rm_steps: int = bounded(150, ge=1)
    rm_lr: float = bounded(5e-5, gt=0)
    rm_batch_size: int = bounded(64, ge=1)
    rm_context_length: int = bounded(512, ge=1)  # the Alpaca-wrapped prompt + response is longer than a rollout
    # adds the bare gold answer ("</think> <answer>N</answer>", rule reward 1) to each group: only for `tiny`,
    # whose 8-token rollouts never score, so its reward model would otherwise have no pair to learn from
    rm_add_gold: bool = False
    eval_every: int = bounded(10, ge=0)
    n_eval_in_loop: int = bounded(256, ge=1)
    generation_batch_size: int = bounded(512, ge=1)
    throughput_rows: int = bounded(256, ge=1)
    throughput_tokens: int = bounded(128, ge=1)

    def __post_init__(self) -> None:
        """Declared ranges (and heads dividing the width) checked when a preset is built or overridden."""
        check_ranges(self)
        if self.method not in METHODS:
            raise UserError(f"unknown method {self.method!r}; expected one of {', '.join(METHODS)}")
        if self.d_model % self.num_heads:
            raise UserError(f"num_heads ({self.num_heads}) must divide d_model ({self.d_model})")

    def stage_budgets(self) -> dict[str, float]:
        """Guards per stage: generous shares of the budget that a run at the preset's speed never reaches."""
        return {"pretrain": 0.3 * self.time_budget_s, "sft": 0.05 * self.time_budget_s,
                "grpo": 0.55 * self.time_budget_s}


PRESETS: dict[str, DemoConfig] = {
    "h200": DemoConfig(),
    "cpu-smoke": DemoConfig(
        time_budget_s=600.0, n_pretrain_problems=1500, n_sft_examples=64, n_heldout=16, vocab_size=600,
        encode_workers=1, d_model=64, num_layers=2, num_heads=4, d_ff=128, context_length=256,
        pretrain_batch_size=8, pretrain_warmup=5, pretrain_steps=40, sft_steps=4, sft_batch_size=8,
        sft_grad_accum=2, grpo_steps=2, rollout_batch_size=16, group_size=4, train_batch_size=16,
        grpo_grad_accum=2, max_new_tokens=32, eval_every=1, n_eval_in_loop=8, generation_batch_size=32,
        throughput_rows=8, throughput_tokens=16,
    ),
}
# The head-to-head (`multi methods`): the h200 task and SFT start, 40 rollout batches of 256 per method, two
# optimizer steps per batch (so GRPO-Clip's token ratios and GSPO's sequence ratios move off 1 and their clipping
# differs; with one on-policy step both are REINFORCE with baseline), GRPO-Clip for `grpo`; the reward model from
# 256 x 8 SFT rollouts, 60 steps. Sized for 3 seeds x 4 methods in one call under 9 minutes on one H100 (README);
# the time budget makes the RL guard 250 s, so a slower machine ends with a flagged table, not a killed call.
PRESETS["methods"] = replace(PRESETS["h200"], grpo_steps=40, eval_every=8, train_batch_size=128, grpo_grad_accum=1,
                             loss_type="grpo_clip", rm_questions=256, rm_steps=60, time_budget_s=455.0,
                             throughput_rows=16, throughput_tokens=16)  # (speeds mean little on a shared GPU)
# The CPU check of the whole head-to-head (seconds per seed; its tiny model learns nothing).
PRESETS["tiny"] = replace(
    PRESETS["cpu-smoke"], n_pretrain_problems=400, pretrain_steps=3, pretrain_batch_size=2, sft_steps=2,
    sft_batch_size=2, sft_grad_accum=1, n_heldout=4, n_eval_in_loop=4, max_new_tokens=8, throughput_rows=4,
    throughput_tokens=8, grpo_steps=2, rollout_batch_size=8, train_batch_size=4, grpo_grad_accum=1, grpo_lr=1e-2,
    loss_type="grpo_clip", rm_questions=8, rm_group_size=4, rm_steps=2, rm_batch_size=4, rm_add_gold=True,
    generation_batch_size=64)


def preset(name: str, overrides: list[str] | None = None) -> DemoConfig:
    """A preset with `key=value` overrides (typed from the field's default)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    config = PRESETS[name]
    types = {f.name: type(getattr(config, f.name)) for f in fields(config)}
    changes = {}
    for item in overrides or []:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in types:
            raise ValueError(f"bad override {item!r}: expected key=value with key one of the DemoConfig fields")
        kind = types[key]
        try:
            changes[key] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
        except ValueError:
            raise ValueError(f"bad override {item!r}: {value!r} is not a {kind.__name__}") from None
    return replace(config, **changes)
