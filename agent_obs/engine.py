"""Where the hook's statistics run: inline on CPU, or on a CUDA side stream overlapped with training.

Both engines feed one ``StatsAccumulator`` per ``observe()`` block (``staged``) and fold it into the
interval's accumulator (``acc``) only when the block ends cleanly, so a failed forward or a rejected
block counts nothing. They differ only in when the work runs and how long the logits stay alive.

Memory bound of the CUDA engine: besides the sums (a few KiB), the side stream keeps at most
``max_in_flight`` chunks of logits (and their ``[N]`` targets) alive past the producing stream's use
of them, so the extra peak memory is at most ``max_in_flight x`` the largest projection output (one
chunk of ``B x S / num_output_chunks x V`` elements in the logits' dtype) plus the kernel's working set
(about ``chunk_tokens x V x 4`` bytes, see ``default_chunk_tokens``).
"""

from __future__ import annotations

from collections import deque

import torch

from agent_obs.accumulator import StatsAccumulator


class InlineEngine:
    """Computes the statistics in the hook, on the caller's stream: nothing outlives the call."""

    def __init__(self, acc: StatsAccumulator, staged: StatsAccumulator) -> None:
        self.acc = acc
        self.staged = staged

    def submit(self, logits, labels, classes, slots, *, ignore_index: int, **extra) -> None:
        """Add one chunk of rows ``[N, V]`` (targets ``[N]`` or None; ``extra``: see ``update``) to the open block."""
        self.staged.update(logits, labels, classes, slots, ignore_index=ignore_index, **extra)

    def end_block(self, commit: bool = True) -> None:
        """Fold the block's sums into the interval's (``commit``) or drop them (a failed block)."""
        if commit:
            self.acc.merge(self.staged)
        self.staged.reset()

    def drain(self) -> torch.Tensor:
        """The committed sums so far (then zeroed)."""
        sums = self.acc.sums.clone()
        self.acc.sums.zero_()  # the per-sample table is handed over by ``take_samples``
        return sums

    def close(self) -> None:
        """Nothing runs asynchronously."""


class SideStreamEngine:
    """CUDA: the statistics run on a per-device side stream that waits on the producing stream.

    ``submit`` never synchronises the host. Each chunk's tensors are held in a bounded deque of
    ``(done event, tensors)`` and released once the event has completed; beyond ``max_in_flight``
    chunks the producing stream waits on the oldest event (``wait_event``: device-side
    back-pressure, no host sync), after which freeing the tensors is safe for the caching allocator
    because every later kernel of that stream is ordered after the side stream's reads.
    The accumulators are allocated on the side stream, which is the only stream that writes them
    (``drain`` reads them after synchronising it), so their memory is never reused under its feet.
    The side stream reads the logits while training goes on, so an in-place edit of the
    projection's output by the model (rather than a new tensor) would race with it (the observer warns).
    """

    def __init__(
        self, acc: StatsAccumulator, staged: StatsAccumulator, stream: torch.cuda.Stream, max_in_flight: int
    ) -> None:
        self.acc = acc
        self.staged = staged
        self.device = stream.device
        self.stream = stream
        self.max_in_flight = max_in_flight
        self._in_flight: deque[tuple[torch.cuda.Event, tuple[torch.Tensor, ...]]] = deque()
        self._dirty = False  # the side stream has written ``staged`` since the last end_block

    def submit(self, logits, labels, classes, slots, *, ignore_index: int, **extra) -> None:
        """Queue one chunk on the side stream after the work that produced it (``extra``: see ``update``)."""
        producer = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(producer)
        with torch.cuda.stream(self.stream):
            self.staged.update(logits, labels, classes, slots, ignore_index=ignore_index, **extra)
        self._dirty = True
        done = torch.cuda.Event()
        done.record(self.stream)
        tensors = (logits, labels, classes, slots, *extra.values())
        held = tuple(t for t in tensors if isinstance(t, torch.Tensor))
        self._in_flight.append((done, held))
        self._release_completed()
        while len(self._in_flight) > self.max_in_flight:
            event, _ = self._in_flight.popleft()
            producer.wait_event(event)

    def end_block(self, commit: bool = True) -> None:
        """Fold (or drop) the block's sums on the side stream and drop every reference to its logits.

        The merge is queued after the block's updates on the same stream: no host sync. Chunks the
        side stream has not finished yet are handed to the caching allocator with ``record_stream``
        (at most ``max_in_flight`` of them): their memory is reused only after the side stream's
        reads, without the producing stream having to wait.
        """
        if self._dirty:
            with torch.cuda.stream(self.stream):
                if commit:
                    self.acc.merge(self.staged)
                self.staged.reset()
            self._dirty = False
        capturing = torch.cuda.is_current_stream_capturing()  # event queries are not allowed during capture
        for event, held in self._in_flight:
            if capturing or not event.query():
                for t in held:
                    t.record_stream(self.stream)
        self._in_flight.clear()

    def drain(self) -> torch.Tensor:
        """Wait for the side stream only, then return the committed device sums (then zeroed)."""
        self.stream.synchronize()
        self._in_flight.clear()
        producer = torch.cuda.current_stream(self.device)
        sums = self.acc.sums.clone()
        self.stream.wait_stream(producer)  # the reset waits for the clone
        with torch.cuda.stream(self.stream):
            self.acc.sums.zero_()  # the per-sample table is handed over by ``take_samples``
        return sums

    def close(self) -> None:
        """Make the producing stream wait for the side stream (device-side) before anything is freed."""
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        for _, held in self._in_flight:
            for t in held:
                t.record_stream(self.stream)
        self._in_flight.clear()

    def _release_completed(self) -> None:
        while self._in_flight and self._in_flight[0][0].query():
            self._in_flight.popleft()


Engine = InlineEngine | SideStreamEngine


def make_engine(
    device: torch.device,
    topk: tuple[int, ...],
    *,
    num_tool_slots: int,
    chunk_tokens: int | None,
    side_stream: bool,
    max_in_flight: int,
) -> Engine:
    """A side-stream engine for CUDA devices (unless ``side_stream=False``), else the inline one."""

    def accumulator() -> StatsAccumulator:
        return StatsAccumulator(topk, device=device, num_tool_slots=num_tool_slots, chunk_tokens=chunk_tokens)

    if device.type != "cuda" or not side_stream:
        return InlineEngine(accumulator(), accumulator())
    stream = torch.cuda.Stream(device=device)
    with torch.cuda.stream(stream):  # allocated on the stream that writes them
        acc, staged = accumulator(), accumulator()
    return SideStreamEngine(acc, staged, stream, max_in_flight)
