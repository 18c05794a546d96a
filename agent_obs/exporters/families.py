"""Metric keys -> metric families: the Prometheus/OpenTelemetry names and labels dashboards query.

Prometheus names follow the team contract (``agent_obs_`` prefix, base unit in the name,
``_total`` for counters); the OpenTelemetry names are dotted with the unit in ``unit``, so
the standard OTLP -> Prometheus translation gives back the same Prometheus names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from agent_obs.keys import NONFINITE, OUTLIERS, parse_key


@dataclass(frozen=True)
class Family:
    """One metric family: Prometheus name, OTel name and unit, kind, help text, extra labels."""

    name: str
    otel_name: str
    kind: str  # gauge | counter | histogram
    unit: str
    help: str
    labels: tuple[str, ...]  # besides run and split


def _class_and_tool(stat: str, otel: str, kind: str, unit: str, help_text: str, k: bool = False):
    extra = ("k",) if k else ()
    suffix = {"nats": "_nats", "1": "_ratio"}.get(unit, "")
    total = "_total" if kind == "counter" else ""
    by_class = Family(
        f"agent_obs_{otel}{suffix}{total}",
        f"agent_obs.{otel}",
        kind,
        unit,
        f"{help_text}, per token class (all|reasoning|tool_call|tool_syntax|tool_args)",
        ("token_class", *extra),
    )
    by_tool = Family(
        f"agent_obs_tool_{otel}{suffix}{total}",
        f"agent_obs.tool.{otel}",
        kind,
        unit,
        f"{help_text}, over one tool's call tokens",
        ("tool", *extra),
    )
    return stat, by_class, by_tool


_STATS = [
    _class_and_tool(
        "entropy", "entropy", "gauge", "nats", "Mean full-vocabulary entropy of the next-token distribution"
    ),
    _class_and_tool("perplexity", "perplexity", "gauge", "{perplexity}", "exp(mean NLL of the label), capped at 1e6"),
    _class_and_tool(
        "topk_prob", "topk_prob", "gauge", "1", "Mean probability mass of the k most likely tokens", k=True
    ),
    _class_and_tool("accuracy", "accuracy", "gauge", "1", "Fraction of tokens whose argmax equals the label"),
    _class_and_tool("tokens", "tokens", "counter", "{token}", "Tokens observed"),
    _class_and_tool(
        "top1_binary_entropy", "top1_binary_entropy", "gauge", "nats", "Mean binary entropy of the top-1 probability"
    ),
]
CLASS_FAMILIES: dict[str, Family] = {stat: fam for stat, fam, _ in _STATS}
TOOL_FAMILIES: dict[str, Family] = {stat: fam for stat, _, fam in _STATS}
NONFINITE_FAMILY = Family(
    "agent_obs_nonfinite_tokens_total",
    "agent_obs.nonfinite_tokens",
    "counter",
    "{token}",
    "Selected tokens whose logits held NaN/Inf (excluded from every other metric)",
    (),
)
OUTLIER_FAMILY = Family(
    "agent_obs_outlier_samples_total",
    "agent_obs.outlier_samples",
    "counter",
    "{sample}",
    "Samples whose mean NLL was above median + k x MAD of their log window (ids in the JSONL/structlog samples)",
    (),
)
STEP_FAMILY = Family("agent_obs_step", "agent_obs.step", "gauge", "{step}", "Training step of the last collect", ())
LAST_COLLECT_FAMILY = Family(
    "agent_obs_last_collect_timestamp_seconds",
    "agent_obs.last_collect_timestamp",
    "gauge",
    "s",
    "Unix time of the last collect",
    (),
)
HISTOGRAM_FAMILY = Family(
    "agent_obs_token_entropy_nats",
    "agent_obs.token_entropy",
    "histogram",
    "nats",
    "Per-token entropy of the next-token distribution, cumulative over collects",
    ("token_class",),
)
ALL_FAMILIES: tuple[Family, ...] = (
    *CLASS_FAMILIES.values(),
    *TOOL_FAMILIES.values(),
    NONFINITE_FAMILY,
    OUTLIER_FAMILY,
    STEP_FAMILY,
    LAST_COLLECT_FAMILY,
    HISTOGRAM_FAMILY,
)


class Sample(NamedTuple):
    """One value of a family with its extra labels (in ``family.labels`` order)."""

    family: Family
    labels: tuple[str, ...]
    value: float


def metric_samples(metrics: Mapping[str, float]) -> tuple[list[Sample], list[str]]:
    """Map metric keys to family samples; also return the keys outside the grammar (ignored)."""
    samples: list[Sample] = []
    unknown: list[str] = []
    for key, value in metrics.items():
        if key == NONFINITE:
            samples.append(Sample(NONFINITE_FAMILY, (), float(value)))
            continue
        if key == OUTLIERS:
            samples.append(Sample(OUTLIER_FAMILY, (), float(value)))
            continue
        parsed = parse_key(key)
        if parsed is None:
            unknown.append(key)
            continue
        k = (str(parsed.k),) if parsed.k is not None else ()
        if parsed.tool is None:
            samples.append(Sample(CLASS_FAMILIES[parsed.stat], (parsed.group, *k), float(value)))
        else:
            samples.append(Sample(TOOL_FAMILIES[parsed.stat], (parsed.tool, *k), float(value)))
    return samples, unknown
