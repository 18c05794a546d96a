"""Where the hook's statistics run: inline on CPU, or on a CUDA side stream overlapped with training.

Both engines feed one ``StatsAccumulator`` (the same math); they differ only in when the work
runs and how long the logits must stay alive for it.
"""

from __future__ import annotations

from collections import deque

import torch

from agent_obs.accumulator import StatsAccumulator


class InlineEngine:
    """Computes the statistics in the hook, on the caller's stream: nothing outlives the call."""

    def __init__(self, acc: StatsAccumulator) -> None:
        self.acc = acc

    def submit(self, logits, labels, classes, slots, *, ignore_index: int, **extra) -> None:
        """Add one chunk of rows ``[N, V]`` (labels/classes/slots ``[N]`` or None; ``extra``: see ``update``)."""
        self.acc.update(logits, labels, classes, slots, ignore_index=ignore_index, **extra)

    def end_block(self) -> None:
        """Nothing in flight: the work ran inside ``submit``."""

    def drain(self) -> torch.Tensor:
        """The sums so far (then zeroed)."""
        sums = self.acc.sums.clone()
        self.acc.reset()
        return sums


class SideStreamEngine:
    """CUDA: the statistics run on a per-device side stream that waits on the producing stream.

    ``submit`` never synchronises the host. Each chunk's tensors are held in a bounded deque of
    ``(done event, tensors)`` and released once the event has completed; beyond ``max_in_flight``
    chunks the producing stream waits on the oldest event (``wait_event``: device-side
    back-pressure, no host sync), after which freeing the tensors is safe for the caching allocator
    because every later kernel of that stream is ordered after the side stream's reads.
    The side stream reads the logits while training goes on, so an in-place edit of the
    projection's output by the model (rather than a new tensor) would race with it.
    """

    def __init__(self, acc: StatsAccumulator, device: torch.device, max_in_flight: int) -> None:
        self.acc = acc
        self.device = device
        self.max_in_flight = max_in_flight
        self.stream = torch.cuda.Stream(device=device)
        self._in_flight: deque[tuple[torch.cuda.Event, tuple[torch.Tensor, ...]]] = deque()

    def submit(self, logits, labels, classes, slots, *, ignore_index: int, **extra) -> None:
        """Queue one chunk on the side stream after the work that produced it (``extra``: see ``update``)."""
        producer = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(producer)
        with torch.cuda.stream(self.stream):
            self.acc.update(logits, labels, classes, slots, ignore_index=ignore_index, **extra)
        done = torch.cuda.Event()
        done.record(self.stream)
        tensors = (logits, labels, classes, slots, *extra.values())
        held = tuple(t for t in tensors if isinstance(t, torch.Tensor))
        self._in_flight.append((done, held))
        self._release_completed()
        while len(self._in_flight) > self.max_in_flight:
            event, _ = self._in_flight.popleft()
            producer.wait_event(event)

    def end_block(self) -> None:
        """Drop every reference at the end of ``observe()`` so no logits outlive the step.

        Chunks the side stream has not finished yet are handed to the caching allocator with
        ``record_stream`` (at most ``max_in_flight`` of them): their memory is reused only after
        the side stream's reads, without the producing stream having to wait.
        """
        for event, held in self._in_flight:
            if not event.query():
                for t in held:
                    t.record_stream(self.stream)
        self._in_flight.clear()

    def drain(self) -> torch.Tensor:
        """Wait for the side stream only, then return the device sums (then zeroed)."""
        self.stream.synchronize()
        self._in_flight.clear()
        producer = torch.cuda.current_stream(self.device)
        sums = self.acc.sums.clone()
        self.stream.wait_stream(producer)
        with torch.cuda.stream(self.stream):
            self.acc.reset()
        return sums

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
    acc = StatsAccumulator(topk, device=device, num_tool_slots=num_tool_slots, chunk_tokens=chunk_tokens)
    if device.type == "cuda" and side_stream:
        return SideStreamEngine(acc, device, max_in_flight)
    return InlineEngine(acc)
