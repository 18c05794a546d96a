"""OTelExporter on the wire: a real OTLP/HTTP receiver decodes what the SDK sent; faults stay contained."""

from __future__ import annotations

import ast
import logging
import time
from pathlib import Path

import numpy as np
import pytest
from exporter_cases import Record, console_exporter, console_metrics, sample_metrics, series_of_key
from servers import OtlpReceiver, free_port

import agent_obs.exporters.otel as otel_module
from agent_obs.accumulator import ENTROPY_BUCKETS
from agent_obs.exporters import OTelExporter

# OTel name and unit of each contract family: the OTLP -> Prometheus translation (dots to
# underscores, unit suffix "nats"/"ratio"/"seconds", "_total" on monotonic sums) gives the contract name.
OTEL_OF = {
    "agent_obs_entropy_nats": ("agent_obs.entropy", "nats"),
    "agent_obs_perplexity": ("agent_obs.perplexity", "{perplexity}"),
    "agent_obs_topk_prob_ratio": ("agent_obs.topk_prob", "1"),
    "agent_obs_accuracy_ratio": ("agent_obs.accuracy", "1"),
    "agent_obs_tokens_total": ("agent_obs.tokens", "{token}"),
    "agent_obs_nonfinite_tokens_total": ("agent_obs.nonfinite_tokens", "{token}"),
    "agent_obs_tool_entropy_nats": ("agent_obs.tool.entropy", "nats"),
    "agent_obs_tool_perplexity": ("agent_obs.tool.perplexity", "{perplexity}"),
    "agent_obs_tool_topk_prob_ratio": ("agent_obs.tool.topk_prob", "1"),
    "agent_obs_tool_accuracy_ratio": ("agent_obs.tool.accuracy", "1"),
    "agent_obs_tool_tokens_total": ("agent_obs.tool.tokens", "{token}"),
}
RECORDS = [
    Record("train", 10, sample_metrics(11)),
    Record("train", 20, sample_metrics(12)),
    Record("val", 20, sample_metrics(13, tools=("bash",))),
]


def feed(exp, records=RECORDS):
    for r in records:
        exp.export(r.metrics, step=r.step, split=r.split)


def otel_attributes(labels: dict[str, str]) -> dict:
    attrs = {k: v for k, v in labels.items() if k != "run"}
    if "k" in attrs:
        attrs["k"] = int(attrs["k"])
    return attrs


def latest(points):
    """{(name, attributes): the newest point}."""
    out = {}
    for p in sorted(points, key=lambda p: p.time_unix_nano):
        out[(p.name, frozenset(p.attributes.items()))] = p
    return out


def test_otlp_receiver_gets_every_metric_with_names_attributes_values_and_resource():
    with OtlpReceiver() as receiver:
        exp = OTelExporter(endpoint=receiver.endpoint, run="wire", export_interval_s=3600)
        t0 = time.time()
        feed(exp)
        t1 = time.time()
        exp.close()  # shutdown exports the final state once
        points = receiver.points()
    assert points and all(p.resource["service.name"] == "agent-obs" and p.resource["run"] == "wire" for p in points)
    got = latest(points)
    want: dict = {}
    for r in RECORDS:  # independent float64 expectations: last gauge per split, summed counters
        for key, value in r.metrics.items():
            name, labels = series_of_key(key, r.split, "wire")
            otel_name, unit = OTEL_OF[name]
            ident = (otel_name, frozenset(otel_attributes(labels).items()))
            counter = name.endswith("_total")
            want[ident] = (want.get(ident, (0.0,))[0] + value if counter else value, unit, counter)
        want[("agent_obs.step", frozenset({"split": r.split}.items()))] = (float(r.step), "{step}", False)
    stamps = {k: p for k, p in got.items() if k[0] == "agent_obs.last_collect_timestamp"}
    assert {dict(k[1])["split"] for k in stamps} == {"train", "val"}
    assert all(t0 <= p.value <= t1 and p.unit == "s" for p in stamps.values())
    hist = {k: p for k, p in got.items() if k[0] == "agent_obs.token_entropy"}
    scalars = {k: p for k, p in got.items() if k not in stamps and k not in hist}
    assert set(scalars) == set(want)
    for ident, (value, unit, counter) in want.items():
        point = scalars[ident]
        assert point.value == pytest.approx(value, rel=1e-12, abs=0), ident
        assert point.unit == unit and point.kind == ("sum" if counter else "gauge"), ident
        assert point.is_monotonic is (True if counter else None), ident
    expected_hist: dict = {}
    for r in RECORDS:
        for cls, h in r.metrics.histograms.items():
            counts, total = expected_hist.get((r.split, cls), (np.zeros(len(h.counts)), 0.0))
            expected_hist[(r.split, cls)] = (counts + np.asarray(h.counts), total + h.total)
    assert {(dict(k[1])["split"], dict(k[1])["token_class"]) for k in hist} == set(expected_hist)
    for ident, p in hist.items():
        counts, total = expected_hist[(dict(ident[1])["split"], dict(ident[1])["token_class"])]
        assert p.kind == "histogram" and p.unit == "nats"
        assert p.explicit_bounds == list(ENTROPY_BUCKETS)
        assert p.bucket_counts == [int(c) for c in counts] and p.count == int(counts.sum())
        assert p.sum == pytest.approx(total, rel=1e-12)


def test_otel_env_variables_choose_endpoint_and_interval(monkeypatch):
    with OtlpReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", receiver.endpoint)
        monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "100")  # ms
        exp = OTelExporter(run="env")
        feed(exp, RECORDS[:1])
        try:
            # periodic export off the training thread, no flush asked: at least two intervals
            receiver.wait_for_attempts(2, timeout=20)
        finally:
            exp.close()
        entropy = latest(receiver.points("agent_obs.entropy"))
    key = ("agent_obs.entropy", frozenset({"split": "train", "token_class": "all"}.items()))
    assert entropy[key].value == RECORDS[0].metrics["entropy"]


def test_a_user_metric_exporter_receives_the_same_metrics_and_the_exact_summed_histogram():
    sdk_exporter, out = console_exporter()
    exp = OTelExporter(exporter=sdk_exporter, run="mem", export_interval_s=3600)
    feed(exp)
    assert exp.force_flush(timeout_s=5.0) is True
    exp.close(timeout_s=5.0)
    metrics = {m["name"]: m for m in console_metrics(out)}  # the last document wins
    assert {"agent_obs.entropy", "agent_obs.tokens", "agent_obs.token_entropy", "agent_obs.step"} <= set(metrics)
    points = {frozenset(p["attributes"].items()): p for p in metrics["agent_obs.token_entropy"]["data"]["data_points"]}
    train_all = points[frozenset({"split": "train", "token_class": "all"}.items())]
    expected = np.asarray(RECORDS[0].metrics.histograms["all"].counts) + RECORDS[1].metrics.histograms["all"].counts
    assert train_all["bucket_counts"] == [int(c) for c in expected] and train_all["count"] == int(expected.sum())
    total = RECORDS[0].metrics.histograms["all"].total + RECORDS[1].metrics.histograms["all"].total
    assert train_all["sum"] == pytest.approx(total, rel=1e-12)
    assert train_all["explicit_bounds"] == list(ENTROPY_BUCKETS)


def test_flush_with_nothing_exported_delivers_trivially_and_flush_after_close_is_false():
    sdk_exporter, out = console_exporter()
    exp = OTelExporter(exporter=sdk_exporter, export_interval_s=3600)
    assert exp.force_flush(timeout_s=2.0) is True and out.getvalue() == ""  # nothing to send, nothing sent
    exp.close(timeout_s=2.0)
    assert exp.force_flush(timeout_s=2.0) is False


def test_an_endpoint_and_an_exporter_together_are_refused_with_the_fix():
    sdk_exporter, _ = console_exporter()
    with pytest.raises(ValueError, match=r"either endpoint= .* or exporter="):
        OTelExporter(exporter=sdk_exporter, endpoint="http://127.0.0.1:4318/v1/metrics")
    with pytest.raises(ValueError, match="export_interval_s must be > 0"):
        OTelExporter(exporter=sdk_exporter, export_interval_s=0)


def test_otel_exporter_uses_no_private_name_of_the_opentelemetry_sdk():
    """Only public SDK API: no ``_name`` imported from opentelemetry, no ``._attr`` read on anything but self."""
    tree = ast.parse(Path(otel_module.__file__).read_text(encoding="utf-8"))
    private = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("opentelemetry"):
            private += [node.module for part in node.module.split(".") if part.startswith("_")]
            private += [a.name for a in node.names if a.name.startswith("_")]
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            if not (isinstance(node.value, ast.Name) and node.value.id == "self"):
                private.append(ast.unparse(node))
        elif isinstance(node, ast.Call) and ast.unparse(node.func) in ("getattr", "hasattr", "setattr"):
            private.append(ast.unparse(node))
    assert private == []


@pytest.mark.parametrize("fault", ["down", 500, 404])
def test_collector_down_or_refusing_is_reported_once_and_export_never_raises(fault, caplog):
    receiver = OtlpReceiver(status=200 if fault == "down" else fault)
    if fault == "down":
        receiver.close()
        endpoint = f"http://127.0.0.1:{free_port()}/v1/metrics"
    else:
        endpoint = receiver.endpoint
    with caplog.at_level(logging.WARNING):
        exp = OTelExporter(endpoint=endpoint, export_interval_s=0.05, export_timeout_s=0.3)
        deadline = time.monotonic() + 20
        step = 0
        while exp._reporter.failures < 3 and time.monotonic() < deadline:
            step += 1
            exp.export(sample_metrics(step % 4), step=step, split="train")
            time.sleep(0.02)
        exp.close(timeout_s=1)
    if fault != "down":
        receiver.close()
        assert receiver.attempts >= 3 and not receiver.requests
    assert exp._reporter.failures >= 3
    ours = [r for r in caplog.records if r.name == "agent_obs.exporters"]
    assert len(ours) == 1 and endpoint in ours[0].getMessage(), [r.getMessage() for r in ours]
    # the SDK's own records are left as they are (no filter on its loggers): they carry the reason
    sdk = [r.getMessage() for r in caplog.records if r.name.startswith("opentelemetry.exporter")]
    assert sdk, "the SDK logged nothing: was its logger filtered?"
    if fault != "down":
        assert any(str(fault) in m for m in sdk), sdk
