"""The course leaderboard's step (`torch.compile(FlashAttentionTriton.apply)`, 3-D (16, 16384, 64) bf16 causal,
`o.sum().backward()`) against the same step run eagerly, for each backward form, with torch.compile's graph
breaks counted and the gradients checked against SDPA: to see what the compiled harness does to a form.

    PYTHONPATH=assignment1-basics:assignment2-systems python3 assignment2-systems/benchmarks/course_harness_check.py
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from cs336_systems.flash_attention import FlashAttentionTriton
from cs336_systems.flash_attention import triton_impl as ti

FORMS = {"split-desc": ("split", True), "split-pointers": ("split", False), "tma": ("tma", False)}


def _grads(fn, q, k, v):
    for x in (q, k, v):
        x.grad = None
    fn(q, k, v).sum().backward()
    return [x.grad.clone() for x in (q, k, v)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--forms", nargs="+", default=list(FORMS), choices=list(FORMS))
    p.add_argument("--rep", type=int, default=200)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    q, k, v = (torch.randn(16, 16384, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    ref = _grads(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True), q, k, v)
    rows = []
    for form in args.forms:
        mode, descriptors = FORMS[form]
        ti.set_backward_mode(mode)
        ti.set_descriptors(descriptors)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        compiled = torch.compile(FlashAttentionTriton.apply)
        row = {"form": form}
        for label, fn in (("eager", FlashAttentionTriton.apply), ("compiled", compiled)):
            grads = _grads(lambda a, b, c, fn=fn: fn(a, b, c, True), q, k, v)
            row[f"{label}_rel_err"] = max(((g.float() - r.float()).norm() / r.float().norm()).item()
                                          for g, r in zip(grads, ref, strict=True))

            def step(fn=fn):
                fn(q, k, v, True).sum().backward()

            row[f"{label}_ms"] = do_bench(step, warmup=25, rep=args.rep, return_mode="median")
        row["graph_breaks"] = {str(why): n for why, n in torch._dynamo.utils.counters["graph_break"].items()}
        rows.append(row)
        print(json.dumps(row), flush=True)
    ti.set_backward_mode("split")
    ti.set_descriptors(True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
