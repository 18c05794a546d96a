"""``attach()``: a ``Recorder`` on the model's output projection and a ``Publisher`` for its metrics, as one object.

``Recorder`` (recorder.py) owns the hook, the blocks and the engines; ``Publisher`` (publisher.py)
owns the reduction over ranks, the rank-0 gate and the exporters. ``Observer`` is the pair behind
``observe()``/``collect()``/``detach()``; integrations that need more (two recorders, one set of
exporters) use the two directly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from agent_obs.accumulator import DEFAULT_TOPK, Metrics
from agent_obs.exporters.base import Exporter
from agent_obs.publisher import Publisher
from agent_obs.recorder import Observing, Recorder, Targets, shift_left
from agent_obs.samples import DEFAULT_OUTLIER_K
from agent_obs.settings import Rows, Settings

__all__ = ["Observer", "attach", "shift_left"]  # shift_left: for callers that shift labels themselves


class Observer:
    """A hooked model: ``observe()`` blocks record, ``collect()`` returns (and exports) the metrics.

    Args:
        recorder: records the blocks.
        publisher: reduces and exports what the recorder drains; closed by ``detach()``.
    """

    def __init__(self, recorder: Recorder, publisher: Publisher) -> None:
        self.recorder = recorder
        self.publisher = publisher

    def observe(
        self,
        labels: Targets = None,
        token_classes: Targets = None,
        tool_ids: Targets = None,
        tool_args: Targets = None,
        sample_ids: Targets = None,
    ) -> Observing:
        """Record the projection calls of the forward(s) inside the ``with`` block against these targets.

        Args:
            labels: ``[B, S]`` (or ``[S]``) token ids aligned to the logits positions (unshifted with
                ``shift_labels=True``); ``ignore_index`` where not scored.
            token_classes: ``TokenClass`` per position, same shape.
            tool_ids: ``tool_id(name)`` per tool-call token (needs ``token_classes``).
            tool_args: nonzero inside a tool-call argument value (``token_tool_args``); splits tool_call
                into ``tool_syntax_*``/``tool_args_*``.
            sample_ids: the sample of each sequence (``[B]`` ints or strs) or of each token (``[B, S]``
                ints, -1 for none); ``collect()`` then reports the hardest samples.

        A block counts all or nothing (see ``Recorder.begin``/``Recorder.end``).
        """
        return self.recorder.observe(labels, token_classes, tool_ids, tool_args, sample_ids)

    def warmup(
        self,
        *,
        dtype: torch.dtype | None = None,
        vocab_size: int | None = None,
        labels: bool = True,
        token_classes: bool = True,
        tool_ids: bool | None = None,
    ) -> None:
        """Compile the metric kernel now, on a dummy chunk shaped like the projection's output, not in step 1.

        Args:
            dtype: the logits dtype (default: the projection's weight dtype; pass the autocast dtype
                under autocast).
            vocab_size: the logits width (default: the projection's).
            labels: the ``observe()`` blocks will pass ``labels``.
            token_classes: the blocks will pass ``token_classes``.
            tool_ids: the blocks will pass ``tool_ids`` (default: ``token_classes and max_tools > 0``).
        """
        self.recorder.warmup(
            dtype=dtype, vocab_size=vocab_size, labels=labels, token_classes=token_classes, tool_ids=tool_ids
        )

    def collect(self, split: str = "train", step: int | None = None) -> Metrics:
        """Metrics since the last collect (then reset), summed over ranks; exports on rank 0.

        Same keys as ``compute_metrics`` plus ``tool_call.{tool}_*``. Collective when
        torch.distributed is initialised: every rank must call it.

        Args:
            split: the split the exporters file the metrics under (``train``, ``val``, ...).
            step: the step to export at (default: the number of ``observe()`` blocks so far).
        """
        return self.publisher.publish(self.recorder, split=split, step=step)

    def detach(self) -> None:
        """Remove the hook and close the exporters; the model is as before ``attach``."""
        self.recorder._detach()
        self.publisher.close()

    def __enter__(self) -> Observer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()


def attach(
    model: nn.Module,
    *,
    layer: nn.Module | str | object | None = None,
    topk: tuple[int, ...] = DEFAULT_TOPK,
    chunk_tokens: int | None = None,
    every_n_steps: int = 1,
    exporters: Sequence[Exporter] = (),
    rank0_only_export: bool = True,
    shift_labels: bool = False,
    rows: Rows = "all",
    ignore_index: int = -100,
    max_tools: int = 16,
    side_stream: bool = True,
    max_in_flight: int = 4,
    process_group: torch.distributed.ProcessGroup | None = None,
    binary_entropy: bool = False,
    top_n: int = 10,
    outlier_k: float = DEFAULT_OUTLIER_K,
) -> Observer:
    """Hook ``model``'s output projection; wrap forwards in ``obs.observe(...)``, then ``obs.collect()``.

    Args:
        model: any ``torch.nn.Module`` with an output projection.
        layer: the projection (module, dotted name or torchtune ``TiedLinear``); found by name or
            vocabulary size when None.
        topk: top-k probability masses to report.
        chunk_tokens: logits rows per kernel call (None: sized from the vocabulary).
        every_n_steps: record only every n-th ``observe()`` block; the others cost nothing.
        exporters: where ``collect()`` sends the metrics; closed by ``detach()``.
        rank0_only_export: export only on rank 0 (every rank still gets the metrics).
        shift_labels: labels are unshifted (Hugging Face style).
        rows: ``"valid"`` when the loss calls the projection on flat rows of only the valid tokens.
        ignore_index: the label of tokens that are not scored.
        max_tools: distinct tool names with their own keys (the rest as ``_other``).
        side_stream: on CUDA, compute the statistics on a side stream overlapping the step.
        max_in_flight: at most this many chunks in flight on the side stream.
        process_group: the ranks ``collect()`` sums over, by default all; under tensor parallelism the
            data-parallel group (TP ranks see the same tokens; ``DTensor`` logits are gathered exactly).
        binary_entropy: add the seed's ``top1_binary_entropy`` keys.
        top_n: how many hardest samples ``collect()`` returns (blocks given ``sample_ids``).
        outlier_k: the outlier threshold, median + k x 1.4826 x MAD of the window's per-sample mean NLL.

    Raises:
        ValueError: an option is out of range (see ``Settings``), or no projection is found.
    """
    settings = Settings(
        topk=topk,
        chunk_tokens=chunk_tokens,
        every_n_steps=every_n_steps,
        rank0_only_export=rank0_only_export,
        shift_labels=shift_labels,
        rows=rows,
        ignore_index=ignore_index,
        max_tools=max_tools,
        side_stream=side_stream,
        max_in_flight=max_in_flight,
        process_group=process_group,
        binary_entropy=binary_entropy,
        top_n=top_n,
        outlier_k=outlier_k,
    )
    return Observer(Recorder(model, settings, layer=layer), Publisher(settings, exporters))
