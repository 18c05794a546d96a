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
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, push_to_gateway, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from agent_obs.accumulator import Metrics
from agent_obs.exporters.base import DEFAULT_REPORT_INTERVAL_S, FaultReporter
from agent_obs.exporters.families import ALL_FAMILIES, HISTOGRAM_FAMILY, Family
from agent_obs.exporters.state import DEFAULT_MAX_TOOLS, SeriesState, Snapshot, record_export

DEFAULT_PORT = 9464
SHUTDOWN_S = 0.5  # the HTTP server's serve_forever poll interval: stopping it waits at most this long


class PortInUseError(OSError):
    """The exporter's port is taken by another process (or another exporter)."""


def prometheus_families(run: str, snap: Snapshot) -> Iterator[Metric]:
    """The state as prometheus_client metric families, in ``ALL_FAMILIES`` order."""
    out: dict[str, Metric] = {}

    def family(fam: Family) -> Metric:
        if fam.name not in out:
            cls = GaugeMetricFamily if fam.kind == "gauge" else CounterMetricFamily
            out[fam.name] = cls(fam.name, fam.help, labels=["run", "split", *fam.labels])
        return out[fam.name]

    for split, values in snap.gauges.items():
        for (fam, labels), value in values.items():
            family(fam).add_metric([run, split, *labels], value)
    for (split, (fam, labels)), value in snap.counters.items():
        family(fam).add_metric([run, split, *labels], value)
    if snap.hists:
        fam = HISTOGRAM_FAMILY
        hist = HistogramMetricFamily(fam.name, fam.help, labels=["run", "split", *fam.labels])
        for (split, cls), h in sorted(snap.hists.items()):
            buckets = [("+Inf" if math.isinf(edge) else repr(edge), count) for edge, count in h.cumulative()]
            hist.add_metric([run, split, cls], buckets, h.total)
        out[fam.name] = hist
    order = {f.name: i for i, f in enumerate(ALL_FAMILIES)}
    yield from sorted(out.values(), key=lambda m: order.get(m.name, len(order)))


class _Collector:
    """A prometheus_client custom collector over a ``SeriesState``."""

    def __init__(self, run: str, state: SeriesState) -> None:
        self.run = run
        self.state = state

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        return prometheus_families(self.run, self.state.snapshot())


class PrometheusExporter:
    """Exposes every collected metric as ``agent_obs_*`` families on ``http://host:port/metrics``.

    Pushes to a Pushgateway run on a background thread (latest state wins, so the queue is
    bounded at one push); ``close()`` returns within ``max(push_timeout_s, 0.5 s)``.

    Args:
        port: Port to serve ``/metrics`` on; ``0`` picks a free one (see ``.port``), ``None`` serves nothing.
        host: Address to bind; the default serves loopback only, ``"0.0.0.0"`` every interface.
        run: Value of the ``run`` label on every series (and the Pushgateway grouping key).
        push_gateway: Pushgateway base URL (``"http://host:9091"``); each export then also pushes.
        job: Pushgateway job name.
        push_timeout_s: Timeout of one push, and the bound on the final push in ``close()``.
        on_bind_error: A port already in use raises ``PortInUseError`` (``"raise"``), or is reported
            once and the exporter keeps working for the Pushgateway (``"warn"``).
        report_interval_s: At most one warning per fault source per this many seconds.
        max_tools: At most this many ``tool`` label values plus ``_other``; ``attach()`` sets its own.
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
        report_interval_s: float = DEFAULT_REPORT_INTERVAL_S,
        max_tools: int = DEFAULT_MAX_TOOLS,
    ) -> None:
        if on_bind_error not in ("raise", "warn"):
            raise ValueError(f"on_bind_error must be 'raise' or 'warn', got {on_bind_error!r}")
        self.run = run
        self.registry = CollectorRegistry(auto_describe=False)
        self._state = SeriesState(max_tools)
        self.registry.register(_Collector(run, self._state))
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

    def set_max_tools(self, max_tools: int) -> None:
        """At most ``max_tools`` tool label values (plus the overflow ``_other``); ``attach`` sets it."""
        self._state.set_max_tools(max_tools)

    def export(self, metrics: Metrics, *, step: int, split: str) -> None:
        """Record one collect: gauges replaced for ``split``, counters and histogram buckets added."""
        record_export(self._state, self._reporter, metrics, step, split)
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
        """Push the latest state whenever asked; after ``close()`` asked, push once more and stop."""
        while True:
            self._push_wanted.wait()
            self._push_wanted.clear()
            closing = self._closing
            self._reporter.call("push", self._push)
            if closing:
                return

    def close(self) -> None:
        """Push the final state and stop the server, within ``max(push_timeout_s, SHUTDOWN_S)``.

        The final push runs on the pusher thread while the server stops; if it is not done by
        ``push_timeout_s`` (a push already in flight, a gateway that does not answer), ``close``
        reports it and returns; the Pushgateway may then hold an earlier state.
        """
        deadline = time.monotonic() + self._push_timeout_s
        pusher, self._pusher = self._pusher, None
        if pusher is not None:
            self._closing = True
            self._push_wanted.set()
        if self._server is not None:
            self._server.shutdown()  # returns within serve_forever's poll interval (SHUTDOWN_S)
            self._server.server_close()
            self._server = None
        if pusher is not None:
            pusher.join(timeout=max(0.0, deadline - time.monotonic()))
            if pusher.is_alive():
                self._reporter.report(
                    "close",
                    f"final push to {self.push_gateway} not done within push_timeout_s={self._push_timeout_s} s; "
                    "the Pushgateway may show an earlier state",
                )
