"""BPE training and encoding at the real corpora's size: cost vs input size, beside HF `tokenizers`, same run.

    G=/tmp/scale B=assignment1-basics/benchmarks
    uv run python $B/scale_corpus.py --out $G/corpus_2.1g.txt --gb 2.1
    nice -n 15 uv run python $B/bpe_scale.py --corpus $G/corpus_2.1g.txt --sizes 0.25 0.5 1 2.1 --work $G \
        --out $B/results/bpe_scale.json --fig fig/a1_bpe_scale.png

Each size is a prefix of the corpus cut at a document end (`--sizes` in GB). Each measurement runs in its own
child process, so its peak memory is its own; the parent samples the RSS of the child and all its descendants
(the pre-tokenisation and encoding workers) every 50 ms and records the peak of the sum (shared copy-on-write
pages of forked workers are counted once per process, so this overstates a little), and the CPU seconds of the
tree (user + system, from the reaped children's rusage), which other load on the machine does not inflate the
way it inflates wall time. Per size:

- `ours`: `train_bpe` split into its two phases, pre-token counting (`count_pretokens`, both cores) and merges
  (`train_bpe_from_counts`), with the number of distinct pre-tokens;
- `hf`: `tokenizers`' `BpeTrainer` (ByteLevel pre-tokenizer, no prefix space, 256-byte alphabet, same vocab and
  special token), all cores through its thread pool;
- `encode_1`, `encode_2`: `cs336_basics.encode.encode_file` with 1 and 2 workers, with the tokenizer that `ours`
  trained on the smallest size, into a uint16 `.npy` under `--work` (deleted after).

`--project` adds an OpenWebText projection (11 GB, vocab 32 000) from the measured growth; see `project()`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bpe_training import machine_info  # noqa: E402

EOT = b"<|endoftext|>"


def prefix_file(src: str, dst: str, size: int) -> int:
    """Copies the first `size` bytes of `src` and on to the end of the document they stop in; returns bytes."""
    if os.path.exists(dst):
        return os.path.getsize(dst)
    written = 0
    with open(src, "rb") as f, open(dst + ".part", "wb") as out:
        while written < size and (block := f.read(min(1 << 24, size - written))):
            out.write(block)
            written += len(block)
        tail = f.read(1 << 20)
        cut = tail.find(EOT + b"\n")
        out.write(tail if cut < 0 else tail[: cut + len(EOT) + 1])
        written += len(tail) if cut < 0 else cut + len(EOT) + 1
    os.replace(dst + ".part", dst)
    return written


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # a worker that just exited
            total += p.memory_info().rss
    return total


def run_child(args: list[str], timeout: float) -> dict:
    """Runs `python this_file --child ...`; returns its JSON result plus wall time and peak tree RSS."""
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", *args], stdout=subprocess.PIPE)
    ps = psutil.Process(proc.pid)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, tree_rss(ps))
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for p in [*ps.children(recursive=True), ps]:
            p.kill()
        proc.wait()
        return {"timed_out": True, "wall_s": time.perf_counter() - start, "peak_rss_mb": peak / 1e6}
    finally:
        stop.set()
        sampler.join()
    if proc.returncode:
        raise RuntimeError(f"child {args} exited {proc.returncode}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result = json.loads(out.decode().strip().splitlines()[-1])
    result.update(wall_s=round(time.perf_counter() - start, 2), peak_rss_mb=round(peak / 1e6, 1),
                  cpu_s=round(cpu, 1), load_average_1m_at_start=round(load, 2))
    return result


# ------------------------------------------------------------------ children (one measurement per process)


def child_ours(path: str, vocab_size: int, save_dir: str) -> dict:
    from cs336_basics.tokenizer import save_tokenizer, train_bpe_from_counts
    from cs336_basics.tokenizer.pretokenize import count_pretokens

    special = ["<|endoftext|>"]
    t0 = time.perf_counter()
    counts = count_pretokens(path, special)
    pretoken_counts = {pretoken.encode("utf-8"): count for pretoken, count in counts.items()}
    del counts
    t1 = time.perf_counter()
    vocab, merges = train_bpe_from_counts(pretoken_counts, vocab_size, special)
    t2 = time.perf_counter()
    if save_dir:
        save_tokenizer(vocab, merges, save_dir)
    return {"pretokenize_s": round(t1 - t0, 2), "merge_s": round(t2 - t1, 2), "train_s": round(t2 - t0, 2),
            "distinct_pretokens": len(pretoken_counts), "merges": len(merges)}


def child_hf(path: str, vocab_size: int) -> dict:
    from bpe_training import train_hf

    t0 = time.perf_counter()
    merges = train_hf(path, vocab_size, ["<|endoftext|>"])
    return {"train_s": round(time.perf_counter() - t0, 2), "merges": len(merges)}


def child_encode(path: str, tokenizer_dir: str, workers: int, work: str) -> dict:
    import numpy as np

    from cs336_basics.encode import encode_file
    from cs336_basics.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_files(os.path.join(tokenizer_dir, "vocab.json"),
                                     os.path.join(tokenizer_dir, "merges.txt"), ["<|endoftext|>"])
    with tempfile.TemporaryDirectory(dir=work, prefix="encode-") as tmp:
        out = os.path.join(tmp, "tokens.npy")
        t0 = time.perf_counter()
        n = encode_file(tokenizer, path, out, num_workers=workers)
        seconds = time.perf_counter() - t0
        check = np.load(out, mmap_mode="r")
        assert len(check) == n
    mb = os.path.getsize(path) / 1e6
    return {"encode_s": round(seconds, 2), "tokens": n, "mb_per_s": round(mb / seconds, 2),
            "bytes_per_token": round(os.path.getsize(path) / n, 3)}


# ------------------------------------------------------------------ projection


def fit_power(sizes: list[float], values: list[float]) -> tuple[float, float]:
    """Least-squares fit of log v = log a + b log s; returns (a, b)."""
    import math

    xs, ys = [math.log(s) for s in sizes], [math.log(max(v, 1e-9)) for v in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return math.exp(my - b * mx), b


def project(rows: list[dict], target_gb: float = 11.0, target_vocab: int = 32_000,
            web_distinct: int = 10_000_000) -> dict:
    """OpenWebText projection (11 GB, vocab 32 000) from the measured growth.

    Time: pre-tokenisation is fitted as a power of the size (the exponent is reported; ~1 means linear) and
    extrapolated to 11 GB, taken as at least linear from the largest size. Merge time is proportional to the
    distinct pre-tokens (the words a merge may touch) and to the number of merges: the largest measured merge
    time is scaled by both ratios, a pessimistic bound
    (late merges touch fewer words than early ones). Memory: the peak is the pre-token Counters of the counting
    phase and then the word list, pair counts and pair -> words index of the merge phase, all proportional to
    the distinct pre-tokens, not the bytes; peak = fixed + cost per distinct pre-token x distinct pre-tokens,
    fitted on the two largest sizes. Two scenarios: the distinct count extrapolated from this corpus (whose word
    list is finite, so it saturates) and `web_distinct` (10 M, more than real web text of that size is expected
    to hold), which bounds the cost for OWT's longer tail.
    """
    sizes = [r["gb"] for r in rows]
    pre_a, pre_b = fit_power(sizes, [r["ours"]["pretokenize_s"] for r in rows])
    dis_a, dis_b = fit_power(sizes, [r["ours"]["distinct_pretokens"] for r in rows])
    merge_a, merge_b = fit_power(sizes, [r["ours"]["merge_s"] for r in rows])
    last = max(rows, key=lambda r: r["gb"])
    # never less than linear at the largest size's rate (small sizes carry fixed costs that flatten the fit)
    pre_s = max(pre_a * target_gb**pre_b, last["ours"]["pretokenize_s"] * target_gb / last["gb"])
    r1, r2 = sorted(rows, key=lambda r: r["gb"])[-2:]
    d1, d2 = r1["ours"]["distinct_pretokens"], r2["ours"]["distinct_pretokens"]
    slope = (r2["ours"]["peak_rss_mb"] - r1["ours"]["peak_rss_mb"]) / max(1, d2 - d1)
    slope = max(slope, r2["ours"]["peak_rss_mb"] / d2 / 2)  # guard against a flat or noisy pair of points
    fixed = max(0.0, r2["ours"]["peak_rss_mb"] - slope * d2)
    merges_ratio = (target_vocab - 257) / max(1, last["ours"]["merges"])
    scenarios = {}
    for name, distinct in (("extrapolated", dis_a * target_gb**dis_b), ("web_10M_distinct", web_distinct)):
        merge_s = last["ours"]["merge_s"] * distinct / last["ours"]["distinct_pretokens"] * merges_ratio
        scenarios[name] = {"distinct_pretokens": round(distinct), "pretokenize_s": round(pre_s),
                           "merge_s": round(merge_s), "train_hours": round((pre_s + merge_s) / 3600, 2),
                           "peak_rss_gb": round((fixed + slope * distinct) / 1e3, 1)}
    enc = {}
    for key in ("encode_1", "encode_2"):
        measured = [r for r in rows if key in r and "mb_per_s" in r[key]]
        if measured:
            mbps = max(measured, key=lambda r: r["gb"])[key]["mb_per_s"]
            enc[key] = {"hours": round(target_gb * 1e3 / mbps / 3600, 2),
                        "peak_rss_mb_measured_max": max(r[key]["peak_rss_mb"] for r in measured)}
    return {
        "target_gb": target_gb, "target_vocab": target_vocab,
        "fits_a_times_gb_to_the_b": {"pretokenize_s": [round(pre_a, 2), round(pre_b, 3)],
                                     "distinct_pretokens": [round(dis_a), round(dis_b, 3)],
                                     "merge_s": [round(merge_a, 2), round(merge_b, 3)]},
        "memory_model": {"fixed_mb": round(fixed, 1), "bytes_per_distinct_pretoken": round(slope * 1e6)},
        "training": scenarios,
        "encode": enc,
    }


def plot(rows: list[dict], fig_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cs336_basics.cli_support import save_figure

    sizes = [r["gb"] for r in rows]
    fig, (a, c, b) = plt.subplots(1, 3, figsize=(15, 4))
    series = [("ours", "train_s", "ours: BPE training"), ("hf", "train_s", "HF tokenizers: BPE training"),
              ("encode_1", "encode_s", "ours: encode, 1 worker"), ("encode_2", "encode_s", "ours: encode, 2 workers")]
    for key, field, label in series:
        pts = [(r["gb"], r[key][field], r[key]["peak_rss_mb"], r[key]["cpu_s"])
               for r in rows if key in r and field in r[key]]
        if pts:
            a.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
            c.plot([p[0] for p in pts], [p[3] for p in pts], "o-", label=label)
            b.plot([p[0] for p in pts], [p[2] / 1e3 for p in pts], "o-", label=label)
    pts = [(r["gb"], r["ours"]["pretokenize_s"]) for r in rows if "ours" in r]
    a.plot([p[0] for p in pts], [p[1] for p in pts], "x--", label="ours: pre-tokenisation part")
    a.set(xlabel="input (GB)", ylabel="wall time (s)", title="wall time (shared 2-core machine)")
    c.set(xlabel="input (GB)", ylabel="CPU seconds, process tree", title="CPU time (not inflated by other load)")
    b.set(xlabel="input (GB)", ylabel="peak RSS of the process tree (GB)", title="memory vs input size")
    for ax in (a, b, c):
        ax.grid(alpha=0.3)
        ax.set_xticks(sizes)
    a.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, fig_path)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, *rest = sys.argv[2:]
        if kind == "ours":
            res = child_ours(rest[0], int(rest[1]), rest[2])
        elif kind == "hf":
            res = child_hf(rest[0], int(rest[1]))
        else:
            res = child_encode(rest[0], rest[1], int(rest[2]), rest[3])
        print(json.dumps(res))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True, help="the largest corpus (scale_corpus.py); sizes are its prefixes")
    p.add_argument("--sizes", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.1])
    p.add_argument("--vocab-size", type=int, default=10_000)
    p.add_argument("--work", default=tempfile.gettempdir(), help="prefix files, tokenizer and token arrays")
    p.add_argument("--skip", nargs="*", default=[], choices=["ours", "hf", "encode_1", "encode_2"])
    p.add_argument("--encode-sizes", type=float, nargs="*", default=None, help="sizes to encode (default all)")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--out", required=True)
    p.add_argument("--fig")
    p.add_argument("--merge", action="store_true", help="keep rows already in --out for sizes not rerun")
    args = p.parse_args()
    machine = machine_info()
    previous = {}
    if args.merge and os.path.exists(args.out):
        with open(args.out) as f:
            previous = {r["gb"]: r for r in json.load(f)["rows"]}
    tokenizer_dir = os.path.join(args.work, f"tokenizer_{args.vocab_size}")
    rows = []
    for gb in args.sizes:
        path = args.corpus if gb * 1e9 >= os.path.getsize(args.corpus) else os.path.join(args.work, f"prefix_{gb}g.txt")
        nbytes = prefix_file(args.corpus, path, int(gb * 1e9)) if path != args.corpus else os.path.getsize(path)
        row = dict(previous.get(gb, {}))
        row.update(gb=gb, bytes=nbytes)
        save = tokenizer_dir if not os.path.exists(tokenizer_dir) else ""
        for key, cmd in (("ours", ["ours", path, str(args.vocab_size), save]),
                         ("hf", ["hf", path, str(args.vocab_size)]),
                         ("encode_1", ["encode", path, tokenizer_dir, "1", args.work]),
                         ("encode_2", ["encode", path, tokenizer_dir, "2", args.work])):
            if key in args.skip or (key.startswith("encode") and args.encode_sizes is not None
                                    and gb not in args.encode_sizes):
                continue
            row[key] = run_child(cmd, args.timeout)
            print(f"{gb} GB {key}: {json.dumps(row[key])}", flush=True)
            rows_out = sorted([*[r for g, r in previous.items() if g not in {x['gb'] for x in rows} | {gb}],
                               *rows, row], key=lambda r: r["gb"])
            _write(args, machine, rows_out)
        if "ours" in row and "hf" in row and "train_s" in row["hf"]:
            row["ours_over_hf"] = round(row["ours"]["wall_s"] / row["hf"]["wall_s"], 2)
            print(f"{gb} GB: ours / HF tokenizers = {row['ours_over_hf']}", flush=True)
        rows.append(row)
        if path != args.corpus and gb != max(args.sizes):
            pass  # prefixes are kept for reruns; delete --work when done
    rows_out = sorted([*[r for g, r in previous.items() if g not in {x["gb"] for x in rows}], *rows],
                      key=lambda r: r["gb"])
    _write(args, machine, rows_out)
    if args.fig:
        plot(rows_out, args.fig)


def _write(args, machine: dict, rows: list[dict]) -> None:
    for r in rows:
        if "wall_s" in r.get("ours", {}) and "wall_s" in r.get("hf", {}):
            r["ours_over_hf"] = round(r["ours"]["wall_s"] / r["hf"]["wall_s"], 2)
            r["ours_over_hf_cpu"] = round(r["ours"]["cpu_s"] / r["hf"]["cpu_s"], 2)
    result = {"benchmark": "bpe_scale", "vocab_size": args.vocab_size, "machine": machine, "rows": rows}
    complete = [r for r in rows if "ours" in r and "pretokenize_s" in r["ours"]]
    if len(complete) >= 2:
        result["owt_projection"] = project(complete)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".part", "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    os.replace(args.out + ".part", args.out)


if __name__ == "__main__":
    main()
