"""End to end: a real Prometheus scrapes an observed training run; faults never stop the training."""

from __future__ import annotations

import json
import logging
import math
import socket
import time

import numpy as np
import pytest
from exporter_cases import expected_series, le_label, train_observed
from servers import OtlpReceiver, free_port, prometheus_server, require_binary

from agent_obs.accumulator import ENTROPY_BUCKETS
from agent_obs.exporters import JsonlExporter, OTelExporter, PrometheusExporter

pytestmark = pytest.mark.slow
RUN = "e2e"


def series_of(prom, name: str) -> dict[tuple[str, frozenset], float]:
    """Every series of ``name`` for this run, via /api/v1/query, keyed like ``expected_series``."""
    out = {}
    for item in prom.query(f'{{__name__="{name}",run="{RUN}"}}'):
        labels = {k: v for k, v in item["metric"].items() if k not in ("__name__", "job", "instance")}
        if "le" in labels:
            labels["le"] = le_label(labels["le"])
        out[(name, frozenset(labels.items()))] = float(item["value"][1])
    return out


def test_real_prometheus_scrapes_every_metric_of_an_observed_training_run():
    require_binary("prometheus")
    exporter = PrometheusExporter(port=0, run=RUN)
    got: dict = {}
    t0 = time.time()
    with prometheus_server([f"127.0.0.1:{exporter.port}"], scrape_interval="1s") as prom:

        def scraped(records):
            # the last export is val at the last step: wait for a scrape taken after it (first scrape ~6 s)
            last = records[-1]
            prom.wait_for(f'agent_obs_step{{run="{RUN}",split="{last.split}"}} == {last.step}', timeout=45)
            names = {name for name, _ in expected_series(records, RUN)}
            names.add("agent_obs_last_collect_timestamp_seconds")
            for name in names:
                got.update(series_of(prom, name))

        records, ref = train_observed([exporter], steps=6, val_every=3, before_detach=scraped)
    t1 = time.time()

    stamps = {k: v for k, v in got.items() if k[0] == "agent_obs_last_collect_timestamp_seconds"}
    assert {dict(k[1])["split"] for k in stamps} == {"train", "val"}
    assert all(t0 <= v <= t1 for v in stamps.values())
    got = {k: v for k, v in got.items() if k not in stamps}
    want = expected_series(records, RUN)
    assert set(got) == set(want)
    for ident, value in want.items():
        assert got[ident] == pytest.approx(value, rel=1e-12, abs=0), ident
    assert any(dict(k[1]).get("tool") == "str_replace_editor" for k in got)
    # independent float64 references from the logits, labels and classes themselves
    for (split, cls), tokens in ref.tokens.items():
        labels = frozenset({"run": RUN, "split": split, "token_class": cls}.items())
        assert got[("agent_obs_tokens_total", labels)] == tokens
        cumulative = np.cumsum(ref.buckets[(split, cls)])
        for edge, count in zip([*ENTROPY_BUCKETS, math.inf], cumulative, strict=True):
            ident = ("agent_obs_token_entropy_nats_bucket", labels | {("le", le_label(edge))})
            assert got[ident] == count, ident


def test_failing_exporters_never_stop_training_and_each_reports_once(tmp_path, caplog):
    good = tmp_path / "good.jsonl"
    with socket.socket() as taken, OtlpReceiver(status=500) as refusing:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        down = f"http://127.0.0.1:{free_port()}/v1/metrics"
        with caplog.at_level(logging.WARNING):
            faulty = [
                OTelExporter(endpoint=down, export_interval_s=0.05, export_timeout_s=0.2),
                OTelExporter(endpoint=refusing.endpoint, export_interval_s=0.05, export_timeout_s=0.2),
                PrometheusExporter(port=port, on_bind_error="warn"),
                JsonlExporter("/dev/full"),  # disk full
            ]
            exporters = [*faulty, JsonlExporter(good)]

            def failing_for_a_while(records):
                deadline = time.monotonic() + 20
                while min(e._reporter.failures for e in faulty[:2]) < 2 and time.monotonic() < deadline:
                    time.sleep(0.05)

            records, _ = train_observed(exporters, steps=4, val_every=2, before_detach=failing_for_a_while)
    assert [(r.split, r.step) for r in records] == [
        ("train", 1),
        ("train", 2),
        ("val", 2),
        ("train", 3),
        ("train", 4),
        ("val", 4),
    ]
    lines = [json.loads(line) for line in good.read_text().splitlines()]
    assert [(row["split"], row["step"]) for row in lines] == [(r.split, r.step) for r in records]
    for row, r in zip(lines, records, strict=True):
        assert {k: row[k] for k in r.metrics} == dict(r.metrics)
    ours = [r for r in caplog.records if r.name == "agent_obs.exporters"]
    assert len(ours) == len(faulty), [r.getMessage() for r in ours]
    messages = " ".join(r.getMessage() for r in ours)
    assert down in messages and refusing.endpoint in messages and str(port) in messages and "No space" in messages
    assert all(e._reporter.failures >= 2 for e in faulty[:2]) and faulty[3]._reporter.failures == len(records)
