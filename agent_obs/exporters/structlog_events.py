"""``StructlogExporter``: one structured log event per collect (key-value or JSON lines)."""

from __future__ import annotations

import sys
from typing import Any, TextIO

import structlog

from agent_obs.accumulator import Metrics
from agent_obs.exporters.base import DEFAULT_REPORT_INTERVAL_S, FaultReporter, as_metrics


def _renderer(renderer: str):
    if renderer == "json":
        return structlog.processors.JSONRenderer(sort_keys=False)
    if renderer == "kv":
        return structlog.processors.KeyValueRenderer(key_order=["timestamp", "level", "event", "step", "split"])
    raise ValueError(f"renderer must be 'json' or 'kv', got {renderer!r}")


class StructlogExporter:
    """Logs ``event`` with ``step``, ``split`` and every metric as fields, once per collect.

    When the collect has hardest samples, a second event ``samples_event`` carries them as ``samples``.

    Args:
        logger: Your structlog logger (your processors and output); by default one renders events
            with an ISO timestamp and level to ``file``.
        event: Name of the per-collect metrics event.
        samples_event: Name of the event carrying the hardest samples.
        renderer: ``"kv"`` (key=value) or ``"json"``, for the default logger only.
        file: Text stream of the default logger (default: stderr).
        report_interval_s: At most one warning per fault source per this many seconds.
    """

    def __init__(
        self,
        logger: Any | None = None,
        *,
        event: str = "agent_obs.metrics",
        samples_event: str = "agent_obs.samples",
        renderer: str = "kv",
        file: TextIO | None = None,
        report_interval_s: float = DEFAULT_REPORT_INTERVAL_S,
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

    def export(self, metrics: Metrics, *, step: int, split: str) -> None:
        """Emit one info event for this collect, and one for its hardest samples if any (never raises)."""
        metrics = as_metrics(metrics)
        fields = {key: float(value) for key, value in metrics.items()}
        self._reporter.call("export", self.logger.info, self.event, step=step, split=split, **fields)
        if metrics.samples:
            self._reporter.call(
                "export", self.logger.info, self.samples_event, step=step, split=split, samples=metrics.samples
            )

    def close(self) -> None:
        """Nothing to release: the logger belongs to structlog."""
