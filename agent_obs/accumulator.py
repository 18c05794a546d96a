"""Streaming per-group sums of token statistics: fed chunk by chunk, merged, all-reduced.

The state is one float64 tensor ``sums[group, column]`` on the logits' device, so it can
be summed across micro-batches and ranks and turned into means at the end. Groups are
``all``, ``reasoning``, ``tool_call``, ``tool_syntax``, ``tool_args`` and then one row per tool
slot. When sample rows are given, a second float64 table ``samples[sample, column]`` sums the
same statistics per training sample (see ``SAMPLE_GROUPS``), also without host syncs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from agent_obs.kernel import (
    NUM_ROW_STATS,
    PASS2_OPTIONS,
    ROW_CORRECT,
    ROW_ENTROPY,
    ROW_FINITE,
    ROW_NLL,
    Fused,
    finish_row_stats,
    fused_block_stats,
    rows_per_call,
)
from agent_obs.keys import BINARY_ENTROPY, CLASS_GROUPS, NONFINITE, group_prefix
from agent_obs.token_class import TokenClass

DEFAULT_TOPK = (1, 2, 5, 10)
DEFAULT_CHUNK_BYTES = 64 * 2**20
PERPLEXITY_CAP = 1e6
# Upper bucket edges (nats) of the per-token entropy histogram; the last bucket is +Inf.
ENTROPY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)

# Plain ints: under torch.compile (2.13) ``tensor != IntEnum member`` wrongly evaluates to all-True.
_IGNORE, _REASONING, _TOOL_CALL = int(TokenClass.IGNORE), int(TokenClass.REASONING), int(TokenClass.TOOL_CALL)
# Columns of ``sums`` before the top-k masses; histogram counts follow the masses.
COL_TOKENS, COL_LABELED, COL_ENTROPY, COL_NLL, COL_CORRECT, COL_NONFINITE, COL_BINARY_ENTROPY = range(7)
_FIXED_COLS = 7
# Per-sample table: for each of these groups the columns tokens, labeled, entropy, NLL, correct (see ``samples``).
SAMPLE_GROUPS = ("all", "reasoning", "tool_call")
SAMPLE_STATS = 5


def default_chunk_tokens(vocab_size: int) -> int:
    """Rows per chunk so one fp32 chunk of logits is about 64 MiB."""
    return max(1, DEFAULT_CHUNK_BYTES // (4 * max(1, vocab_size)))


@dataclass(frozen=True)
class Histogram:
    """Per-bucket (not cumulative) counts of per-token entropy: ``counts[i]`` is in ``(edges[i-1], edges[i]]``.

    Args:
        edges: Upper bucket edges in nats, increasing; a final +Inf bucket is implied.
        counts: ``len(edges) + 1`` token counts (whole numbers held as floats), the last one above ``edges[-1]``.
        total: Sum of the observed entropies (Prometheus' ``_sum``, OTLP's ``sum``).
    """

    edges: tuple[float, ...]
    counts: tuple[float, ...]
    total: float

    def plus(self, other: Histogram) -> Histogram:
        """The bucket-wise sum of two histograms with the same edges (ValueError otherwise)."""
        if tuple(other.edges) != tuple(self.edges) or len(other.counts) != len(self.counts):
            raise ValueError(f"histogram edges differ: {self.edges} vs {other.edges}; sum only histograms of one run")
        return Histogram(
            self.edges, tuple(a + b for a, b in zip(self.counts, other.counts, strict=True)), self.total + other.total
        )

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper edge, tokens <= edge)`` per bucket, the last edge ``math.inf``: Prometheus' ``le`` buckets."""
        out, running = [], 0
        for edge, count in zip([*self.edges, math.inf], self.counts, strict=True):
            running += round(count)
            out.append((float(edge), running))
        return out


class Metrics(dict):
    """``collect()``'s result, the input of every exporter: a ``dict[str, float]`` of metric keys plus two fields.

    Args:
        values: Metric key (``agent_obs.keys`` grammar: ``entropy``, ``tool_call_top5_prob``, ...) -> value.
        histograms: Token class (``all``, ``reasoning``, ``tool_call``, ...) -> its per-token entropy
            ``Histogram`` over the collect window; held in ``.histograms``.
        samples: The window's hardest samples as plain dicts, hardest first by mean NLL (empty unless
            ``observe()`` got ``sample_ids``; see ``agent_obs.samples.hardest_samples``); held in ``.samples``.
    """

    def __init__(
        self,
        values: Mapping[str, float],
        histograms: dict[str, Histogram] | None = None,
        samples: list[dict] | None = None,
    ):
        super().__init__(values)
        self.histograms: dict[str, Histogram] = histograms or {}
        self.samples: list[dict] = samples or []


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
        self.samples = self._empty_samples(0, device)

    @staticmethod
    def _empty_samples(capacity: int, device) -> torch.Tensor:
        """``[capacity + 1, groups x stats]`` zeros: the last row takes the rows of no sample."""
        return torch.zeros(capacity + 1, len(SAMPLE_GROUPS) * SAMPLE_STATS, dtype=torch.float64, device=device)

    def reset(self) -> None:
        """Zero the group sums and the per-sample table (same shape: no reallocation, no sync)."""
        self.sums.zero_()
        self.samples.zero_()

    def take_samples(self, num_samples: int) -> torch.Tensor:
        """The per-sample sums of the first ``num_samples`` samples; the table starts empty again."""
        table = self.samples
        self.samples = self._empty_samples(0, table.device)
        if table.shape[0] - 1 < num_samples:
            table = torch.cat([table[:-1], table.new_zeros(num_samples - table.shape[0] + 1, table.shape[1])])
        return table[:num_samples]

    def _reserve_samples(self, num_samples: int) -> None:
        """Grow the table (doubling, on the current stream) so rows ``0..num_samples-1`` exist."""
        capacity = self.samples.shape[0] - 1
        if num_samples > capacity:
            grown = self._empty_samples(max(num_samples, 2 * capacity, 64), self.samples.device)
            grown[:capacity] = self.samples[:capacity]
            self.samples = grown

    def merge(self, other: StatsAccumulator) -> None:
        """Add another accumulator's sums and per-sample rows (same topk and tool slots)."""
        self.sums += other.sums.to(self.sums.device)
        rows = other.samples.shape[0] - 1  # its last row collects the rows of no sample
        if rows:
            self._reserve_samples(rows)
            self.samples[:rows] += other.samples[:rows].to(self.samples.device)

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
        tool_args: torch.Tensor | None = None,
        sample_rows: torch.Tensor | None = None,
        num_samples: int = 0,
    ) -> None:
        """Add rows of ``logits`` ``[N, V]`` (labels/classes/tool slots ``[N]``), chunk by chunk, without host syncs.

        ``tool_args`` (``[N]``, nonzero inside an argument value) splits tool_call into
        tool_syntax/tool_args; ``sample_rows`` (``[N]``, ``0..num_samples-1`` or -1 for none) adds
        each row to its sample's row of ``samples``.
        """
        n, vocab = logits.shape
        if n == 0:
            return
        dev = logits.device
        labels, classes, tool_slots, tool_args, sample_rows = (
            None if t is None else t.to(dev) for t in (labels, classes, tool_slots, tool_args, sample_rows)
        )
        slots = tool_slots if self.num_tool_slots and classes is not None else None
        parts = None if classes is None else _tool_parts(tool_args, classes)
        if sample_rows is not None:
            self._reserve_samples(num_samples)
            trash = self.samples.shape[0] - 1
            sample_rows = torch.where(sample_rows >= 0, sample_rows.long(), trash)
        chunk = self.chunk_tokens or default_chunk_tokens(vocab)
        kmax = min(max(self.topk), vocab)
        start = 0
        while start < n:
            # sized per call: should a kernel fall back to eager (recompile limit), the next calls get eager sizes
            compiling = _fused_chunk_sums.compiling and fused_block_stats.compiling
            sl = slice(start, min(n, start + rows_per_call(chunk, vocab, kmax, compiling)))
            start = sl.stop
            x = logits[sl]
            sums, per_sample = _fused_chunk_sums(
                x,
                None if labels is None else labels[sl],
                None if classes is None else classes[sl],
                None if slots is None else slots[sl],
                None if parts is None else parts[sl],
                *fused_block_stats(x),
                self.topk,
                ignore_index,
                self.num_tool_slots,
            )
            self.sums += sums.to(self.sums.device)
            if sample_rows is not None:
                self.samples.index_add_(0, sample_rows[sl].to(self.samples.device), per_sample.to(self.samples))

    def metrics(self, tool_names: dict[int, str] | None = None, *, binary_entropy: bool = False) -> Metrics:
        """The means of the current sums (syncs to host): keys as in ``agent_obs.keys``."""
        return metrics_from_sums(self.sums.cpu(), self.topk, tool_names or {}, binary_entropy=binary_entropy)


def chunk_sums(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    classes: torch.Tensor | None,
    tool_slots: torch.Tensor | None,
    tool_args: torch.Tensor | None,
    bmax: torch.Tensor,
    bsum: torch.Tensor,
    bdot: torch.Tensor,
    topk: tuple[int, ...],
    ignore_index: int,
    num_tool_slots: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's ``[group, column]`` float64 sums and each row's ``[N, SAMPLE_GROUPS x SAMPLE_STATS]`` values
    (for the per-sample table) from its logits and ``block_stats`` (pure torch, compiled).

    Rows are selected by label/class, non-finite ones only counted; group membership is a
    ``[N, group]`` mask, so every group's sums come from one fused reduction over the rows.
    ``tool_args`` is ``_tool_parts``' int8 mask. The per-row values are always computed (a few
    columns per row, tiny next to the logits): a flag would compile a second variant of the kernel.
    """
    kernel_topk = topk if 1 in topk else (*topk, 1)  # the top-1 mass feeds the binary entropy
    stats = finish_row_stats(logits, labels, bmax, bsum, bdot, kernel_topk)
    p1 = stats[:, NUM_ROW_STATS + kernel_topk.index(1)].double().clamp(0.0, 1.0)
    binary_entropy = -(torch.special.xlogy(p1, p1) + torch.special.xlogy(1.0 - p1, 1.0 - p1))
    selected = torch.ones_like(stats[:, 0], dtype=torch.bool)
    if labels is not None:
        selected = selected & (labels != ignore_index)
    if classes is not None:
        selected = selected & (classes != _IGNORE)
    finite = stats[:, ROW_FINITE] > 0
    ok = selected & finite
    entropy = stats[:, ROW_ENTROPY]
    bucket = sum((entropy > edge).long() for edge in ENTROPY_BUCKETS)  # (edges[i-1], edges[i]] -> i
    hist = [bucket == i for i in range(len(ENTROPY_BUCKETS) + 1)]
    ok_f = ok.double()
    columns = [
        ok_f,
        ok_f if labels is not None else torch.zeros_like(ok_f),
        entropy,
        stats[:, ROW_NLL],
        stats[:, ROW_CORRECT],
        (selected & ~finite).double(),
        binary_entropy,
        *stats[:, NUM_ROW_STATS : NUM_ROW_STATS + len(topk)].unbind(-1),
        *hist,
    ]
    values = torch.stack(
        [c if i == COL_NONFINITE else torch.where(ok, c.double(), 0.0) for i, c in enumerate(columns)], dim=-1
    )
    groups = [selected]
    if classes is not None:
        tool_call = selected & (classes == _TOOL_CALL)
        groups += [selected & (classes == _REASONING), tool_call]
        if tool_args is not None:
            groups += [tool_call & (tool_args == 0), tool_call & (tool_args == 1)]
        if tool_slots is not None:
            slots = tool_slots.long().clamp(max=num_tool_slots - 1)
            in_tool = tool_call & (tool_slots >= 0)
            groups += [in_tool & (slots == i) for i in range(num_tool_slots)]
    member = torch.stack(groups, dim=-1)
    sums = torch.where(member[:, :, None], values[:, None, :], 0.0).sum(0)  # not a product: 0 * inf NLL is NaN
    pad = len(CLASS_GROUPS) + num_tool_slots - sums.shape[0]
    sums = torch.nn.functional.pad(sums, (0, 0, 0, pad))
    picked = values[:, [COL_TOKENS, COL_LABELED, COL_ENTROPY, COL_NLL, COL_CORRECT]]
    rows = [torch.where(member[:, g, None], picked, 0.0) for g in range(min(len(SAMPLE_GROUPS), member.shape[1]))]
    rows += [torch.zeros_like(picked)] * (len(SAMPLE_GROUPS) - len(rows))
    return sums, torch.cat(rows, dim=-1)


def _tool_parts(tool_args: torch.Tensor | None, classes: torch.Tensor) -> torch.Tensor:
    """``tool_args`` as int8 1 (inside an argument value) / 0 (tool syntax), or all -1 (in neither group) when not
    given: given or not, the compiled kernel sees one dtype and no ``None``, so it is one variant, not two."""
    if tool_args is None:
        return torch.full(classes.shape, -1, dtype=torch.int8, device=classes.device)
    return (tool_args != 0).to(torch.int8)


_fused_chunk_sums = Fused(chunk_sums, options=PASS2_OPTIONS)


def metrics_from_sums(
    sums: torch.Tensor, topk: tuple[int, ...], tool_names: dict[int, str], *, binary_entropy: bool = False
) -> Metrics:
    """Turn ``[group, column]`` sums into the metric dict; groups without tokens get no keys.

    ``binary_entropy`` adds ``top1_binary_entropy`` (the seed's definition) to every group.
    """
    rows = sums.tolist()
    groups = [(group, None) for group in CLASS_GROUPS]
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
        if binary_entropy:
            out[p + BINARY_ENTROPY] = row[COL_BINARY_ENTROPY] / tokens
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
