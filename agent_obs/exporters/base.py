"""The exporter contract and the fault guard that keeps a failing exporter from stopping training."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol, TypeVar, runtime_checkable

from agent_obs.accumulator import Metrics

LOGGER = logging.getLogger("agent_obs.exporters")
DEFAULT_REPORT_INTERVAL_S = 300.0  # every exporter's default: at most one warning per fault source per 5 min
T = TypeVar("T")


@runtime_checkable
class Exporter(Protocol):
    """Where ``collect()`` sends its metrics.

    ``export`` receives a ``Metrics`` (metric keys -> values, with ``.histograms`` and ``.samples``)
    and must neither raise nor block for long; ``close`` releases what the exporter holds.
    """

    def export(self, metrics: Metrics, *, step: int, split: str) -> None: ...

    def close(self) -> None: ...


def as_metrics(metrics: Mapping[str, float]) -> Metrics:
    """``metrics`` itself if it is a ``Metrics``; a plain mapping becomes one without histograms or samples."""
    return metrics if isinstance(metrics, Metrics) else Metrics(metrics)


class FaultReporter:
    """Turns an exporter's exceptions into one structured warning per interval, never raising.

    The first failure of an exporter is logged at once on the ``agent_obs.exporters`` logger
    (fields in ``record.agent_obs``); later ones within ``interval_s``, whatever the operation,
    are only counted and reported (as ``suppressed``) with the next warning after the interval.
    """

    def __init__(
        self,
        exporter: str,
        *,
        interval_s: float = DEFAULT_REPORT_INTERVAL_S,
        logger: logging.Logger = LOGGER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.exporter = exporter
        self.interval_s = interval_s
        self.logger = logger
        self.clock = clock
        self.failures = 0  # all failures so far, reported or not
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def report(self, operation: str, error: BaseException | str, *, source: str | None = None) -> None:
        """Count a failure; log it unless ``source`` (default: this exporter) logged one within ``interval_s``."""
        source = source or self.exporter
        now = self.clock()
        with self._lock:
            self.failures += 1
            last = self._last.get(source)
            if last is not None and now - last < self.interval_s:
                self._suppressed[source] = self._suppressed.get(source, 0) + 1
                return
            self._last[source] = now
            suppressed = self._suppressed.pop(source, 0)
        text = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)
        fields = {
            "exporter": source,
            "operation": operation,
            "error": text,
            "suppressed": suppressed,
            "next_report_s": self.interval_s,
        }
        with contextlib.suppress(Exception):  # a broken logging handler must not stop training either
            self.logger.warning(
                "agent_obs exporter failed; training continues: %s",
                " ".join(f"{k}={v!r}" for k, v in fields.items()),
                extra={"agent_obs": fields},
            )

    def call(self, operation: str, fn: Callable[..., T], *args, source: str | None = None, **kwargs) -> T | None:
        """Run ``fn``; on an ``Exception`` report it and return None instead of raising."""
        try:
            return fn(*args, **kwargs)
        except Exception as error:
            self.report(operation, error, source=source)
            return None


def export_all(
    exporters: Iterable[Exporter],
    metrics: Mapping[str, float],
    *,
    step: int,
    split: str,
    reporter: FaultReporter | None = None,
) -> None:
    """Send ``metrics`` (a ``Metrics``; a plain mapping has no histograms) to every exporter.

    One that raises is reported and the others still run.
    """
    reporter = reporter or _SHARED_REPORTER
    metrics = as_metrics(metrics)
    for exporter in exporters:
        name = type(exporter).__name__
        reporter.call("export", exporter.export, metrics, step=step, split=split, source=name)


def close_all(exporters: Iterable[Exporter], *, reporter: FaultReporter | None = None) -> None:
    """Close every exporter; one that raises is reported and the others are still closed."""
    reporter = reporter or _SHARED_REPORTER
    for exporter in exporters:
        reporter.call("close", exporter.close, source=type(exporter).__name__)


def limit_tools(exporters: Iterable[Exporter], max_tools: int) -> None:
    """Tell exporters that hold per-tool series (``set_max_tools``) how many tools ``attach`` keeps."""
    for exporter in exporters:
        set_max_tools = getattr(exporter, "set_max_tools", None)
        if callable(set_max_tools):
            set_max_tools(max_tools)


_SHARED_REPORTER = FaultReporter("exporters")
