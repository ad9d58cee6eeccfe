"""Every training hyperparameter in one dataclass, plus named presets (the handout's configurations).

Every numeric field declares its valid range (`bounded`), checked when the config is built, so a nonsensical
value fails at once with the flag named. Importing this module does not import torch: a bad flag is reported
before the seconds torch takes to load.
"""

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from cs336_basics.cli_support import UserError, bounded, check_ranges

if TYPE_CHECKING:
    from cs336_basics.model import TransformerConfig

ARCHITECTURE = ("vocab_size", "context_length", "d_model", "num_layers", "num_heads", "d_ff", "rope_theta", "norm",
                "position", "ffn", "use_torch_sdpa", "attention", "num_kv_heads", "sliding_window", "kv_lora_rank",
                "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "linear_chunk_size",
                "num_experts", "moe_top_k", "num_shared_experts", "moe_d_ff", "moe_router", "moe_norm_topk",
                "moe_routed_scale", "moe_dense_layers", "attention_backend")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's
CHOICES = {"norm": ("pre", "post", "none"), "position": ("rope", "none", "alibi"), "ffn": ("swiglu", "silu", "moe"),
           "attention": ("mha", "mla", "linear"), "moe_router": ("softmax", "sigmoid"),
           "precision": ("auto", "fp32", "bf16", "fp16"), "optimizer": ("adamw", "muon"),
           "parallel": ("none", "ddp", "fsdp"),
           "fsdp_reshard": ("auto", "always", "never"), "fsdp_units": ("auto", "block", "model"),
           "compile_mode": COMPILE_MODES, "loss_impl": ("full", "chunked", "onepass", "fused"),
           "adamw_impl": ("ours", "fused"), "residual_dtype": ("param", "bf16", "auto"),
           "attention_layout": ("bhsd", "bshd"), "rope_layout": ("pairs", "halves"),
           "value_proj": ("fused", "separate")}


@dataclass
class TrainConfig:
    # data: 1-D uint16 token files (.npy or raw), e.g. from `cs336-basics encode`
    train_data: str = ""
    val_data: str = ""
    out_dir: str = "runs/default"
    # model (see TransformerConfig; norm/position/ffn are the handout's ablations)
    vocab_size: int = bounded(10_000, ge=1)
    context_length: int = bounded(256, ge=1)
    d_model: int = bounded(512, ge=1)
    num_layers: int = bounded(4, ge=1)
    num_heads: int = bounded(16, ge=1)
    d_ff: int = bounded(1344, ge=1)
    rope_theta: float = bounded(10_000.0, gt=0)
    norm: Literal["pre", "post", "none"] = "pre"
    position: Literal["rope", "none", "alibi"] = "rope"
    ffn: Literal["swiglu", "silu", "moe"] = "swiglu"
    use_torch_sdpa: bool = True
    # the kernel of plain causal attention, e.g. cs336-fa2 (our Triton FlashAttention-2) or sdpa-cudnn; none:
    # --use-torch-sdpa decides. Names: cs336_basics.attention_backends (plugins such as cs336_systems' included)
    attention_backend: str | None = None
    # the model family (see TransformerConfig): attention variant, grouped KV heads, sliding window
    attention: Literal["mha", "mla", "linear"] = "mha"
    num_kv_heads: int | None = bounded(None, ge=1)  # None: one KV head per query head; 1: multi-query
    sliding_window: int | None = bounded(None, ge=1)  # None: full causal attention
    # multi-head latent attention (attention="mla")
    kv_lora_rank: int = bounded(64, ge=1)
    q_lora_rank: int = bounded(0, ge=0)  # 0: queries projected directly from the residual stream
    qk_nope_head_dim: int = bounded(32, ge=1)
    qk_rope_head_dim: int = bounded(16, ge=1)
    v_head_dim: int = bounded(32, ge=1)
    linear_chunk_size: int = bounded(64, ge=1)  # attention="linear"
    # mixture of experts (ffn="moe")
    num_experts: int = bounded(8, ge=1)
    moe_top_k: int = bounded(2, ge=1)
    num_shared_experts: int = bounded(1, ge=0)
    moe_d_ff: int = bounded(256, ge=1)
    moe_router: Literal["softmax", "sigmoid"] = "sigmoid"
    moe_norm_topk: bool = True
    moe_routed_scale: float = bounded(1.0, gt=0)
    moe_dense_layers: int = bounded(0, ge=0)
    moe_bias_update_rate: float = bounded(1e-3, ge=0)  # auxiliary-loss-free balancing step (DeepSeek-V3's γ)
    moe_aux_loss_coef: float = bounded(0.0, ge=0)  # weight of the sequence-wise balance loss (0: off)
    # optimisation
    batch_size: int = bounded(128, ge=1)
    max_steps: int = bounded(10_000, ge=1)
    lr_max: float = bounded(2e-3, ge=0)
    lr_min: float = bounded(2e-4, ge=0)  # <= lr_max
    warmup_steps: int = bounded(200, ge=0)  # may exceed max_steps: the whole run then warms up
    weight_decay: float = bounded(0.1, ge=0)
    beta1: float = bounded(0.9, ge=0, lt=1)
    beta2: float = bounded(0.95, ge=0, lt=1)
    adam_eps: float = bounded(1e-8, gt=0)
    grad_clip: float = bounded(1.0, gt=0, allow=(math.inf,))  # max gradient L2 norm; inf: no clipping
    optimizer: Literal["adamw", "muon"] = "adamw"  # muon: Muon for hidden matrices, AdamW for the rest
    muon_lr: float = bounded(0.0, ge=0)  # peak lr of the Muon matrices (0: --lr-max; same schedule)
    muon_momentum: float = bounded(0.95, ge=0, lt=1)
    # loss-spike guard: skip an update whose loss or gradient norm exceeds this multiple of its running
    # average (0: off), once spike_warmup_steps steps have built the average
    spike_guard: float = bounded(0.0, ge=0)
    spike_warmup_steps: int = bounded(100, ge=0)
    # evaluation, logging, checkpoints
    eval_interval: int = bounded(500, ge=1)
    eval_batches: int = bounded(20, ge=1)
    log_interval: int = bounded(10, ge=1)
    checkpoint_interval: int = bounded(1000, ge=1)
    resume: bool = False  # continue the run in out_dir from its checkpoint
    overwrite: bool = False  # start over in an out_dir that already holds a run (its checkpoint and metrics go)
    stop_after_steps: int = bounded(0, ge=0)  # end this invocation early (0: never); --resume continues it
    time_limit_s: float = bounded(0.0, ge=0)  # end gracefully with a checkpoint after this many seconds (0: no limit)
    # system
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # fp16: with dynamic loss scaling
    compile: bool = False
    tf32: bool = True
    # throughput (benchmarks/NOTES_throughput.md); the defaults are the original paths
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    compile_loss: bool = False  # with --compile: the loss compiled too (full: with the model; chunked: per chunk)
    # chunked: LM head + cross-entropy per chunk of tokens; onepass: the full logits, the gradient written out
    # as one pass over them (onepass_ce.py) instead of autograd's scatter + log-softmax backward; fused: chunked,
    # each chunk's loss and gradient one Triton pass that reads the logits once and overwrites them (fused_ce.py)
    loss_impl: Literal["full", "chunked", "onepass", "fused"] = "full"
    loss_chunk_tokens: int = bounded(4096, ge=1)  # tokens per chunk of --loss-impl chunked or fused
    adamw_impl: Literal["ours", "fused"] = "ours"  # fused: torch's fused kernel, our update (optim.FusedAdamW)
    # with --adamw-impl fused: gradient clipping's scale applied by the fused kernel as it reads the gradients
    # (FusedAdamW.clip_in_next_step), instead of a separate pass over them
    clip_in_optimizer: bool = False
    prefetch: bool = False  # build the next steps' batches (pinned) on a background thread
    # N > 0: Python's automatic garbage collection off while training, a young-generation collection every N
    # steps instead (training/gc_schedule.py: for loops whose unscheduled full collections pause the host; the
    # owt-leaderboard step saw none and is unchanged by it)
    gc_interval: int = bounded(0, ge=0)
    # bf16 (with bf16 precision): the residual stream and the norms' outputs in bf16 rather than in the fp32 of
    # the master weights, which autocast leaves them in: half the traffic of the step's elementwise kernels;
    # auto: bf16 when the run's precision is bf16 (the owt-leaderboard preset's), else param
    residual_dtype: Literal["param", "bf16", "auto"] = "param"
    # bshd: q, k, v and the attention output stay (batch, seq, heads, d) in memory around SDPA, so neither
    # side of the kernel needs a layout copy and RoPE reads contiguously (bhsd: the heads-major copies)
    attention_layout: Literal["bhsd", "bshd"] = "bhsd"
    # halves (with --attention-layout bshd): each head's q/k features computed in the order (evens, odds) by
    # reordering the projection's weight rows on the fly, so RoPE rotates two contiguous halves rather than
    # swapping neighbours; the attention and the weights (state dict) are the same as with pairs
    rope_layout: Literal["pairs", "halves"] = "pairs"
    # separate (with --attention-layout bshd): the value projection as its own GEMM instead of a slice of the
    # fused q/k/v one, so v is dense and SDPA's value gradient is already the matrix that GEMM's backward reads
    value_proj: Literal["fused", "separate"] = "fused"
    seed: int = bounded(0, ge=0, lt=2**63)
    peak_flops: float = bounded(0.0, ge=0)  # accelerator peak FLOP/s for MFU; 0 = look up by device name
    # data parallelism (training/distributed.py): ddp/fsdp run under `torchrun --nproc_per_node N`; batch_size
    # stays the global batch, split over the ranks and then into grad_accum micro-batches on each
    parallel: Literal["none", "ddp", "fsdp"] = "none"
    # fsdp: free each block's gathered weights after its forward and gather them again for backward (less memory,
    # one more copy per block); auto: only with more than one rank (one rank holds every weight anyway)
    fsdp_reshard: Literal["auto", "always", "never"] = "auto"
    # fsdp: what one FSDP unit holds: each transformer block (then the root: blocks gathered one by one, which
    # overlaps communication with compute across ranks) or the whole model; auto: the whole model on one rank
    # (no communication to overlap: one gather per step, and the model compiles whole), blocks otherwise
    fsdp_units: Literal["auto", "block", "model"] = "auto"
    grad_accum: int = bounded(1, ge=1)
    dist_timeout_s: float = bounded(600.0, gt=0)  # a collective waiting longer than this fails the run
    wandb: bool = False
    wandb_project: str = "cs336-basics"
    progress: bool = True

    def __post_init__(self):
        check_ranges(self)
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise UserError(f"{_flag(name)} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.lr_min > self.lr_max:
            raise UserError(f"--lr-min ({self.lr_min:g}) must not exceed --lr-max ({self.lr_max:g})")
        if self.d_model % self.num_heads:
            raise UserError(f"--d-model ({self.d_model}) must be divisible by --num-heads ({self.num_heads})")
        if self.spike_guard and self.spike_guard <= 1:
            raise UserError(f"--spike-guard must be > 1 (a multiple of the running average) or 0 (off), "
                            f"got {self.spike_guard:g}")
        if self.position == "rope" and self.attention == "mha" and (self.d_model // self.num_heads) % 2:
            raise UserError(f"rotary embeddings need an even head size; --d-model/--num-heads is "
                            f"{self.d_model // self.num_heads}")
        if self.batch_size % self.grad_accum:
            raise UserError(f"--batch-size ({self.batch_size}) must be divisible by --grad-accum ({self.grad_accum})")
        if self.resume and self.overwrite:
            raise UserError("--resume and --overwrite exclude each other")
        if self.fsdp_reshard != "auto" and self.parallel != "fsdp":
            raise UserError(f"--fsdp-reshard {self.fsdp_reshard} needs --parallel fsdp")
        if self.fsdp_units != "auto" and self.parallel != "fsdp":
            raise UserError(f"--fsdp-units {self.fsdp_units} needs --parallel fsdp")
        if self.fsdp_units == "model" and self.fsdp_reshard == "always":
            raise UserError("--fsdp-reshard always frees each block after its forward: it needs --fsdp-units block")
        if self.parallel != "none" and (self.loss_impl in ("chunked", "fused") or self.compile_loss):
            which = f"--loss-impl {self.loss_impl}" if self.loss_impl in ("chunked", "fused") else "--compile-loss"
            raise UserError(f"{which} needs --parallel none (the owt-leaderboard preset turns --compile-loss on; "
                            "--no-compile-loss turns it off)")
        if self.residual_dtype == "bf16" and self.precision in ("fp32", "fp16"):
            raise UserError(f"--residual-dtype bf16 needs bf16 precision, not --precision {self.precision}")
        if self.attention_layout == "bshd" and (not self.use_torch_sdpa or self.attention_backend is not None
                                                or self.attention != "mha"):
            raise UserError("--attention-layout bshd is a layout for torch's SDPA in multi-head attention: it needs "
                            "--use-torch-sdpa, --attention mha and no --attention-backend")
        if self.rope_layout == "halves" and (self.attention_layout != "bshd" or self.position != "rope"):
            raise UserError("--rope-layout halves reorders RoPE's features in the sequence-major attention: it "
                            "needs --attention-layout bshd and --position rope")
        if self.value_proj == "separate" and self.attention_layout != "bshd":
            raise UserError("--value-proj separate changes the sequence-major attention's projections: it needs "
                            "--attention-layout bshd")
        if self.adamw_impl != "ours" and self.optimizer != "adamw":
            raise UserError(f"--adamw-impl {self.adamw_impl} applies to --optimizer adamw, not {self.optimizer}")
        if self.clip_in_optimizer and self.adamw_impl != "fused":
            raise UserError("--clip-in-optimizer needs --adamw-impl fused (torch's kernel applies the scale)")
        if self.clip_in_optimizer and (self.parallel == "fsdp" or self.precision == "fp16"):
            raise UserError(f"--clip-in-optimizer works with the whole gradients and no loss scaling, not "
                            f"{'--parallel fsdp' if self.parallel == 'fsdp' else '--precision fp16'}")
        if self.attention_backend is not None:
            from cs336_basics.attention_backends import UnknownAttentionBackend, check_attention_backend

            try:  # torch-free: the name is checked before torch loads
                check_attention_backend(self.attention_backend)
            except UnknownAttentionBackend as e:
                raise UserError(f"--attention-backend: {e}") from e

    def model_config(self) -> "TransformerConfig":
        """The architecture; a combination TransformerConfig rejects is a `UserError` naming the flags."""
        from cs336_basics.model import ConfigError, TransformerConfig

        try:
            return TransformerConfig(**{name: getattr(self, name) for name in ARCHITECTURE})
        except ConfigError as e:
            raise UserError(_flags_named(str(e))) from e

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.context_length


# The handout's TinyStories model: ≈17M non-embedding parameters, 327,680,000 tokens (10,000 × 128 × 256).
_TS17M = dict(vocab_size=10_000, context_length=256, d_model=512, num_layers=4, num_heads=16, d_ff=1344,
              batch_size=128, max_steps=10_000, lr_max=2e-3, lr_min=2e-4, warmup_steps=200, eval_interval=500,
              checkpoint_interval=1000)
PRESETS: dict[str, dict] = {
    "tinystories-17m": dict(_TS17M),
    # The model family at the 17M scale, same token budget. Active non-embedding parameters
    # (TransformerLM.num_active_parameters(include_embeddings=False): no input embedding, no LM head):
    #   tinystories-17m   12,456,448   (MHA 16 heads, SwiGLU 1344)
    #   llama3-gqa        12,456,448   (4 KV heads of 16 save 393,216 per layer; d_ff 1600 spends them exactly)
    #   mistral-swa       12,456,448   (llama3-gqa + a 128-token sliding window in a 256-token context)
    #   deepseek-v3-nano  12,309,504   active of 30,004,224 total (MLA: latent 128 + rope key 16 per token;
    #                                  8 routed experts of width 480, top-2, + 1 shared, sigmoid routing)
    "llama3-gqa": dict(_TS17M, num_kv_heads=4, d_ff=1600),
    "mistral-swa": dict(_TS17M, num_kv_heads=4, d_ff=1600, sliding_window=128),
    "deepseek-v3-nano": dict(_TS17M, attention="mla", kv_lora_rank=128, q_lora_rank=0, qk_nope_head_dim=32,
                             qk_rope_head_dim=16, v_head_dim=32, ffn="moe", num_experts=8, moe_top_k=2,
                             num_shared_experts=1, moe_d_ff=480, moe_router="sigmoid", moe_norm_topk=True),
    # The handout's low-resource (CPU / Apple silicon) variant: 40M tokens.
    "tinystories-17m-lowres": dict(vocab_size=10_000, context_length=256, d_model=512, num_layers=4,
                                   num_heads=16, d_ff=1344, batch_size=32, max_steps=5_000, lr_max=1e-3,
                                   lr_min=1e-4, warmup_steps=100, eval_interval=250, checkpoint_interval=500),
    # OpenWebText with the same architecture and token budget, 32K vocabulary.
    "owt": dict(vocab_size=32_000, context_length=256, d_model=512, num_layers=4, num_heads=16, d_ff=1344,
                batch_size=128, max_steps=10_000, lr_max=2e-3, lr_min=2e-4, warmup_steps=200,
                eval_interval=500, checkpoint_interval=1000),
    # Leaderboard starting point (OWT, 1.5 H100-hours): wider/deeper model, longer context, compiled, stops
    # at the time limit with a checkpoint. Not yet measured on the full budget; tune lr and steps from sweeps.
    # The speed flags are those whose 2,000-step loss curve matched the plain path's on an H100 (1.81x the
    # tokens/s with --loss-impl fused; benchmarks/NOTES_throughput.md).
    "owt-leaderboard": dict(vocab_size=32_000, context_length=512, d_model=768, num_layers=12, num_heads=12,
                            d_ff=2048, batch_size=64, max_steps=40_000, lr_max=1.5e-3, lr_min=1.5e-4,
                            warmup_steps=1_000, weight_decay=0.1, eval_interval=1_000, checkpoint_interval=2_000,
                            compile=True, time_limit_s=5_400, compile_loss=True, adamw_impl="fused",
                            prefetch=True, loss_impl="fused", loss_chunk_tokens=32_768, residual_dtype="auto",
                            attention_layout="bshd", rope_layout="halves"),
    # The quickstart's small model: trains on two CPU cores in about a minute.
    "quickstart": dict(vocab_size=1_000, context_length=128, d_model=128, num_layers=3, num_heads=4, d_ff=384,
                       batch_size=16, max_steps=400, lr_max=3e-3, lr_min=3e-4, warmup_steps=30, eval_interval=50,
                       eval_batches=8, log_interval=10, checkpoint_interval=200, weight_decay=0.1),
}


def config_from_preset(preset: str | None, **overrides) -> TrainConfig:
    if preset is not None and preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    return TrainConfig(**{**(PRESETS[preset] if preset else {}), **overrides})


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _flags_named(message: str) -> str:
    """A TransformerConfig message with its field names written as the flags that set them."""
    names = "|".join(sorted(ARCHITECTURE, key=len, reverse=True))
    return re.sub(rf"(?<![\w-])({names})(?![\w])", lambda m: _flag(m.group(1)), message.splitlines()[0])
