"""State-dict mapping between `TransformerLM` and the Hugging Face checkpoint layouts.

Every mapping is a renaming, a row permutation or a split/stack of expert tensors, i.e. linear and
orthogonal: it maps parameter gradients exactly as it maps parameters (the parity tests rely on this).

RoPE: our rotary embedding rotates interleaved pairs (x[2i], x[2i+1]) of each head; Llama and Mistral rotate
halves (x[i], x[i + d/2]) with the same frequency i. Reordering the q and k rows of every head as
[0, 2, 4, ..., 1, 3, 5, ...] turns one into the other; scores q·k are unchanged since both sides move alike.
DeepseekV3 (rope_interleave=True) rotates interleaved pairs like us, so MLA weights map unpermuted.

MoE experts are written in DeepSeek's hub layout (`mlp.experts.{e}.gate_proj.weight`, ...): transformers
4.x loads it as is and 5.x fuses it into `gate_up_proj` on load. Reading accepts both layouts.
"""

import torch
from torch import Tensor

from cs336_basics.cli_support import UserError
from cs336_basics.hf.architectures import DEEPSEEK_V3, architecture_for
from cs336_basics.model import TransformerConfig

StateDict = dict[str, Tensor]

_DENSE_FFN = {"ffn.w1": "mlp.gate_proj", "ffn.w3": "mlp.up_proj", "ffn.w2": "mlp.down_proj"}
_NORMS = {"ln1": "input_layernorm", "ln2": "post_attention_layernorm"}
_MHA = {"attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj", "attn.v_proj": "self_attn.v_proj",
        "attn.output_proj": "self_attn.o_proj"}
_MLA = {
    "attn.q_proj": "self_attn.q_proj",
    "attn.q_down": "self_attn.q_a_proj",
    "attn.q_norm": "self_attn.q_a_layernorm",
    "attn.q_up": "self_attn.q_b_proj",
    "attn.kv_down": "self_attn.kv_a_proj_with_mqa",
    "attn.kv_norm": "self_attn.kv_a_layernorm",
    "attn.kv_up": "self_attn.kv_b_proj",
    "attn.output_proj": "self_attn.o_proj",
}
_MOE = {"ffn.router.weight": "mlp.gate.weight", "ffn.expert_bias": "mlp.gate.e_score_correction_bias",
        "ffn.shared.w1.weight": "mlp.shared_experts.gate_proj.weight",
        "ffn.shared.w3.weight": "mlp.shared_experts.up_proj.weight",
        "ffn.shared.w2.weight": "mlp.shared_experts.down_proj.weight"}
_EXPERTS = {"ffn.experts_w1": "gate_proj", "ffn.experts_w3": "up_proj", "ffn.experts_w2": "down_proj"}


def halves_order(d_head: int) -> Tensor:
    """Row order taking one interleaved-pair head to the rotate-half layout: [0, 2, 4, ..., 1, 3, 5, ...]."""
    return torch.cat((torch.arange(0, d_head, 2), torch.arange(1, d_head, 2)))


def _permute_heads(weight: Tensor, d_head: int, order: Tensor) -> Tensor:
    heads = weight.reshape(-1, d_head, weight.shape[-1])
    return heads[:, order.to(weight.device)].reshape(weight.shape).contiguous()


def _layer_renames(config: TransformerConfig, i: int) -> dict[str, str]:
    """Our key (without `layers.{i}.`) -> HF key (without `model.layers.{i}.`) for the non-expert tensors."""
    names = {f"{ours}.weight": f"{theirs}.weight" for ours, theirs in _NORMS.items()}
    attention = _MHA
    if config.attention == "mla":
        skip = ("attn.q_proj",) if config.q_lora_rank else ("attn.q_down", "attn.q_norm", "attn.q_up")
        attention = {ours: theirs for ours, theirs in _MLA.items() if ours not in skip}
    names |= {f"{ours}.weight": f"{theirs}.weight" for ours, theirs in attention.items()}
    if config.is_moe_layer(i):
        names |= {ours: theirs for ours, theirs in _MOE.items()
                  if config.num_shared_experts or not ours.startswith("ffn.shared")}
    else:
        names |= {f"{ours}.weight": f"{theirs}.weight" for ours, theirs in _DENSE_FFN.items()}
    return names


def to_hf_state_dict(state: StateDict, config: TransformerConfig) -> StateDict:
    """Our state dict (or gradients keyed like it) -> the HF checkpoint's tensors; a key left over is a bug."""
    model_type = architecture_for(config)
    remaining = dict(state)
    out = {"model.embed_tokens.weight": remaining.pop("token_embeddings.weight"),
           "model.norm.weight": remaining.pop("ln_final.weight"),
           "lm_head.weight": remaining.pop("lm_head.weight")}
    order = halves_order(config.d_head)
    for i in range(config.num_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        for name, hf_name in _layer_renames(config, i).items():
            tensor = remaining.pop(ours + name)
            if model_type != DEEPSEEK_V3 and name in ("attn.q_proj.weight", "attn.k_proj.weight"):
                tensor = _permute_heads(tensor, config.d_head, order)
            out[theirs + hf_name] = tensor
        if config.is_moe_layer(i):
            for name, hf_name in _EXPERTS.items():
                for e, expert in enumerate(remaining.pop(ours + name).unbind(0)):
                    out[f"{theirs}mlp.experts.{e}.{hf_name}.weight"] = expert
    if remaining:
        raise ValueError(f"no Hugging Face name for {sorted(remaining)[:3]}")
    return {name: tensor.contiguous() for name, tensor in out.items()}


def _fused_to_hub(hf: StateDict, config: TransformerConfig) -> StateDict:
    """transformers 5.x's in-memory expert tensors (gate_up_proj (E, 2F, d), down_proj (E, d, F)) -> hub."""
    out = {}
    for name, tensor in hf.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name.removesuffix("gate_up_proj")
            gate, up = tensor.split(config.moe_d_ff, dim=1)
            for e in range(tensor.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"], out[f"{prefix}{e}.up_proj.weight"] = gate[e], up[e]
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name.removesuffix("down_proj")
            for e in range(tensor.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = tensor[e]
        else:
            out[name] = tensor
    return out


def from_hf_state_dict(hf: StateDict, config: TransformerConfig) -> StateDict:
    """HF tensors (hub or transformers-5 fused expert layout; tied embeddings allowed) -> our state dict.

    Tensors we have no place for (multi-token-prediction layers past num_layers, rotary caches) are ignored;
    a tensor we need and do not find is a `UserError` naming it.
    """
    model_type = architecture_for(config)
    hf = _fused_to_hub(hf, config)

    def take(name: str) -> Tensor:
        if name not in hf:
            raise UserError(f"the Hugging Face checkpoint lacks {name}")
        return hf[name]

    out = {"token_embeddings.weight": take("model.embed_tokens.weight"),
           "ln_final.weight": take("model.norm.weight"),
           "lm_head.weight": hf.get("lm_head.weight", hf["model.embed_tokens.weight"]).clone()}
    inverse = torch.argsort(halves_order(config.d_head))
    for i in range(config.num_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        for name, hf_name in _layer_renames(config, i).items():
            tensor = take(theirs + hf_name)
            if model_type != DEEPSEEK_V3 and name in ("attn.q_proj.weight", "attn.k_proj.weight"):
                tensor = _permute_heads(tensor, config.d_head, inverse)
            out[ours + name] = tensor
        if config.is_moe_layer(i):
            for name, hf_name in _EXPERTS.items():
                experts = [take(f"{theirs}mlp.experts.{e}.{hf_name}.weight") for e in range(config.num_experts)]
                out[ours + name] = torch.stack(experts)
    return out
