"""The hardest samples of a log window: sample ids -> table rows, per-sample means, exact cross-rank top N, outliers.

The accumulator sums each sample's tokens, NLL, entropy and correct tokens (overall, reasoning,
tool_call) on the device; ``collect()`` turns the table into plain dicts here. Each rank sends its
own top N by overall and by tool-call mean NLL (plus every sample's mean NLL, for the outlier
threshold): the global top N of either ranking is among them, so the merge is exact as long as a
sample is seen by one rank per window (rows of one id gathered from several ranks are summed).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import torch
from torch.distributed import ProcessGroup

from agent_obs.accumulator import SAMPLE_GROUPS, SAMPLE_STATS
from agent_obs.distributed import _all_gather, is_distributed

DEFAULT_OUTLIER_K = 3.5  # the modified z-score cut-off of Iglewicz and Hoaglin
MAD_SCALE = 1.4826  # MAD x 1.4826 estimates the standard deviation of normal data
SampleId = int | str


class SampleIndex:
    """This window's sample ids, each given a row of the per-sample table in order of first sight."""

    def __init__(self) -> None:
        self.ids: list[SampleId] = []
        self._rows: dict[SampleId, int] = {}
        self.used = False

    def __len__(self) -> int:
        return len(self.ids)

    def _row(self, sid: SampleId) -> int:
        if isinstance(sid, int) and sid < 0:
            return -1  # padding / no sample
        row = self._rows.get(sid)
        if row is None:
            row = self._rows[sid] = len(self.ids)
            self.ids.append(sid)
        return row

    def rows(self, sample_ids: torch.Tensor | Sequence[SampleId], shape: tuple[int, ...] | None) -> torch.Tensor:
        """Per-token ``[B, S]`` rows (long, -1 for none) of ``sample_ids`` given per sequence ``[B]`` or per token."""
        if shape is None or len(shape) != 2:
            raise ValueError("sample_ids need labels (or token_classes) of shape [batch, seq] in the same observe()")
        self.used = True
        if isinstance(sample_ids, torch.Tensor):
            if sample_ids.is_floating_point() or sample_ids.is_complex():
                raise ValueError(f"sample_ids must be integer ids (or a list of str), got {sample_ids.dtype}")
            ids = sample_ids.detach().cpu().long()
            if ids.dim() == 1 and shape[0] == 1 and ids.shape[0] == shape[1] != 1:
                ids = ids[None]  # per token, one unbatched sequence
            if tuple(ids.shape) == shape:
                uniq, inverse = torch.unique(ids, return_inverse=True)
                lut = torch.tensor([self._row(int(u)) for u in uniq.tolist()], dtype=torch.long)
                return lut[inverse]
            per_seq: list[SampleId] = ids.tolist() if ids.dim() == 1 else []
        else:
            per_seq = [s if isinstance(s, str) else int(s) for s in sample_ids]
        if len(per_seq) != shape[0]:
            raise ValueError(
                f"sample_ids must be one id per sequence ([{shape[0]}]) or one per token ({list(shape)}), got "
                f"{tuple(sample_ids.shape) if isinstance(sample_ids, torch.Tensor) else len(per_seq)}"
            )
        rows = torch.tensor([self._row(s) for s in per_seq], dtype=torch.long)
        return rows[:, None].expand(shape).clone()


def _means(sid: SampleId, sums: Sequence[float]) -> dict:
    """One sample's plain dict: id, tokens, nll, entropy, accuracy, then per class with its prefix."""
    out: dict = {"id": sid}
    for g, group in enumerate(SAMPLE_GROUPS):
        tokens, labeled, entropy, nll, correct = sums[g * SAMPLE_STATS : (g + 1) * SAMPLE_STATS]
        if tokens <= 0:
            continue
        p = "" if group == "all" else f"{group}_"
        out[p + "tokens"] = tokens
        out[p + "entropy"] = entropy / tokens
        if labeled > 0:
            out[p + "nll"] = nll / labeled
            out[p + "accuracy"] = correct / labeled
    return out


def _top(rows: dict[SampleId, list[float]], key: str, top_n: int) -> list[dict]:
    """The ``top_n`` samples with the highest ``key`` (ties by id), as means."""
    means = [m for sid, sums in rows.items() if key in (m := _means(sid, sums))]
    return sorted(means, key=lambda m: (-m[key], str(m["id"])))[:top_n]


def collect_samples(
    index: SampleIndex, table: torch.Tensor, *, top_n: int, outlier_k: float, group: ProcessGroup | None = None
) -> tuple[list, float]:
    """``hardest_samples`` when this rank saw sample ids or may be part of a collective; ``([], -1.0)`` when no
    rank did (so the metrics get no samples and no outlier count). Every rank must call it when distributed."""
    if not index.used and not is_distributed():
        return [], -1.0
    return hardest_samples(table, index.ids, top_n=top_n, outlier_k=outlier_k, used=index.used, group=group)


def hardest_samples(
    table: torch.Tensor,
    ids: Sequence[SampleId],
    *,
    top_n: int = 10,
    outlier_k: float = DEFAULT_OUTLIER_K,
    used: bool = True,
    group: ProcessGroup | None = None,
) -> tuple[list[dict], float]:
    """The window's hardest samples over all ranks, hardest first by mean NLL, and the outlier count.

    ``table[i]`` holds the sums of sample ``ids[i]``. The list is the global top ``top_n`` by mean NLL
    plus the top ``top_n`` by tool-call mean NLL; each dict has ``rank`` / ``tool_call_rank`` (1-based,
    None outside that ranking) and ``outlier``: mean NLL above median + ``outlier_k`` x 1.4826 x MAD of
    every sample's mean NLL in the window (none with fewer than 3 samples or a MAD of 0). Collective
    when distributed (over ``group``, default every rank): ``used`` says whether this rank saw sample
    ids; when no rank did, ``([], -1.0)``.
    Samples without labeled tokens are not ranked.
    """
    local = {sid: row for sid, row in zip(ids, table.tolist(), strict=True)}
    picked = {m["id"] for key in ("nll", "tool_call_nll") for m in _top(local, key, top_n)}
    nlls = [m["nll"] for sid, row in local.items() if "nll" in (m := _means(sid, row))]
    merged: dict[SampleId, list[float]] = {}
    all_nlls: list[float] = []
    any_used = False
    for rank_rows, rank_nlls, rank_used in _all_gather(([(sid, local[sid]) for sid in picked], nlls, used), group):
        for sid, row in rank_rows:
            merged[sid] = [a + b for a, b in zip(merged[sid], row, strict=True)] if sid in merged else list(row)
        all_nlls += rank_nlls
        any_used |= rank_used
    if not any_used:
        return [], -1.0
    threshold = math.inf
    if len(all_nlls) >= 3:
        median = statistics.median(all_nlls)
        mad = statistics.median(abs(x - median) for x in all_nlls)
        if mad > 0:
            threshold = median + outlier_k * MAD_SCALE * mad
    by_nll = _top(merged, "nll", top_n)
    by_tool = _top(merged, "tool_call_nll", top_n)
    rank = {m["id"]: i for i, m in enumerate(by_nll, 1)}
    tool_rank = {m["id"]: i for i, m in enumerate(by_tool, 1)}
    chosen = {m["id"]: m for m in (*by_nll, *by_tool)}
    out = sorted(chosen.values(), key=lambda m: (-m.get("nll", -math.inf), str(m["id"])))
    for m in out:
        m.update(rank=rank.get(m["id"]), tool_call_rank=tool_rank.get(m["id"]), outlier=m["nll"] > threshold)
    return out, float(sum(x > threshold for x in all_nlls))
