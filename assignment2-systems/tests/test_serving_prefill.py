"""The engine's prefill pass (`cs336_systems.serving.prefill.PrefillForward`) against the model's own forward
through `PagedLayerCache`: bit-identical logits and cached keys/values for every attention variant it takes,
the model's own path for the others, and both close to the model's plain (contiguous, unpaged) forward."""

import pytest
import torch

from cs336_basics.model import TransformerConfig, TransformerLM
from cs336_systems.serving.block_manager import SCRATCH_BLOCK
from cs336_systems.serving.engine import EngineConfig, LLMEngine
from cs336_systems.serving.loader import tiny_served_model
from cs336_systems.serving.model_runner import ModelRunner
from cs336_systems.serving.testing import (
    ENGINE_VARIANTS,
    one_thread,  # noqa: F401 (autouse: one torch thread)
    random_prompts,
)

FAST = {
    "mha": {},
    "gqa": {"num_kv_heads": 2},
    "mqa": {"num_kv_heads": 1},
    "no-rope": {"position": "none"},
    "silu-ffn": {"ffn": "silu"},
    "llama-eps": {"rmsnorm_eps": 1e-6, "rope_theta": 500_000.0},
}
MODEL_PATH = {name: over for name, over in ENGINE_VARIANTS.items() if name not in FAST and name != "linear"}
BLOCK = 4


def _model(overrides: dict, dtype: torch.dtype) -> TransformerLM:
    torch.manual_seed(0)
    settings = dict(vocab_size=257, context_length=128, d_model=64, num_layers=3, num_heads=4, d_ff=96)
    return TransformerLM(TransformerConfig(**{**settings, **overrides})).to(dtype).eval()


def _slots(lengths) -> list[list[int]]:
    slots, next_block = [], SCRATCH_BLOCK + 1
    for n in lengths:
        blocks = list(range(next_block, next_block + -(-n // BLOCK)))[::-1]  # scattered, not in order
        next_block += len(blocks)
        slots.append([blocks[t // BLOCK] * BLOCK + t % BLOCK for t in range(n)])
    return slots


def _prefill(overrides, dtype, fast: bool, lengths=(13, 40, 7, 1), device="cpu"):
    runner = ModelRunner(_model(overrides, dtype).to(device), num_blocks=64, block_size=BLOCK, max_num_seqs=8,
                         cuda_graphs=False, fast_prefill=fast)
    prompts = random_prompts(1, lengths)
    logits = runner.prefill(prompts, _slots(lengths))
    pools = [p[SCRATCH_BLOCK + 1 :] for p in (*runner.k_pools, *runner.v_pools) if p is not None]
    return runner, prompts, logits, pools


def _same_prefill(runner: ModelRunner, reference: ModelRunner, lengths: tuple[int, ...], tol: float,
                  pinned: bool = False) -> None:
    """One pass of random prompts through both runners (pools cleared first): the logits and every stored
    key/value outside the scratch block agree within `tol`."""
    slots, prompts = _slots(lengths), random_prompts(len(lengths), lengths)
    for r in (runner, reference):
        for pool in (*r.k_pools, *r.v_pools):
            pool.zero_()
    want, got = reference.prefill(prompts, slots, pinned=pinned), runner.prefill(prompts, slots, pinned=pinned)
    assert got.shape == want.shape == (len(lengths), reference.config.vocab_size)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    for pool, ref in zip((*runner.k_pools, *runner.v_pools), (*reference.k_pools, *reference.v_pools), strict=True):
        torch.testing.assert_close(pool[SCRATCH_BLOCK + 1 :], ref[SCRATCH_BLOCK + 1 :], rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant", sorted(FAST))
def test_fast_prefill_is_bit_identical_to_the_models_own_forward(variant, dtype):
    fast, _, logits, pools = _prefill(FAST[variant], dtype, fast=True)
    slow, _, ref_logits, ref_pools = _prefill(FAST[variant], dtype, fast=False)
    assert fast.prefill_forward is not None and slow.prefill_forward is None
    assert logits.dtype == torch.float32 and torch.equal(logits, ref_logits)
    for pool, ref in zip(pools, ref_pools, strict=True):
        assert torch.equal(pool, ref)
    assert any(p.abs().sum() > 0 for p in pools)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernels of the prefill pass need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant", sorted(FAST))
def test_fast_prefill_on_cuda_matches_the_models_own_forward(variant, dtype):
    """On a GPU the fused projections may take other matmul kernels than three separate ones (cuBLAS picks by
    shape), so equal up to the dtype's rounding rather than bit for bit."""
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2}[dtype]
    fast, _, logits, pools = _prefill(FAST[variant], dtype, fast=True, device="cuda")
    slow, _, ref_logits, ref_pools = _prefill(FAST[variant], dtype, fast=False, device="cuda")
    assert fast.prefill_forward is not None and slow.prefill_forward is None
    torch.testing.assert_close(logits, ref_logits, rtol=tol, atol=tol)
    for pool, ref in zip(pools, ref_pools, strict=True):
        torch.testing.assert_close(pool.float(), ref.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("variant", sorted(MODEL_PATH))
def test_other_variants_keep_the_models_own_prefill(variant):
    runner, _, logits, _ = _prefill(MODEL_PATH[variant], torch.float32, fast=True)
    assert runner.prefill_forward is None and torch.isfinite(logits).all()


@pytest.mark.parametrize("variant", sorted(FAST) + sorted(MODEL_PATH))
def test_prefill_equals_the_plain_forward_and_its_kv_cache(variant):
    """Each row's logits equal the unpaged model's on that prompt alone, and its cached keys (gathered back
    through its slots) equal those of cs336_basics' contiguous KV cache (attention variants with K and V)."""
    overrides = {**FAST, **MODEL_PATH}[variant]
    lengths = (13, 40, 7, 1)
    runner, prompts, logits, _ = _prefill(overrides, torch.float32, fast=True, lengths=lengths)
    reference = _model(overrides, torch.float32)
    slots = _slots(lengths)
    for row, prompt in enumerate(prompts):
        caches = reference.new_kv_caches(1)
        with torch.no_grad():
            expected = reference(torch.tensor([prompt]), kv_caches=caches)[0, -1]
        torch.testing.assert_close(logits[row], expected, rtol=1e-4, atol=1e-4)
        if not hasattr(caches[0], "keys") or overrides.get("sliding_window"):
            continue
        index = torch.tensor(slots[row])
        for cache, k_pool, v_pool in zip(caches, runner.k_pools, runner.v_pools, strict=True):
            k = k_pool.view(-1, *k_pool.shape[2:])[index]  # (seq, kv_heads, d)
            torch.testing.assert_close(k, cache.keys[0, :, : len(prompt)].transpose(0, 1), rtol=1e-4, atol=1e-4)
            v = v_pool.view(-1, *v_pool.shape[2:])[index]
            torch.testing.assert_close(v, cache.values[0, :, : len(prompt)].transpose(0, 1), rtol=1e-4, atol=1e-4)


def test_fusing_the_projections_leaves_the_models_weights_and_forward_unchanged():
    model, reference = _model(FAST["gqa"], torch.float32), _model(FAST["gqa"], torch.float32)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    ModelRunner(model, num_blocks=16, block_size=BLOCK, max_num_seqs=2, cuda_graphs=False)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    qkv = model.layers[0].attn
    assert qkv.k_proj.weight.untyped_storage().data_ptr() == qkv.q_proj.weight.untyped_storage().data_ptr()
    for layer in reference.layers:  # what the runner sets on the model's layers
        layer.attn.use_torch_sdpa = True
    tokens = torch.tensor([random_prompts(2, (20,))[0]])
    with torch.no_grad():
        assert torch.equal(model(tokens), reference(tokens))


def test_host_profile_prefill_counts_fewer_aten_calls_for_the_engines_prefill(capsys):
    from cs336_systems.serving.host_profile import main

    assert main(["--prefill", "--prefill-passes", "2", "--json"]) == 0
    import json

    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ours, model = result["engine_prefill"], result["model_forward"]
    assert 0 < ours["aten_calls"] < model["aten_calls"] and ours["casts"] < model["casts"]


@pytest.fixture(scope="module")
def compiled_and_eager():
    """Two runners of one fp32 GQA model (the Llama shape with grouped heads), the second compiling its
    prefill; compiled once for the module (about 10 s on a CPU), with the one thread the tests run with (the
    graph's guards include the thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    eager = ModelRunner(_model(FAST["gqa"], torch.float32), num_blocks=64, block_size=BLOCK, max_num_seqs=8,
                        cuda_graphs=False)
    compiled = ModelRunner(_model(FAST["gqa"], torch.float32), num_blocks=64, block_size=BLOCK, max_num_seqs=8,
                           cuda_graphs=False, compile_prefill=True)
    torch.set_num_threads(threads)
    return eager, compiled


def test_compiled_prefill_matches_the_eager_one_at_every_shape_without_recompiling(compiled_and_eager):
    """Logits and stored keys/values of the compiled graph equal the eager fast prefill's up to fp32 rounding
    for batches of one and several prompts, including one-token prompts (padded to the graph's minimum shape),
    and no pass after start-up compiles again."""
    from torch._dynamo.utils import counters

    eager, compiled = compiled_and_eager
    assert compiled.prefill_forward is not None and compiled.prefill_forward.compiled
    assert not eager.prefill_forward.compiled
    graphs = counters["stats"]["unique_graphs"]
    for lengths in [(13, 40, 7, 1), (5,), (1,), (1, 1, 2), (3, 4, 5, 6, 7, 8, 9, 10)]:
        _same_prefill(compiled, eager, lengths, 1e-5)
        assert any(p[SCRATCH_BLOCK + 1 :].abs().sum() > 0 for p in compiled.k_pools)
    assert counters["stats"]["unique_graphs"] == graphs


def test_the_cpp_wrapper_prefill_computes_what_the_eager_one_does(compiled_and_eager):
    """The same graph launched from inductor's generated C++: logits and stored keys/values as the eager fast
    prefill's, and the option reaches torch.compile only for a compiled prefill."""
    eager, _ = compiled_and_eager
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        wrapped = ModelRunner(_model(FAST["gqa"], torch.float32), num_blocks=64, block_size=BLOCK, max_num_seqs=8,
                              cuda_graphs=False, compile_prefill=True, prefill_cpp_wrapper=True)
        assert wrapped.prefill_forward.cpp_wrapper
        for lengths in [(13, 40, 7, 1), (5,)]:
            _same_prefill(wrapped, eager, lengths, 1e-5)
    finally:
        torch.set_num_threads(threads)
    plain = ModelRunner(_model(FAST["gqa"], torch.float32), num_blocks=8, block_size=BLOCK, max_num_seqs=2,
                        cuda_graphs=False, prefill_cpp_wrapper=True)
    assert not plain.prefill_forward.compiled and not plain.prefill_forward.cpp_wrapper
    with pytest.raises(ValueError, match="prefill_cpp_wrapper"):
        EngineConfig(prefill_cpp_wrapper=True, compile_prefill=False)
    with pytest.raises(ValueError, match="off on cpu unless asked for"):  # None: compiled on CUDA only
        LLMEngine(tiny_served_model(), EngineConfig(device="cpu", prefill_cpp_wrapper=True, compile_prefill=None))


def test_engine_with_a_compiled_prefill_generates_what_the_eager_engine_does():
    from cs336_systems.serving.engine import EngineConfig, LLMEngine
    from cs336_systems.serving.loader import tiny_served_model
    from cs336_systems.serving.params import SamplingParams

    prompts = random_prompts(3, (5, 17, 1, 30, 9))
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    outputs = {}
    for compile_prefill in (False, True):
        engine = LLMEngine(tiny_served_model(num_kv_heads=2),
                           EngineConfig(device="cpu", compile_prefill=compile_prefill))
        assert engine.runner.prefill_forward.compiled is compile_prefill
        outputs[compile_prefill] = [o.outputs[0].token_ids for o in engine.generate(prompts, params)]
    assert outputs[True] == outputs[False]
    assert all(len(ids) == 12 for ids in outputs[True])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled prefill's CUDA graph needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compiled_prefill_on_cuda_matches_the_eager_one(dtype):
    """Triton kernels and cuBLAS on the GPU: equal to the eager fast prefill up to the dtype's rounding, and one
    graph for every shape."""
    from torch._dynamo.utils import counters

    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2}[dtype]
    runners = [ModelRunner(_model(FAST["gqa"], dtype).cuda(), num_blocks=64, block_size=BLOCK, max_num_seqs=8,
                           cuda_graphs=False, compile_prefill=compile_prefill) for compile_prefill in (False, True)]
    assert runners[1].prefill_forward.compiled
    graphs = counters["stats"]["unique_graphs"]
    for lengths in [(13, 40, 7, 1), (5,), (1,), (3, 4, 5, 6, 7, 8, 9, 10)]:
        _same_prefill(runners[1], runners[0], lengths, tol)
    assert counters["stats"]["unique_graphs"] == graphs


def test_bucketed_prefill_pads_to_the_ladder_and_computes_what_the_unpadded_one_does():
    """`prefill_graphs` pads each pass to the smallest (rows, tokens) bucket that holds it (on the CPU without
    capturing): logits and stored keys/values equal the unpadded pass's to fp32 rounding; a pass larger than
    every bucket runs unpadded."""
    plain = ModelRunner(_model(FAST["gqa"], torch.float32), num_blocks=64, block_size=BLOCK, max_num_seqs=8,
                        cuda_graphs=False)
    bucketed = ModelRunner(_model(FAST["gqa"], torch.float32), num_blocks=64, block_size=BLOCK, max_num_seqs=8,
                           cuda_graphs=False, prefill_graphs=True, max_num_batched_tokens=256)
    buckets = bucketed.prefill_buckets
    assert buckets and all(rows * length <= 256 and rows <= 8 and length <= 128 for rows, length in buckets)
    assert bucketed._prefill_bucket(3, 40) == (3, 48) and bucketed._prefill_bucket(1, 1) == (2, 16)
    assert bucketed._prefill_bucket(8, 100) is None  # 8 × 128 tokens is past max_num_batched_tokens
    for lengths in [(13, 40, 7, 1), (5,), (1,), (3, 4, 5, 6, 7, 8, 9, 10), (100,), (20, 20, 20, 99)]:
        _same_prefill(bucketed, plain, lengths, 1e-5)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        LLMEngine(tiny_served_model(), EngineConfig(device="cpu", prefill_cuda_graphs=True))
    with pytest.raises(ValueError, match="without CUDA graphs"):
        EngineConfig(prefill_cuda_graphs=True, cuda_graphs=False)
    # the command lines' default (None): graphs where the engine runs on CUDA with CUDA graphs, else none
    EngineConfig(prefill_cuda_graphs=None, cuda_graphs=False)
    on_cpu = LLMEngine(tiny_served_model(), EngineConfig(device="cpu", prefill_cuda_graphs=None))
    assert on_cpu.runner.prefill_buckets == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("compile_prefill", [False, True], ids=["eager", "compiled"])
def test_prefill_cuda_graphs_replay_what_the_prefill_without_graphs_computes(compile_prefill):
    """Captured at start-up, one per bucket; each replayed pass (fresh inputs in the graph's buffer) gives the
    logits and stored keys/values of the same pass without graphs, in bf16 up to its rounding; a pass past
    every bucket runs without one."""
    tol = 3e-2
    runners = [ModelRunner(_model(FAST["gqa"], torch.bfloat16).cuda(), num_blocks=64, block_size=BLOCK,
                           max_num_seqs=8, cuda_graphs=False, compile_prefill=compile_prefill, prefill_graphs=graphs,
                           max_num_batched_tokens=256) for graphs in (False, True)]
    assert set(runners[1].prefill_graphs) == set(runners[1].prefill_buckets) and runners[1].prefill_graphs
    replays = 0
    for lengths in [(13, 40, 7, 1), (5,), (1,), (3, 4, 5, 6, 7, 8, 9, 10), (17, 2), (20, 20, 20, 99)]:
        replays += runners[1]._prefill_bucket(len(lengths), max(lengths)) is not None
        _same_prefill(runners[1], runners[0], lengths, tol, pinned=True)
    assert replays == 5  # all but the last pass (4 × 128 tokens > 256)
