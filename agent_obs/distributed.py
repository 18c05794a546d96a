"""Summing accumulator state across ranks, with per-tool slots merged by tool name.

Each rank assigns tool slots in the order it meets tool ids, so slot ``i`` means different
tools on different ranks. ``reduce_sums`` gathers every rank's slot table (one
``all_gather_object``), picks the same global slot layout on every rank (the ``max_tools``
tools with most tokens, the rest as ``other``), moves each rank's rows there and sums the
whole state with one ``all_reduce``.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.distributed as dist

from agent_obs.accumulator import COL_TOKENS
from agent_obs.keys import CLASS_GROUPS
from agent_obs.tools import tool_name

OTHER = "other"


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
    group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, dict[int, str]]:
    """Global ``[3 + kept tools + 1, columns]`` sums and ``{tool slot: name}`` from this rank's sums.

    ``sums`` rows are the class groups, then the local tool slots: ``slot_tools[i] = (tool id,
    name or None if unknown here)`` for slot ``i``; the last row is the local ``other`` slot.
    Sums over ``group`` (default: every rank); collective: every rank of it must call it.
    """
    n_cls = len(CLASS_GROUPS)
    local_tokens = sums[n_cls : n_cls + len(slot_tools), COL_TOKENS].tolist()
    table = [(tid, name, tok) for (tid, name), tok in zip(slot_tools, local_tokens, strict=True)]
    tokens: Counter[int] = Counter()
    names: dict[int, str] = {}
    for rank_table in _all_gather(table, group):
        for tid, name, tok in rank_table:
            tokens[tid] += tok
            if name is not None:
                names.setdefault(tid, name)
    ranked = sorted((t for t in tokens if tokens[t] > 0), key=lambda t: (-tokens[t], names.get(t, ""), t))
    kept = ranked[:max_tools]
    other = len(kept)
    target = {tid: i for i, tid in enumerate(kept)}
    out = sums.new_zeros(n_cls + other + 1, sums.shape[1])
    out[:n_cls] = sums[:n_cls]
    local_slots = sums.shape[0] - n_cls
    rows = [target.get(slot_tools[i][0], other) if i < len(slot_tools) else other for i in range(local_slots)]
    out[n_cls:].index_add_(0, torch.tensor(rows, dtype=torch.long, device=sums.device), sums[n_cls:])
    out = _all_reduce(out, group)
    tool_names = {i: names.get(tid) or tool_name(tid) for tid, i in target.items()}
    tool_names[other] = OTHER
    return out, tool_names


def _all_gather(obj: list, group: dist.ProcessGroup | None = None) -> list[list]:
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
