"""``Settings``: every option of ``attach()`` but the model, the layer and the exporters, validated once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from agent_obs.accumulator import DEFAULT_TOPK
from agent_obs.samples import DEFAULT_OUTLIER_K

Rows = Literal["all", "valid"]


@dataclass(frozen=True)
class Settings:
    """How a ``Recorder`` records and a ``Publisher`` reduces and reports; shared by both.

    Args:
        topk: top-k probability masses to report, e.g. ``(1, 5, 10)``.
        chunk_tokens: logits rows per kernel call (None: sized from the vocabulary).
        every_n_steps: record only every n-th ``observe()`` block; the others cost nothing.
        rank0_only_export: export only on rank 0 (every rank still gets the metrics from ``collect()``).
        shift_labels: labels are unshifted (Hugging Face style): position t is scored against token t + 1.
        rows: ``"all"`` when the projection sees every position, ``"valid"`` when the loss projects only
            the tokens whose label is not ``ignore_index``, as flat rows.
        ignore_index: the label of tokens that are not scored.
        max_tools: distinct tools with their own keys (the rest as ``_other``); 0 disables the breakdown.
        side_stream: on CUDA, compute the statistics on a side stream that overlaps the training step.
        max_in_flight: at most this many chunks queued on the side stream.
        process_group: the ranks ``collect()`` sums over (None: all); under tensor parallelism the
            data-parallel group.
        binary_entropy: add the ``top1_binary_entropy`` keys.
        top_n: how many hardest samples ``collect()`` returns when blocks pass ``sample_ids``.
        outlier_k: outlier threshold, median + k x 1.4826 x MAD of the window's per-sample mean NLL.
    """

    topk: tuple[int, ...] = DEFAULT_TOPK
    chunk_tokens: int | None = None
    every_n_steps: int = 1
    rank0_only_export: bool = True
    shift_labels: bool = False
    rows: Rows = "all"
    ignore_index: int = -100
    max_tools: int = 16
    side_stream: bool = True
    max_in_flight: int = 4
    process_group: torch.distributed.ProcessGroup | None = None
    binary_entropy: bool = False
    top_n: int = 10
    outlier_k: float = DEFAULT_OUTLIER_K

    def __post_init__(self) -> None:
        topk = tuple(self.topk)
        if not topk or any(int(k) < 1 for k in topk):
            raise ValueError(f"topk must be positive integers, got {self.topk!r}; e.g. topk=(1, 5, 10)")
        object.__setattr__(self, "topk", tuple(int(k) for k in topk))
        if not isinstance(self.every_n_steps, int) or self.every_n_steps < 1:
            raise ValueError(f"every_n_steps must be an integer >= 1, got {self.every_n_steps!r}")
        if self.rows not in ("all", "valid"):
            raise ValueError(
                f'rows must be "all" (logits for every position) or "valid" (flat valid rows), got {self.rows!r}'
            )
        if self.max_tools < 0 or self.max_in_flight < 1:
            raise ValueError(
                f"need max_tools >= 0 and max_in_flight >= 1, got {self.max_tools} and {self.max_in_flight}"
            )
        if self.chunk_tokens is not None and (not isinstance(self.chunk_tokens, int) or self.chunk_tokens < 1):
            raise ValueError(f"chunk_tokens must be None (automatic) or an integer >= 1, got {self.chunk_tokens!r}")
        if not isinstance(self.top_n, int) or self.top_n < 0:
            raise ValueError(f"top_n must be an integer >= 0 (hardest samples per collect), got {self.top_n!r}")
        if not self.outlier_k > 0:
            raise ValueError(f"outlier_k must be > 0 (MADs above the median), got {self.outlier_k!r}")

    @property
    def num_tool_slots(self) -> int:
        """Local accumulator rows for tools: ``max_tools`` for the tools kept so far, as many for newcomers
        (so a rank can count a tool the others keep), and the last for the overflow (none when ``max_tools`` is 0)."""
        return 2 * self.max_tools + 1 if self.max_tools > 0 else 0
