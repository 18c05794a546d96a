"""Summing accumulator state across ranks, with per-tool slots merged by tool name.

Each rank assigns tool slots in the order it meets tool ids, so slot ``i`` means different
tools on different ranks. ``reduce_sums`` gathers every rank's slot table (one
``all_gather_object``), picks the same global slot layout on every rank (the ``max_tools``
tools a ``ToolSelector`` keeps, the rest as ``OVERFLOW_TOOL``), moves each rank's rows there
and sums the whole state with one ``all_reduce``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection

import torch
import torch.distributed as dist

from agent_obs.accumulator import COL_TOKENS
from agent_obs.keys import CLASS_GROUPS
from agent_obs.tools import tool_name

# Sanitized tool names never start with "_" (sanitize_tool_name strips it): no real tool can take this name.
OVERFLOW_TOOL = "_other"
DEFAULT_WINDOW = 10  # collects: the half-life of a tool's token score
SWAP_MARGIN = 2.0  # a challenger replaces a kept tool only with more than twice its score


class ToolSelector:
    """Which tools keep their own keys across collects: at most ``max_tools``, stable under churn.

    Each tool's score is its token count over the recent collects, exponentially weighted (half-life
    ``window`` collects). Free places go to the best-scoring tools at once; once all are taken, a
    challenger replaces the lowest-scoring kept tool only when its score is more than ``SWAP_MARGIN``
    times as high, so tools do not flap at the boundary. Deterministic in its inputs, so every rank
    that feeds it the same all-gathered counts keeps the same tools.
    """

    def __init__(self, max_tools: int, window: float = DEFAULT_WINDOW) -> None:
        if max_tools < 0 or window <= 0:
            raise ValueError(f"need max_tools >= 0 and window > 0, got {max_tools} and {window}")
        self.max_tools = max_tools
        self.decay = 0.5 ** (1.0 / window)
        self.scores: dict[int, float] = {}
        self.kept: list[int] = []  # tool ids, in the order they were admitted

    def update(self, tokens: dict[int, float]) -> list[int]:
        """Add one collect's token counts per tool id; return the kept tool ids."""
        for tid in self.scores:
            self.scores[tid] *= self.decay
        for tid, tok in tokens.items():
            if tok > 0:
                self.scores[tid] = self.scores.get(tid, 0.0) + tok
        self._forget()
        rank = sorted((t for t in self.scores if t not in self.kept), key=lambda t: (-self.scores[t], t))
        for tid in rank:
            if len(self.kept) < self.max_tools:
                self.kept.append(tid)
                continue
            weakest = min(self.kept, key=lambda t: (self.scores.get(t, 0.0), -t))
            if self.scores[tid] <= SWAP_MARGIN * self.scores.get(weakest, 0.0):
                break  # candidates are in falling score order: no later one can win either
            self.kept[self.kept.index(weakest)] = tid
        return list(self.kept)

    def _forget(self) -> None:
        """Bound memory: keep the scores of the kept tools and of the best ``4 * max_tools + 64`` others."""
        limit = 4 * self.max_tools + 64
        if len(self.scores) > limit + len(self.kept):
            others = sorted((t for t in self.scores if t not in self.kept), key=lambda t: -self.scores[t])
            for tid in others[limit:]:
                del self.scores[tid]


def is_distributed() -> bool:
    """True when a default process group is initialised (every rank must then call collectives)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 outside torch.distributed)."""
    return dist.get_rank() if is_distributed() else 0


def reduce_sums(
    sums: torch.Tensor,
    slot_tools: list[tuple[int, str | None]],
    max_tools: int,
    selector: ToolSelector | None = None,
    group: dist.ProcessGroup | None = None,
    overflowed: Collection[int] = (),
) -> tuple[torch.Tensor, dict[int, str]]:
    """Global ``[3 + kept tools + 1, columns]`` sums and ``{tool slot: name}`` from this rank's sums.

    ``sums`` rows are the class groups, then the local tool slots: ``slot_tools[i] = (tool id,
    name or None if unknown here)`` for slot ``i``; the last row is the local overflow slot.
    ``selector`` (kept across collects) picks the tools; without one, this collect's top
    ``max_tools`` by tokens. ``overflowed``: tools that fell into this rank's overflow slot for
    want of a free one; a tool that did on any rank gets no row of its own this time (its tokens count
    under the overflow name), so every per-tool row is exact. Sums over ``group`` (default: every
    rank); collective: every rank of it must call it.
    """
    n_cls = len(CLASS_GROUPS)
    local_tokens = sums[n_cls : n_cls + len(slot_tools), COL_TOKENS].tolist()
    table = [(tid, name, tok) for (tid, name), tok in zip(slot_tools, local_tokens, strict=True)]
    tokens: Counter[int] = Counter()
    names: dict[int, str] = {}
    inexact: set[int] = set()
    for rank_table, rank_overflowed in _all_gather((table, sorted(overflowed)), group):
        inexact.update(rank_overflowed)
        for tid, name, tok in rank_table:
            tokens[tid] += tok
            if name is not None:
                names.setdefault(tid, name)
    selector = selector or ToolSelector(max_tools)
    kept = [tid for tid in selector.update(dict(tokens)) if tokens[tid] > 0 and tid not in inexact]
    other = len(kept)
    target = {tid: i for i, tid in enumerate(kept)}
    out = sums.new_zeros(n_cls + other + 1, sums.shape[1])
    out[:n_cls] = sums[:n_cls]
    local_slots = sums.shape[0] - n_cls
    rows = [target.get(slot_tools[i][0], other) if i < len(slot_tools) else other for i in range(local_slots)]
    out[n_cls:].index_add_(0, torch.tensor(rows, dtype=torch.long, device=sums.device), sums[n_cls:])
    out = _all_reduce(out, group)
    tool_names = {i: names.get(tid) or tool_name(tid) for tid, i in target.items()}
    tool_names[other] = OVERFLOW_TOOL
    return out, tool_names


def _all_gather(obj: object, group: dist.ProcessGroup | None = None) -> list:
    if not is_distributed():
        return [obj]
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def _all_reduce(t: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum ``t`` over the ranks of ``group`` (default: all) on a device its backend supports."""
    if not is_distributed():
        return t
    backend = str(dist.get_backend(group))
    if "nccl" in backend and not t.is_cuda:
        work = t.to(torch.device("cuda", torch.cuda.current_device()))
    elif t.is_cuda and "nccl" not in backend:
        work = t.cpu()
    else:
        work = t
    dist.all_reduce(work, op=dist.ReduceOp.SUM, group=group)
    return work
