"""The exporter protocol and the fault guard that keeps a failing exporter from stopping training."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol, TypeVar, runtime_checkable

LOGGER = logging.getLogger("agent_obs.exporters")
DEFAULT_REPORT_INTERVAL_S = 300.0
T = TypeVar("T")


@runtime_checkable
class Exporter(Protocol):
    """Where ``collect()`` sends its metrics; ``export`` must never raise nor block for long."""

    def export(self, metrics: Mapping[str, float], *, step: int, split: str) -> None: ...

    def close(self) -> None: ...


class FaultReporter:
    """Turns an exporter's exceptions into one structured warning per interval, never raising.

    The first failure of each ``(exporter, operation)`` is logged at once on the
    ``agent_obs.exporters`` logger; later ones within ``interval_s`` are only counted and
    reported (as ``suppressed``) with the next warning after the interval.
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

    def report(self, operation: str, error: BaseException | str) -> None:
        """Count a failure of ``operation``; log it unless one was logged less than ``interval_s`` ago."""
        now = self.clock()
        with self._lock:
            self.failures += 1
            last = self._last.get(operation)
            if last is not None and now - last < self.interval_s:
                self._suppressed[operation] = self._suppressed.get(operation, 0) + 1
                return
            self._last[operation] = now
            suppressed = self._suppressed.pop(operation, 0)
        text = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)
        fields = {
            "exporter": self.exporter,
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

    def call(self, operation: str, fn: Callable[..., T], *args, **kwargs) -> T | None:
        """Run ``fn``; on an ``Exception`` report it and return None instead of raising."""
        try:
            return fn(*args, **kwargs)
        except Exception as error:
            self.report(operation, error)
            return None


def export_all(
    exporters: Iterable[Exporter],
    metrics: Mapping[str, float],
    *,
    step: int,
    split: str,
    reporter: FaultReporter | None = None,
) -> None:
    """Send ``metrics`` to every exporter; one that raises is reported and the others still run."""
    reporter = reporter or _SHARED_REPORTER
    for exporter in exporters:
        reporter.call(f"export:{type(exporter).__name__}", exporter.export, metrics, step=step, split=split)


def close_all(exporters: Iterable[Exporter], *, reporter: FaultReporter | None = None) -> None:
    """Close every exporter; one that raises is reported and the others are still closed."""
    reporter = reporter or _SHARED_REPORTER
    for exporter in exporters:
        reporter.call(f"close:{type(exporter).__name__}", exporter.close)


_SHARED_REPORTER = FaultReporter("exporters")
