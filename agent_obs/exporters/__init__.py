"""Exporters: where collected metrics go (Prometheus, OTLP, structlog, JSONL, torchtune loggers).

Each has ``export(metrics, *, step, split)`` and ``close()``, never raises from either, and
is imported on first use (OpenTelemetry and structlog cost ~0.2 s each to import).
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
