"""``StructlogExporter``: one structured log event per collect (key-value or JSON lines)."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, TextIO

import structlog

from agent_obs.exporters.base import FaultReporter


def _renderer(renderer: str):
    if renderer == "json":
        return structlog.processors.JSONRenderer(sort_keys=False)
    if renderer == "kv":
        return structlog.processors.KeyValueRenderer(key_order=["timestamp", "level", "event", "step", "split"])
    raise ValueError(f"renderer must be 'json' or 'kv', got {renderer!r}")


class StructlogExporter:
    """Logs ``event`` with ``step``, ``split`` and every metric as fields, once per collect.

    When the collect has hardest samples, a second event ``samples_event`` carries them as ``samples``.

    Pass your own structlog ``logger`` to use your configuration; otherwise events are
    rendered (``renderer="kv"`` or ``"json"``) to ``file`` (default stderr) with an ISO
    timestamp and level.
    """

    def __init__(
        self,
        logger: Any | None = None,
        *,
        event: str = "agent_obs.metrics",
        samples_event: str = "agent_obs.samples",
        renderer: str = "kv",
        file: TextIO | None = None,
        report_interval_s: float = 300.0,
    ) -> None:
        if logger is None:
            processors = [
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                structlog.processors.add_log_level,
                _renderer(renderer),
            ]
            logger = structlog.wrap_logger(structlog.PrintLogger(file or sys.stderr), processors=processors)
        self.logger = logger
        self.event = event
        self.samples_event = samples_event
        self._reporter = FaultReporter("structlog", interval_s=report_interval_s)

    def export(self, metrics: Mapping[str, float], *, step: int, split: str) -> None:
        """Emit one info event for this collect (never raises)."""
        fields = {key: float(value) for key, value in metrics.items()}
        self._reporter.call("export", self.logger.info, self.event, step=step, split=split, **fields)
        samples = getattr(metrics, "samples", None)
        if samples:
            self._reporter.call("export", self.logger.info, self.samples_event, step=step, split=split, samples=samples)

    def close(self) -> None:
        """Nothing to release: the logger belongs to structlog."""
