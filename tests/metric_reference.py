"""An independent float64 reference of the metrics (full softmax, sort, python loops over groups) for the tests."""

from __future__ import annotations

import math

import torch

from agent_obs.accumulator import ENTROPY_BUCKETS, PERPLEXITY_CAP
from agent_obs.keys import BINARY_ENTROPY, NONFINITE, group_prefix

GROUP_CLASSES = {"all": None, "reasoning": 1, "tool_call": 2}
TOOL_PARTS = {"tool_syntax": False, "tool_args": True}  # tool_call tokens outside / inside an argument value


def reference_rows(logits: torch.Tensor, labels: torch.Tensor | None, topk: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Per-row float64 statistics of ``[N, V]`` logits by the textbook formulas."""
    x = logits.double()
    finite = ~torch.isnan(x).any(-1) & ~torch.isposinf(x).any(-1) & ~torch.isneginf(x).all(-1)
    x = torch.where(finite[:, None], x, 0.0)
    logp = torch.log_softmax(x, dim=-1)
    p = logp.exp()
    rows = {"finite": finite, "entropy": -(p * torch.where(p > 0, logp, 0.0)).sum(-1)}
    ranked = p.sort(-1, descending=True).values.cumsum(-1)
    p1 = ranked[:, 0]
    rows["binary_entropy"] = torch.tensor(
        [-sum(q * math.log(q) for q in (a, 1.0 - a) if q > 0) for a in p1.tolist()], dtype=torch.float64
    )
    for k in topk:
        rows[f"top{k}"] = ranked[:, min(k, x.shape[1]) - 1]
    if labels is not None:
        lab = labels.clamp(0, x.shape[1] - 1)
        rows["nll"] = -logp.gather(1, lab[:, None]).squeeze(1)
        rows["correct"] = (x.argmax(-1) == lab).double()  # argmax: first index of the maximum
    return rows


def reference_metrics(
    logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    classes: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    topk: tuple[int, ...] = (1, 2, 5, 10),
    tool_slots: torch.Tensor | None = None,
    tool_names: dict[int, str] | None = None,
    tool_args: torch.Tensor | None = None,
    binary_entropy: bool = False,
) -> tuple[dict[str, float], dict[str, list[int]]]:
    """The expected metric dict and per-class entropy histogram counts (``[..., V]`` inputs).

    ``tool_args`` (nonzero inside argument values) adds the tool_syntax/tool_args groups;
    ``binary_entropy`` the ``top1_binary_entropy`` keys.
    """
    vocab = logits.shape[-1]
    x = logits.reshape(-1, vocab)
    lab = None if labels is None else labels.reshape(-1)
    cls = None if classes is None else classes.reshape(-1)
    rows = reference_rows(x, lab, topk)
    n = x.shape[0]
    selected = [True] * n
    for i in range(n):
        if lab is not None and int(lab[i]) == ignore_index:
            selected[i] = False
        if cls is not None and int(cls[i]) == 0:
            selected[i] = False
    finite = rows["finite"].tolist()
    groups: list[tuple[str, str | None, list[int]]] = []
    for group, c in GROUP_CLASSES.items():
        if c is not None and cls is None:
            continue
        members = [i for i in range(n) if selected[i] and (c is None or int(cls[i]) == c)]
        groups.append((group, None, members))
    if tool_args is not None and cls is not None:
        args = tool_args.reshape(-1)
        for group, inside in TOOL_PARTS.items():
            members = [i for i in range(n) if selected[i] and int(cls[i]) == 2 and (int(args[i]) != 0) == inside]
            groups.append((group, None, members))
    if tool_slots is not None:
        slots = tool_slots.reshape(-1)
        for slot, name in (tool_names or {}).items():
            members = [i for i in range(n) if selected[i] and int(cls[i]) == 2 and int(slots[i]) == slot]
            groups.append(("tool_call", name, members))
    out: dict[str, float] = {NONFINITE: float(sum(1 for i in range(n) if selected[i] and not finite[i]))}
    hists: dict[str, list[int]] = {}
    for group, tool, members in groups:
        ok = [i for i in members if finite[i]]
        if not ok:
            continue
        p = group_prefix(group, tool)
        out[p + "tokens"] = float(len(ok))
        out[p + "entropy"] = sum(float(rows["entropy"][i]) for i in ok) / len(ok)
        if binary_entropy:
            out[p + BINARY_ENTROPY] = sum(float(rows["binary_entropy"][i]) for i in ok) / len(ok)
        for k in topk:
            out[p + f"top{k}_prob"] = sum(float(rows[f"top{k}"][i]) for i in ok) / len(ok)
        if lab is not None:
            mean_nll = sum(float(rows["nll"][i]) for i in ok) / len(ok)
            out[p + "perplexity"] = min(math.exp(min(mean_nll, 700.0)), PERPLEXITY_CAP)
            out[p + "accuracy"] = sum(float(rows["correct"][i]) for i in ok) / len(ok)
        if tool is None:
            counts = [0] * (len(ENTROPY_BUCKETS) + 1)
            for i in ok:
                h = float(rows["entropy"][i])
                counts[next((b for b, edge in enumerate(ENTROPY_BUCKETS) if h <= edge), len(ENTROPY_BUCKETS))] += 1
            hists[group] = counts
    return out, hists


def assert_metrics_close(got: dict[str, float], want: dict[str, float], *, rtol: float, atol: float = 1e-6) -> None:
    """Same keys, every value within ``rtol`` relative (plus a tiny ``atol`` for values near 0), never NaN."""
    assert set(got) == set(want), f"keys differ: extra {set(got) - set(want)}, missing {set(want) - set(got)}"
    for key, value in want.items():
        assert not math.isnan(got[key]), key
        assert math.isclose(got[key], value, rel_tol=rtol, abs_tol=atol), f"{key}: got {got[key]!r}, want {value!r}"
