"""`serving/decode.py`: the decode step written out for compilation, against the model's own decode step through
the paged cache (`ModelRunner` without `compile_decode`), eagerly and compiled, and in the engine."""

import numpy as np
import pytest
import torch

from cs336_basics.model import TransformerConfig, TransformerLM
from cs336_systems.serving.block_manager import SCRATCH_BLOCK
from cs336_systems.serving.decode import DecodeForward
from cs336_systems.serving.model_runner import ModelRunner
from cs336_systems.serving.testing import (
    one_thread,  # noqa: F401 (autouse: one torch thread)
    random_prompts,
)

BLOCK = 4
VARIANTS = {"mha": {}, "gqa": {"num_kv_heads": 2}, "no-rope+silu": {"position": "none", "ffn": "silu"}}


def _model(overrides: dict) -> TransformerLM:
    torch.manual_seed(0)
    settings = dict(vocab_size=257, context_length=64, d_model=64, num_layers=3, num_heads=4, d_ff=96)
    return TransformerLM(TransformerConfig(**{**settings, **overrides})).eval()


def _runner(overrides: dict, **kwargs) -> ModelRunner:
    return ModelRunner(_model(overrides), num_blocks=64, block_size=BLOCK, max_num_seqs=8, cuda_graphs=False,
                       **kwargs)


def _prefilled(runner: ModelRunner, lengths) -> tuple[list[list[int]], list[list[int]]]:
    """Prompts prefilled into scattered blocks; returns each row's block table and its slots so far."""
    tables, slots, next_block = [], [], SCRATCH_BLOCK + 1
    for n in lengths:
        blocks = list(range(next_block, next_block + 4))[::-1]  # room for the prompt and a few decode steps
        next_block += 4
        tables.append(blocks)
        slots.append([blocks[t // BLOCK] * BLOCK + t % BLOCK for t in range(n)])
    runner.prefill(random_prompts(7, lengths), slots)
    return tables, slots


def _packed(runner: ModelRunner, tokens, lengths, tables) -> torch.Tensor:
    """The runner's packed decode input: token, length with this token, its slot, block table."""
    packed = np.zeros((len(tokens), 4 + runner.max_blocks_per_seq), dtype=np.int64)
    for row, (token, length, table) in enumerate(zip(tokens, lengths, tables, strict=True)):
        position = length - 1
        packed[row, :3] = token, length, table[position // BLOCK] * BLOCK + position % BLOCK
        packed[row, 4 : 4 + len(table)] = table
    return torch.from_numpy(packed)


def _step_both(variant: str, lengths, decode_steps: int, **kwargs):
    """The same decode steps (greedy tokens fed back) through the model's path and through `DecodeForward`."""
    reference, fast = _runner(VARIANTS[variant]), _runner(VARIANTS[variant])
    fast.decode_forward = DecodeForward(fast.prefill_forward, fast.k_pools, fast.v_pools, "torch", **kwargs)
    tables, _ = _prefilled(reference, lengths)
    _prefilled(fast, lengths)
    tokens, lens = [5 + row for row in range(len(lengths))], [n + 1 for n in lengths]
    results = []
    with torch.inference_mode():
        for _ in range(decode_steps):
            packed = _packed(reference, tokens, lens, tables)
            want, got = reference._decode_forward(packed.clone()), fast._decode_forward(packed.clone())
            results.append((want, got))
            tokens, lens = want.argmax(-1).tolist(), [n + 1 for n in lens]
    return reference, fast, results


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_decode_forward_equals_the_models_decode_step(variant):
    """Logits of several decode steps and every key/value written into the pools, eagerly, against the model's
    own decode step through `PagedLayerCache` (fp32: equal to rounding; the q/k/v GEMM is fused)."""
    reference, fast, results = _step_both(variant, (5, 11, 1), decode_steps=3)
    assert fast.decode_forward is not None and not fast.decode_forward.compiled
    for want, got in results:
        assert got.dtype == torch.float32 and got.shape == want.shape == (3, 257)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for pool, ref in zip((*fast.k_pools, *fast.v_pools), (*reference.k_pools, *reference.v_pools), strict=True):
        torch.testing.assert_close(pool[SCRATCH_BLOCK + 1 :], ref[SCRATCH_BLOCK + 1 :], rtol=1e-5, atol=1e-5)


def test_compiled_decode_forward_equals_the_models_decode_step_without_recompiling():
    """The compiled step (one graph, symbolic batch) at batches of 2, 5 and 3 rows after its first call."""
    from torch._dynamo.utils import counters

    reference, fast, results = _step_both("gqa", (5, 11), decode_steps=2, compile=True)
    assert fast.decode_forward.compiled
    for want, got in results:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    graphs = counters["stats"]["unique_graphs"]
    for lengths in [(3, 7, 1, 9, 2), (4, 4, 6)]:
        reference, fast = _runner(VARIANTS["gqa"]), _runner(VARIANTS["gqa"])
        fast.decode_forward = DecodeForward(fast.prefill_forward, fast.k_pools, fast.v_pools, "torch", compile=True)
        tables, _ = _prefilled(reference, lengths)
        _prefilled(fast, lengths)
        packed = _packed(reference, [9] * len(lengths), [n + 1 for n in lengths], tables)
        with torch.inference_mode():
            torch.testing.assert_close(fast._decode_forward(packed.clone()), reference._decode_forward(packed.clone()),
                                       rtol=1e-5, atol=1e-5)
    # new runners are new DecodeForward objects: their graphs are compiled afresh, once each (not per batch)
    assert counters["stats"]["unique_graphs"] - graphs <= 2


def test_compiled_decode_keeps_the_pools_out_of_its_graph():
    """The pools reach the cache write and paged attention through the operator's registry, not as graph
    inputs: a pool written inside the graph and then read by the operator was cloned and copied back whole,
    per layer and step, by inductor on the GPU. The graph's inputs here are the packed step and the weights."""
    runner = _runner(VARIANTS["gqa"])
    step = DecodeForward(runner.prefill_forward, runner.k_pools, runner.v_pools, "torch")
    shapes = []

    def record_inputs(graph, example_inputs):
        shapes.extend(tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor))
        return graph.forward

    tables, _ = _prefilled(runner, (5, 11))
    with torch.inference_mode():
        eager = step(_packed(runner, [9, 9], [6, 12], tables))
        traced = torch.compile(step._forward, backend=record_inputs, fullgraph=True)
        torch.testing.assert_close(traced(_packed(runner, [9, 9], [6, 12], tables)), eager)
    assert shapes and tuple(runner.k_pools[0].shape) not in shapes
    assert tuple(runner.v_pools[0].shape) not in shapes


def test_engine_with_compiled_decode_and_prefill_generates_what_the_plain_engine_does():
    """Greedy streams of a batch whose size changes as requests finish (down to one row, padded to two) equal
    the plain engine's; the runner compiled both steps."""
    from cs336_systems.serving.engine import EngineConfig, LLMEngine
    from cs336_systems.serving.loader import tiny_served_model
    from cs336_systems.serving.params import SamplingParams

    prompts = random_prompts(4, (5, 17, 1, 30, 9))
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (3, 9, 14, 6, 20)]
    outputs = {}
    for compiled in (False, True):
        engine = LLMEngine(tiny_served_model(num_kv_heads=2),
                           EngineConfig(device="cpu", compile_decode=compiled, compile_prefill=compiled))
        assert (engine.runner.decode_forward is not None) is compiled
        outputs[compiled] = [o.outputs[0].token_ids for o in engine.generate(prompts, params)]
    assert outputs[True] == outputs[False]
    assert [len(ids) for ids in outputs[True]] == [3, 9, 14, 6, 20]



def test_the_command_lines_compile_on_cuda_only_unless_told():
    """`serve`/`bench-serve` pass None unless a flag says otherwise; the engine reads None as "compile on CUDA",
    so a CPU engine stays eager, and the library's own default (False) never compiles."""
    import argparse

    from cs336_systems.serving import bench_cli, serve_cli
    from cs336_systems.serving.engine import EngineConfig, LLMEngine
    from cs336_systems.serving.loader import tiny_served_model

    for module in (serve_cli, bench_cli):
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        for flags, want in (([], None), (["--compile-decode", "--compile-prefill"], True),
                            (["--no-compile-decode", "--no-compile-prefill"], False)):
            args = parser.parse_args(flags)
            assert (args.compile_decode, args.compile_prefill) == (want, want)
    assert (EngineConfig().compile_decode, EngineConfig().compile_prefill) == (False, False)
    engine = LLMEngine(tiny_served_model(), EngineConfig(device="cpu", compile_decode=None, compile_prefill=None))
    assert engine.runner.decode_forward is None and not engine.runner.prefill_forward.compiled

@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton paged-attention kernel needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compiled_decode_on_cuda_matches_the_models_step_and_captures_into_cuda_graphs(dtype):
    """On the GPU: the compiled step (Triton paged attention inside, as an opaque operator) against the model's
    step, and the runner's CUDA graphs captured over it replay to the same logits."""
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2}[dtype]
    model = lambda: _model(VARIANTS["gqa"]).to(dtype).cuda()
    reference = ModelRunner(model(), num_blocks=64, block_size=BLOCK, max_num_seqs=8, cuda_graphs=False)
    fast = ModelRunner(model(), num_blocks=64, block_size=BLOCK, max_num_seqs=8, cuda_graphs=True,
                       compile_decode=True)
    assert fast.decode_forward is not None and fast.graphs and 1 not in fast.graphs
    lengths = (5, 11, 2)
    tables, _ = _prefilled(reference, lengths)
    _prefilled(fast, lengths)
    lens = [n + 1 for n in lengths]
    want = reference.decode([3, 4, 5], lens, [[t[(n - 1) // BLOCK] * BLOCK + (n - 1) % BLOCK] for t, n in
                                              zip(tables, lens, strict=True)], tables, lambda logits: logits.argmax(-1))
    got = fast.decode([3, 4, 5], lens, [[t[(n - 1) // BLOCK] * BLOCK + (n - 1) % BLOCK] for t, n in
                                        zip(tables, lens, strict=True)], tables, lambda logits: logits.argmax(-1))
    assert got == want
    for pool, ref in zip((*fast.k_pools, *fast.v_pools), (*reference.k_pools, *reference.v_pools), strict=True):
        torch.testing.assert_close(pool[SCRATCH_BLOCK + 1 :], ref[SCRATCH_BLOCK + 1 :], rtol=tol, atol=tol)


def test_other_model_shapes_keep_their_own_decode_step_and_say_so(caplog):
    runner = _runner({"attention": "mla"}, compile_decode=True, compile_prefill=True)
    assert runner.prefill_forward is None and runner.decode_forward is None
    assert "this model runs its own forward" in caplog.text


def test_a_failed_compilation_leaves_the_eager_steps(monkeypatch, caplog):
    """A compiler that fails (no toolchain, say) costs a warning, not the server: prefill runs its eager pass
    on the same fused weights, decode the model's own step, with the eager runner's results."""
    def failing_compile(fn, **kwargs):
        def fail(*args):
            raise RuntimeError("no compiler here")
        return fail

    monkeypatch.setattr(torch, "compile", failing_compile)
    runner = _runner(VARIANTS["gqa"], compile_prefill=True, compile_decode=True)
    assert not runner.prefill_forward.compiled and runner.decode_forward is None
    assert "prefill compilation failed (no compiler here)" in caplog.text
    assert "decode compilation failed (no compiler here)" in caplog.text
    monkeypatch.undo()
    reference = _runner(VARIANTS["gqa"])
    lengths = (5, 11, 1)
    tables, _ = _prefilled(reference, lengths)
    _prefilled(runner, lengths)
    packed = _packed(reference, [3, 4, 5], [n + 1 for n in lengths], tables)
    with torch.inference_mode():
        torch.testing.assert_close(runner._decode_forward(packed.clone()), reference._decode_forward(packed.clone()))
    for pool, ref in zip((*runner.k_pools, *runner.v_pools), (*reference.k_pools, *reference.v_pools), strict=True):
        assert torch.equal(pool, ref)
