"""``attach()``: one forward hook on the output projection streams exact token statistics per step.

The hook sees the logits as the model produces them (full ``[B, S, V]``, torchtune's sequence
chunks, or flattened rows of the valid tokens), slices the labels/classes/tool slots given to
``observe()`` to match, and feeds an engine (inline on CPU, a side stream on CUDA). It never
touches autograd and keeps no logits past the ``observe()`` block.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

from agent_obs.accumulator import DEFAULT_TOPK, Metrics, StatsAccumulator, metrics_from_sums
from agent_obs.distributed import ToolSelector, rank, reduce_sums
from agent_obs.engine import Engine, make_engine
from agent_obs.exporters.base import Exporter, close_all, export_all, limit_tools
from agent_obs.kernel import BLOCK
from agent_obs.keys import NONFINITE, OUTLIERS
from agent_obs.metrics import check_inputs
from agent_obs.projection import Projection, find_projection
from agent_obs.samples import DEFAULT_OUTLIER_K, SampleIndex, collect_samples
from agent_obs.tensor_parallel import check_replicas, full_logits, tensor_parallel_mesh
from agent_obs.token_class import TokenClass
from agent_obs.tools import NO_TOOL, known_tools

Rows = Literal["all", "valid"]


class _Block:
    """The targets of one ``observe()`` block and how many logits positions the hook has consumed.

    ``rows="all"``: targets are ``[B, S]`` and each projection call yields ``[B, s, V]`` (or
    ``[s, V]`` when ``B == 1``) for the next ``s`` positions. ``rows="valid"``: targets are the
    valid positions flattened in order and each call yields ``[n, V]`` for the next ``n``.
    """

    def __init__(self, targets: dict[str, torch.Tensor | None], rows: Rows, layer_name: str) -> None:
        self.targets = targets
        self.rows = rows
        self.layer_name = layer_name
        self.ref = next((t for t in targets.values() if t is not None), None)
        self.total = 0 if self.ref is None else self.ref.shape[-1]
        self.offset = 0
        self.calls = 0
        self.captured = False  # a call came during CUDA graph capture: the block is not observed
        self.outputs: list[tuple[weakref.ref, int]] = []  # projection outputs and their _version when read

    def watch(self, output: torch.Tensor) -> None:
        """Remember ``output``'s version counter (weakly) to detect in-place edits before the block ends."""
        if not output.is_inference():  # inference tensors have no version counter
            self.outputs.append((weakref.ref(output), output._version))

    def edited_in_place(self) -> bool:
        """Whether an output still alive was modified in place after the hook read it."""
        return any((t := ref()) is not None and t._version != version for ref, version in self.outputs)

    def take(self, logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Rows ``[N, V]`` of this call and the matching ``[N]`` targets (None where not given)."""
        self.calls += 1
        vocab = logits.shape[-1]
        if self.ref is None:
            return (logits.reshape(-1, vocab), None, None, None)
        self._move_to(logits.device)
        if self.rows == "valid":
            n = logits.reshape(-1, vocab).shape[0]
            index: tuple = (slice(self.offset, self.offset + n),)
        else:
            batch = self.ref.shape[0]
            if logits.dim() == 3 and logits.shape[0] == batch:
                n = logits.shape[1]
            elif logits.dim() == 2 and batch == 1:
                n = logits.shape[0]
            else:
                raise ValueError(
                    f"{self.layer_name} produced logits of shape {tuple(logits.shape)} but observe() got targets "
                    f"of shape {tuple(self.ref.shape)}: pass labels shaped [batch, seq] like the model input, or "
                    'attach(..., rows="valid") when the loss projects only the valid tokens as flat rows'
                )
            index = (slice(None), slice(self.offset, self.offset + n))
        if self.offset + n > self.total:
            raise ValueError(
                f"{self.layer_name} produced {self.offset + n} positions in this observe() block but the targets "
                f"have {self.total}: give observe() the labels of exactly one forward, aligned to the logits "
                "(shift_labels=True for unshifted Hugging Face labels)"
            )
        self.offset += n
        picked = [None if t is None else t[index].reshape(-1) for t in self.targets.values()]
        return (logits.reshape(-1, vocab), *picked)

    def check_complete(self) -> None:
        """Raise when the projection covered only part of the targets; warn when it never ran."""
        if self.calls == 0:
            warnings.warn(
                f"observe() block ended without any call of {self.layer_name}: nothing was recorded. If the loss "
                "never calls the projection (a fused linear-cross-entropy kernel such as Liger's), disable that "
                "fusion or pass the module the loss does call as attach(model, layer=...)",
                RuntimeWarning,
                stacklevel=4,
            )
        elif self.ref is not None and self.offset != self.total:
            raise ValueError(
                f"{self.layer_name} produced {self.offset} positions in this observe() block but the targets have "
                f"{self.total}: the labels do not line up with the logits (rows={self.rows!r}; use "
                'shift_labels=True for unshifted labels, rows="valid" for flat valid-token rows)'
            )

    def _move_to(self, device: torch.device) -> None:
        for key, t in self.targets.items():
            if t is not None and t.device != device:
                self.targets[key] = to_device(t, device)
        self.ref = next(t for t in self.targets.values() if t is not None)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy to ``device`` without a host sync when going host -> CUDA (via pinned memory)."""
    if t.device == device:
        return t
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def shift_left(t: torch.Tensor, fill: int) -> torch.Tensor:
    """``t[..., 1:]`` followed by ``fill``: position i gets token i+1's value."""
    return torch.cat([t[..., 1:], torch.full_like(t[..., :1], fill)], dim=-1)


class Observer:
    """A hooked model: ``observe()`` blocks record, ``collect()`` returns (and exports) the metrics."""

    def __init__(
        self,
        model: nn.Module,
        projection: Projection,
        *,
        topk: tuple[int, ...],
        chunk_tokens: int | None,
        every_n_steps: int,
        exporters: Sequence[Exporter],
        rank0_only_export: bool,
        shift_labels: bool,
        rows: Rows,
        ignore_index: int,
        max_tools: int,
        side_stream: bool,
        max_in_flight: int,
        process_group: torch.distributed.ProcessGroup | None = None,
        binary_entropy: bool = False,
        top_n: int = 10,
        outlier_k: float = DEFAULT_OUTLIER_K,
    ) -> None:
        self.model = model
        self.projection = projection
        self.topk = tuple(topk)
        self.chunk_tokens = chunk_tokens
        self.every_n_steps = every_n_steps
        self.exporters = list(exporters)
        self.rank0_only_export = rank0_only_export
        self.shift_labels = shift_labels
        self.rows = rows
        self.ignore_index = ignore_index
        self.max_tools = max_tools
        self._tools = ToolSelector(max_tools)  # which tools keep their own keys, stable across collects
        limit_tools(self.exporters, max_tools)  # exporters drop series of tools it stops keeping
        self.side_stream = side_stream
        self.max_in_flight = max_in_flight
        self.process_group = process_group
        self._checked_mesh: object = None  # the TP mesh already checked against process_group
        self.binary_entropy = binary_entropy
        self.top_n = top_n
        self.outlier_k = outlier_k
        self._samples = SampleIndex()  # this log window's sample ids -> rows of the per-sample table
        self.blocks_seen = 0
        self._empty = StatsAccumulator(self.topk, num_tool_slots=self._num_tool_slots).sums
        self._engines: dict[torch.device, Engine] = {}
        self._slots: dict[int, int] = {}  # tool id -> local slot, in slot order
        self._block: _Block | None = None
        self._skipping = False  # inside a block that every_n_steps (or graph capture) skips
        self._uncollected = False  # a block was committed since the last collect()
        self._warned: set[str] = set()
        self._handle = projection.module.register_forward_hook(torch.compiler.disable(self._on_output))

    @property
    def _num_tool_slots(self) -> int:
        return self.max_tools + 1 if self.max_tools > 0 else 0  # the last slot is "other"

    # -- recording ---------------------------------------------------------------------------

    @contextmanager
    def observe(
        self,
        labels: torch.Tensor | None = None,
        token_classes: torch.Tensor | None = None,
        tool_ids: torch.Tensor | None = None,
        tool_args: torch.Tensor | None = None,
        sample_ids: torch.Tensor | Sequence[int | str] | None = None,
    ) -> Iterator[None]:
        """Record the projection calls of the forward(s) inside the block against these targets.

        ``labels``/``token_classes``/``tool_ids`` are ``[B, S]`` (or ``[S]``) aligned to the logits
        positions (``shift_labels=True`` at attach for unshifted labels). Only every
        ``every_n_steps``-th block records; the others cost nothing. No host sync on CUDA
        except, by design, for ``tool_ids`` held on the GPU (mapped to slots on the host) and
        ``rows="valid"`` with GPU labels (the valid rows are selected here); host targets are
        copied through pinned memory. Label range checks run only for host labels.

        ``tool_args`` (like ``token_classes``; nonzero inside an argument value, see
        ``token_tool_args``) splits tool_call into ``tool_syntax_*``/``tool_args_*``. ``sample_ids``
        names the sample of each sequence (``[B]`` ints or strs) or of each token (``[B, S]`` ints,
        -1 for none, for packed batches); ``collect()`` then reports the hardest samples. Ids are
        mapped to rows on the host (a sync if they are on a GPU).
        """
        if self._handle is None:
            raise RuntimeError("this observer is detached: call agent_obs.attach(model) again")
        if self._block is not None or self._skipping:
            raise RuntimeError("observe() blocks do not nest: close the previous block first")
        self.blocks_seen += 1
        if (self.blocks_seen - 1) % self.every_n_steps or self._capture_skip():
            self._skipping = True
            try:
                yield
            finally:
                self._skipping = False
            return
        slots_before = dict(self._slots)
        block = _Block(
            self._prepare(labels, token_classes, tool_ids, tool_args, sample_ids), self.rows, self.projection.name
        )
        self._block = block
        clean = False  # a block counts all or nothing: its sums (and tool slots) are kept only when it ends cleanly
        try:
            yield
            if not block.captured:
                block.check_complete()
                clean = True
        finally:
            self._block = None
            for engine in self._engines.values():
                engine.end_block(commit=clean)
            if not clean:
                self._slots = slots_before
        self._uncollected |= clean and block.calls > 0
        if block.edited_in_place():
            self._warn_once(
                "inplace",
                f"the model modified the output of {self.projection.name} in place after agent_obs read it "
                "(e.g. logits.div_(t) or logits[..., i] = x): inline (CPU) the metrics describe the values before "
                "the edit, but the CUDA side stream may read either, so the metrics can be wrong. Use an "
                "out-of-place op (logits = logits / t) or attach(..., side_stream=False)",
            )

    def _on_output(self, module: nn.Module, args: tuple, output: object) -> None:
        block = self._block
        # a call during backward is activation-checkpoint recomputation: already counted
        if block is None or block.captured or torch._C._current_graph_task_id() != -1:
            return
        if not isinstance(output, torch.Tensor):
            raise TypeError(
                f"{self.projection.name} returned {type(output).__name__}, not a logits tensor: "
                "pass the module that outputs the logits as attach(model, layer=...)"
            )
        mesh = tensor_parallel_mesh(output, args)
        if mesh is not None and mesh is not self._checked_mesh:
            check_replicas(mesh, self.process_group, self.projection.name)
            self._checked_mesh = mesh
        if output.is_cuda and self._capture_skip():
            block.captured = True
            return
        block.watch(output)
        with torch.no_grad():
            if mesh is not None:
                output = full_logits(output.detach(), self.projection.vocab_size, self.projection.name)
            logits, labels, classes, tool_slots, tool_args, sample_rows = block.take(output.detach())
            engine = self._engines.get(logits.device)
            if engine is None:
                engine = make_engine(
                    logits.device,
                    self.topk,
                    num_tool_slots=self._num_tool_slots,
                    chunk_tokens=self.chunk_tokens,
                    side_stream=self.side_stream,
                    max_in_flight=self.max_in_flight,
                )
                self._engines[logits.device] = engine
            engine.submit(
                logits,
                labels,
                classes,
                tool_slots,
                ignore_index=self.ignore_index,
                tool_args=tool_args,
                sample_rows=sample_rows,
                num_samples=len(self._samples),
            )

    def _prepare(self, labels, token_classes, tool_ids, tool_args, sample_ids) -> dict[str, torch.Tensor | None]:
        given = {"labels": labels, "token_classes": token_classes, "tool_ids": tool_ids, "tool_args": tool_args}
        given = {k: None if v is None else torch.as_tensor(v) for k, v in given.items()}
        present = {k: v for k, v in given.items() if v is not None}
        shapes = {k: tuple(v.shape) for k, v in present.items()}
        if len(set(shapes.values())) > 1:
            raise ValueError(f"observe() targets must have one shape, got {shapes}")
        for name, t in present.items():
            if t.dim() not in (1, 2) or t.is_floating_point() or t.is_complex():
                raise ValueError(
                    f"{name} must be an integer tensor [batch, seq] or [seq], got {t.dtype} of shape {tuple(t.shape)}"
                )
        labels, classes, tools, args = (given[k] for k in ("labels", "token_classes", "tool_ids", "tool_args"))
        if (tools is not None or args is not None) and classes is None:
            raise ValueError("tool_ids/tool_args split the tool_call tokens by tool/part: pass token_classes too")
        if self.rows == "valid" and labels is None:
            raise ValueError('rows="valid" maps logits rows to the tokens whose label is not ignore_index: pass labels')
        if any(t.dim() == 1 for t in present.values()):
            labels, classes, tools, args = (
                None if t is None else t.unsqueeze(0) for t in (labels, classes, tools, args)
            )
        rows = None
        if sample_ids is not None:
            ref = next((t for t in (labels, classes, tools, args) if t is not None), None)
            rows = self._samples.rows(sample_ids, None if ref is None else tuple(ref.shape))
        if self.shift_labels:
            labels = None if labels is None else shift_left(labels, self.ignore_index)
            classes = None if classes is None else shift_left(classes, TokenClass.IGNORE)
            tools = None if tools is None else shift_left(tools, NO_TOOL)
            args = None if args is None else shift_left(args, 0)
            rows = None if rows is None else shift_left(rows, -1)
        self._validate(labels, classes)
        slots = None if tools is None or not self.max_tools else self._tool_slots(tools, classes)
        targets = {
            "labels": labels,
            "token_classes": classes,
            "tool_slots": slots,
            "tool_args": args,
            "sample_rows": rows,
        }
        if self.rows == "valid":
            keep = labels != self.ignore_index  # a host sync when labels are on a GPU (documented)
            targets = {k: None if t is None else to_device(t, keep.device)[keep] for k, t in targets.items()}
        device = self._model_device()
        return {k: None if t is None else to_device(t, device) for k, t in targets.items()}

    def _validate(self, labels: torch.Tensor | None, classes: torch.Tensor | None) -> None:
        """Check label range and class values where that costs no device sync (CPU tensors)."""
        vocab = self.projection.vocab_size
        if labels is not None and labels.device.type == "cpu" and vocab is not None:
            check_inputs((*labels.shape, vocab), labels, None, ignore_index=self.ignore_index)
        if classes is not None and classes.device.type == "cpu":
            check_inputs((*classes.shape, 1), None, classes)

    def _tool_slots(self, tool_ids: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Map tool ids to accumulator slots on the host (a sync if ``tool_ids`` is on a GPU).

        Ids off tool_call tokens count nowhere; they are dropped here when ``classes`` are on the
        host (so they take no slot) and otherwise left for the accumulator to ignore.
        """
        ids = tool_ids.cpu()
        if classes.device.type == "cpu":
            ids = torch.where(classes == TokenClass.TOOL_CALL, ids, NO_TOOL)
        uniq, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
        lut = torch.empty(len(uniq), dtype=torch.long)
        for i in counts.argsort(descending=True, stable=True).tolist():  # frequent tools get the free slots first
            lut[i] = self._slot(int(uniq[i]))
        return lut[inverse]

    def _slot(self, tid: int) -> int:
        if tid < 0:
            return -1
        slot = self._slots.get(tid)
        if slot is None:
            slot = len(self._slots)
            if slot >= self.max_tools:
                return self.max_tools  # "other"
            self._slots[tid] = slot
        return slot

    def _model_device(self) -> torch.device:
        if self._engines:
            return next(iter(self._engines))
        param = next(self.model.parameters(), None)
        return torch.device("cpu") if param is None else param.device

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

        ``dtype`` defaults to the projection's weight dtype (pass the autocast dtype under autocast),
        ``vocab_size`` to the projection's; ``labels``/``token_classes``/``tool_ids`` say which targets
        the ``observe()`` blocks will pass (each combination is its own compiled variant; ``tool_ids``
        defaults to ``token_classes and max_tools > 0``). The kernel logs one line while compiling; records nothing.
        """
        vocab = vocab_size or self.projection.vocab_size
        if vocab is None:
            raise ValueError(f"the vocabulary of {self.projection.name} is unknown: pass warmup(vocab_size=...)")
        weight = getattr(self.projection.module, "weight", None)
        param = weight if isinstance(weight, torch.Tensor) else next(self.model.parameters(), None)
        dtype = dtype or (torch.float32 if param is None else param.dtype)
        tool_ids = token_classes and self.max_tools > 0 if tool_ids is None else tool_ids
        device = self._model_device()
        engine = make_engine(
            device,
            self.topk,
            num_tool_slots=self._num_tool_slots,
            chunk_tokens=self.chunk_tokens,
            side_stream=False,
            max_in_flight=self.max_in_flight,
        )
        # >= 2 rows (fewer run eagerly), and a count unlike the vocabulary dims, which dynamo would tie to it
        rows = next(r for r in (2, 3, 4) if r not in (vocab, vocab // BLOCK))
        zeros = torch.zeros(rows, dtype=torch.long, device=device)
        engine.submit(
            torch.zeros(rows, vocab, dtype=dtype, device=device),
            zeros if labels else None,
            zeros + int(TokenClass.TOOL_CALL) if token_classes else None,
            zeros if token_classes and tool_ids else None,
            ignore_index=self.ignore_index,
        )

    def _capture_skip(self) -> bool:
        """True (after one warning) while the current CUDA stream is capturing a graph: nothing can be observed."""
        if not (torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()):
            return False
        self._warn_once(
            "capture",
            "agent_obs does not observe inside CUDA graph capture (events, stream waits and host copies cannot be "
            "captured): blocks during capture record nothing. Observe an uncaptured (eager) step instead",
        )
        return True

    def _warn_once(self, key: str, message: str, stacklevel: int = 4) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)

    # -- reporting ---------------------------------------------------------------------------

    def collect(self, split: str = "train", step: int | None = None) -> Metrics:
        """Metrics since the last collect (then reset), summed over ranks; exports on rank 0.

        Same keys as ``compute_metrics`` plus ``tool_call.{tool}_*``. Collective when
        torch.distributed is initialised: every rank must call it. ``step`` defaults to the
        number of ``observe()`` blocks so far.
        """
        if self._block is not None or self._skipping:
            raise RuntimeError("collect() inside an observe() block: call it after the block")
        step = self.blocks_seen if step is None else step
        sums = self._drain()
        self._uncollected = False
        known = known_tools()
        slot_tools = [(tid, known.get(tid)) for tid in self._slots]
        self._slots = {}
        sums, tool_names = reduce_sums(sums, slot_tools, self.max_tools, self._tools, group=self.process_group)
        metrics = metrics_from_sums(sums.cpu(), self.topk, tool_names, binary_entropy=self.binary_entropy)
        samples, outliers = collect_samples(
            self._samples, self._take_samples(), top_n=self.top_n, outlier_k=self.outlier_k, group=self.process_group
        )  # collective when distributed, like reduce_sums
        if outliers >= 0:
            metrics.samples, metrics[OUTLIERS] = samples, outliers
        self._samples = SampleIndex()
        observed = metrics.get("tokens", 0.0) + metrics[NONFINITE] > 0
        if observed and (rank() == 0 or not self.rank0_only_export):
            export_all(self.exporters, metrics, step=step, split=split)  # a failing exporter is logged
        return metrics

    def _drain(self) -> torch.Tensor:
        drained = [engine.drain() for engine in self._engines.values()]
        if not drained:
            return self._empty.clone()
        total = drained[0]
        for more in drained[1:]:
            total += more.to(total.device)
        return total

    def _take_samples(self) -> torch.Tensor:
        """The window's per-sample sums over every device (after ``_drain``: no side-stream work in flight)."""
        n = len(self._samples)
        tables = [engine.acc.take_samples(n).cpu() for engine in self._engines.values()]
        return sum(tables[1:], tables[0]) if tables else StatsAccumulator().take_samples(n)

    def detach(self) -> None:
        """Remove the hook and close the exporters; the model is as before ``attach``."""
        if self._handle is None:
            return
        self._handle.remove()
        self._handle = None
        if self._uncollected:
            self._warn_once(
                "uncollected",
                "detach() drops the metrics observed since the last collect(): call obs.collect() before detach()",
                stacklevel=3,
            )
        for engine in self._engines.values():
            engine.close()  # no side-stream write may outlive the memory it writes
        self._engines.clear()
        close_all(self.exporters)

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

    ``layer``: the projection (module, dotted name or torchtune ``TiedLinear``), found by name
    or vocabulary size when None. ``shift_labels``: labels are unshifted (Hugging Face style).
    ``rows="valid"``: the loss calls the projection on flat rows of only the valid tokens.
    ``max_tools``: distinct tool names with their own keys (the rest as ``_other``).
    ``side_stream``/``max_in_flight``: the CUDA engine (statistics overlapped on a side stream,
    at most this many chunks in flight). ``process_group``: the ranks ``collect()`` sums over, by default
    all; under tensor parallelism the data-parallel group (TP ranks see the same tokens; ``DTensor``
    logits are gathered exactly). ``binary_entropy``: add the seed's ``top1_binary_entropy``
    keys. ``top_n``/``outlier_k``: how many hardest samples ``collect()`` returns and the outlier
    threshold (median + k x 1.4826 x MAD of the window's per-sample mean NLL), with ``sample_ids``.
    """
    if not isinstance(every_n_steps, int) or every_n_steps < 1:
        raise ValueError(f"every_n_steps must be an integer >= 1, got {every_n_steps!r}")
    if rows not in ("all", "valid"):
        raise ValueError(f'rows must be "all" (logits for every position) or "valid" (flat valid rows), got {rows!r}')
    if max_tools < 0 or max_in_flight < 1:
        raise ValueError(f"need max_tools >= 0 and max_in_flight >= 1, got {max_tools} and {max_in_flight}")
    return Observer(
        model,
        find_projection(model, layer),
        topk=topk,
        chunk_tokens=chunk_tokens,
        every_n_steps=every_n_steps,
        exporters=exporters,
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
