"""Training-step overhead of ``agent_obs.attach``: with vs without the observer, alternating in one run.

A torchtune qwen2 with Qwen2.5-0.5B's width and vocabulary (dim 896, vocab 151936, tied
embeddings, 14 heads / 2 KV heads, MLP 4864), ``--layers`` layers, one sequence of ``--seq``
tokens, fp32 on CPU, torchtune's chunked output + ``CEWithChunkedOutputLoss`` (8 chunks, as the
recipes), AdamW. Each pair runs one step without any hook and one step observing every step
(observe + collect), in alternating order; it prints the median step-time ratio, its spread,
and the peak-RSS increase of a step (sampled every ms) for both.

    python bench/overhead.py [--pairs 8] [--seq 512] [--layers 2] [--anatomy]

``--anatomy`` also observes the tool-call syntax/arguments split (``tool_args``), per-token sample
ids (8 packed samples, the hardest-samples table) and the seed's binary entropy.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

import torch
from torchtune.models.qwen2 import qwen2
from torchtune.modules.loss import CEWithChunkedOutputLoss

import agent_obs
from agent_obs.accumulator import StatsAccumulator
from agent_obs.settings import Settings

PAGE = os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """Peak resident set size above the level at ``__enter__``, sampled by a thread every ``period_s``."""

    def __init__(self, period_s: float = 0.001) -> None:
        self.period_s = period_s
        self.peak = 0

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE

    def __enter__(self) -> PeakRss:
        self._base = self.rss()
        self._top = self._base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self._top = max(self._top, self.rss())
            time.sleep(self.period_s)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self._top, self.rss()) - self._base


def build(layers: int, seq: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = qwen2(
        vocab_size=151936,
        num_layers=layers,
        num_heads=14,
        num_kv_heads=2,
        embed_dim=896,
        intermediate_dim=4864,
        max_seq_len=seq,
        tie_word_embeddings=True,
    )
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return model


def statistics_only(model, inputs, labels, classes) -> float:
    """Median time of the accumulator alone on the logits chunks of one step (the kernel's share)."""
    with torch.no_grad():
        chunks = [c.reshape(-1, c.shape[-1]) for c in model(inputs)]
    acc = StatsAccumulator(num_tool_slots=Settings().num_tool_slots)  # the tool rows attach() lays out
    times = []
    for _ in range(5):
        start = time.perf_counter()
        offset = 0
        for c in chunks:
            n = c.shape[0]
            acc.update(c, labels[0, offset : offset + n], classes[0, offset : offset + n])
            offset += n
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps of each kind first (kernel compile)")
    parser.add_argument("--anatomy", action="store_true", help="also tool_args, packed sample ids, binary entropy")
    args = parser.parse_args()

    model = build(args.layers, args.seq)
    loss_fn = CEWithChunkedOutputLoss()
    model.set_num_output_chunks(loss_fn.num_output_chunks)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=False)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 151936, (1, args.seq + 1), generator=g)
    inputs, labels = tokens[:, :-1], tokens[:, 1:].clone()
    labels[:, : args.seq // 8] = -100  # a prompt that is not trained on
    classes = torch.randint(1, 4, labels.shape, generator=g)
    extra = {}
    if args.anatomy:
        extra = {
            "tool_args": torch.randint(0, 2, labels.shape, generator=g),
            "sample_ids": (torch.arange(args.seq) * 8 // args.seq).unsqueeze(0),
        }

    def step(observe: bool) -> tuple[float, float, int]:
        obs = agent_obs.attach(model, binary_entropy=args.anatomy) if observe else None
        with PeakRss() as mem:
            start, cpu_start = time.perf_counter(), time.process_time()
            if obs is None:
                loss = loss_fn(model(inputs), labels)
            else:
                with obs.observe(labels=labels, token_classes=classes, **extra):
                    loss = loss_fn(model(inputs), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if obs is not None:
                metrics = obs.collect()
                assert metrics["tokens"] > 0 and bool(metrics.samples) == args.anatomy
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            del loss
        if obs is not None:
            obs.detach()
        return elapsed, cpu, mem.peak

    print(f"CPU, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"load average at start: {os.getloadavg()}")
    print(f"model: qwen2 dim 896 vocab 151936 layers {args.layers}, seq {args.seq}, fp32, 8 output chunks, AdamW")
    print(f"anatomy (tool_args, 8 packed sample ids, binary entropy): {args.anatomy}")
    for _ in range(args.warmup):
        step(False)
        step(True)
    ratios, cpu_ratios, base_t, obs_t, base_m, obs_m = [], [], [], [], [], []
    for i in range(args.pairs):
        order = (False, True) if i % 2 == 0 else (True, False)
        got = {kind: step(kind) for kind in order}
        (tb, cb, mb), (to, co, mo) = got[False], got[True]
        ratios.append(to / tb)
        cpu_ratios.append(co / cb)
        base_t.append(tb)
        obs_t.append(to)
        base_m.append(mb)
        obs_m.append(mo)
        print(
            f"pair {i}: without {tb:.3f} s, with {to:.3f} s, ratio {to / tb:.4f} (CPU time {co / cb:.4f}), "
            f"peak +{mb / 2**20:.0f} / +{mo / 2**20:.0f} MiB"
        )
    q = statistics.quantiles(ratios, n=4)
    print(f"load average at end: {os.getloadavg()}")
    print(
        f"median step: without {statistics.median(base_t):.3f} s, with {statistics.median(obs_t):.3f} s; "
        f"median ratio {statistics.median(ratios):.4f} (min {min(ratios):.4f}, IQR {q[0]:.4f}-{q[2]:.4f}, "
        f"max {max(ratios):.4f}) over {args.pairs} pairs"
    )
    cq = statistics.quantiles(cpu_ratios, n=4)
    print(
        f"median process-CPU-time ratio {statistics.median(cpu_ratios):.4f} (IQR {cq[0]:.4f}-{cq[2]:.4f}): "
        "less sensitive than wall time to other jobs on a shared machine"
    )
    stats_s = statistics_only(model, inputs, labels, classes)
    print(
        f"statistics alone (StatsAccumulator.update on this step's logits, median of 5): {stats_s:.3f} s = "
        f"{100 * stats_s / statistics.median(base_t):.1f}% of the median step without observer"
    )
    diff = statistics.median(obs_m) - statistics.median(base_m)
    print(
        f"median peak RSS increase within a step: without {statistics.median(base_m) / 2**20:.0f} MiB, "
        f"with {statistics.median(obs_m) / 2**20:.0f} MiB, difference {diff / 2**20:+.0f} MiB (goal <= +64 MiB)"
    )


if __name__ == "__main__":
    main()
