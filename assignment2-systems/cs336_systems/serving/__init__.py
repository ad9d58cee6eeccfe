"""An OpenAI-compatible inference server for cs336 models: continuous batching over a paged KV cache.

Layers, bottom up: `block_manager` (blocks, block tables, free list, copy-on-write), `paged_attention` (PyTorch
reference + Triton decode kernel), `model_runner` (a `cs336_basics` model over the paged pool), `scheduler`
(who runs each step, preemption by recompute), `engine` (the step loop; knows nothing about HTTP), `api`
(FastAPI + OpenAI's schemas). Importing this package imports no torch.
"""
