"""One-shot CUDA check of attach()'s side-stream engine, for a session with a GPU. Needs only torch + agent_obs.

1. equality: CUDA metrics (side stream, several chunks in flight) == compute_metrics on the CPU copy of the logits;
2. no host sync: ``torch.cuda.set_sync_debug_mode("error")`` around a full training step with the hook;
3. no logits kept alive: a weakref to the step's logits is dead after the step;
4. overlap: median step-time ratios over alternating steps of a Qwen2.5-0.5B-width model (dim 896,
   vocab 151936, bf16, seq 4096, 8 output chunks, AdamW): observer on the side stream vs. the same
   statistics inline on the training stream; the side stream must hide part of their cost;
5. warmup: seconds ``obs.warmup()`` takes to compile the Triton kernel (bf16, vocab 151936), and the
   first observed step after it compiles nothing;
6. peak memory: ``max_memory_allocated`` of a training step with vs. without the observer, for
   ``max_in_flight`` 1 and 4, against the documented bound (``max_in_flight`` logits chunks + the
   kernel's 64 MiB working set) + 64 MiB.

Prints a PASS/FAIL line per check and exits 1 if any failed.  ``python bench/gpu_check.py [--pairs 10]``
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import agent_obs
from agent_obs import attach, compute_metrics

CUDA = torch.device("cuda")
MiB = 2**20
VOCAB = 151936
KERNEL_WORKING_SET = 64 * MiB  # agent_obs.accumulator.DEFAULT_CHUNK_BYTES
CHUNKS = 8


class Block(nn.Module):
    """Pre-norm causal self-attention (grouped KV heads) + SwiGLU MLP, Qwen2-like."""

    def __init__(self, dim: int, heads: int, kv_heads: int, hidden: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.norm1, self.norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim)
        self.o = nn.Linear(dim, dim, bias=False)
        self.up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        h = self.norm1(x)
        q = self.q(h).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(h).view(b, s, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, s, -1))
        gate, up = self.up(self.norm2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class Decoder(nn.Module):
    """Tied-embedding decoder returning torchtune-style output chunks (one ``output`` call per chunk)."""

    def __init__(self, vocab: int, dim: int, layers: int, heads: int, kv_heads: int, hidden: int, chunks: int):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim, heads, kv_heads, hidden) for _ in range(layers))
        self.norm = nn.RMSNorm(dim)
        self.output = nn.Linear(dim, vocab, bias=False)
        self.output.weight = self.tok_embeddings.weight
        self.chunks = chunks

    def forward(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h)
        return [self.output(c) for c in self.norm(h).chunk(self.chunks, dim=1)]


def chunked_ce(chunks: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """torchtune's CEWithChunkedOutputLoss: fp32 cross-entropy per chunk, summed, / labelled tokens."""
    targets = labels.chunk(len(chunks), dim=1)
    total = sum(
        F.cross_entropy(c.float().flatten(0, 1), t.flatten(), ignore_index=-100, reduction="sum")
        for c, t in zip(chunks, targets, strict=True)
    )
    return total / (labels != -100).sum()


def batch(seq: int, vocab: int, seed: int, bsz: int = 1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (bsz, seq + 1), generator=g)
    labels = tokens[:, 1:].clone()
    labels[:, : seq // 8] = -100
    classes = torch.randint(0, 4, labels.shape, generator=g)
    return tokens[:, :-1], labels, classes


def check_equality() -> tuple[bool, str]:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    vocab = 151936
    model = Decoder(vocab, 128, 1, 4, 2, 256, chunks=8).to(CUDA)
    obs = attach(model, max_in_flight=2)
    cpu_logits, all_labels, all_classes = [], [], []
    with torch.no_grad():
        for seed, seq in ((1, 300), (2, 77)):
            tokens, labels, classes = batch(seq, vocab, seed, bsz=2)
            with obs.observe(labels=labels, token_classes=classes):
                out = model(tokens.to(CUDA))
            cpu_logits.append(torch.cat(out, dim=1).cpu().reshape(-1, vocab))
            all_labels.append(labels.reshape(-1))
            all_classes.append(classes.reshape(-1))
    got = obs.collect()
    want = compute_metrics(torch.cat(cpu_logits), torch.cat(all_labels), torch.cat(all_classes))
    worst = max(abs(got[k] - v) / max(abs(v), 1e-12) for k, v in want.items())
    torch.backends.cuda.matmul.allow_tf32 = True
    ok = set(got) == set(want) and worst < 1e-5
    return ok, f"{len(want)} keys, worst relative error {worst:.2e} (need < 1e-5, same keys: {set(got) == set(want)})"


def make_training(seq: int, layers: int):
    torch.manual_seed(0)
    model = Decoder(VOCAB, 896, layers, 14, 2, 4864, chunks=CHUNKS).to(CUDA, torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True, capturable=True)  # no .item()
    tokens, labels, classes = batch(seq, VOCAB, seed=3)
    return model, optimizer, tokens.to(CUDA), labels.to(CUDA), classes.to(CUDA)


def train_step(model, optimizer, tokens, labels, classes, obs) -> weakref.ref:
    if obs is None:
        out = model(tokens)
        loss = chunked_ce(out, labels)
    else:
        with obs.observe(labels=labels, token_classes=classes):
            out = model(tokens)
            loss = chunked_ce(out, labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return weakref.ref(out[0])


def check_no_sync_and_freed(seq: int, layers: int) -> list[tuple[str, bool, str]]:
    model, optimizer, tokens, labels, classes = make_training(seq, layers)
    obs = attach(model)
    train_step(model, optimizer, tokens, labels, classes, obs)  # warm-up: allocations, kernel compilation
    torch.cuda.synchronize()
    error = ""
    torch.cuda.set_sync_debug_mode("error")
    try:
        ref = train_step(model, optimizer, tokens, labels, classes, obs)
    except RuntimeError as e:
        error, ref = str(e).splitlines()[0], None
    finally:
        torch.cuda.set_sync_debug_mode(0)
    gc.collect()
    tokens_seen = obs.collect().get("tokens", 0)
    return [
        (
            "no host sync in a training step",
            not error,
            error or f"sync debug mode 'error' raised nothing; {tokens_seen:.0f} tokens",
        ),
        ("logits freed after the step", ref is not None and ref() is None, "weakref to the first output chunk"),
    ]


def check_overlap(seq: int, layers: int, pairs: int) -> tuple[bool, str, list[str]]:
    model, optimizer, tokens, labels, classes = make_training(seq, layers)
    observers = {"side stream": attach(model), "inline": attach(model, side_stream=False)}
    for o in observers.values():  # attach once each; only the observing one records in a step
        train_step(model, optimizer, tokens, labels, classes, o)
        o.collect()
    train_step(model, optimizer, tokens, labels, classes, None)

    def timed(obs) -> tuple[float, int]:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        train_step(model, optimizer, tokens, labels, classes, obs)
        torch.cuda.synchronize()
        return time.perf_counter() - start, torch.cuda.max_memory_allocated()

    kinds = ["baseline", "side stream", "inline"]
    times: dict[str, list[float]] = {k: [] for k in kinds}
    peaks: dict[str, list[int]] = {k: [] for k in kinds}
    for i in range(pairs):
        for kind in kinds[i % 3 :] + kinds[: i % 3]:  # rotate the order
            t, m = timed(observers.get(kind))
            times[kind].append(t)
            peaks[kind].append(m)
    for o in observers.values():
        o.collect()
    ratio = {k: statistics.median(a / b for a, b in zip(times[k], times["baseline"], strict=True)) for k in kinds[1:]}
    lines = [
        "median step: " + ", ".join(f"{k} {1e3 * statistics.median(times[k]):.1f} ms" for k in kinds),
        f"median ratio vs baseline: side stream {ratio['side stream']:.4f} (goal <= 1.01), "
        f"inline {ratio['inline']:.4f}",
        "ratio spread (side stream): "
        + ", ".join(f"{a / b:.3f}" for a, b in zip(times["side stream"], times["baseline"], strict=True)),
        "peak memory vs baseline: "
        + ", ".join(
            f"{k} {(statistics.median(peaks[k]) - statistics.median(peaks['baseline'])) / 2**20:+.0f} MiB"
            for k in kinds[1:]
        ),
    ]
    hidden = ratio["side stream"] < ratio["inline"]
    return hidden, f"side stream {ratio['side stream']:.4f} < inline {ratio['inline']:.4f}", lines


def check_warmup(seq: int, layers: int) -> tuple[bool, str]:
    """obs.warmup() compiles ahead (timed); the first observed training step then compiles nothing."""
    model, optimizer, tokens, labels, classes = make_training(seq, layers)
    obs = attach(model)
    torch.cuda.synchronize()
    start = time.perf_counter()
    obs.warmup(dtype=torch.bfloat16, tool_ids=False)  # train_step passes labels and classes, no tool ids
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    graphs = counters["stats"]["unique_graphs"]
    train_step(model, optimizer, tokens, labels, classes, obs)
    new = counters["stats"]["unique_graphs"] - graphs
    obs.collect()
    obs.detach()
    return new == 0, f"warmup() {seconds:.1f} s (bf16, vocab {VOCAB}); first observed step compiled {new} graphs"


def check_peak_memory(seq: int, layers: int) -> list[tuple[str, bool, str]]:
    """Extra peak allocated memory of an observed training step vs. the documented in-flight bound."""
    model, optimizer, tokens, labels, classes = make_training(seq, layers)
    chunk_bytes = tokens.shape[0] * (seq // CHUNKS) * VOCAB * 2  # one bf16 logits chunk

    def peak(obs) -> int:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        train_step(model, optimizer, tokens, labels, classes, obs)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    results = []
    for max_in_flight in (1, 4):
        obs = attach(model, max_in_flight=max_in_flight)
        peak(obs)  # warm-up
        peak(None)
        without = min(peak(None) for _ in range(3))
        with_obs = min(peak(obs) for _ in range(3))
        obs.collect()
        obs.detach()
        extra, bound = with_obs - without, max_in_flight * chunk_bytes + KERNEL_WORKING_SET
        results.append(
            (
                f"peak memory, max_in_flight={max_in_flight}",
                extra <= bound + 64 * MiB,
                f"without {without / MiB:.0f} MiB, with {with_obs / MiB:.0f} MiB: extra {extra / MiB:+.0f} MiB; "
                f"bound {bound / MiB:.0f} MiB ({max_in_flight} x {chunk_bytes / MiB:.0f} MiB chunk + 64 MiB) + 64 MiB",
            )
        )
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("FAIL: no CUDA device")
        return 1
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, agent_obs {agent_obs.__version__}")
    results: list[tuple[str, bool, str]] = []
    ok, detail = check_warmup(args.seq, args.layers)  # first: nothing compiled yet in this process
    results.append(("warmup() compiles ahead", ok, detail))
    ok, detail = check_equality()
    results.append(("CUDA metrics == CPU reference", ok, detail))
    results += check_no_sync_and_freed(args.seq, args.layers)
    results += check_peak_memory(args.seq, args.layers)
    ok, detail, lines = check_overlap(args.seq, args.layers, args.pairs)
    results.append(("side-stream overlap visible in timings", ok, detail))
    print("\n".join(lines))
    for name, passed, detail in results:
        print(f"{'PASS' if passed else 'FAIL'}: {name}: {detail}")
    failed = sum(not p for _, p, _ in results)
    print(f"SUMMARY: {'PASS' if not failed else 'FAIL'} ({len(results) - failed}/{len(results)} checks passed)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
