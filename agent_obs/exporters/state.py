"""The series an exporter holds between collects, with the number of ``tool`` label values capped.

Prometheus and OpenTelemetry render the same state: the latest gauges per split, counters and
entropy-histogram buckets summed over collects. ``ToolLabels`` bounds how many distinct tools
those series can name for the life of the process: at most ``max_tools`` plus ``OVERFLOW_TOOL``.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable, Mapping
from typing import NamedTuple

from agent_obs.accumulator import Histogram, Metrics
from agent_obs.distributed import OVERFLOW_TOOL
from agent_obs.exporters.base import FaultReporter, as_metrics
from agent_obs.exporters.families import LAST_COLLECT_FAMILY, STEP_FAMILY, TOOL_FAMILIES, Family, Sample, metric_samples

DEFAULT_MAX_TOOLS = 16  # attach()'s default; attach() passes its own value to the exporters it is given
SeriesKey = tuple[Family, tuple[str, ...]]


def sample_tool(family: Family, labels: tuple[str, ...]) -> str | None:
    """The ``tool`` label of a sample, or None for families without one."""
    return labels[family.labels.index("tool")] if "tool" in family.labels else None


class ToolLabels:
    """The tools that may appear as label values: at most ``max_tools`` (plus the overflow bucket).

    A tool in an export is admitted and marked most recent; when more than ``max_tools`` are
    held, the least recently exported ones are evicted (their series must then be removed). An
    export naming more than ``max_tools`` tools (``collect()`` never does) keeps those with the
    most tokens and drops the rest.
    """

    def __init__(self, max_tools: int = DEFAULT_MAX_TOOLS) -> None:
        self.max_tools = max_tools
        self._recent: dict[str, None] = {}  # insertion order = least recently exported first

    def admit(self, tokens: Mapping[str, float]) -> tuple[set[str], list[str]]:
        """Record one export's tools (name -> tokens): return (tools to keep here, tools evicted)."""
        named = sorted((t for t in tokens if t != OVERFLOW_TOOL), key=lambda t: (-tokens[t], t))
        keep = named[: self.max_tools]
        for tool in sorted(keep):
            self._recent.pop(tool, None)
            self._recent[tool] = None
        evicted = []
        while len(self._recent) > self.max_tools:
            tool = next(iter(self._recent))
            del self._recent[tool]
            evicted.append(tool)
        return {*keep, OVERFLOW_TOOL}, evicted


class Snapshot(NamedTuple):
    """A consistent copy of the state for one scrape or OTLP collection."""

    gauges: dict[str, dict[SeriesKey, float]]  # split -> latest collect's gauges
    counters: dict[tuple[str, SeriesKey], float]  # (split, series) -> sum over collects
    hists: dict[tuple[str, str], Histogram]  # (split, class) -> entropy histogram summed over collects


class SeriesState:
    """Latest gauges per split, cumulative counters and histogram buckets, tools capped; thread-safe."""

    def __init__(self, max_tools: int = DEFAULT_MAX_TOOLS) -> None:
        self.lock = threading.Lock()
        self.tools = ToolLabels(max_tools)
        self.gauges: dict[str, dict[SeriesKey, float]] = {}
        self.counters: dict[tuple[str, SeriesKey], float] = {}
        self.hists: dict[tuple[str, str], Histogram] = {}
        self.dropped_tools = 0  # tool samples over the cap that an export did not keep

    def set_max_tools(self, max_tools: int) -> None:
        """Change the cap; series of tools beyond it go at the next export."""
        with self.lock:
            self.tools.max_tools = max_tools

    def update(self, metrics: Metrics, step: int, split: str, now: float) -> list[str]:
        """Record one collect; return the keys outside the metric grammar (ignored)."""
        samples, unknown = metric_samples(metrics)
        with self.lock:
            samples = self._cap_tools(samples)
            gauges: dict[SeriesKey, float] = {(STEP_FAMILY, ()): float(step), (LAST_COLLECT_FAMILY, ()): now}
            for fam, labels, value in samples:
                if fam.kind != "counter":
                    gauges[(fam, labels)] = value
                elif value >= 0 and math.isfinite(value):  # a counter only grows
                    key = (split, (fam, labels))
                    self.counters[key] = self.counters.get(key, 0.0) + value
            self.gauges[split] = gauges
            for cls, hist in metrics.histograms.items():
                before = self.hists.get((split, cls))
                self.hists[(split, cls)] = hist if before is None else before.plus(hist)
        return unknown

    def _cap_tools(self, samples: Iterable[Sample]) -> list[Sample]:
        """Admit this export's tools, remove every series of evicted tools, drop samples over the cap."""
        samples = list(samples)
        tokens: dict[str, float] = {}
        for fam, labels, value in samples:
            tool = sample_tool(fam, labels)
            if tool is not None:
                tokens[tool] = max(tokens.get(tool, 0.0), value if fam is TOOL_FAMILIES["tokens"] else 0.0)
        keep, evicted = self.tools.admit(tokens)
        if evicted:
            gone = set(evicted)
            for split, gauges in self.gauges.items():
                self.gauges[split] = {k: v for k, v in gauges.items() if sample_tool(*k) not in gone}
            self.counters = {k: v for k, v in self.counters.items() if sample_tool(*k[1]) not in gone}
        kept = [s for s in samples if sample_tool(s.family, s.labels) in (None, *keep)]
        self.dropped_tools += len(samples) - len(kept)
        return kept

    def snapshot(self) -> Snapshot:
        """Copies taken under the lock (a scrape never blocks ``update`` for longer)."""
        with self.lock:
            return Snapshot(
                {split: dict(g) for split, g in self.gauges.items()},
                dict(self.counters),
                dict(self.hists),  # Histogram is immutable
            )

    def empty(self) -> bool:
        """True until the first export recorded something (then there is data to deliver)."""
        with self.lock:
            return not (self.gauges or self.counters or self.hists)

    def tool_labels(self) -> set[str]:
        """The tool label values the series hold now (for tests and the load probe)."""
        with self.lock:
            keys = [k for g in self.gauges.values() for k in g] + [k for _, k in self.counters]
        return {t for t in (sample_tool(*k) for k in keys) if t is not None}


def record_export(
    state: SeriesState, reporter: FaultReporter, metrics: Mapping[str, float], step: int, split: str
) -> None:
    """``state.update`` that never raises: errors, ignored keys and tools over the cap are reported.

    A plain mapping is taken as ``Metrics`` without histograms (``as_metrics``).
    """
    dropped = state.dropped_tools
    unknown = reporter.call("export", state.update, as_metrics(metrics), step, split, time.time())
    if unknown:
        reporter.report("export", f"keys outside the metric grammar ignored: {sorted(unknown)[:5]}")
    if state.dropped_tools > dropped:
        reporter.report(
            "export",
            f"an export named more than max_tools={state.tools.max_tools} tools: the ones with fewest tokens were "
            "left out (collect() never does this; pass the tools through attach(max_tools=...))",
        )
