"""Which Hugging Face architecture expresses a `TransformerConfig`, and the config.json that says so.

Llama for dense multi-head / grouped-query / multi-query models, Mistral when a sliding window is set,
DeepseekV3 for multi-head latent attention and/or DeepSeek-style mixture of experts. Everything else (ALiBi,
no position signal, linear attention, post-norm or no norm, the ungated SiLU FFN, softmax routing, ...) has
no architecture here and is refused with a one-line reason, in both directions.

The config.json written here loads in transformers 4.x and 5.x alike: `rope_theta` at the top level (4.x)
and `rope_parameters` (5.x); `torch_dtype` (both; 5.x reads it as `dtype`).
"""

from typing import Any

from cs336_basics.cli_support import UserError
from cs336_basics.model import ConfigError, TransformerConfig

LLAMA, MISTRAL, DEEPSEEK_V3 = "llama", "mistral", "deepseek_v3"
CLASS_NAMES = {LLAMA: "LlamaForCausalLM", MISTRAL: "MistralForCausalLM", DEEPSEEK_V3: "DeepseekV3ForCausalLM"}


def architecture_for(config: TransformerConfig) -> str:
    """The model_type that computes exactly our function, or a `UserError` saying why none does."""
    reasons = (  # the most specific first: linear attention also implies position='none'
        config.attention == "linear" and "attention='linear' (no HF causal LM computes it)",
        config.norm != "pre" and f"norm={config.norm!r} (HF decoders here are pre-norm)",
        config.position != "rope" and f"position={config.position!r} (HF decoders here use RoPE)",
        config.ffn == "silu" and "ffn='silu' (HF decoders here use a gated SwiGLU FFN)",
    )
    for reason in reasons:
        if reason:
            raise UserError(f"cannot export to Hugging Face: {reason}")
    if config.attention == "mla" or config.ffn == "moe":
        if config.attention != "mla":
            raise UserError("cannot export to Hugging Face: ffn='moe' needs attention='mla' (DeepseekV3 is the "
                            f"only MoE architecture mapped), got attention={config.attention!r}")
        if config.ffn == "moe":
            if config.moe_router != "sigmoid":
                raise UserError("cannot export to Hugging Face: DeepseekV3 routes with sigmoid scores, "
                                f"got moe_router={config.moe_router!r}")
            if config.num_experts < 2:
                raise UserError("cannot export to Hugging Face: DeepseekV3's router needs num_experts >= 2, "
                                f"got {config.num_experts}")
        return DEEPSEEK_V3
    return MISTRAL if config.sliding_window is not None else LLAMA


def _common(config: TransformerConfig, model_type: str, dtype: str, eos_id: int | None) -> dict[str, Any]:
    return {
        "architectures": [CLASS_NAMES[model_type]],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.d_ff,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "hidden_act": "silu",
        "max_position_embeddings": config.context_length,
        "rms_norm_eps": config.rmsnorm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "tie_word_embeddings": False,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "pad_token_id": None,
        "torch_dtype": dtype,
    }


def hf_config(config: TransformerConfig, dtype: str = "float32", eos_id: int | None = None) -> dict[str, Any]:
    """config.json for `config` (refused via `architecture_for` when no architecture fits)."""
    model_type = architecture_for(config)
    out = _common(config, model_type, dtype, eos_id)
    if model_type in (LLAMA, MISTRAL):
        out |= {"num_key_value_heads": config.kv_heads, "head_dim": config.d_head}
        if model_type == LLAMA:
            out |= {"mlp_bias": False, "pretraining_tp": 1}
        else:
            out |= {"sliding_window": config.sliding_window}
        return out
    moe = config.ffn == "moe"
    out |= {
        "num_key_value_heads": config.num_heads,
        "kv_lora_rank": config.kv_lora_rank,
        "q_lora_rank": config.q_lora_rank or None,
        "qk_nope_head_dim": config.qk_nope_head_dim,
        "qk_rope_head_dim": config.qk_rope_head_dim,
        "v_head_dim": config.v_head_dim,
        "rope_interleave": True,  # our RoPE rotates interleaved pairs, as DeepSeek's checkpoints do
        # A dense MLA model is DeepseekV3 with every layer "first-k dense".
        "first_k_dense_replace": config.moe_dense_layers if moe else config.num_layers,
        "moe_intermediate_size": config.moe_d_ff,
        "n_routed_experts": config.num_experts if moe else 2,
        "n_shared_experts": config.num_shared_experts,
        "num_experts_per_tok": config.moe_top_k if moe else 1,
        "routed_scaling_factor": config.moe_routed_scale,
        "norm_topk_prob": config.moe_norm_topk,
        "n_group": 1,
        "topk_group": 1,
        "topk_method": "noaux_tc",  # read by DeepSeek's own modelling code; transformers ignores both
        "scoring_func": "sigmoid",
        "num_nextn_predict_layers": 0,
    }
    return out


def _get(hf: dict, key: str, default: Any = None) -> Any:
    value = hf.get(key, default)
    return default if value is None else value


def _rope_theta(hf: dict) -> float:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise UserError(f"cannot import from Hugging Face: rope type {rope_type!r} (only plain RoPE is mapped)")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise UserError("cannot import from Hugging Face: partial rotary embeddings are not mapped")
    return float(params.get("rope_theta", hf.get("rope_theta", 10_000.0)))


def config_from_hf(hf: dict[str, Any]) -> TransformerConfig:
    """Our config for a Llama / Mistral / DeepseekV3 config.json; anything it cannot express is refused."""
    model_type = hf.get("model_type")
    if model_type not in CLASS_NAMES:
        raise UserError(f"cannot import from Hugging Face: model_type {model_type!r} is not one of "
                        f"{sorted(CLASS_NAMES)}")
    if _get(hf, "hidden_act", "silu") != "silu":
        raise UserError(f"cannot import from Hugging Face: hidden_act={hf['hidden_act']!r} (SwiGLU uses 'silu')")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise UserError("cannot import from Hugging Face: biases in attention or MLP (our layers have none)")
    d_model, num_heads = hf["hidden_size"], hf["num_attention_heads"]
    base = {
        "vocab_size": hf["vocab_size"],
        "context_length": hf["max_position_embeddings"],
        "d_model": d_model,
        "num_layers": hf["num_hidden_layers"],
        "num_heads": num_heads,
        "d_ff": hf["intermediate_size"],
        "rope_theta": _rope_theta(hf),
        "rmsnorm_eps": float(_get(hf, "rms_norm_eps", 1e-6)),
    }
    try:
        if model_type in (LLAMA, MISTRAL):
            head_dim = _get(hf, "head_dim", d_model // num_heads)
            if head_dim * num_heads != d_model:
                raise UserError(f"cannot import from Hugging Face: head_dim={head_dim} × {num_heads} heads != "
                                f"hidden_size={d_model} (our heads split d_model)")
            kv_heads = _get(hf, "num_key_value_heads", num_heads)
            window = hf.get("sliding_window") if model_type == MISTRAL else None
            return TransformerConfig(**base, num_kv_heads=None if kv_heads == num_heads else kv_heads,
                                     sliding_window=window)
        return _deepseek_config(hf, base)
    except ConfigError as e:
        raise UserError(f"cannot import from Hugging Face: {e}") from e


def _deepseek_config(hf: dict[str, Any], base: dict[str, Any]) -> TransformerConfig:
    if not _get(hf, "rope_interleave", True):
        raise UserError("cannot import from Hugging Face: DeepseekV3 with rope_interleave=false is not mapped")
    if (_get(hf, "n_group", 1), _get(hf, "topk_group", 1)) != (1, 1):
        raise UserError(f"cannot import from Hugging Face: grouped routing (n_group={hf.get('n_group')}, "
                        f"topk_group={hf.get('topk_group')}); only n_group = topk_group = 1 is mapped")
    if _get(hf, "scoring_func", "sigmoid") != "sigmoid":
        raise UserError(f"cannot import from Hugging Face: scoring_func={hf['scoring_func']!r}")
    num_layers = base["num_layers"]
    dense_layers = min(_get(hf, "first_k_dense_replace", 0), num_layers)
    moe = dense_layers < num_layers
    fields = {
        "attention": "mla",
        "kv_lora_rank": hf["kv_lora_rank"],
        "q_lora_rank": _get(hf, "q_lora_rank", 0),
        "qk_nope_head_dim": hf["qk_nope_head_dim"],
        "qk_rope_head_dim": hf["qk_rope_head_dim"],
        "v_head_dim": hf["v_head_dim"],
    }
    if moe:
        fields |= {
            "ffn": "moe",
            "num_experts": hf["n_routed_experts"],
            "moe_top_k": hf["num_experts_per_tok"],
            "num_shared_experts": _get(hf, "n_shared_experts", 0),
            "moe_d_ff": hf["moe_intermediate_size"],
            "moe_router": "sigmoid",
            "moe_norm_topk": bool(_get(hf, "norm_topk_prob", True)),
            "moe_routed_scale": float(_get(hf, "routed_scaling_factor", 1.0)),
            "moe_dense_layers": dense_layers,
        }
    return TransformerConfig(**base, **fields)
