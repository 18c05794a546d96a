"""Benchmark: the fused metric kernel against the memory-read floor and TRL/verl-style entropy, side by side.

Prints, for ``N x V`` logits (default 2048 x 151936 fp32, 1.2 GB), each method's median time over
interleaved repetitions as a multiple of ``x.sum(-1)`` (one read of the logits: the floor) measured
in the same run, the peak extra memory each allocates (torch's CPU allocator, via the profiler), the
first call's compile time, and the compiled-graph count before/after new token counts (must not grow).

    python bench/metrics_kernel.py [--tokens 2048 --vocab 151936 --dtype fp32 --reps 7 --threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def verl_entropy(logits: torch.Tensor, chunk_size: int = 2048) -> torch.Tensor:
    """verl's ``entropy_from_logits_with_chunking`` (verl/utils/torch_functional.py), verbatim in substance."""
    entropy = torch.zeros(logits.shape[0], device=logits.device)
    for i in range(0, logits.shape[0], chunk_size):
        chunk = logits[i : i + chunk_size].float()
        pd = torch.nn.functional.softmax(chunk, dim=-1)
        entropy[i : i + chunk_size] = torch.logsumexp(chunk, dim=-1) - torch.sum(pd * chunk, dim=-1)
    return entropy


def peak_extra_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes allocated through torch's CPU allocator while ``fn`` runs (profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--reps", type=int, default=7, help="interleaved timed repetitions of every method")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warm-cache", action="store_true", help="reuse inductor's on-disk cache (default: cold)")
    args = parser.parse_args()
    if not args.warm_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="agent_obs_bench_inductor_")
    torch.set_num_threads(args.threads)

    from torch._dynamo.utils import counters
    from trl.trainer.utils import entropy_from_logits as trl_entropy

    from agent_obs.accumulator import StatsAccumulator, default_chunk_tokens

    torch.manual_seed(0)
    n, vocab = args.tokens, args.vocab
    x = (torch.randn(n, vocab) * 3).to(DTYPES[args.dtype])
    labels = torch.randint(0, vocab, (n,))
    classes = torch.randint(1, 4, (n,))
    acc = StatsAccumulator()

    start = time.perf_counter()
    acc.update(x[: max(2, n // 4)], labels[: max(2, n // 4)], classes[: max(2, n // 4)])
    compile_s = time.perf_counter() - start
    graphs_before = counters["stats"]["unique_graphs"]

    methods: dict[str, Callable[[], object]] = {
        "floor x.sum(-1)": lambda: x.sum(-1),
        "torch.logsumexp alone": lambda: torch.logsumexp(x.float() if x.dtype != torch.float32 else x, -1),
        "TRL entropy_from_logits (128 rows)": lambda: trl_entropy(x, chunk_size=128),
        "verl chunked entropy (2048 rows)": lambda: verl_entropy(x),
        "agent_obs all metrics, all groups": lambda: acc.update(x, labels, classes),
    }
    times: dict[str, list[float]] = {name: [] for name in methods}
    for fn in methods.values():
        fn()
    for _ in range(args.reps):
        for name, fn in methods.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    for m in (n - 1, n // 3 + 1):
        acc.update(x[:m], labels[:m], classes[:m])
    graphs_after = counters["stats"]["unique_graphs"]

    floor = statistics.median(times["floor x.sum(-1)"])
    best_floor = min(times["floor x.sum(-1)"])
    gb = x.numel() * x.element_size() / 1e9
    print(f"logits {n} x {vocab} {args.dtype} ({gb:.2f} GB), {torch.get_num_threads()} threads, {args.reps} reps")
    print(f"{'method':38s} {'median ms':>10s} {'x floor':>8s} {'best/best':>9s} {'peak extra MB':>14s}")
    for name, fn in methods.items():
        med = statistics.median(times[name])
        peak = peak_extra_bytes(fn) / 2**20
        ratio_best = min(times[name]) / best_floor
        print(f"{name:38s} {med * 1e3:10.1f} {med / floor:8.2f} {ratio_best:9.2f} {peak:14.1f}")
    chunk_mb = default_chunk_tokens(vocab) * vocab * 4 / 2**20
    print(f"memory bound: chunk_tokens x V x 4 = {chunk_mb:.1f} MB (+ O(tokens))")
    print(f"first call (compile, cold inductor cache={not args.warm_cache}): {compile_s:.1f} s")
    print(
        f"compiled graphs after warm-up: {graphs_before}; after new token counts {n - 1}, {n // 3 + 1}: {graphs_after}"
    )


if __name__ == "__main__":
    main()
