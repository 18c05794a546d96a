"""Fault guard, JSONL, structlog and the torchtune metric-logger bridge, with real files and loggers."""

from __future__ import annotations

import io
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import pytest
from agent_obs.integrations.torchtune.metric_logger import TorchtuneMetricLogger
from exporter_cases import Record, sample_metrics

from agent_obs.accumulator import Histogram, Metrics
from agent_obs.exporters import FaultReporter, JsonlExporter, StructlogExporter, export_all

RECORDS = [
    Record("train", 1, sample_metrics(21)),
    Record("val", 1, sample_metrics(22)),
    Record("train", 2, sample_metrics(23)),
]


def warnings_of(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "agent_obs.exporters"]


# --------------------------------------------------------------------------- fault guard


def test_fault_reporter_logs_once_per_interval_with_the_suppressed_count(caplog):
    now = [100.0]
    reporter = FaultReporter("demo", interval_s=60.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="agent_obs.exporters"):
        for _ in range(5):
            reporter.report("write", OSError(28, "No space left on device"))
        reporter.report("push", "gateway down")  # same exporter, other operation: same budget
        reporter.report("export", "bug", source="Other")  # another source has its own budget
        now[0] += 61.0
        reporter.report("write", OSError(28, "No space left on device"))
    logged = [r.agent_obs for r in warnings_of(caplog)]
    assert [(f["exporter"], f["operation"], f["suppressed"]) for f in logged] == [
        ("demo", "write", 0),
        ("Other", "export", 0),
        ("demo", "write", 5),
    ]
    assert logged[0]["exporter"] == "demo" and "No space left" in logged[0]["error"]
    assert reporter.failures == 8


def test_fault_reporter_call_returns_none_instead_of_raising():
    reporter = FaultReporter("demo")
    assert reporter.call("op", lambda: 1 / 0) is None
    assert reporter.call("op", lambda x: x + 1, 1) == 2
    assert reporter.failures == 1


class Exploding:
    """A third-party exporter that raises on every call."""

    def export(self, metrics, *, step, split):
        raise RuntimeError("exporter bug")

    def close(self):
        raise RuntimeError("close bug")


def test_export_all_keeps_feeding_the_other_exporters_when_one_raises(tmp_path, caplog):
    a, b = JsonlExporter(tmp_path / "a.jsonl"), JsonlExporter(tmp_path / "b.jsonl")
    reporter = FaultReporter("t")
    with caplog.at_level(logging.WARNING, logger="agent_obs.exporters"):
        for r in RECORDS:
            export_all([a, Exploding(), b], r.metrics, step=r.step, split=r.split, reporter=reporter)
    for path in (tmp_path / "a.jsonl", tmp_path / "b.jsonl"):
        assert len(path.read_text().splitlines()) == len(RECORDS)
    assert reporter.failures == len(RECORDS)
    assert len(warnings_of(caplog)) == 1 and "exporter bug" in warnings_of(caplog)[0].getMessage()
    assert warnings_of(caplog)[0].agent_obs["exporter"] == "Exploding"


# --------------------------------------------------------------------------- JSONL


def test_jsonl_writes_one_flushed_line_per_collect(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    exp = JsonlExporter(path, histograms=True)
    for i, r in enumerate(RECORDS):
        exp.export(r.metrics, step=r.step, split=r.split)
        lines = path.read_text().splitlines()  # read while open: flushed after each collect
        assert len(lines) == i + 1
        row = json.loads(lines[-1])
        assert (row.pop("step"), row.pop("split")) == (r.step, r.split)
        assert isinstance(row.pop("time"), float)
        hists = row.pop("histograms")
        assert row == dict(r.metrics)  # every key, float64 values round-trip exactly
        for cls, h in r.metrics.histograms.items():
            assert hists[cls] == {"edges": list(h.edges), "counts": list(h.counts), "sum": h.total}
    exp.close()


def test_jsonl_takes_a_plain_mapping_as_metrics_without_histograms(tmp_path):
    """The contract is ``Metrics``; a plain dict is written whole, with no histograms (none to write)."""
    exp = JsonlExporter(tmp_path / "m.jsonl", histograms=True)
    exp.export({"entropy": 1.5, "tokens": 3.0}, step=4, split="val")
    exp.close()
    row = json.loads((tmp_path / "m.jsonl").read_text())
    assert exp._reporter.failures == 0
    assert {k: row[k] for k in ("step", "split", "entropy", "tokens")} == {
        "step": 4,
        "split": "val",
        "entropy": 1.5,
        "tokens": 3.0,
    }
    assert "histograms" not in row and "samples" not in row


def test_histogram_cumulative_and_plus_match_numpy():
    a, b = RECORDS[0].metrics.histograms["all"], RECORDS[1].metrics.histograms["all"]
    both = a.plus(b)
    counts = np.asarray(a.counts, dtype=np.float64) + np.asarray(b.counts, dtype=np.float64)
    assert list(both.counts) == list(counts) and both.total == a.total + b.total
    assert both.cumulative() == list(zip([*a.edges, math.inf], np.cumsum(counts).astype(int).tolist(), strict=True))
    with pytest.raises(ValueError, match="histogram edges differ"):
        a.plus(Histogram(a.edges[:-1], a.counts[:-1], a.total))


def test_jsonl_appends_and_writes_non_finite_values_as_null(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 0}\n')
    exp = JsonlExporter(path)
    exp.export(Metrics({"entropy": float("nan"), "perplexity": float("inf"), "tokens": 3.0}), step=1, split="train")
    exp.close()
    lines = path.read_text().splitlines()
    row = json.loads(lines[1])
    assert len(lines) == 2 and row["entropy"] is None and row["perplexity"] is None and row["tokens"] == 3.0
    assert "histograms" not in row


def _read_only_path(tmp_path: Path) -> Path:
    if os.geteuid() == 0:  # root ignores permission bits; sysfs refuses new files even to root
        return Path("/sys/agent_obs_readonly/metrics.jsonl")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    return ro / "metrics.jsonl"


@pytest.mark.parametrize("where", ["read-only", "disk full"])
def test_unwritable_jsonl_is_reported_once_and_never_raises(where, tmp_path, caplog):
    path = _read_only_path(tmp_path) if where == "read-only" else Path("/dev/full")
    with caplog.at_level(logging.WARNING, logger="agent_obs.exporters"):
        exp = JsonlExporter(path)
        for r in RECORDS * 3:
            exp.export(r.metrics, step=r.step, split=r.split)
        exp.close()
    ours = warnings_of(caplog)
    assert exp._reporter.failures >= len(RECORDS) * 3
    assert len(ours) == 1 and ours[0].agent_obs["exporter"] == "jsonl"


# --------------------------------------------------------------------------- structlog


@pytest.mark.parametrize("renderer", ["json", "kv"])
def test_structlog_emits_one_event_per_collect_with_every_metric(renderer):
    out = io.StringIO()
    exp = StructlogExporter(renderer=renderer, file=out)
    for r in RECORDS:
        exp.export(r.metrics, step=r.step, split=r.split)
    exp.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == len(RECORDS)
    for line, r in zip(lines, RECORDS, strict=True):
        if renderer == "json":
            event = json.loads(line)
        else:
            event = dict(field.split("=", 1) for field in line.split(" "))
            event = {
                k: json.loads(v) if k not in ("event", "split", "timestamp", "level") else v for k, v in event.items()
            }
            event = {k: v.strip("'") if isinstance(v, str) else v for k, v in event.items()}
        assert event["event"] == "agent_obs.metrics" and event["level"] == "info"
        assert event["step"] == r.step and event["split"] == r.split
        assert {k: event[k] for k in r.metrics} == dict(r.metrics)


def test_structlog_uses_a_logger_you_pass():
    import structlog

    with structlog.testing.capture_logs() as captured:
        exp = StructlogExporter(structlog.get_logger("train"), event="metrics")
        exp.export(RECORDS[0].metrics, step=7, split="train")
    assert len(captured) == 1
    assert captured[0]["event"] == "metrics" and captured[0]["step"] == 7
    assert captured[0]["entropy"] == RECORDS[0].metrics["entropy"]


# --------------------------------------------------------------------------- torchtune bridge


def parse_disk_log(path: Path) -> list[tuple[int, dict[str, float]]]:
    """DiskLogger's ``Step N | name:value name:value`` lines."""
    rows = []
    for line in path.read_text().splitlines():
        head, _, body = line.partition(" | ")
        rows.append((int(head.split()[1]), {k: float(v) for k, v in (f.rsplit(":", 1) for f in body.split())}))
    return rows


def test_torchtune_disk_logger_gets_split_prefixed_names_and_values(tmp_path):
    from torchtune.training.metric_logging import DiskLogger

    disk = DiskLogger(log_dir=str(tmp_path), filename="log.txt")
    bridge = TorchtuneMetricLogger(disk)
    for r in RECORDS:
        bridge.export(r.metrics, step=r.step, split=r.split)
    bridge.close()  # the recipe owns the logger: still open
    disk.log("loss", 1.5, step=3)
    disk.close()
    rows = parse_disk_log(tmp_path / "log.txt")
    assert rows[-1] == (3, {"loss": 1.5})
    assert len(rows) == len(RECORDS) + 1
    for (step, logged), r in zip(rows, RECORDS, strict=False):
        assert step == r.step
        assert logged == {f"{r.split}_{key}": value for key, value in r.metrics.items()}
    names = set(rows[0][1])
    for name in ("train_entropy", "train_perplexity", "train_top5_prob", "train_reasoning_entropy"):
        assert name in names
    assert "train_tool_call_top1_prob" in names and "train_tool_call.bash_entropy" in names
    assert "val_tool_call_top1_prob" in rows[1][1] and "val_perplexity" in rows[1][1]


def test_torchtune_bridge_rejects_a_non_logger_with_the_fix():
    with pytest.raises(TypeError, match="log_dict"):
        TorchtuneMetricLogger(object())
