"""``OTelExporter``: the metrics as OpenTelemetry gauges, counters and a histogram, sent over OTLP/HTTP.

``export()`` only updates the in-memory ``SeriesState`` (microseconds); the reader turns it
into points at each collection. The default ``PeriodicExportingMetricReader`` sends from its
own thread every interval, so the queue is bounded by construction (one state, no backlog)
and a slow or dead collector never blocks ``collect()``; ``force_flush`` and ``close`` wait
at most their timeouts.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Gauge,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricExporter,
    MetricExportResult,
    MetricReader,
    MetricsData,
    NumberDataPoint,
    PeriodicExportingMetricReader,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from agent_obs.exporters.base import FaultReporter
from agent_obs.exporters.families import ALL_FAMILIES, HISTOGRAM_FAMILY, Family
from agent_obs.exporters.state import DEFAULT_MAX_TOOLS, SeriesState, Snapshot, record_export

SCOPE = "agent_obs"
T = TypeVar("T")


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
        self.successes = 0  # exports the collector accepted
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
        if result == MetricExportResult.SUCCESS:
            self.successes += 1
        else:
            endpoint = getattr(self.inner, "_endpoint", type(self.inner).__name__)
            reasons = local.messages[:1] + local.messages[-1:] if len(local.messages) > 1 else local.messages
            self.reporter.report("otlp", f"export to {endpoint} failed: {' / '.join(reasons) or 'no reason given'}")
        return result

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self.inner.force_flush(timeout_millis=timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs) -> None:
        self.inner.shutdown(timeout_millis=timeout_millis, **kwargs)


def otel_metrics(snap: Snapshot, start_ns: int, now_ns: int) -> list[Metric]:
    """The state as OTel metrics: gauges, cumulative monotonic sums and the entropy histogram."""
    points: dict[Family, list[NumberDataPoint]] = {}
    for split, values in snap.gauges.items():
        for (fam, labels), value in values.items():
            attrs = {"split": split, **_attributes(fam, labels)}
            points.setdefault(fam, []).append(NumberDataPoint(attrs, start_ns, now_ns, value))
    for (split, (fam, labels)), value in snap.counters.items():
        attrs = {"split": split, **_attributes(fam, labels)}
        points.setdefault(fam, []).append(NumberDataPoint(attrs, start_ns, now_ns, value))
    out = []
    for fam in ALL_FAMILIES:
        if fam in points:
            if fam.kind == "counter":
                data = Sum(points[fam], AggregationTemporality.CUMULATIVE, is_monotonic=True)
            else:
                data = Gauge(points[fam])
            out.append(Metric(name=fam.otel_name, description=fam.help, unit=fam.unit, data=data))
    if snap.hists:
        hist_points = []
        for (split, cls), (counts, total) in sorted(snap.hists.items()):
            ints = [round(c) for c in counts]
            hist_points.append(
                HistogramDataPoint(
                    attributes={"split": split, "token_class": cls},
                    start_time_unix_nano=start_ns,
                    time_unix_nano=now_ns,
                    count=sum(ints),
                    sum=total,
                    bucket_counts=ints,
                    explicit_bounds=list(snap.edges),
                    min=None,
                    max=None,
                )
            )
        fam = HISTOGRAM_FAMILY
        data = Histogram(data_points=hist_points, aggregation_temporality=AggregationTemporality.CUMULATIVE)
        out.append(Metric(name=fam.otel_name, description=fam.help, unit=fam.unit, data=data))
    return out


def _with_scope(data: MetricsData | None, metrics: list[Metric], resource: Resource) -> MetricsData | None:
    """``data`` with ``metrics`` added to the agent_obs scope (created if absent)."""
    if not metrics:
        return data
    resource_metrics = list(data.resource_metrics) if data is not None else []
    for i, rm in enumerate(resource_metrics):
        for j, sm in enumerate(rm.scope_metrics):
            if sm.scope.name == SCOPE:
                scopes = list(rm.scope_metrics)
                scopes[j] = ScopeMetrics(sm.scope, [*sm.metrics, *metrics], sm.schema_url)
                resource_metrics[i] = ResourceMetrics(rm.resource, scopes, rm.schema_url)
                return MetricsData(resource_metrics)
    scope = ScopeMetrics(InstrumentationScope(SCOPE), metrics, "")
    resource_metrics.append(ResourceMetrics(resource, [scope], ""))
    return MetricsData(resource_metrics)


def _within(fn: Callable[[], T], timeout_s: float) -> tuple[bool, T | None]:
    """Run ``fn`` on a daemon thread for at most ``timeout_s``: (finished, result or None).

    The SDK's flush and shutdown retry on their own clocks; the caller's wait is what is bounded
    (an unfinished call goes on in the background and its late result is dropped).
    """
    box: list = []
    thread = threading.Thread(target=lambda: box.append(fn()), name="agent-obs-otel-wait", daemon=True)
    try:
        thread.start()
    except RuntimeError:  # no new threads late in interpreter shutdown: the SDK's own deadline applies
        return True, fn()
    thread.join(max(0.0, timeout_s))
    return (True, box[0]) if box else (False, None)


DEFAULT_CLOSE_TIMEOUT_S = 5.0  # the longest close() (and the exit hook) waits for the final export
DEFAULT_FLUSH_TIMEOUT_S = 10.0


class OTelExporter:
    """Sends every collected metric as OpenTelemetry metrics via OTLP/HTTP, or to a reader you pass.

    Without ``reader``, an ``OTLPMetricExporter`` (which honours the ``OTEL_EXPORTER_OTLP_*``
    variables; ``endpoint`` overrides them) is driven by a ``PeriodicExportingMetricReader``
    every ``export_interval_s`` (default: ``OTEL_METRIC_EXPORT_INTERVAL`` or 60 s). The
    resource carries ``service.name`` and ``run``; points carry ``split``, ``token_class``,
    ``k`` and ``tool`` attributes. The points come from the same capped state as Prometheus
    (``SeriesState``): at most ``max_tools`` + 1 ``tool`` values, evicted tools' points gone.
    ``close()`` returns within ``close_timeout_s``, also when run at interpreter exit.
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
        max_tools: int = DEFAULT_MAX_TOOLS,
        close_timeout_s: float = DEFAULT_CLOSE_TIMEOUT_S,
    ) -> None:
        self._reporter = FaultReporter("otel", interval_s=report_interval_s)
        self.resource = Resource.create({**(resource_attributes or {}), "service.name": service_name, "run": run})
        self._sender: _ReportingExporter | None = None
        if reader is None:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

            otlp = OTLPMetricExporter(endpoint=endpoint, timeout=export_timeout_s)
            self._sender = _ReportingExporter(otlp, self._reporter)
            reader = PeriodicExportingMetricReader(
                self._sender,
                export_interval_millis=None if export_interval_s is None else export_interval_s * 1000,
                export_timeout_millis=None if export_timeout_s is None else export_timeout_s * 1000,
            )
        self.reader = reader
        self.close_timeout_s = close_timeout_s
        # our exit hook instead of the SDK's, whose shutdown waits up to 30 s on a dead collector
        self.provider = MeterProvider(resource=self.resource, metric_readers=[reader], shutdown_on_exit=False)
        self._state = SeriesState(max_tools)
        self._start_ns = time.time_ns()
        self._hook_collect(reader)
        self._closed = False
        atexit.register(_close_at_exit, weakref.ref(self))

    def _hook_collect(self, reader: MetricReader) -> None:
        collect = getattr(reader, "_collect", None)
        if collect is None or not hasattr(reader, "_set_collect_callback"):
            raise RuntimeError(
                "this opentelemetry-sdk has no MetricReader._set_collect_callback: install the version in "
                "constraints.txt (opentelemetry-sdk==1.45.2)"
            )

        def collect_with_state(r, *args, **kwargs):
            data = collect(r, *args, **kwargs)
            try:
                return _with_scope(
                    data, otel_metrics(self._state.snapshot(), self._start_ns, time.time_ns()), self.resource
                )
            except Exception as error:
                self._reporter.report("collect", error)
                return data

        reader._set_collect_callback(collect_with_state)

    def set_max_tools(self, max_tools: int) -> None:
        """At most ``max_tools`` ``tool`` attribute values (plus the overflow ``_other``); ``attach`` sets it."""
        self._state.set_max_tools(max_tools)

    def export(self, metrics: Mapping[str, float], *, step: int, split: str) -> None:
        """Record one collect: gauges replaced for ``split``, counters and histogram buckets added (never raises)."""
        record_export(self._state, self._reporter, metrics, step, split)

    def force_flush(self, timeout_s: float = DEFAULT_FLUSH_TIMEOUT_S) -> bool:
        """Export now; returns within ``timeout_s``, True only if the data reached the reader or collector."""
        if self._closed:
            return False
        sent = self._sender.successes if self._sender is not None else 0
        done, ok = _within(lambda: self.provider.force_flush(timeout_millis=timeout_s * 1000), timeout_s)
        delivered = done and bool(ok) and (not self._must_deliver() or self._sender.successes > sent)
        if not delivered:
            self._reporter.report("flush", f"force_flush delivered nothing within {timeout_s} s")
        return delivered

    def close(self, timeout_s: float | None = None) -> None:
        """Send the last state and shut down; returns within ``timeout_s`` (default ``close_timeout_s``)."""
        if self._closed:
            return
        self._closed = True
        timeout_s = self.close_timeout_s if timeout_s is None else timeout_s
        sent = self._sender.successes if self._sender is not None else 0
        done, _ = _within(lambda: self._reporter.call("close", self.provider.shutdown, timeout_s * 1000), timeout_s)
        if not done or (self._must_deliver() and self._sender.successes == sent):
            self._reporter.report("close", f"the final export was not delivered within {timeout_s} s")

    def _must_deliver(self) -> bool:
        """Whether a flush has something to send to our OTLP exporter (a user's reader reports nothing back)."""
        return self._sender is not None and not self._state.empty()


def _close_at_exit(ref: weakref.ref) -> None:
    exporter = ref()
    if exporter is not None:
        exporter.close()


def _attributes(fam: Family, labels: Sequence[str]) -> dict[str, str | int]:
    attrs: dict[str, str | int] = dict(zip(fam.labels, labels, strict=True))
    if "k" in attrs:
        attrs["k"] = int(attrs["k"])
    return attrs
