"""How long each exporter can hold up ``collect()``: ``export()`` latency, healthy and under faults.

For each exporter, time ``export()`` on a realistic collect (3 classes + 16 tools, 4 top-k
values, histograms) while the backend is healthy, slow (an OTLP collector that takes 2 s
per request), refusing (HTTP 500), down, or scraped in a tight loop; print median / p99 /
max in microseconds and the ratio of the median to a ``collect()`` of a tiny observed model
measured in the same run. Run: ``python bench/exporters.py [--calls 2000]``.
"""

from __future__ import annotations

import argparse
import io
import logging
import socket
import statistics
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

import agent_obs
from agent_obs.accumulator import StatsAccumulator
from agent_obs.exporters import JsonlExporter, OTelExporter, PrometheusExporter, StructlogExporter


def realistic_metrics(tools: int = 16):
    g = torch.Generator().manual_seed(0)
    n, vocab = 4096, 512
    acc = StatsAccumulator((1, 2, 5, 10), num_tool_slots=tools)
    classes = torch.randint(1, 4, (n,), generator=g)
    acc.update(
        torch.randn(n, vocab, generator=g),
        torch.randint(0, vocab, (n,), generator=g),
        classes,
        torch.randint(0, tools, (n,), generator=g),
    )
    return acc.metrics(tool_names={i: f"tool{i}" for i in range(tools)})


def http_server(status: int, delay_s: float) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            time.sleep(delay_s)
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hung_port() -> tuple[socket.socket, int]:
    """A port whose connections complete (kernel backlog) and are never answered: a hung backend."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock, sock.getsockname()[1]


def time_exports(exporter, metrics, calls: int) -> list[float]:
    out = []
    for step in range(calls):
        t0 = time.perf_counter()
        exporter.export(metrics, step=step, split="train")
        out.append(time.perf_counter() - t0)
    return out


def collect_time(calls: int) -> float:
    """Median seconds of ``collect()`` (no exporters) after one observed forward of a tiny LM."""
    model = torch.nn.Sequential(torch.nn.Embedding(512, 64), torch.nn.Linear(64, 512))
    obs = agent_obs.attach(model, layer="1")
    tokens = torch.randint(0, 512, (4, 128))
    times = []
    for _ in range(min(calls, 200)):
        with torch.no_grad(), obs.observe(labels=tokens, token_classes=torch.ones_like(tokens)):
            model(tokens)
        t0 = time.perf_counter()
        obs.collect("train")
        times.append(time.perf_counter() - t0)
    obs.detach()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    logging.getLogger("agent_obs.exporters").setLevel(logging.ERROR)  # the faults are on purpose
    logging.getLogger("opentelemetry").setLevel(logging.CRITICAL)  # so are the OTel SDK's own failure records
    metrics = realistic_metrics()
    base = collect_time(args.calls)
    tmp = Path(tempfile.mkdtemp())
    slow, refusing = http_server(200, 2.0), http_server(500, 0.0)
    hung, hung_port_ = hung_port()

    prom = PrometheusExporter(port=0)
    stop = threading.Event()

    def scraper() -> None:
        while not stop.is_set():
            urllib.request.urlopen(prom.url).read()

    scrape_thread = threading.Thread(target=scraper, daemon=True)
    scrape_thread.start()
    cases = [
        ("prometheus, scraped in a tight loop", prom),
        (
            "prometheus + unreachable pushgateway",
            PrometheusExporter(port=None, push_gateway=f"http://127.0.0.1:{free_port()}"),
        ),
        (
            "prometheus + hung pushgateway",
            PrometheusExporter(port=None, push_gateway=f"http://127.0.0.1:{hung_port_}", push_timeout_s=2.0),
        ),
        (
            "otel, collector hung (never answers)",
            OTelExporter(endpoint=f"http://127.0.0.1:{hung_port_}/v1/metrics", export_interval_s=0.05),
        ),
        (
            "otel, collector slow (2 s/request)",
            OTelExporter(endpoint=f"http://127.0.0.1:{slow.server_port}/v1/metrics", export_interval_s=0.05),
        ),
        (
            "otel, collector refusing (500)",
            OTelExporter(endpoint=f"http://127.0.0.1:{refusing.server_port}/v1/metrics", export_interval_s=0.05),
        ),
        (
            "otel, collector down",
            OTelExporter(endpoint=f"http://127.0.0.1:{free_port()}/v1/metrics", export_interval_s=0.05),
        ),
        ("jsonl (local disk)", JsonlExporter(tmp / "m.jsonl", histograms=True)),
        ("jsonl, disk full (/dev/full)", JsonlExporter("/dev/full")),
        ("structlog (kv to a StringIO)", StructlogExporter(file=io.StringIO())),
    ]
    print(f"collect() of a tiny observed model (no exporters): median {base * 1e6:.0f} us")
    print(
        f"{len(metrics)} metric keys per collect; {args.calls} export() calls per case; torch threads "
        f"{torch.get_num_threads()}"
    )
    print(f"{'case':45s} {'median us':>10s} {'p99 us':>10s} {'max us':>10s} {'median/collect':>15s}")
    for name, exporter in cases:
        times = sorted(time_exports(exporter, metrics, args.calls))
        med, p99, worst = statistics.median(times), times[int(0.99 * len(times))], times[-1]
        print(f"{name:45s} {med * 1e6:10.0f} {p99 * 1e6:10.0f} {worst * 1e6:10.0f} {med / base:15.2f}")
    stop.set()
    scrape_thread.join()
    for name, exporter in cases:
        if isinstance(exporter, OTelExporter):
            t0 = time.perf_counter()
            ok = exporter.force_flush(timeout_s=1.0)
            print(f"force_flush(1 s) {name:40s} {time.perf_counter() - t0:6.2f} s delivered={ok}")
    for name, exporter in cases:
        t0 = time.perf_counter()
        exporter.close(*(() if not isinstance(exporter, OTelExporter) else (2.0,)))  # bound: 2 s or push_timeout_s
        print(f"close {name:45s} {time.perf_counter() - t0:6.2f} s")
    hung.close()
    slow.shutdown()
    refusing.shutdown()


if __name__ == "__main__":
    main()
