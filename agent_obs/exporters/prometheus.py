"""``PrometheusExporter``: serves the metrics on ``/metrics`` (own registry) and can push to a Pushgateway.

``export()`` only updates in-memory state under a lock (microseconds); scrapes run on the
HTTP server's daemon thread and pushes on a background thread, so neither can block
``collect()`` beyond that lock (held for a dict copy during a scrape).
"""

from __future__ import annotations

import errno
import math
import threading
import time
from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, push_to_gateway, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from agent_obs.exporters.base import FaultReporter
from agent_obs.exporters.families import (
    ALL_FAMILIES,
    HISTOGRAM_FAMILY,
    LAST_COLLECT_FAMILY,
    STEP_FAMILY,
    Family,
    metric_samples,
)

DEFAULT_PORT = 9464
_Key = tuple[Family, tuple[str, ...]]


class PortInUseError(OSError):
    """The exporter's port is taken by another process (or another exporter)."""


class _State:
    """Latest gauges per split, cumulative counters and histogram buckets; thread-safe."""

    def __init__(self, run: str) -> None:
        self.run = run
        self.lock = threading.Lock()
        self.gauges: dict[str, dict[_Key, float]] = {}  # split -> latest collect's gauges
        self.counters: dict[tuple[str, _Key], float] = {}
        self.hists: dict[tuple[str, str], tuple[list[float], float]] = {}  # (split, class) -> (counts, sum)
        self.edges: tuple[float, ...] = ()

    def update(self, metrics: Mapping[str, float], step: int, split: str, now: float) -> list[str]:
        samples, unknown = metric_samples(metrics)
        gauges: dict[_Key, float] = {(STEP_FAMILY, ()): float(step), (LAST_COLLECT_FAMILY, ()): now}
        histograms = getattr(metrics, "histograms", None) or {}
        with self.lock:
            for fam, labels, value in samples:
                if fam.kind == "counter":
                    key = (split, (fam, labels))
                    self.counters[key] = self.counters.get(key, 0.0) + value
                else:
                    gauges[(fam, labels)] = value
            self.gauges[split] = gauges
            for cls, hist in histograms.items():
                counts, total = self.hists.get((split, cls), ([0.0] * len(hist.counts), 0.0))
                if len(counts) != len(hist.counts) or (self.edges and self.edges != tuple(hist.edges)):
                    raise ValueError(f"histogram edges changed for split={split!r} class={cls!r}")
                self.edges = tuple(hist.edges)
                self.hists[(split, cls)] = (
                    [a + b for a, b in zip(counts, hist.counts, strict=True)],
                    total + hist.total,
                )
        return unknown

    def families(self) -> Iterator[Metric]:
        with self.lock:
            gauges = {split: dict(g) for split, g in self.gauges.items()}
            counters = dict(self.counters)
            hists = {key: (list(c), s) for key, (c, s) in self.hists.items()}
            edges = self.edges
        out: dict[str, Metric] = {}

        def family(fam: Family) -> Metric:
            if fam.name not in out:
                cls = GaugeMetricFamily if fam.kind == "gauge" else CounterMetricFamily
                out[fam.name] = cls(fam.name, fam.help, labels=["run", "split", *fam.labels])
            return out[fam.name]

        for split, values in gauges.items():
            for (fam, labels), value in values.items():
                family(fam).add_metric([self.run, split, *labels], value)
        for (split, (fam, labels)), value in counters.items():
            family(fam).add_metric([self.run, split, *labels], value)
        if hists:
            fam = HISTOGRAM_FAMILY
            hist = HistogramMetricFamily(fam.name, fam.help, labels=["run", "split", *fam.labels])
            for (split, cls), (counts, total) in sorted(hists.items()):
                cumulative, buckets = 0.0, []
                for edge, count in zip([*edges, math.inf], counts, strict=True):
                    cumulative += count
                    buckets.append(("+Inf" if math.isinf(edge) else repr(float(edge)), cumulative))
                hist.add_metric([self.run, split, cls], buckets, total)
            out[fam.name] = hist
        order = {f.name: i for i, f in enumerate(ALL_FAMILIES)}
        yield from sorted(out.values(), key=lambda m: order.get(m.name, len(order)))


class _Collector:
    """A prometheus_client custom collector over ``_State``."""

    def __init__(self, state: _State) -> None:
        self.state = state

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        return self.state.families()


class PrometheusExporter:
    """Exposes every collected metric as ``agent_obs_*`` families on ``http://host:port/metrics``.

    ``port=0`` picks a free port (see ``.port``); ``port=None`` serves nothing (push only).
    ``push_gateway="http://host:9091"`` also pushes after each export, from a background
    thread (latest state wins, so the queue is bounded at one push). A port already in use
    raises ``PortInUseError`` at construction, or with ``on_bind_error="warn"`` is reported
    once and the exporter keeps working for the Pushgateway.
    """

    def __init__(
        self,
        *,
        port: int | None = DEFAULT_PORT,
        host: str = "127.0.0.1",
        run: str = "default",
        push_gateway: str | None = None,
        job: str = "agent_obs",
        push_timeout_s: float = 5.0,
        on_bind_error: str = "raise",
        report_interval_s: float = 300.0,
    ) -> None:
        if on_bind_error not in ("raise", "warn"):
            raise ValueError(f"on_bind_error must be 'raise' or 'warn', got {on_bind_error!r}")
        self.run = run
        self.registry = CollectorRegistry(auto_describe=False)
        self._state = _State(run)
        self.registry.register(_Collector(self._state))
        self._reporter = FaultReporter("prometheus", interval_s=report_interval_s)
        self._server = None
        self.host = host
        self.port: int | None = None
        if port is not None:
            self._start_server(host, port, on_bind_error)
        self.push_gateway = push_gateway
        self._job = job
        self._push_timeout_s = push_timeout_s
        self._push_wanted = threading.Event()
        self._closing = False
        self._pusher: threading.Thread | None = None
        if push_gateway:
            self._pusher = threading.Thread(target=self._push_loop, name="agent-obs-pushgateway", daemon=True)
            self._pusher.start()

    def _start_server(self, host: str, port: int, on_bind_error: str) -> None:
        try:
            self._server, _ = start_http_server(port, addr=host, registry=self.registry)
            self.port = self._server.server_port
        except OSError as error:
            if error.errno != errno.EADDRINUSE:
                raise
            message = (
                f"port {port} on {host} is already in use (another exporter or process): pass "
                f"PrometheusExporter(port=...) another port, or port=0 to pick a free one (see .port)"
            )
            if on_bind_error == "raise":
                raise PortInUseError(errno.EADDRINUSE, message) from error
            self._reporter.report("bind", message)

    @property
    def url(self) -> str | None:
        """The scrape URL, or None when not serving."""
        return None if self.port is None else f"http://{self.host}:{self.port}/metrics"

    def export(self, metrics: Mapping[str, float], *, step: int, split: str) -> None:
        """Record one collect: gauges replaced for ``split``, counters and histogram buckets added."""
        unknown = self._reporter.call("export", self._state.update, metrics, step, split, time.time())
        if unknown:
            self._reporter.report("export", f"keys outside the metric grammar ignored: {sorted(unknown)[:5]}")
        if self._pusher is not None:
            self._push_wanted.set()

    def _push(self) -> None:
        push_to_gateway(
            self.push_gateway,
            job=self._job,
            registry=self.registry,
            grouping_key={"run": self.run},
            timeout=self._push_timeout_s,
        )

    def _push_loop(self) -> None:
        while True:
            self._push_wanted.wait()
            if self._closing:
                return
            self._push_wanted.clear()
            self._reporter.call("push", self._push)

    def close(self) -> None:
        """Push the final state (bounded by ``push_timeout_s``) and stop the server."""
        if self._pusher is not None and not self._closing:
            self._closing = True
            self._push_wanted.set()
            self._pusher.join(timeout=self._push_timeout_s)
            self._reporter.call("push", self._push)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
