"""The vLLM backend (GPU only): vLLM is imported when the backend is built, never at package import."""

from collections.abc import Sequence
from typing import Any

from torch import nn

from cs336_alignment.generation.params import Completion, SamplingParams

INSTALL_HINT = "the vllm backend needs vLLM on a CUDA machine: `uv pip install vllm` (see the package README)"


def _import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise RuntimeError(f"{INSTALL_HINT} ({e})") from None
    return vllm


def to_vllm_params(params: SamplingParams, vllm_module: Any) -> Any:
    return vllm_module.SamplingParams(
        temperature=params.temperature,
        top_p=params.top_p,
        max_tokens=params.max_tokens,
        min_tokens=params.min_tokens,
        stop=list(params.stop) or None,
        include_stop_str_in_output=params.include_stop_str_in_output,
        n=params.n,
        seed=params.seed,
    )


class VLLMBackend:
    """Wraps `vllm.LLM`; extra keyword arguments (device, enable_prefix_caching, ...) go to its constructor."""

    def __init__(
        self,
        model_path: str,
        dtype: str = "bfloat16",
        gpu_memory_utilization: float = 0.85,
        seed: int = 0,
        llm: Any = None,
        **llm_kwargs: Any,
    ):
        self.vllm = _import_vllm()
        self.llm = llm if llm is not None else self.vllm.LLM(
            model=model_path, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization, seed=seed, **llm_kwargs
        )

    def generate(self, prompts: Sequence[str], params: SamplingParams) -> list[Completion]:
        if isinstance(prompts, str):
            raise TypeError("prompts must be a sequence of strings, not one string")
        outputs = self.llm.generate(list(prompts), to_vllm_params(params, self.vllm))
        completions = []
        for index, request in enumerate(outputs):
            for sample in request.outputs:
                reason = "length" if sample.finish_reason == "length" else "stop"
                completions.append(Completion(index, sample.text, list(sample.token_ids), reason))
        return completions

    def load_policy_weights(self, policy: nn.Module) -> None:
        """Copies a training policy's weights into the engine (the single-process engine layout of vLLM <= 0.8)."""
        try:
            runner_model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        except AttributeError as e:
            raise RuntimeError(f"this vLLM version keeps its model elsewhere; cannot load weights ({e})") from None
        runner_model.load_weights(policy.state_dict().items())
