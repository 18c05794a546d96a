"""``Publisher``: sums recorders' windows over the ranks and sends the metrics to the exporters (on rank 0).

One publisher serves any number of recorders (a train and an eval recorder, say) with one set of
exporters and one ``close()``; each recorder keeps its own choice of tools across collects.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

from agent_obs.accumulator import Metrics, metrics_from_sums
from agent_obs.distributed import ToolSelector, rank, reduce_sums
from agent_obs.exporters.base import Exporter, close_all, export_all, limit_tools
from agent_obs.keys import NONFINITE, OUTLIERS
from agent_obs.recorder import Recorder
from agent_obs.samples import collect_samples
from agent_obs.settings import Settings


class Publisher:
    """Reduction over ``settings.process_group``, the rank-0 gate and the exporters.

    Args:
        settings: how to reduce and report (see ``Settings``); its recorders must use the same
            ``topk`` and ``max_tools``, which fix the layout of their sums.
        exporters: where the metrics go (each ``export`` is guarded: a failing exporter is logged).
    """

    def __init__(self, settings: Settings, exporters: Sequence[Exporter] = ()) -> None:
        self.settings = settings
        self.exporters = tuple(exporters)
        limit_tools(self.exporters, settings.max_tools)  # exporters drop series of tools a selector stops keeping
        self._selectors: weakref.WeakKeyDictionary[Recorder, ToolSelector] = weakref.WeakKeyDictionary()
        self._closed = False

    def publish(self, recorder: Recorder, *, split: str = "train", step: int | None = None) -> Metrics:
        """Drain ``recorder``, sum the window over the ranks and export it on rank 0; returns the metrics.

        Collective when torch.distributed is initialised: every rank of the group must call it.

        Args:
            recorder: the recorder whose window to publish.
            split: the split the exporters file the metrics under (``train``, ``eval``, ...).
            step: the step to export at (default: the recorder's ``observe()`` blocks so far).
        """
        s = self.settings
        if (recorder.settings.topk, recorder.settings.max_tools) != (s.topk, s.max_tools):
            raise ValueError(
                f"the recorder has topk={recorder.settings.topk}, max_tools={recorder.settings.max_tools} but the "
                f"publisher topk={s.topk}, max_tools={s.max_tools}: create both from the same Settings"
            )
        window = recorder.drain()
        step = window.blocks if step is None else step
        selector = self._selectors.setdefault(recorder, ToolSelector(s.max_tools))  # stable tools per recorder
        sums, tool_names = reduce_sums(
            window.sums, window.slot_tools, s.max_tools, selector, group=s.process_group, overflowed=window.overflowed
        )
        recorder.reserve_tools(selector.kept)  # kept tools get a slot on every rank in the next window
        metrics = metrics_from_sums(sums.cpu(), s.topk, tool_names, binary_entropy=s.binary_entropy)
        samples, outliers = collect_samples(
            window.samples, window.sample_sums, top_n=s.top_n, outlier_k=s.outlier_k, group=s.process_group
        )  # collective when distributed, like reduce_sums
        if outliers >= 0:
            metrics.samples, metrics[OUTLIERS] = samples, outliers
        observed = metrics.get("tokens", 0.0) + metrics[NONFINITE] > 0
        if observed and (rank() == 0 or not s.rank0_only_export):
            export_all(self.exporters, metrics, step=step, split=split)  # a failing exporter is logged
        return metrics

    def close(self) -> None:
        """Close every exporter, once (later calls do nothing)."""
        if not self._closed:
            self._closed = True
            close_all(self.exporters)
