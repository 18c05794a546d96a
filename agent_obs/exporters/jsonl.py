"""``JsonlExporter``: one JSON line per collect, flushed each time, for offline plots and reports.

Each line is ``{"step", "split", "time", <metric key>: value, ..., "histograms"?: {...}, "samples"?: [...]}``;
non-finite values are written as null so every line is strict JSON. A crash loses at most
the line being written.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import BinaryIO

from agent_obs.accumulator import Metrics
from agent_obs.exporters.base import DEFAULT_REPORT_INTERVAL_S, FaultReporter, as_metrics


def _finite(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def jsonl_record(metrics: Metrics, *, step: int, split: str, now: float, histograms: bool) -> dict:
    """The dict written for one collect (``histograms``: add the per-class entropy histograms)."""
    record: dict = {"step": int(step), "split": split, "time": now}
    record.update({key: _finite(value) for key, value in metrics.items()})
    if histograms and metrics.histograms:
        record["histograms"] = {
            cls: {"edges": list(h.edges), "counts": [float(c) for c in h.counts], "sum": _finite(h.total)}
            for cls, h in metrics.histograms.items()
        }
    if metrics.samples:  # the window's hardest samples (agent_obs.samples), hardest first
        record["samples"] = [
            {k: _finite(v) if isinstance(v, float) else v for k, v in s.items()} for s in metrics.samples
        ]
    return record


class JsonlExporter:
    """Appends one line per collect to ``path``, unbuffered: a crash loses at most the line being written.

    A path that cannot be opened or written is reported once (rate-limited) and retried
    at the next collect; training goes on.

    Args:
        path: The JSONL file, opened for appending (parent directories created).
        histograms: Also write each collect's per-class entropy histograms (``agent-obs report`` plots them).
        fsync: ``os.fsync`` after every line (survives a power loss; slower on network filesystems).
        report_interval_s: At most one warning per fault source per this many seconds.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        histograms: bool = False,
        fsync: bool = False,
        report_interval_s: float = DEFAULT_REPORT_INTERVAL_S,
    ) -> None:
        self.path = Path(path)
        self.histograms = histograms
        self.fsync = fsync
        self._reporter = FaultReporter("jsonl", interval_s=report_interval_s)
        self._file: BinaryIO | None = None
        self._reporter.call("open", self._open)

    def _open(self) -> BinaryIO:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # unbuffered: each line goes to the OS in one write, and a failed write leaves nothing behind
            self._file = self.path.open("ab", buffering=0)
        return self._file

    def export(self, metrics: Metrics, *, step: int, split: str) -> None:
        """Write and flush one line (never raises); a plain mapping is written without histograms."""
        self._reporter.call("write", self._write, as_metrics(metrics), step, split)

    def _write(self, metrics: Metrics, step: int, split: str) -> None:
        record = jsonl_record(metrics, step=step, split=split, now=time.time(), histograms=self.histograms)
        line = memoryview((json.dumps(record, allow_nan=False) + "\n").encode())
        file = self._open()
        while line:
            line = line[file.write(line) :]
        if self.fsync:
            os.fsync(file.fileno())

    def close(self) -> None:
        """Close the file."""
        if self._file is not None:
            file, self._file = self._file, None
            self._reporter.call("close", file.close)
