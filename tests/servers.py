"""Real servers on loopback for tests: Debian's Prometheus and Pushgateway, and an OTLP/HTTP receiver.

Usage (from a test module in tests/)::

    from servers import OtlpReceiver, prometheus_server, require_binary

    require_binary("prometheus")                     # skip locally, fail in CI (env CI set)
    with prometheus_server(["127.0.0.1:9464"]) as prom:
        series = prom.wait_for("agent_obs_step", timeout=30)
        value = prom.value('agent_obs_entropy_nats{split="train",token_class="all"}')

    with OtlpReceiver() as receiver:                # exporter endpoint: receiver.endpoint
        points = receiver.wait_for_points("agent_obs.entropy", timeout=10)
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def require_binary(name: str) -> str:
    """Path of an executable; skip when absent and env CI is unset, fail when CI is set."""
    path = shutil.which(name)
    if path is None:
        msg = f"{name} not found: install it with `apt-get install -y --no-install-recommends {name}` (make test does)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def http_get(url: str, *, timeout: float = 5.0) -> bytes:
    """GET a URL and return the body (raises on HTTP errors)."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read()


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            http_get(url, timeout=1.0)
            return
        except (OSError, urllib.error.URLError):
            time.sleep(0.05)
    raise TimeoutError(f"{url} not ready after {timeout} s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- Prometheus


@dataclass
class PrometheusServer:
    """A running Prometheus: its base URL, work directory and query helpers."""

    url: str
    port: int
    workdir: Path
    process: subprocess.Popen

    def api(self, path: str, **params: str | float) -> object:
        """GET ``/api/v1/{path}`` with query parameters; returns ``data`` (raises on status != success)."""
        query = urllib.parse.urlencode({k: str(v) for k, v in params.items()})
        body = json.loads(http_get(f"{self.url}/api/v1/{path}?{query}"))
        if body.get("status") != "success":
            raise RuntimeError(f"Prometheus API {path} {params}: {body}")
        return body["data"]

    def query(self, promql: str, *, at: float | None = None) -> list[dict]:
        """Instant query: the result vector, each ``{"metric": labels, "value": [t, "v"]}``."""
        params: dict[str, str | float] = {"query": promql}
        if at is not None:
            params["time"] = at
        data = self.api("query", **params)
        return data["result"] if data["resultType"] == "vector" else [{"metric": {}, "value": data["result"]}]

    def query_range(self, promql: str, *, start: float, end: float, step: float = 1.0) -> list[dict]:
        """Range query: the result matrix, each ``{"metric": labels, "values": [[t, "v"], ...]}``."""
        return self.api("query_range", query=promql, start=start, end=end, step=step)["result"]

    def wait_for(self, promql: str, *, timeout: float = 30.0, until: Callable[[list[dict]], bool] = bool) -> list[dict]:
        """Poll an instant query until ``until(result)`` holds (default: non-empty); TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        result: list[dict] = []
        while time.monotonic() < deadline:
            result = self.query(promql)
            if until(result):
                return result
            time.sleep(0.25)
        raise TimeoutError(f"{promql!r} after {timeout} s: {result}; targets: {self.targets()}")

    def value(self, promql: str) -> float:
        """The single value of an instant query (error unless exactly one series)."""
        result = self.query(promql)
        if len(result) != 1:
            raise AssertionError(f"{promql!r} returned {len(result)} series: {result}")
        return float(result[0]["value"][1])

    def targets(self) -> list[dict]:
        """The active scrape targets with health and last error."""
        return self.api("targets")["activeTargets"]

    def alerts(self) -> list[dict]:
        """The alerts currently pending or firing."""
        return self.api("alerts")["alerts"]

    def stop(self) -> None:
        _stop(self.process)


def start_prometheus(
    targets: Sequence[str],
    *,
    scrape_interval: str = "1s",
    evaluation_interval: str = "1s",
    rule_files: Sequence[str | Path] = (),
    job: str = "agent_obs",
    workdir: Path | None = None,
    ready_timeout: float = 30.0,
) -> PrometheusServer:
    """Start ``prometheus`` on a free loopback port scraping ``targets`` (host:port) with a temp TSDB."""
    binary = require_binary("prometheus")
    workdir = Path(workdir or tempfile.mkdtemp(prefix="prom-"))
    port = free_port()
    rules = "".join(f"\n  - {json.dumps(str(Path(r).resolve()))}" for r in rule_files)
    config = workdir / "prometheus.yml"
    config.write_text(
        f"global:\n  scrape_interval: {scrape_interval}\n  evaluation_interval: {evaluation_interval}\n"
        + (f"rule_files:{rules}\n" if rules else "")
        + f"scrape_configs:\n  - job_name: {json.dumps(job)}\n    static_configs:\n"
        + f"      - targets: {json.dumps(list(targets))}\n"
    )
    log = workdir / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address={LOOPBACK}:{port}",
                "--web.enable-lifecycle",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://{LOOPBACK}:{port}"
    try:
        _wait_ready(f"{url}/-/ready", proc, ready_timeout, log)
    except BaseException:
        _stop(proc)
        raise
    return PrometheusServer(url, port, workdir, proc)


@contextmanager
def prometheus_server(targets: Sequence[str], **kwargs) -> Iterator[PrometheusServer]:
    """``start_prometheus`` as a context manager that stops it and removes its temp directory."""
    workdir = Path(tempfile.mkdtemp(prefix="prom-"))
    server = start_prometheus(targets, workdir=workdir, **kwargs)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def promtool_check_metrics(text: str) -> subprocess.CompletedProcess:
    """Run ``promtool check metrics`` on exposition text (stdin); returns the finished process."""
    binary = require_binary("promtool")
    return subprocess.run([binary, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)


# --------------------------------------------------------------------------- Pushgateway


@dataclass
class Pushgateway:
    """A running Prometheus Pushgateway."""

    url: str
    process: subprocess.Popen

    def metrics_text(self) -> str:
        """The gateway's ``/metrics`` exposition (pushed groups included)."""
        return http_get(f"{self.url}/metrics").decode()


@contextmanager
def pushgateway_server(ready_timeout: float = 30.0) -> Iterator[Pushgateway]:
    """Debian's ``prometheus-pushgateway`` on a free loopback port (skip/fail like ``require_binary``)."""
    binary = require_binary("prometheus-pushgateway")
    workdir = Path(tempfile.mkdtemp(prefix="pushgw-"))
    port = free_port()
    log = workdir / "pushgateway.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [binary, f"--web.listen-address={LOOPBACK}:{port}"], stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://{LOOPBACK}:{port}"
    try:
        _wait_ready(f"{url}/-/ready", proc, ready_timeout, log)
        yield Pushgateway(url, proc)
    finally:
        _stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)


# --------------------------------------------------------------------------- OTLP/HTTP receiver


@dataclass
class OtlpPoint:
    """One received data point, flattened: metric name, kind, attributes, value or histogram."""

    name: str
    kind: str  # gauge | sum | histogram
    unit: str
    attributes: dict[str, object]
    resource: dict[str, object]
    value: float | None = None
    count: int | None = None
    sum: float | None = None
    bucket_counts: list[int] = field(default_factory=list)
    explicit_bounds: list[float] = field(default_factory=list)
    is_monotonic: bool | None = None
    time_unix_nano: int = 0


def _any_value(v) -> object:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def _attrs(kvs) -> dict[str, object]:
    return {kv.key: _any_value(kv.value) for kv in kvs}


def flatten_request(request) -> list[OtlpPoint]:
    """All data points of an ``ExportMetricsServiceRequest``, one ``OtlpPoint`` each."""
    points = []
    for rm in request.resource_metrics:
        resource = _attrs(rm.resource.attributes)
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                kind = m.WhichOneof("data")
                data = getattr(m, kind)
                for dp in data.data_points:
                    p = OtlpPoint(m.name, kind, m.unit, _attrs(dp.attributes), resource)
                    p.time_unix_nano = dp.time_unix_nano
                    if kind in ("gauge", "sum"):
                        p.value = dp.as_double if dp.WhichOneof("value") == "as_double" else float(dp.as_int)
                        p.is_monotonic = data.is_monotonic if kind == "sum" else None
                    elif kind == "histogram":
                        p.count, p.sum = dp.count, dp.sum
                        p.bucket_counts, p.explicit_bounds = list(dp.bucket_counts), list(dp.explicit_bounds)
                    points.append(p)
    return points


class OtlpReceiver:
    """An OTLP/HTTP metrics receiver on 127.0.0.1: decodes each POSTed ExportMetricsServiceRequest.

    Set ``status`` (e.g. 500 or 404) to make it refuse requests; refused requests are still
    counted in ``attempts``. ``endpoint`` is the full ``/v1/metrics`` URL.
    """

    def __init__(self, status: int = 200) -> None:
        from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
            ExportMetricsServiceRequest,
            ExportMetricsServiceResponse,
        )

        self.status = status
        self.requests: list = []  # accepted ExportMetricsServiceRequest messages
        self.attempts = 0
        self._cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                encoding = self.headers.get("Content-Encoding", "")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                with receiver._cond:
                    receiver.attempts += 1
                    status = receiver.status
                    if status == 200 and self.path.rstrip("/").endswith("/v1/metrics"):
                        request = ExportMetricsServiceRequest()
                        request.ParseFromString(body)
                        receiver.requests.append(request)
                    elif status == 200:
                        status = 404
                    receiver._cond.notify_all()
                payload = ExportMetricsServiceResponse().SerializeToString() if status == 200 else b"refused"
                self.send_response(status)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.endpoint = f"http://{LOOPBACK}:{self.port}/v1/metrics"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def points(self, name: str | None = None) -> list[OtlpPoint]:
        """Flattened points of every accepted request (optionally of one metric name), oldest first."""
        with self._cond:
            requests = list(self.requests)
        return [p for r in requests for p in flatten_request(r) if name is None or p.name == name]

    def wait_for_attempts(self, n: int, timeout: float = 10.0) -> int:
        """Block until at least ``n`` POSTs arrived (accepted or refused); returns the count."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.attempts >= n, timeout):
                raise TimeoutError(f"{self.attempts} OTLP requests after {timeout} s, expected >= {n}")
            return self.attempts

    def wait_for_points(
        self, name: str, timeout: float = 10.0, until: Callable[[list[OtlpPoint]], bool] = bool
    ) -> list[OtlpPoint]:
        """Poll until ``until(points(name))`` holds; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.points(name)
            if until(found):
                return found
            with self._cond:
                self._cond.wait(0.1)
        raise TimeoutError(f"no matching OTLP points for {name!r} after {timeout} s ({self.attempts} requests)")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> OtlpReceiver:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- faulty endpoints


class SilentServer:
    """Accepts TCP connections on 127.0.0.1 and never answers (a hung collector or gateway)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind((LOOPBACK, 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            self.accepted.append(conn)  # held open, never read from nor written to

    def close(self) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()

    def __enter__(self) -> SilentServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class StatusServer:
    """Answers every GET/PUT/POST/DELETE on 127.0.0.1 with ``status`` (e.g. 500), counting requests."""

    def __init__(self, status: int = 500) -> None:
        self.requests = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                server.requests += 1
                self.send_response(status)
                self.send_header("Content-Length", "7")
                self.end_headers()
                self.wfile.write(b"refused")

            do_GET = do_PUT = do_POST = do_DELETE = _answer

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://{LOOPBACK}:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> StatusServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
