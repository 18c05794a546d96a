"""The metric-key grammar shared by compute_metrics, collect() and every exporter.

A key is ``{group prefix}{stat}``: the prefix is ``""`` (all tokens), ``"reasoning_"``,
``"tool_call_"``, ``"tool_syntax_"`` / ``"tool_args_"`` (the tool-call tokens outside / inside
argument values) or ``"tool_call.{tool}_"`` (one tool's calls); ``stat`` is one of ``entropy``,
``top1_binary_entropy``, ``perplexity``, ``top{k}_prob``, ``accuracy``, ``tokens``. The overall
``nonfinite_tokens`` and ``outlier_samples`` counts have no prefix.
"""

from __future__ import annotations

import re
from typing import NamedTuple

# The accumulator's leading rows, in order: the token classes, then the split of tool_call into syntax/args.
CLASS_GROUPS = ("all", "reasoning", "tool_call", "tool_syntax", "tool_args")
TOOL_PARTS = ("tool_syntax", "tool_args")
NONFINITE = "nonfinite_tokens"
OUTLIERS = "outlier_samples"  # samples of the window flagged as outliers (see agent_obs.samples)
BINARY_ENTROPY = "top1_binary_entropy"
_STAT = r"(?P<stat>entropy|top1_binary_entropy|perplexity|top(?P<k>\d+)_prob|accuracy|tokens)"
_KEY = re.compile(
    r"^(?:(?:(?P<part>tool_syntax|tool_args)|(?P<cls>reasoning|tool_call)(?:\.(?P<tool>[a-z0-9_]+?))?)_)?" + _STAT + "$"
)
_TOOL_NAME = re.compile(r"[^a-z0-9_]+")


class MetricKey(NamedTuple):
    """A parsed key: ``group`` is one of ``CLASS_GROUPS``, ``tool`` a tool name (tool_call only) or None."""

    group: str
    tool: str | None
    stat: str  # entropy | top1_binary_entropy | perplexity | topk_prob | accuracy | tokens
    k: int | None


def group_prefix(group: str, tool: str | None = None) -> str:
    """The key prefix of a group: ``""``, ``"reasoning_"``, ``"tool_call.bash_"``."""
    if group == "all":
        return ""
    return f"{group}.{tool}_" if tool is not None else f"{group}_"


def sanitize_tool_name(name: str) -> str:
    """Lower-case ``[a-z0-9_]`` form of a tool name, safe in keys and Prometheus labels."""
    return _TOOL_NAME.sub("_", name.strip().lower()).strip("_") or "unnamed"


def parse_key(key: str) -> MetricKey | None:
    """Split a metric key into group/tool/stat/k; None for keys outside the grammar."""
    m = _KEY.match(key)
    if m is None:
        return None
    stat = "topk_prob" if m["k"] else m["stat"]
    return MetricKey(m["part"] or m["cls"] or "all", m["tool"], stat, int(m["k"]) if m["k"] else None)
