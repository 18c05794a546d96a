"""Shared inputs and expectations for the exporter tests: metrics from real training, contract names.

The expected Prometheus series are derived here from the team contract (names written out
by hand, not taken from the exporter) with float64 sums/cumsums computed independently.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

import agent_obs
from agent_obs import TokenClass
from agent_obs.accumulator import ENTROPY_BUCKETS, Metrics, StatsAccumulator
from agent_obs.keys import parse_key
from agent_obs.tools import NO_TOOL, tool_id

TOOLS = ("bash", "str_replace_editor")
# The contract's family names (team brief), by (per-class | per-tool, stat).
CONTRACT = {
    ("class", "entropy"): "agent_obs_entropy_nats",
    ("class", "perplexity"): "agent_obs_perplexity",
    ("class", "topk_prob"): "agent_obs_topk_prob_ratio",
    ("class", "accuracy"): "agent_obs_accuracy_ratio",
    ("class", "tokens"): "agent_obs_tokens_total",
    ("tool", "entropy"): "agent_obs_tool_entropy_nats",
    ("tool", "perplexity"): "agent_obs_tool_perplexity",
    ("tool", "topk_prob"): "agent_obs_tool_topk_prob_ratio",
    ("tool", "accuracy"): "agent_obs_tool_accuracy_ratio",
    ("tool", "tokens"): "agent_obs_tool_tokens_total",
}
COUNTER_STATS = {"tokens"}


@dataclass
class Record:
    """One collect: its split, step and metrics."""

    split: str
    step: int
    metrics: Metrics


def sample_metrics(seed: int, n: int = 96, vocab: int = 64, tools: Sequence[str] = TOOLS) -> Metrics:
    """Metrics (with per-tool keys and histograms) of random logits through the real accumulator."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=g) * 3
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[::7] = -100
    classes = torch.randint(0, 4, (n,), generator=g)
    slots = torch.randint(0, max(1, len(tools)), (n,), generator=g)
    acc = StatsAccumulator((1, 2, 5, 10), num_tool_slots=len(tools))
    acc.update(logits, labels, classes, slots)
    return acc.metrics(tool_names=dict(enumerate(tools)))


def console_exporter() -> tuple[ConsoleMetricExporter, io.StringIO]:
    """The SDK's own ConsoleMetricExporter writing one JSON document per line to a buffer."""
    out = io.StringIO()
    return ConsoleMetricExporter(out=out, formatter=lambda data: data.to_json(indent=None) + "\n"), out


def console_metrics(out: io.StringIO) -> list[dict]:
    """The metrics of every document a ConsoleMetricExporter wrote, oldest first."""
    docs = [json.loads(line) for line in out.getvalue().splitlines()]
    return [m for d in docs for rm in d["resource_metrics"] for sm in rm["scope_metrics"] for m in sm["metrics"]]


def series_of_key(key: str, split: str, run: str) -> tuple[str, dict[str, str]]:
    """The contract's Prometheus series (name, labels) of one metric key."""
    if key == "nonfinite_tokens":
        return "agent_obs_nonfinite_tokens_total", {"run": run, "split": split}
    parsed = parse_key(key)
    assert parsed is not None, key
    labels = {"run": run, "split": split}
    if parsed.tool is None:
        labels["token_class"] = parsed.group
        name = CONTRACT[("class", parsed.stat)]
    else:
        labels["tool"] = parsed.tool
        name = CONTRACT[("tool", parsed.stat)]
    if parsed.k is not None:
        labels["k"] = str(parsed.k)
    return name, labels


def le_label(edge: float | str) -> str:
    """A bucket bound in one spelling (``"1.0"``, ``"+Inf"``): Pushgateway re-renders ``1.0`` as ``1``."""
    edge = float(edge)
    return "+Inf" if math.isinf(edge) else str(edge)


def expected_series(records: Sequence[Record], run: str) -> dict[tuple[str, frozenset], float]:
    """Every series a Prometheus exporter fed ``records`` must expose, with its value.

    Gauges: the last collect of each split. Counters: float64 sums over collects.
    Histogram: float64 cumsum over buckets of the per-bucket counts summed over collects.
    (``agent_obs_last_collect_timestamp_seconds`` is time-dependent: checked by the tests.)
    """
    out: dict[tuple[str, frozenset], float] = {}
    last = {r.split: r for r in records}
    for split, rec in last.items():
        out[("agent_obs_step", frozenset({"run": run, "split": split}.items()))] = float(rec.step)
        for key, value in rec.metrics.items():
            name, labels = series_of_key(key, split, run)
            if not name.endswith("_total"):
                out[(name, frozenset(labels.items()))] = float(value)
    for rec in records:
        for key, value in rec.metrics.items():
            name, labels = series_of_key(key, rec.split, run)
            if name.endswith("_total"):
                ident = (name, frozenset(labels.items()))
                out[ident] = out.get(ident, 0.0) + float(value)
    hist: dict[tuple[str, str], tuple[np.ndarray, float]] = {}
    for rec in records:
        for cls, h in rec.metrics.histograms.items():
            counts, total = hist.get((rec.split, cls), (np.zeros(len(h.counts)), 0.0))
            hist[(rec.split, cls)] = (counts + np.asarray(h.counts, dtype=np.float64), total + h.total)
    for (split, cls), (counts, total) in hist.items():
        labels = {"run": run, "split": split, "token_class": cls}
        cumulative = np.cumsum(counts)
        for edge, c in zip([*ENTROPY_BUCKETS, math.inf], cumulative, strict=True):
            ident = ("agent_obs_token_entropy_nats_bucket", frozenset({**labels, "le": le_label(edge)}.items()))
            out[ident] = float(c)
        out[("agent_obs_token_entropy_nats_count", frozenset(labels.items()))] = float(cumulative[-1])
        out[("agent_obs_token_entropy_nats_sum", frozenset(labels.items()))] = total
    return out


class TinyLM(torch.nn.Module):
    """Embedding -> tanh MLP -> ``lm_head``: a real (tiny) language model to train."""

    def __init__(self, vocab: int = 64, dim: int = 32) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.mlp = torch.nn.Linear(dim, dim)
        self.lm_head = torch.nn.Linear(dim, vocab)
        with torch.no_grad():  # peaked and flat rows alike, so entropies fill many histogram buckets
            self.lm_head.weight.mul_(torch.logspace(-1, 1.6, vocab)[:, None])

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.tanh(self.mlp(self.embed(tokens))))


@dataclass
class Reference:
    """Independent float64 references of what a run observed, per split: token counts, entropy buckets."""

    tokens: dict[tuple[str, str], float]  # (split, class) -> selected tokens
    buckets: dict[tuple[str, str], np.ndarray]  # (split, class) -> per-bucket counts of float64 entropies


def _reference_add(ref: Reference, split: str, logits, labels, classes) -> None:
    logp = torch.log_softmax(logits.detach().double().reshape(-1, logits.shape[-1]), dim=-1)
    entropy = -(logp.exp() * logp).sum(-1).numpy()
    labels, classes = labels.reshape(-1).numpy(), classes.reshape(-1).numpy()
    selected = (labels != -100) & (classes != int(TokenClass.IGNORE))
    edges = np.asarray(ENTROPY_BUCKETS)
    for cls, mask in (
        ("all", selected),
        ("reasoning", selected & (classes == int(TokenClass.REASONING))),
        ("tool_call", selected & (classes == int(TokenClass.TOOL_CALL))),
    ):
        ref.tokens[(split, cls)] = ref.tokens.get((split, cls), 0.0) + float(mask.sum())
        counts = np.bincount(np.searchsorted(edges, entropy[mask], side="left"), minlength=len(edges) + 1)
        ref.buckets[(split, cls)] = ref.buckets.get((split, cls), 0) + counts.astype(np.float64)


def train_observed(
    exporters: Sequence,
    *,
    steps: int = 6,
    val_every: int = 3,
    seed: int = 0,
    vocab: int = 64,
    before_detach: Callable[[list[Record]], None] | None = None,
) -> tuple[list[Record], Reference]:
    """Train TinyLM for ``steps`` SGD steps under ``agent_obs.attach(..., exporters=...)``.

    Collects "train" every step and "val" every ``val_every`` steps, with reasoning, tool-call
    (two tools) and context tokens; returns what ``collect()`` returned and float64 references.
    ``before_detach(records)`` runs after the last collect, while the exporters are still open.
    """
    torch.manual_seed(seed)
    model = TinyLM(vocab)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.tensor([tool_id(name) for name in TOOLS])
    records: list[Record] = []
    ref = Reference({}, {})

    def batch():
        tokens = torch.randint(0, vocab, (2, 25), generator=g)
        labels = tokens[:, 1:].clone()
        labels[:, :2] = -100
        classes = torch.randint(0, 4, labels.shape, generator=g)
        tools = ids[torch.randint(0, len(TOOLS), labels.shape, generator=g)]
        tool_ids = torch.where(classes == int(TokenClass.TOOL_CALL), tools, NO_TOOL)
        return tokens[:, :-1], labels, classes, tool_ids

    def forward(obs, split):
        tokens, labels, classes, tool_ids = batch()
        with obs.observe(labels=labels, token_classes=classes, tool_ids=tool_ids):
            logits = model(tokens)
        _reference_add(ref, split, logits, labels, classes)
        return logits, labels

    with agent_obs.attach(model, layer="lm_head", exporters=exporters) as obs:
        for step in range(1, steps + 1):
            logits, labels = forward(obs, "train")
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), labels.reshape(-1), ignore_index=-100)
            opt.zero_grad()
            loss.backward()
            opt.step()
            records.append(Record("train", step, obs.collect("train", step=step)))
            if step % val_every == 0:
                with torch.no_grad():
                    forward(obs, "val")
                records.append(Record("val", step, obs.collect("val", step=step)))
        if before_detach is not None:
            before_detach(records)
        # detach() on leaving the block closes the exporters
    return records, ref
