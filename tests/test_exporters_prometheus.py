"""PrometheusExporter: contract names/labels/values on a real /metrics scrape, promtool, ports, Pushgateway."""

from __future__ import annotations

import logging
import socket
import threading
import time
import urllib.request

import pytest
from exporter_cases import Record, expected_series, le_label, sample_metrics
from prometheus_client.parser import text_string_to_metric_families
from servers import promtool_check_metrics, pushgateway_server

from agent_obs.exporters import PortInUseError, PrometheusExporter


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read().decode()


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    """Exposition text -> {(sample name, labels): value}."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = {**s.labels, "le": le_label(s.labels["le"])} if "le" in s.labels else s.labels
            ident = (s.name, frozenset(labels.items()))
            assert ident not in out, f"duplicate series {ident}"
            out[ident] = s.value
    return out


@pytest.fixture
def exporter():
    exp = PrometheusExporter(port=0, run="unit")
    yield exp
    exp.close()


def feed(exp, records):
    for r in records:
        exp.export(r.metrics, step=r.step, split=r.split)


def test_scrape_exposes_every_metric_with_contract_names_labels_and_values(exporter):
    records = [
        Record("train", 10, sample_metrics(1)),
        Record("train", 20, sample_metrics(2)),
        Record("val", 20, sample_metrics(3, tools=("bash",))),
    ]
    t0 = time.time()
    feed(exporter, records)
    t1 = time.time()
    got = parse(scrape(exporter.url))
    stamps = {k: v for k, v in got.items() if k[0] == "agent_obs_last_collect_timestamp_seconds"}
    assert {dict(k[1])["split"] for k in stamps} == {"train", "val"}
    assert all(t0 <= v <= t1 for v in stamps.values())
    rest = {k: v for k, v in got.items() if k not in stamps}
    want = expected_series(records, "unit")
    assert set(rest) == set(want)
    for ident, value in want.items():
        assert rest[ident] == pytest.approx(value, rel=1e-12, abs=0), ident


def test_gauges_are_the_latest_collect_of_their_split_counters_and_buckets_accumulate(exporter):
    with_tools, without_tools = sample_metrics(4), sample_metrics(5, tools=())
    assert not any("." in key for key in without_tools)
    feed(exporter, [Record("train", 1, with_tools), Record("val", 1, with_tools), Record("train", 2, without_tools)])
    got = parse(scrape(exporter.url))
    tool_gauges = {dict(k[1])["split"] for k in got if k[0] == "agent_obs_tool_entropy_nats"}
    assert tool_gauges == {"val"}  # train's latest collect had no tool keys: its tool gauges are gone
    tokens = got[("agent_obs_tokens_total", frozenset({"run": "unit", "split": "train", "token_class": "all"}.items()))]
    assert tokens == with_tools["tokens"] + without_tools["tokens"]
    inf_bucket = ("agent_obs_token_entropy_nats_bucket", {"run": "unit", "split": "train", "token_class": "all"})
    key = (inf_bucket[0], frozenset({**inf_bucket[1], "le": "+Inf"}.items()))
    assert got[key] == sum(with_tools.histograms["all"].counts) + sum(without_tools.histograms["all"].counts)


def test_promtool_check_metrics_reports_nothing(exporter):
    feed(exporter, [Record("train", 1, sample_metrics(6)), Record("val", 1, sample_metrics(7))])
    result = promtool_check_metrics(scrape(exporter.url))
    assert result.returncode == 0 and result.stdout == "" and result.stderr == "", result


def test_binds_loopback_and_reports_the_port_it_picked(exporter):
    host, port = exporter._server.server_address[:2]
    assert host == "127.0.0.1" and port == exporter.port > 0
    assert exporter.url == f"http://127.0.0.1:{exporter.port}/metrics"


def test_port_in_use_is_a_clear_error_naming_the_port_and_the_option():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PortInUseError) as info:
            PrometheusExporter(port=port)
    message = str(info.value)
    assert str(port) in message and "port=" in message and "port=0" in message


def test_port_in_use_with_warn_is_reported_once_and_exports_keep_working(caplog):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with caplog.at_level(logging.WARNING, logger="agent_obs.exporters"):
            exp = PrometheusExporter(port=port, on_bind_error="warn")
            for step in range(5):
                exp.export(sample_metrics(step), step=step, split="train")
            exp.close()
    warnings = [r for r in caplog.records if r.name == "agent_obs.exporters"]
    assert len(warnings) == 1 and str(port) in warnings[0].getMessage()
    assert exp.port is None and exp.url is None
    assert parse_registry(exp)[("agent_obs_step", frozenset({"run": "default", "split": "train"}.items()))] == 4


def parse_registry(exp) -> dict:
    from prometheus_client import generate_latest

    return parse(generate_latest(exp.registry).decode())


def test_scrapes_during_exports_always_see_consistent_monotonic_state(exporter):
    metrics = sample_metrics(8)
    stop = threading.Event()

    def writer():
        step = 0
        while not stop.is_set():
            step += 1
            exporter.export(metrics, step=step, split="train")

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        last_tokens = 0.0
        for _ in range(30):
            got = parse(scrape(exporter.url))
            ident = (
                "agent_obs_tokens_total",
                frozenset({"run": "unit", "split": "train", "token_class": "all"}.items()),
            )
            if ident not in got:
                continue
            tokens = got[ident]
            step = got[("agent_obs_step", frozenset({"run": "unit", "split": "train"}.items()))]
            assert tokens >= last_tokens
            # one snapshot: the counter and the step gauge come from the same number of exports
            assert tokens == pytest.approx(step * metrics["tokens"], rel=1e-12)
            last_tokens = tokens
    finally:
        stop.set()
        thread.join()
    assert last_tokens > 0


def test_pushgateway_receives_the_same_series():
    records = [Record("train", 3, sample_metrics(9)), Record("val", 3, sample_metrics(10))]
    with pushgateway_server() as gateway:
        exp = PrometheusExporter(port=None, run="short-job", push_gateway=gateway.url, job="agent_obs_test")
        feed(exp, records)
        exp.close()  # final push
        got = parse(gateway.metrics_text())
    want = expected_series(records, "short-job")
    for (name, labels), value in want.items():
        pushed = frozenset({*labels, ("job", "agent_obs_test"), ("instance", "")})
        assert got[(name, pushed)] == pytest.approx(value, rel=1e-12, abs=0), name


def test_unreachable_pushgateway_is_reported_once_and_never_raises(caplog):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    with caplog.at_level(logging.WARNING, logger="agent_obs.exporters"):
        exp = PrometheusExporter(port=None, push_gateway=url, push_timeout_s=1.0)
        for step in range(20):
            exp.export(sample_metrics(step % 3), step=step, split="train")
            time.sleep(0.01)
        exp.close()
    warnings = [r for r in caplog.records if r.name == "agent_obs.exporters"]
    assert exp._reporter.failures >= 2
    assert len(warnings) == 1 and "push" in warnings[0].getMessage()
