"""``ShardSampler``: every row of a dataset exactly once across data-parallel ranks (for validation).

``DistributedSampler`` pads the last round with repeated rows so that every rank gets as many
rows; that repeats val rows in the metrics. Here rank ``r`` takes rows ``r, r + n, r + 2n, ...``
and ranks may get one row less; the recipe keeps the ranks' forward counts equal itself.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch.utils.data import Sampler


class ShardSampler(Sampler[int]):
    """Rows ``rank::num_replicas`` of ``range(num_rows)``, in order, without padding."""

    def __init__(self, num_rows: int, *, num_replicas: int, rank: int) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        self.rows = range(rank, num_rows, num_replicas)

    def __iter__(self) -> Iterator[int]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)
