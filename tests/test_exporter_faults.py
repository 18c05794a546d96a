"""Fault matrix: every exporter against every fault it can meet; export() stays fast, waits stay bounded.

Faults (loopback only): nothing listening, a server that accepts and never answers, HTTP 500,
and a full disk (``/dev/full``). Bounds asserted are the ones README's exporter section states.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from exporter_cases import sample_metrics
from servers import OtlpReceiver, SilentServer, StatusServer, free_port

from agent_obs.exporters import JsonlExporter, OTelExporter, PrometheusExporter, StructlogExporter
from agent_obs.exporters.otel import DEFAULT_CLOSE_TIMEOUT_S

EXPORT_BOUND_S = 0.050
SLACK_S = 0.5  # the tolerance on every stated wait
METRICS = [sample_metrics(seed) for seed in range(6)]


@contextlib.contextmanager
def endpoint(fault: str) -> Iterator[str]:
    """Base URL of a loopback endpoint with ``fault``: down | silent | 500."""
    if fault == "down":
        yield f"http://127.0.0.1:{free_port()}"
    elif fault == "silent":
        with SilentServer() as server:
            yield server.url
    else:
        with StatusServer(500) as server:
            yield server.url


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - t0, result


def assert_exports_fast(exporter) -> None:
    """Each of several exports (the first one included) returns within EXPORT_BOUND_S."""
    times = [timed(exporter.export, m, step=i, split="train")[0] for i, m in enumerate(METRICS)]
    assert max(times) < EXPORT_BOUND_S, [f"{t * 1e3:.1f} ms" for t in times]


@pytest.mark.parametrize("fault", ["down", "silent", 500])
def test_pushgateway_fault_export_is_fast_and_close_waits_one_push_timeout(fault):
    push_timeout_s = 1.0
    with endpoint(fault) as url:
        exp = PrometheusExporter(port=None, push_gateway=url, push_timeout_s=push_timeout_s)
        assert_exports_fast(exp)
        time.sleep(0.3)  # a push is in flight (hung on the silent server) when close() starts
        elapsed, _ = timed(exp.close)
    assert elapsed <= push_timeout_s + SLACK_S, f"close() took {elapsed:.2f} s"
    assert exp._reporter.failures >= 1  # the failed pushes were reported, not raised


def test_pushgateway_close_with_a_server_stops_both_within_the_bound():
    with SilentServer() as server:
        exp = PrometheusExporter(port=0, push_gateway=server.url, push_timeout_s=1.0)
        exp.export(METRICS[0], step=1, split="train")
        time.sleep(0.2)  # a push is now in flight and hangs
        elapsed, _ = timed(exp.close)
    assert elapsed <= 1.0 + SLACK_S, f"close() took {elapsed:.2f} s"


@pytest.mark.parametrize("fault", ["down", "silent", 500])
def test_otlp_fault_export_is_fast_flush_and_close_honour_timeouts_and_report_failure(fault):
    with endpoint(fault) as url:
        exp = OTelExporter(endpoint=f"{url}/v1/metrics", export_interval_s=3600, export_timeout_s=30)
        assert_exports_fast(exp)
        elapsed, delivered = timed(exp.force_flush, timeout_s=1.0)
        assert delivered is False  # nothing reached a collector
        assert elapsed <= 1.0 + SLACK_S, f"force_flush(timeout_s=1) took {elapsed:.2f} s"
        elapsed, delivered = timed(exp.force_flush, timeout_s=0.3)  # the first flush may still be retrying
        assert delivered is False and elapsed <= 0.3 + SLACK_S, f"force_flush(timeout_s=0.3) took {elapsed:.2f} s"
        elapsed, _ = timed(exp.close, timeout_s=1.0)
    assert elapsed <= 1.0 + SLACK_S, f"close(timeout_s=1) took {elapsed:.2f} s"


def test_otlp_export_itself_never_connects_only_the_sender_thread_does():
    """``export()`` makes no network I/O on the training thread: with periodic sends off, a hung collector
    sees no connection until a flush asks the sender thread, and that flush is bounded anyway."""
    with SilentServer() as server:
        exp = OTelExporter(endpoint=f"{server.url}/v1/metrics", export_interval_s=3600)
        assert_exports_fast(exp)
        time.sleep(0.3)
        assert server.accepted == []
        elapsed, delivered = timed(exp.force_flush, timeout_s=0.5)
        assert delivered is False and elapsed <= 0.5 + SLACK_S
        assert len(server.accepted) >= 1  # the flush, from the sender thread
        exp.close(timeout_s=0.2)


def test_otlp_default_close_at_the_end_of_a_run_is_bounded_by_the_documented_number():
    with SilentServer() as server:
        exp = OTelExporter(endpoint=f"{server.url}/v1/metrics", export_interval_s=3600)
        exp.export(METRICS[0], step=1, split="train")
        elapsed, _ = timed(exp.close)
    assert elapsed <= DEFAULT_CLOSE_TIMEOUT_S + SLACK_S, f"close() took {elapsed:.2f} s"


def test_a_process_that_never_closes_its_otel_exporter_exits_within_the_close_bound():
    """The exit hook closes with ``close_timeout_s``: a hung collector does not hold the end of a run.

    Timed from the script's end to the last exit handler (registered first, so it runs last),
    leaving out the interpreter's own teardown.
    """
    script = (
        "import atexit, sys, time\n"
        "atexit.register(lambda: print(time.monotonic(), flush=True))\n"
        "from exporter_cases import sample_metrics\n"
        "from agent_obs.exporters import OTelExporter\n"
        "exp = OTelExporter(endpoint=sys.argv[1], export_interval_s=3600, close_timeout_s=1.0)\n"
        "exp.export(sample_metrics(0), step=1, split='train')\n"
        "print(time.monotonic(), flush=True)\n"
    )
    with SilentServer() as server:
        proc = subprocess.run(
            [sys.executable, "-c", script, f"{server.url}/v1/metrics"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "AGENT_OBS_COMPILE": "0"},
        )
    assert proc.returncode == 0, proc.stderr
    ended, exited = (float(t) for t in proc.stdout.split())
    assert exited - ended <= 1.0 + SLACK_S, f"the exit handlers took {exited - ended:.2f} s"


def test_otlp_force_flush_reports_success_only_when_delivered():
    with OtlpReceiver() as receiver:
        exp = OTelExporter(endpoint=receiver.endpoint, export_interval_s=3600)
        exp.export(METRICS[0], step=1, split="train")
        assert exp.force_flush(timeout_s=5.0) is True
        assert receiver.points("agent_obs.entropy")
        receiver.status = 500
        assert exp.force_flush(timeout_s=2.0) is False
        exp.close(timeout_s=1.0)


def test_full_disk_file_exporters_export_fast_and_close_at_once():
    full = open("/dev/full", "w")  # noqa: SIM115 - a text stream for structlog's PrintLogger
    try:
        for exp in (JsonlExporter("/dev/full"), StructlogExporter(file=full)):
            assert_exports_fast(exp)
            elapsed, _ = timed(exp.close)
            assert elapsed < SLACK_S
            assert exp._reporter.failures >= len(METRICS)  # every failed write counted, none raised
    finally:
        with contextlib.suppress(OSError):  # its buffer still holds what the full disk refused
            full.close()
