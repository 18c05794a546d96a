"""Bridge to torchtune's metric loggers: ``collect()`` metrics logged as ``{split}_{key}``.

Works with any ``torchtune.training.metric_logging.MetricLoggerInterface`` (DiskLogger,
WandBLogger, TensorBoardLogger, ...): ``train_entropy``, ``val_perplexity``,
``train_top5_prob``, ``train_reasoning_entropy``, ``val_tool_call_top1_prob``,
``train_tool_call.bash_entropy``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agent_obs.exporters.base import DEFAULT_REPORT_INTERVAL_S, FaultReporter


def torchtune_names(metrics: Mapping[str, float], split: str) -> dict[str, float]:
    """``{f"{split}_{key}": value}``: the names torchtune loggers receive."""
    return {f"{split}_{key}": float(value) for key, value in metrics.items()}


class TorchtuneMetricLogger:
    """An agent_obs exporter that forwards each collect to a torchtune metric logger's ``log_dict``.

    Args:
        logger: A torchtune ``MetricLoggerInterface`` (anything with ``log_dict(payload, step)``).
        close_logger: Whether ``close()`` also closes ``logger`` (a recipe usually closes its own).
        report_interval_s: At most one warning per fault source per this many seconds.
    """

    def __init__(
        self, logger: Any, *, close_logger: bool = False, report_interval_s: float = DEFAULT_REPORT_INTERVAL_S
    ) -> None:
        if not callable(getattr(logger, "log_dict", None)):
            raise TypeError(
                f"{type(logger).__name__} has no log_dict(payload, step): pass a torchtune MetricLoggerInterface "
                "such as torchtune.training.metric_logging.DiskLogger(log_dir=...)"
            )
        self.logger = logger
        self.close_logger = close_logger
        self._reporter = FaultReporter("torchtune", interval_s=report_interval_s)

    def export(self, metrics: Mapping[str, float], *, step: int, split: str) -> None:
        """``logger.log_dict({split}_{key}: value, step)`` (never raises)."""
        self._reporter.call("log_dict", self.logger.log_dict, torchtune_names(metrics, split), step=step)

    def close(self) -> None:
        if self.close_logger:
            self._reporter.call("close", self.logger.close)
