"""``OTelExporter``: the metrics as OpenTelemetry gauges, cumulative sums and a histogram, sent over OTLP/HTTP.

Public SDK API only: the exporter's own state (``SeriesState``, shared with Prometheus) becomes a
``MetricsData`` built from the SDK's public data classes and is handed to a ``MetricExporter``
(default ``OTLPMetricExporter``) by one daemon thread, every interval and on
``force_flush``/``close``. No MeterProvider or reader is involved, so the pre-summed entropy
histograms are published exactly. ``export()`` only updates the in-memory state (microseconds):
a slow or dead collector never blocks ``collect()``, and the queue is bounded by construction
(one state, no backlog).
"""

from __future__ import annotations

import atexit
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence

from opentelemetry.sdk.environment_variables import (
    OTEL_EXPORTER_OTLP_ENDPOINT,
    OTEL_EXPORTER_OTLP_METRICS_ENDPOINT,
    OTEL_METRIC_EXPORT_INTERVAL,
)
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Gauge,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from agent_obs.accumulator import Metrics
from agent_obs.exporters.base import DEFAULT_REPORT_INTERVAL_S, FaultReporter
from agent_obs.exporters.families import ALL_FAMILIES, HISTOGRAM_FAMILY, Family
from agent_obs.exporters.state import DEFAULT_MAX_TOOLS, SeriesState, Snapshot, record_export

SCOPE = "agent_obs"
DEFAULT_CLOSE_TIMEOUT_S = 5.0  # the longest close() (and the exit hook) waits for the final export
DEFAULT_FLUSH_TIMEOUT_S = 10.0
DEFAULT_EXPORT_INTERVAL_S = 60.0  # the SDK's default for OTEL_METRIC_EXPORT_INTERVAL
DEFAULT_EXPORT_TIMEOUT_S = 10.0  # MetricExporter.export's default timeout_millis


def otel_metrics(snap: Snapshot, start_ns: int, now_ns: int) -> list[Metric]:
    """The state as OTel metrics: gauges, cumulative monotonic sums and the exact entropy histograms."""
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
        hist_points = [
            HistogramDataPoint(
                attributes={"split": split, "token_class": cls},
                start_time_unix_nano=start_ns,
                time_unix_nano=now_ns,
                count=hist.cumulative()[-1][1],
                sum=hist.total,
                bucket_counts=[round(c) for c in hist.counts],
                explicit_bounds=list(hist.edges),
                min=None,  # not tracked by the accumulator: OTLP leaves them unset
                max=None,
            )
            for (split, cls), hist in sorted(snap.hists.items())
        ]
        fam = HISTOGRAM_FAMILY
        data = Histogram(data_points=hist_points, aggregation_temporality=AggregationTemporality.CUMULATIVE)
        out.append(Metric(name=fam.otel_name, description=fam.help, unit=fam.unit, data=data))
    return out


def metrics_data(metrics: Sequence[Metric], resource: Resource) -> MetricsData:
    """``metrics`` under the ``agent_obs`` instrumentation scope of ``resource``: one OTLP request's content."""
    scope = ScopeMetrics(InstrumentationScope(SCOPE), list(metrics), schema_url="")
    return MetricsData([ResourceMetrics(resource, [scope], schema_url="")])


class _Sender:
    """One daemon thread that runs ``send`` every ``interval_s`` and when asked; sends are numbered in order.

    ``send`` returns whether the data was delivered; ``stop`` runs once after the last send.
    """

    def __init__(self, send: Callable[[], bool], stop: Callable[[], None], interval_s: float) -> None:
        self._send, self._stop = send, stop
        self.interval_s = interval_s
        self._cond = threading.Condition()
        self._asked = False
        self._stopping = False
        self.started = 0  # sends begun
        self.finished = 0  # number of the last send that ended
        self.succeeded = 0  # number of the last send that delivered
        self._thread = threading.Thread(target=self._run, name="agent-obs-otel-sender", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._asked or self._stopping, timeout=self.interval_s)
                self._asked = False
                stopping = self._stopping
                self.started += 1
                number = self.started
            ok = self._send()
            with self._cond:
                self.finished = number
                if ok:
                    self.succeeded = number
                self._cond.notify_all()
            if stopping:
                self._stop()
                return

    def send_and_wait(self, timeout_s: float, *, last: bool = False) -> bool:
        """Ask for a send of the state as it is now (the last one if ``last``); True if it delivered within
        ``timeout_s``. A send already running does not count: it may have started before the latest export."""
        with self._cond:
            if self._stopping:  # the last send was asked for already
                return False
            wanted = self.started + 1
            self._asked, self._stopping = True, last
            self._cond.notify_all()
            self._cond.wait_for(lambda: self.finished >= wanted, timeout=max(0.0, timeout_s))
            return self.succeeded >= wanted


class OTelExporter:
    """Sends every collected metric as OpenTelemetry metrics, via OTLP/HTTP or a ``MetricExporter`` you pass.

    The points come from the same capped state as Prometheus (``SeriesState``): gauges (latest
    collect per split), cumulative monotonic sums (token counters) and the per-class entropy
    histograms summed over collects (exact bucket counts and sum; min and max are not sent). The
    resource carries ``service.name`` and ``run``; points carry ``split``, ``token_class``, ``k``
    and ``tool`` attributes, with at most ``max_tools`` + 1 ``tool`` values (evicted tools' points
    gone). A background thread sends the whole state every ``export_interval_s``; ``force_flush``
    and ``close`` return within their timeouts, ``close`` also when run at interpreter exit.

    Args:
        run: Resource attribute ``run`` (one value per training run).
        service_name: Resource attribute ``service.name``.
        exporter: Any OpenTelemetry SDK ``MetricExporter`` to hand the data to (e.g. the gRPC
            ``OTLPMetricExporter`` or ``ConsoleMetricExporter``); default: an OTLP/HTTP
            ``OTLPMetricExporter``, which honours the ``OTEL_EXPORTER_OTLP_*`` variables.
        endpoint: Full OTLP/HTTP URL (``http://collector:4318/v1/metrics``) of the default exporter;
            overrides ``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT``/``OTEL_EXPORTER_OTLP_ENDPOINT``.
        export_interval_s: Seconds between periodic sends (default ``OTEL_METRIC_EXPORT_INTERVAL`` or 60 s).
        export_timeout_s: Timeout of one send (the default exporter's ``timeout``; default
            ``OTEL_EXPORTER_OTLP_TIMEOUT`` or 10 s).
        resource_attributes: Further resource attributes (``OTEL_RESOURCE_ATTRIBUTES`` also applies).
        report_interval_s: At most one warning per fault source per this many seconds.
        max_tools: At most this many ``tool`` attribute values plus ``_other``; ``attach()`` sets its own.
        close_timeout_s: The longest ``close()`` (and the exit hook) waits for the final send.
    """

    def __init__(
        self,
        *,
        run: str = "default",
        service_name: str = "agent-obs",
        exporter: MetricExporter | None = None,
        endpoint: str | None = None,
        export_interval_s: float | None = None,
        export_timeout_s: float | None = None,
        resource_attributes: Mapping[str, str] | None = None,
        report_interval_s: float = DEFAULT_REPORT_INTERVAL_S,
        max_tools: int = DEFAULT_MAX_TOOLS,
        close_timeout_s: float = DEFAULT_CLOSE_TIMEOUT_S,
    ) -> None:
        if exporter is not None and endpoint is not None:
            raise ValueError("pass either endpoint= (for the default OTLP/HTTP exporter) or exporter=, not both")
        self._reporter = FaultReporter("otel", interval_s=report_interval_s)
        self.resource = Resource.create({**(resource_attributes or {}), "service.name": service_name, "run": run})
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

            exporter = OTLPMetricExporter(endpoint=endpoint, timeout=export_timeout_s)
            self.target = _otlp_endpoint(endpoint)
        else:
            self.target = type(exporter).__name__
        self.exporter = exporter
        self.close_timeout_s = close_timeout_s
        self._export_timeout_s = DEFAULT_EXPORT_TIMEOUT_S if export_timeout_s is None else export_timeout_s
        self._state = SeriesState(max_tools)
        self._start_ns = time.time_ns()
        self._closed = False
        interval_s = _env_interval_s() if export_interval_s is None else export_interval_s
        if not interval_s > 0:
            raise ValueError(f"export_interval_s must be > 0 seconds, got {interval_s!r}; e.g. export_interval_s=60")
        self._sender = _Sender(self._send, self._shutdown, interval_s)
        atexit.register(_close_at_exit, weakref.ref(self))

    def set_max_tools(self, max_tools: int) -> None:
        """At most ``max_tools`` ``tool`` attribute values (plus the overflow ``_other``); ``attach`` sets it."""
        self._state.set_max_tools(max_tools)

    def export(self, metrics: Metrics, *, step: int, split: str) -> None:
        """Record one collect: gauges replaced for ``split``, counters and histogram buckets added (never raises)."""
        record_export(self._state, self._reporter, metrics, step, split)

    def force_flush(self, timeout_s: float = DEFAULT_FLUSH_TIMEOUT_S) -> bool:
        """Send the state now; returns within ``timeout_s``, True only if the exporter reported it delivered."""
        if self._closed:
            return False
        delivered = self._sender.send_and_wait(timeout_s)
        if not delivered:
            self._reporter.report("flush", f"force_flush delivered nothing to {self.target} within {timeout_s} s")
        return delivered

    def close(self, timeout_s: float | None = None) -> None:
        """Send the last state and shut the exporter down; returns within ``timeout_s`` (default ``close_timeout_s``).

        A final send still running then goes on in the daemon thread; its result is reported there.
        """
        if self._closed:
            return
        self._closed = True
        timeout_s = self.close_timeout_s if timeout_s is None else timeout_s
        if not self._sender.send_and_wait(timeout_s, last=True):
            self._reporter.report("close", f"the final export to {self.target} was not delivered within {timeout_s} s")

    def _send(self) -> bool:
        """Hand the whole state to the exporter (on the sender thread); True if delivered or nothing to send."""
        if self._state.empty():
            return True
        try:
            data = metrics_data(otel_metrics(self._state.snapshot(), self._start_ns, time.time_ns()), self.resource)
            result = self.exporter.export(data, timeout_millis=self._export_timeout_s * 1000)
        except Exception as error:
            self._reporter.report("otlp", f"export to {self.target} raised {type(error).__name__}: {error}")
            return False
        if result == MetricExportResult.SUCCESS:
            return True
        self._reporter.report(
            "otlp",
            f"export to {self.target} failed ({type(self.exporter).__name__} returned {result.name}; its own "
            "logger, opentelemetry.exporter.*, has the reason)",
        )
        return False

    def _shutdown(self) -> None:
        self._reporter.call("close", self.exporter.shutdown)


def _env_interval_s() -> float:
    """``OTEL_METRIC_EXPORT_INTERVAL`` (milliseconds) in seconds, or the SDK's default of 60 s."""
    raw = os.environ.get(OTEL_METRIC_EXPORT_INTERVAL, "").strip()
    try:
        return float(raw) / 1000 if raw and float(raw) > 0 else DEFAULT_EXPORT_INTERVAL_S
    except ValueError:
        return DEFAULT_EXPORT_INTERVAL_S


def _otlp_endpoint(endpoint: str | None) -> str:
    """The URL the default OTLP/HTTP exporter posts to, for messages (the SDK resolves it the same way)."""
    if endpoint:
        return endpoint
    if os.environ.get(OTEL_EXPORTER_OTLP_METRICS_ENDPOINT):
        return os.environ[OTEL_EXPORTER_OTLP_METRICS_ENDPOINT]
    return os.environ.get(OTEL_EXPORTER_OTLP_ENDPOINT, "http://localhost:4318").rstrip("/") + "/v1/metrics"


def _close_at_exit(ref: weakref.ref) -> None:
    exporter = ref()
    if exporter is not None:
        exporter.close()


def _attributes(fam: Family, labels: Sequence[str]) -> dict[str, str | int]:
    attrs: dict[str, str | int] = dict(zip(fam.labels, labels, strict=True))
    if "k" in attrs:
        attrs["k"] = int(attrs["k"])
    return attrs
