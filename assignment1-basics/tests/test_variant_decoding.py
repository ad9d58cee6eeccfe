"""Every model variant decodes through its own cache exactly as full recomputation does (greedy, a batch of
left-padded prompts of different lengths), and its cache costs the bytes per token the variant promises."""

import pytest
import torch

from cs336_basics.decoding import generate
from cs336_basics.model import TransformerConfig, TransformerLM

BASE = {"vocab_size": 61, "context_length": 40, "d_model": 32, "num_layers": 2, "num_heads": 4, "d_ff": 64}
WINDOW = 3
MLA = {"attention": "mla", "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8}
VARIANTS = {
    "mha": {},
    "gqa": {"num_kv_heads": 2},
    "mqa": {"num_kv_heads": 1},
    "alibi": {"position": "alibi"},
    "sliding": {"sliding_window": WINDOW},  # smaller than the longest prompt: the ring wraps during prefill
    "gqa-sliding": {"num_kv_heads": 2, "sliding_window": 5},
    "linear": {"attention": "linear", "position": "none", "linear_chunk_size": 4},
    "mla": MLA,
    "mla-q-lora": {**MLA, "q_lora_rank": 12},
    "moe": {"ffn": "moe", "num_experts": 4, "moe_top_k": 2, "moe_d_ff": 32, "num_shared_experts": 1},
}
PROMPTS = [[5, 9, 3, 22, 7, 1, 8], [4], [30, 31, 32, 33]]  # left padding of 6, 0 and 3 tokens
STEPS = 8
# SDPA changes only the softmax attention modules; linear attention has none, and MoE changes only the FFN.
CASES = [(name, sdpa) for name in VARIANTS for sdpa in (False, True) if not (sdpa and name in ("linear", "moe"))]
ELEMENT = 8  # float64 bytes


def _model(name: str, use_torch_sdpa: bool = False) -> TransformerLM:
    torch.manual_seed(0)
    config = TransformerConfig(**BASE, **VARIANTS[name], use_torch_sdpa=use_torch_sdpa)
    # float64 keeps near-ties in the logits (and MoE routing) from flipping between batched and lone runs
    return TransformerLM(config, dtype=torch.float64).eval()


def _greedy_by_recomputation(model: TransformerLM, prompt: list[int], steps: int) -> list[int]:
    """argmax of model(whole sequence so far) at each step: no cache, no padding, no batch."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def _expected_bytes_per_token(name: str) -> int:
    """Per token and layer: keys + values of the KV heads; MLA's latent + shared rope key; nothing for a
    recurrent state."""
    variant = VARIANTS[name]
    d_head = BASE["d_model"] // BASE["num_heads"]
    if variant.get("attention") == "linear":
        per_layer = 0
    elif variant.get("attention") == "mla":
        per_layer = (variant["kv_lora_rank"] + variant["qk_rope_head_dim"]) * ELEMENT
    else:
        per_layer = 2 * variant.get("num_kv_heads", BASE["num_heads"]) * d_head * ELEMENT
    return BASE["num_layers"] * per_layer


@pytest.mark.parametrize(("name", "use_torch_sdpa"), CASES)
def test_batched_cached_greedy_decoding_equals_recomputation(name, use_torch_sdpa):
    model = _model(name, use_torch_sdpa)
    got = generate(model, PROMPTS, max_new_tokens=STEPS, temperature=0.0)
    assert got == [_greedy_by_recomputation(model, p, STEPS) for p in PROMPTS]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_cache_bytes_per_token(name):
    model = _model(name)
    caches = model.new_kv_caches(batch_size=2, max_len=20)
    assert caches.bytes_per_token == _expected_bytes_per_token(name)
    window = VARIANTS[name].get("sliding_window")
    if window is not None:  # the same cost per token, but storage for only W of them
        assert all(cache.keys.shape[-2] == cache.values.shape[-2] == window for cache in caches)
    if VARIANTS[name].get("attention") == "linear":  # a constant-size state: S (d×d) and z (d) per head
        d_head = BASE["d_model"] // BASE["num_heads"]
        assert all(cache.state.numel() == 2 * BASE["num_heads"] * d_head * d_head for cache in caches)
