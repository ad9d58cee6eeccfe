"""DeepSeek-V3-style mixture-of-experts feed-forward layer: shared + routed SwiGLU experts, top-k routing with
sigmoid (or softmax) scores, auxiliary-loss-free load balancing through a per-expert routing bias, and an
optional sequence-wise balance loss.

Dispatch never loops over tokens in Python: the (token, slot) pairs are sorted by expert so each expert's
tokens form one contiguous block, and the experts run as one grouped GEMM over those blocks
(`torch._grouped_mm`) where the installed torch has it for the tensors' device and dtype, else as a loop over
the experts (not the tokens) on the same contiguous slices.
"""

import math

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from cs336_basics.layers import Linear, SwiGLU, _trunc_normal_
from cs336_basics.nn_utils import silu

# Where `torch._grouped_mm` was seen to work, forward and backward (probed; see tests/test_moe.py):
#   CPU, torch 2.15: float32, bfloat16 and float16; float64 is refused ("Expected mat_a to be Float32,
#     BFloat16 or Float16").
#   CUDA, torch 2.11 on an H200 (sm90): bfloat16, float16 and float32 all run (bit-equal to the loop), but
#     bfloat16 is the grouped kernel that torch documents and that inductor lowers (torch.compile with
#     fullgraph=True works); we route only bfloat16 there. H200, one MoE layer, 16k tokens, d 512, 8 experts,
#     top-2, ff 256, one shared, fwd+bwd: grouped 3.2-3.4 ms eager, 2.4-2.8 ms compiled; expert loop 6-7 ms;
#     a dense SwiGLU of the same active width (768) 1.0 ms.
# Every row stride must be a multiple of 16 bytes, so d_model and moe_d_ff must be multiples of
# 16 / element size. Anything else takes the loop over experts (eager; a graph break under torch.compile).
_GROUPED_MM_DTYPES = {
    "cpu": (torch.float32, torch.bfloat16, torch.float16),
    "cuda": (torch.bfloat16,),
}


def grouped_mm_available(x: Tensor, *weights: Tensor) -> bool:
    """Whether `torch._grouped_mm` serves these tensors (a metadata check: no host sync, compiles as a guard)."""
    if not hasattr(torch, "_grouped_mm") or x.dtype not in _GROUPED_MM_DTYPES.get(x.device.type, ()):
        return False
    if x.device.type == "cuda" and torch.cuda.get_device_capability(x.device) < (9, 0):
        return False
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        return False  # inductor lowers grouped_mm for bfloat16 only
    return all(w.dtype == x.dtype and (w.shape[-1] * w.element_size()) % 16 == 0 for w in weights)


def _expert_matmul(
    x: Float[Tensor, "slots d_in"], w: Float[Tensor, "experts d_out d_in"], ends: Int[Tensor, " experts"],
    grouped: bool,
) -> Float[Tensor, "slots d_out"]:
    """Rows ends[e-1]:ends[e] of x (sorted by expert) times expert e's weight."""
    if grouped:
        return torch._grouped_mm(x, w.mT, offs=ends.to(torch.int32))
    return _expert_loop(x, w, ends)


@torch.compiler.disable  # data-dependent slice sizes: run eagerly (a graph break) rather than fail to trace
def _expert_loop(
    x: Float[Tensor, "slots d_in"], w: Float[Tensor, "experts d_out d_in"], ends: Int[Tensor, " experts"]
) -> Float[Tensor, "slots d_out"]:
    """The fallback: one GEMM per expert on its contiguous slice (reads the offsets on the host: one sync)."""
    out = x.new_empty(x.shape[0], w.shape[1])
    start = 0
    for e, end in enumerate(ends.tolist()):
        if end > start:
            out[start:end] = x[start:end] @ w[e].mT
        start = end
    return out


class MoEFeedForward(nn.Module):
    """shared(x) + Σ_k g_k · expert_k(x) over the k experts the router picks for each token.

    Routing (DeepSeek-V3 with one expert group): s = sigmoid(router(x)) (or softmax); the experts are the
    top-k of s + expert_bias, but the weights g are s at those experts (the bias steers choice, never the
    output), renormalised to sum to one when `moe_norm_topk`, times `moe_routed_scale`.

    Training hooks: `last_aux_loss` (set by each training-mode forward), `load_counts` (tokens routed per
    expert since the last `update_bias`), `update_bias(rate)`. In data-parallel training all-reduce
    `load_counts` before `update_bias` so every replica moves its bias identically.
    """

    def __init__(self, config, device=None, dtype=None):
        super().__init__()
        d, f, num_experts = config.d_model, config.moe_d_ff, config.num_experts
        self.num_experts, self.top_k = num_experts, config.moe_top_k
        self.score_fn = config.moe_router
        self.norm_topk = config.moe_norm_topk
        self.routed_scale = config.moe_routed_scale
        self.dispatch = "auto"  # "auto" | "grouped_mm" | "loop" (tests and benchmarks force a path)
        self.router = Linear(d, num_experts, device=device, dtype=dtype)
        # Float32 whatever the model's dtype: updates of ~1e-3 would vanish in a bf16 bias.
        self.register_buffer("expert_bias", torch.zeros(num_experts, device=device, dtype=torch.float32))
        self.register_buffer("load_counts", torch.zeros(num_experts, device=device), persistent=False)
        std = math.sqrt(2.0 / (d + f))  # as each expert's Linear

        def stacked(*shape: int) -> nn.Parameter:
            return nn.Parameter(_trunc_normal_(torch.empty(num_experts, *shape, device=device, dtype=dtype), std))

        self.experts_w1, self.experts_w3, self.experts_w2 = stacked(f, d), stacked(f, d), stacked(d, f)
        if config.num_shared_experts > 0:
            self.shared = SwiGLU(d, f * config.num_shared_experts, device=device, dtype=dtype)
        self.last_aux_loss: Tensor | None = None

    def route(
        self, x: Float[Tensor, "tokens d_model"]
    ) -> tuple[Float[Tensor, "tokens experts"], Int[Tensor, "tokens k"], Float[Tensor, "tokens k"]]:
        """Scores (float32 or wider), the chosen experts and their output weights."""
        dtype = torch.promote_types(x.dtype, torch.float32)  # at least float32, float64 stays float64
        logits = x.to(dtype) @ self.router.weight.to(dtype).mT
        scores = logits.sigmoid() if self.score_fn == "sigmoid" else logits.softmax(dim=-1)
        chosen = torch.topk(scores + self.expert_bias, self.top_k, dim=-1).indices
        weights = scores.gather(-1, chosen)
        if self.norm_topk:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + (1e-20 if self.score_fn == "sigmoid" else 0.0))
        return scores, chosen, weights * self.routed_scale

    def use_grouped_mm(self, x: Tensor, *weights: Tensor) -> bool:
        if self.dispatch != "auto":
            return self.dispatch == "grouped_mm"
        return grouped_mm_available(x, *(weights or (self.experts_w1, self.experts_w2)))

    def routed(
        self, x: Float[Tensor, "tokens d_model"], chosen: Int[Tensor, "tokens k"], weights: Float[Tensor, "tokens k"]
    ) -> tuple[Float[Tensor, "tokens d_model"], Int[Tensor, " experts"]]:
        """Σ_k weights_k · expert_{chosen_k}(x), and how many slots each expert served."""
        num_tokens, k = chosen.shape
        flat_expert = chosen.reshape(-1)
        order = torch.argsort(flat_expert, stable=True)  # slot ids grouped by expert
        counts = torch.zeros(self.num_experts, dtype=torch.long, device=x.device)
        counts.scatter_add_(0, flat_expert, torch.ones_like(flat_expert))
        ends = counts.cumsum(0)
        # Under autocast the expert GEMMs run in autocast's dtype, as a Linear's would (torch's autocast does
        # not know `_grouped_mm`, and fp32 inputs would miss the bf16 grouped kernel).
        compute = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        w1, w3, w2 = (w.to(compute) for w in (self.experts_w1, self.experts_w3, self.experts_w2))
        xs = x[order // k].to(compute)  # each slot's token, expert by expert
        grouped = self.use_grouped_mm(xs, w1, w2)
        w13 = torch.cat((w1, w3), dim=1)  # gate and up as one GEMM per expert
        gate, up = _expert_matmul(xs, w13, ends, grouped).chunk(2, dim=-1)
        ys = _expert_matmul(silu(gate) * up, w2, ends, grouped)
        # Undo the sort with a gather (deterministic, unlike a scatter-add) and sum each token's k slots.
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=x.device)
        y = ys[inverse].view(num_tokens, k, -1)
        return (y * weights.to(y.dtype).unsqueeze(-1)).sum(dim=1), counts

    def balance_loss(
        self, scores: Float[Tensor, "seqs seq experts"], chosen: Int[Tensor, "seqs seq k"]
    ) -> Float[Tensor, ""]:
        """DeepSeek-V3's sequence-wise balance loss Σ_i f_i P_i, averaged over sequences: f_i = E/(k T) ·
        (tokens choosing i), P_i = mean over the sequence of token-normalised scores. 1 at uniform load."""
        seq_len = scores.shape[-2]
        picked = torch.zeros_like(scores).scatter_(-1, chosen, 1.0)
        f = picked.sum(dim=-2) * (self.num_experts / (self.top_k * seq_len))
        p = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=-2)
        return (f * p).sum(dim=-1).mean()

    def forward(self, x: Float[Tensor, "... seq d_model"]) -> Float[Tensor, "... seq d_model"]:
        flat = x.reshape(-1, x.shape[-1])
        scores, chosen, weights = self.route(flat)
        out, counts = self.routed(flat, chosen, weights)
        if self.training:
            with torch.no_grad():
                self.load_counts += counts.to(self.load_counts.dtype)
            seq_len = x.shape[-2]
            self.last_aux_loss = self.balance_loss(
                scores.view(-1, seq_len, self.num_experts), chosen.view(-1, seq_len, self.top_k)
            )
        out = out.view_as(x)
        return out + self.shared(x) if hasattr(self, "shared") else out

    @torch.no_grad()
    def update_bias(self, rate: float) -> Float[Tensor, " experts"]:
        """Auxiliary-loss-free balancing: raise the bias of under-loaded experts and lower that of over-loaded
        ones by `rate` (expert_bias += rate · sign(mean load − load)); returns the load fractions it saw."""
        load = self.load_counts.clone()
        self.expert_bias += rate * torch.sign(load.mean() - load)
        self.load_counts.zero_()
        return load / load.sum().clamp_min(1.0)

    def inactive_parameters_per_token(self) -> int:
        """Routed-expert parameters a token does not multiply (all but its top-k experts)."""
        per_expert = self.experts_w1[0].numel() + self.experts_w3[0].numel() + self.experts_w2[0].numel()
        return (self.num_experts - self.top_k) * per_expert
