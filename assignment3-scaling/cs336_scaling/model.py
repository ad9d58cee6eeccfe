"""The training API's Transformer variant, assembled from cs336_basics pieces.

Differences from assignment 1 (handout §3.2): learned absolute position embeddings instead of RoPE,
LayerNorm (no bias) instead of RMSNorm, FFN = Linear → GeLU → Linear with d_ff = 4·d_model, dropout 0.1 on
attention probabilities, on each sub-layer's output before the residual add and on the embedding sum,
untied input/output embeddings. Pre-norm as in assignment 1.
"""

from dataclasses import MISSING, dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from cs336_basics.cli_support import bounded, check_ranges
from cs336_basics.layers import Embedding, Linear


@dataclass(frozen=True)
class APIModelConfig:
    vocab_size: int = bounded(MISSING, ge=1)
    context_length: int = bounded(MISSING, ge=1)
    d_model: int = bounded(MISSING, ge=1)
    num_layers: int = bounded(MISSING, ge=1)
    num_heads: int = bounded(MISSING, ge=1)
    dropout: float = bounded(0.1, ge=0, lt=1)

    def __post_init__(self):
        check_ranges(self)
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}")

    @property
    def d_ff(self) -> int:
        return 4 * self.d_model

    @property
    def non_embedding_params(self) -> int:
        return 12 * self.num_layers * self.d_model**2


class DropoutAttention(nn.Module):
    def __init__(self, d_model: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.q_proj, self.k_proj = Linear(d_model, d_model), Linear(d_model, d_model)
        self.v_proj, self.output_proj = Linear(d_model, d_model), Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (rearrange(p(x), "b s (h d) -> b h s d", h=self.num_heads)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.output_proj(rearrange(out, "b h s d -> b s (h d)"))


class GeLUFeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w1, self.w2 = Linear(d_model, d_ff), Linear(d_ff, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.gelu(self.w1(x)))


class APIBlock(nn.Module):
    def __init__(self, config: APIModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model, bias=False)
        self.attn = DropoutAttention(config.d_model, config.num_heads, config.dropout)
        self.ln2 = nn.LayerNorm(config.d_model, bias=False)
        self.ffn = GeLUFeedForward(config.d_model, config.d_ff)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.ffn(self.ln2(x)))


class APITransformerLM(nn.Module):
    def __init__(self, config: APIModelConfig):
        super().__init__()
        self.config = config
        self.token_embeddings = Embedding(config.vocab_size, config.d_model)
        self.position_embeddings = Embedding(config.context_length, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(APIBlock(config) for _ in range(config.num_layers))
        self.ln_final = nn.LayerNorm(config.d_model, bias=False)
        self.lm_head = Linear(config.d_model, config.vocab_size)

    def forward(self, in_indices: Tensor) -> Tensor:
        seq = in_indices.shape[-1]
        if seq > self.config.context_length:
            raise ValueError(f"sequence of {seq} tokens exceeds context_length={self.config.context_length}")
        positions = torch.arange(seq, device=in_indices.device)
        x = self.drop(self.token_embeddings(in_indices) + self.position_embeddings(positions))
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.ln_final(x))
