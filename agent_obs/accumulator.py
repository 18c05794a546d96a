"""Streaming per-group sums of token statistics: fed chunk by chunk, merged, all-reduced.

The state is one float64 tensor ``sums[group, column]`` on the logits' device, so it can
be summed across micro-batches and ranks and turned into means at the end. Groups are
``all``, ``reasoning``, ``tool_call`` and then one row per tool slot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from agent_obs.kernel import NUM_ROW_STATS, ROW_CORRECT, ROW_ENTROPY, ROW_FINITE, ROW_NLL, row_stats
from agent_obs.keys import CLASS_GROUPS, NONFINITE, group_prefix
from agent_obs.token_class import TokenClass

DEFAULT_TOPK = (1, 2, 5, 10)
DEFAULT_CHUNK_BYTES = 64 * 2**20
PERPLEXITY_CAP = 1e6
# Upper bucket edges (nats) of the per-token entropy histogram; the last bucket is +Inf.
ENTROPY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)

# Columns of ``sums`` before the top-k masses; histogram counts follow the masses.
COL_TOKENS, COL_LABELED, COL_ENTROPY, COL_NLL, COL_CORRECT, COL_NONFINITE = range(6)
_FIXED_COLS = 6


def default_chunk_tokens(vocab_size: int) -> int:
    """Rows per chunk so one fp32 chunk of logits is about 64 MiB."""
    return max(1, DEFAULT_CHUNK_BYTES // (4 * max(1, vocab_size)))


@dataclass(frozen=True)
class Histogram:
    """Cumulative-free bucket counts of per-token entropy: ``counts[i]`` is in ``(edges[i-1], edges[i]]``."""

    edges: tuple[float, ...]  # upper edges; a final +Inf bucket is implied
    counts: tuple[float, ...]  # len(edges) + 1
    total: float  # sum of the observed entropies (for Prometheus' _sum)


class Metrics(dict):
    """``collect()``'s result: a plain ``dict[str, float]`` plus the entropy histograms."""

    def __init__(self, values: dict[str, float], histograms: dict[str, Histogram] | None = None):
        super().__init__(values)
        self.histograms: dict[str, Histogram] = histograms or {}


class StatsAccumulator:
    """Token-weighted sums per group; ``update`` is sync-free so it can run in a CUDA hook."""

    def __init__(
        self,
        topk: tuple[int, ...] = DEFAULT_TOPK,
        *,
        device: torch.device | str | None = None,
        num_tool_slots: int = 0,
        chunk_tokens: int | None = None,
    ) -> None:
        if not topk or any(int(k) < 1 for k in topk):
            raise ValueError(f"topk must be positive integers, got {topk!r}; e.g. topk=(1, 5, 10)")
        self.topk = tuple(int(k) for k in topk)
        self.num_tool_slots = num_tool_slots
        self.chunk_tokens = chunk_tokens
        self.num_groups = len(CLASS_GROUPS) + num_tool_slots
        self.num_cols = _FIXED_COLS + len(self.topk) + len(ENTROPY_BUCKETS) + 1
        self.sums = torch.zeros(self.num_groups, self.num_cols, dtype=torch.float64, device=device)
        self._edges = torch.tensor(ENTROPY_BUCKETS, dtype=torch.float32, device=device)

    def reset(self) -> None:
        self.sums.zero_()

    def merge(self, other: StatsAccumulator) -> None:
        """Add another accumulator's sums (same topk and tool slots)."""
        self.sums += other.sums.to(self.sums.device)

    def all_reduce(self, group=None) -> None:
        """Sum the state across ranks (one collective); a no-op outside torch.distributed."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.sums, op=dist.ReduceOp.SUM, group=group)

    def update(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor | None = None,
        classes: torch.Tensor | None = None,
        tool_slots: torch.Tensor | None = None,
        *,
        ignore_index: int = -100,
    ) -> None:
        """Add rows of ``logits`` ``[N, V]`` (labels/classes/tool slots ``[N]``), chunk by chunk."""
        n, vocab = logits.shape
        if n == 0:
            return
        step = self.chunk_tokens or default_chunk_tokens(vocab)
        for start in range(0, n, step):
            sl = slice(start, min(n, start + step))
            self._update_chunk(
                logits[sl],
                None if labels is None else labels[sl],
                None if classes is None else classes[sl],
                None if tool_slots is None else tool_slots[sl],
                ignore_index,
            )

    def _update_chunk(self, logits, labels, classes, tool_slots, ignore_index) -> None:
        dev = self.sums.device
        stats = row_stats(logits, labels, self.topk).to(dev)
        n = stats.shape[0]
        selected = torch.ones(n, dtype=torch.bool, device=dev)
        if labels is not None:
            labels = labels.to(dev)
            selected &= labels != ignore_index
        if classes is not None:
            classes = classes.to(dev)
            selected &= classes != TokenClass.IGNORE
        finite = stats[:, ROW_FINITE] > 0
        ok = selected & finite
        buckets = torch.bucketize(stats[:, ROW_ENTROPY].contiguous(), self._edges)
        columns = [
            ok,
            ok if labels is not None else torch.zeros_like(ok),
            stats[:, ROW_ENTROPY],
            stats[:, ROW_NLL],
            stats[:, ROW_CORRECT],
            selected & ~finite,
            *stats[:, NUM_ROW_STATS:].unbind(-1),
        ]
        values = torch.stack([c.to(torch.float64) for c in columns], dim=-1)
        values[:, COL_ENTROPY:COL_NONFINITE] = torch.where(ok[:, None], values[:, COL_ENTROPY:COL_NONFINITE], 0.0)
        values[:, COL_NONFINITE + 1 :] = torch.where(ok[:, None], values[:, COL_NONFINITE + 1 :], 0.0)
        hist = torch.nn.functional.one_hot(buckets, len(ENTROPY_BUCKETS) + 1).to(torch.float64) * ok[:, None]
        values = torch.cat([values, hist], dim=-1)
        member = torch.zeros(n, self.num_groups, dtype=torch.float64, device=dev)
        member[:, 0] = selected
        if classes is not None:
            member[:, 1] = selected & (classes == TokenClass.REASONING)
            member[:, 2] = selected & (classes == TokenClass.TOOL_CALL)
            if tool_slots is not None and self.num_tool_slots:
                slots = tool_slots.to(dev).long()
                in_tool = selected & (classes == TokenClass.TOOL_CALL) & (slots >= 0)
                onehot = torch.nn.functional.one_hot(slots.clamp(0, self.num_tool_slots - 1), self.num_tool_slots)
                member[:, 3:] = onehot.to(torch.float64) * in_tool[:, None]
        self.sums += member.T @ values

    def metrics(self, tool_names: dict[int, str] | None = None) -> Metrics:
        """The means of the current sums (syncs to host): keys as in ``agent_obs.keys``."""
        return metrics_from_sums(self.sums.cpu(), self.topk, tool_names or {})


def metrics_from_sums(sums: torch.Tensor, topk: tuple[int, ...], tool_names: dict[int, str]) -> Metrics:
    """Turn ``[group, column]`` sums into the metric dict; groups without tokens get no keys."""
    rows = sums.tolist()
    groups = [("all", None), ("reasoning", None), ("tool_call", None)]
    groups += [("tool_call", tool_names.get(i, f"slot{i}")) for i in range(len(rows) - len(CLASS_GROUPS))]
    out: dict[str, float] = {}
    hists: dict[str, Histogram] = {}
    hist_start = _FIXED_COLS + len(topk)
    for (group, tool), row in zip(groups, rows, strict=True):
        tokens = row[COL_TOKENS]
        if tokens <= 0:
            continue
        p = group_prefix(group, tool)
        out[p + "entropy"] = row[COL_ENTROPY] / tokens
        if row[COL_LABELED] > 0:
            out[p + "perplexity"] = min(math.exp(min(row[COL_NLL] / row[COL_LABELED], 700.0)), PERPLEXITY_CAP)
            out[p + "accuracy"] = row[COL_CORRECT] / row[COL_LABELED]
        for j, k in enumerate(topk):
            out[p + f"top{k}_prob"] = row[_FIXED_COLS + j] / tokens
        out[p + "tokens"] = tokens
        if tool is None:
            hists[group] = Histogram(ENTROPY_BUCKETS, tuple(row[hist_start:]), row[COL_ENTROPY])
    out[NONFINITE] = rows[0][COL_NONFINITE]
    return Metrics(out, hists)
