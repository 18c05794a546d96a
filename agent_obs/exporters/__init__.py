"""Exporters: where collected metrics go (Prometheus, OTLP, structlog, JSONL, torchtune loggers).

Each has ``export(metrics: Metrics, *, step, split)`` (``Metrics``: metric keys -> values, with
``.histograms`` and ``.samples``) and ``close()``, never raises from either (a failure is one
rate-limited warning on the ``agent_obs.exporters`` logger), and is imported on first use
(OpenTelemetry and structlog cost ~0.2 s each to import).

Bound on the time ``export()`` adds to ``collect()``: no network I/O ever happens on the
calling thread (Prometheus is scraped and pushes from daemon threads, OTLP is sent by the
OTel exporter's own sender thread); ``export()`` only updates in-memory state under short
locks, plus one unbuffered local write for JSONL. ``bench/exporters.py`` prints the medians
(sub-millisecond for 153 keys, the same with the backend slow, refusing or down; re-measure
on an idle machine). Every call that waits (``close()``, OTel's ``force_flush()``) returns
within one stated bound (README, "Exporters"), also when the backend hangs. The ``tool``
label takes at most ``max_tools`` + 1 values (``state.py``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from agent_obs.exporters.base import Exporter, FaultReporter, close_all, export_all

if TYPE_CHECKING:
    from agent_obs.exporters.jsonl import JsonlExporter
    from agent_obs.exporters.otel import OTelExporter
    from agent_obs.exporters.prometheus import PortInUseError, PrometheusExporter
    from agent_obs.exporters.structlog_events import StructlogExporter

_LAZY = {
    "JsonlExporter": "agent_obs.exporters.jsonl",
    "OTelExporter": "agent_obs.exporters.otel",
    "PortInUseError": "agent_obs.exporters.prometheus",
    "PrometheusExporter": "agent_obs.exporters.prometheus",
    "StructlogExporter": "agent_obs.exporters.structlog_events",
}

__all__ = [
    "Exporter",
    "FaultReporter",
    "JsonlExporter",
    "OTelExporter",
    "PortInUseError",
    "PrometheusExporter",
    "StructlogExporter",
    "close_all",
    "export_all",
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'agent_obs.exporters' has no attribute {name!r}")
