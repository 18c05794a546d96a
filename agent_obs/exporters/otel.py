"""``OTelExporter``: the metrics as OpenTelemetry gauges, counters and a histogram, sent over OTLP/HTTP.

``export()`` only records into the SDK's in-memory aggregation (microseconds). The default
``PeriodicExportingMetricReader`` sends from its own thread every interval, so the queue
is bounded by construction (one aggregated state, no backlog) and a slow or dead
collector never blocks ``collect()``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Mapping, Sequence

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricExporter,
    MetricExportResult,
    MetricReader,
    MetricsData,
    PeriodicExportingMetricReader,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from agent_obs.exporters.base import FaultReporter
from agent_obs.exporters.families import (
    ALL_FAMILIES,
    HISTOGRAM_FAMILY,
    LAST_COLLECT_FAMILY,
    STEP_FAMILY,
    Family,
    metric_samples,
)

SCOPE = "agent_obs"


class _SdkLogCapture(logging.Filter):
    """Holds back the OTLP exporter's own log records while our wrapper exports, keeping their text.

    Only records emitted on the thread inside ``_ReportingExporter.export`` are affected, so
    other OTLP exporters in the process log as usual; ours are folded into one rate-limited warning.
    """

    def __init__(self) -> None:
        super().__init__()
        self.local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(self.local, "active", False):
            self.local.messages.append(record.getMessage())
            return False
        return True


_CAPTURE = _SdkLogCapture()


def _install_capture(logger_name: str) -> None:
    logger = logging.getLogger(logger_name)
    if _CAPTURE not in logger.filters:
        logger.addFilter(_CAPTURE)


class _ReportingExporter(MetricExporter):
    """Wraps a MetricExporter so failed exports reach the rate-limited fault reporter."""

    def __init__(self, inner: MetricExporter, reporter: FaultReporter) -> None:
        super().__init__(
            preferred_temporality=inner._preferred_temporality,
            preferred_aggregation=inner._preferred_aggregation,
        )
        self.inner = inner
        self.reporter = reporter
        _install_capture(type(inner).__module__)

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs) -> MetricExportResult:
        local = _CAPTURE.local
        local.active, local.messages = True, []
        try:
            result = self.inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs)
        except Exception as error:
            result = MetricExportResult.FAILURE
            local.messages.append(f"{type(error).__name__}: {error}")
        finally:
            local.active = False
        if result != MetricExportResult.SUCCESS:
            endpoint = getattr(self.inner, "_endpoint", type(self.inner).__name__)
            reasons = local.messages[:1] + local.messages[-1:] if len(local.messages) > 1 else local.messages
            self.reporter.report("otlp", f"export to {endpoint} failed: {' / '.join(reasons) or 'no reason given'}")
        return result

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self.inner.force_flush(timeout_millis=timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs) -> None:
        self.inner.shutdown(timeout_millis=timeout_millis, **kwargs)


class _HistogramState:
    """Cumulative per-bucket entropy counts per (split, token_class), as OTel histogram points.

    The SDK's Histogram instrument takes one value per ``record()``; the accumulator gives
    pre-aggregated bucket counts, so the points are added to each collection of the reader.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.start_ns = time.time_ns()
        self.points: dict[tuple[str, str], tuple[tuple[float, ...], list[float], float]] = {}

    def add(self, split: str, histograms: Mapping) -> None:
        with self.lock:
            for cls, hist in histograms.items():
                edges, counts, total = self.points.get((split, cls), (tuple(hist.edges), [0.0] * len(hist.counts), 0.0))
                if edges != tuple(hist.edges) or len(counts) != len(hist.counts):
                    raise ValueError(f"histogram edges changed for split={split!r} class={cls!r}")
                counts = [a + b for a, b in zip(counts, hist.counts, strict=True)]
                self.points[(split, cls)] = (edges, counts, total + hist.total)

    def metric(self) -> Metric | None:
        with self.lock:
            items = sorted(self.points.items())
        if not items:
            return None
        now = time.time_ns()
        points = []
        for (split, cls), (edges, counts, total) in items:
            ints = [round(c) for c in counts]
            points.append(
                HistogramDataPoint(
                    attributes={"split": split, "token_class": cls},
                    start_time_unix_nano=self.start_ns,
                    time_unix_nano=now,
                    count=sum(ints),
                    sum=total,
                    bucket_counts=ints,
                    explicit_bounds=list(edges),
                    min=None,
                    max=None,
                )
            )
        fam = HISTOGRAM_FAMILY
        data = Histogram(data_points=points, aggregation_temporality=AggregationTemporality.CUMULATIVE)
        return Metric(name=fam.otel_name, description=fam.help, unit=fam.unit, data=data)

    def add_to(self, data: MetricsData | None, resource: Resource) -> MetricsData | None:
        """``data`` with the histogram metric appended to the agent_obs scope (created if absent)."""
        metric = self.metric()
        if metric is None:
            return data
        resource_metrics = list(data.resource_metrics) if data is not None else []
        for i, rm in enumerate(resource_metrics):
            for j, sm in enumerate(rm.scope_metrics):
                if sm.scope.name == SCOPE:
                    scopes = list(rm.scope_metrics)
                    scopes[j] = ScopeMetrics(sm.scope, [*sm.metrics, metric], sm.schema_url)
                    resource_metrics[i] = ResourceMetrics(rm.resource, scopes, rm.schema_url)
                    return MetricsData(resource_metrics)
        scope = ScopeMetrics(InstrumentationScope(SCOPE), [metric], "")
        resource_metrics.append(ResourceMetrics(resource, [scope], ""))
        return MetricsData(resource_metrics)


class OTelExporter:
    """Records every collected metric on a MeterProvider; exports via OTLP/HTTP or a reader you pass.

    Without ``reader``, an ``OTLPMetricExporter`` (which honours the ``OTEL_EXPORTER_OTLP_*``
    variables; ``endpoint`` overrides them) is driven by a ``PeriodicExportingMetricReader``
    every ``export_interval_s`` (default: ``OTEL_METRIC_EXPORT_INTERVAL`` or 60 s). The
    resource carries ``service.name`` and ``run``; points carry ``split``, ``token_class``,
    ``k`` and ``tool`` attributes.
    """

    def __init__(
        self,
        *,
        run: str = "default",
        service_name: str = "agent-obs",
        reader: MetricReader | None = None,
        endpoint: str | None = None,
        export_interval_s: float | None = None,
        export_timeout_s: float | None = None,
        resource_attributes: Mapping[str, str] | None = None,
        report_interval_s: float = 300.0,
    ) -> None:
        self._reporter = FaultReporter("otel", interval_s=report_interval_s)
        self.resource = Resource.create({**(resource_attributes or {}), "service.name": service_name, "run": run})
        if reader is None:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

            otlp = OTLPMetricExporter(endpoint=endpoint, timeout=export_timeout_s)
            reader = PeriodicExportingMetricReader(
                _ReportingExporter(otlp, self._reporter),
                export_interval_millis=None if export_interval_s is None else export_interval_s * 1000,
                export_timeout_millis=None if export_timeout_s is None else export_timeout_s * 1000,
            )
        self.reader = reader
        self.provider = MeterProvider(resource=self.resource, metric_readers=[reader])
        self._hist = _HistogramState()
        self._hook_histogram(reader)
        meter = self.provider.get_meter(SCOPE)
        self._instruments = {}
        for fam in ALL_FAMILIES:
            if fam.kind == "gauge":
                self._instruments[fam.name] = meter.create_gauge(fam.otel_name, unit=fam.unit, description=fam.help)
            elif fam.kind == "counter":
                self._instruments[fam.name] = meter.create_counter(fam.otel_name, unit=fam.unit, description=fam.help)
        self._closed = False

    def _hook_histogram(self, reader: MetricReader) -> None:
        collect = getattr(reader, "_collect", None)
        if collect is None or not hasattr(reader, "_set_collect_callback"):
            self._reporter.report("histogram", "this opentelemetry-sdk has no reader collect hook: no histogram")
            return

        def collect_with_histogram(r, *args, **kwargs):
            data = collect(r, *args, **kwargs)
            try:
                return self._hist.add_to(data, self.resource)
            except Exception as error:
                self._reporter.report("histogram", error)
                return data

        reader._set_collect_callback(collect_with_histogram)

    def export(self, metrics: Mapping[str, float], *, step: int, split: str) -> None:
        """Record one collect: gauges set, counters added, histogram buckets added (never raises)."""
        self._reporter.call("export", self._record, metrics, step, split)

    def _record(self, metrics: Mapping[str, float], step: int, split: str) -> None:
        samples, unknown = metric_samples(metrics)
        samples += [(STEP_FAMILY, (), float(step)), (LAST_COLLECT_FAMILY, (), time.time())]
        for fam, labels, value in samples:
            attributes = {"split": split, **_attributes(fam, labels)}
            instrument = self._instruments[fam.name]
            if fam.kind == "counter":
                if value >= 0 and math.isfinite(value):
                    instrument.add(value, attributes)
            else:
                instrument.set(value, attributes)
        histograms = getattr(metrics, "histograms", None)
        if histograms:
            self._hist.add(split, histograms)
        if unknown:
            self._reporter.report("export", f"keys outside the metric grammar ignored: {sorted(unknown)[:5]}")

    def force_flush(self, timeout_s: float = 10.0) -> bool:
        """Export now (blocks up to ``timeout_s``); for tests and the end of short jobs."""
        return self.provider.force_flush(timeout_millis=timeout_s * 1000)

    def close(self, timeout_s: float = 10.0) -> None:
        """Flush the last state and shut the provider down (bounded by ``timeout_s``)."""
        if self._closed:
            return
        self._closed = True
        self._reporter.call("close", self.provider.shutdown, timeout_millis=timeout_s * 1000)


def _attributes(fam: Family, labels: Sequence[str]) -> dict[str, str | int]:
    attrs: dict[str, str | int] = dict(zip(fam.labels, labels, strict=True))
    if "k" in attrs:
        attrs["k"] = int(attrs["k"])
    return attrs
