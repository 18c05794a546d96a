"""``Recorder``: one forward hook on the output projection streams exact token statistics per block.

The hook sees the logits as the model produces them (full ``[B, S, V]``, torchtune's sequence
chunks, or flattened rows of the valid tokens), slices the labels/classes/tool slots given to
``begin()`` to match, and feeds an engine (inline on CPU, a side stream on CUDA). It never
touches autograd and keeps no logits past ``end()``. ``drain()`` hands the window's sums to a
``Publisher``, which reduces and reports them.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from agent_obs.accumulator import StatsAccumulator
from agent_obs.engine import Engine, make_engine
from agent_obs.kernel import BLOCK
from agent_obs.metrics import check_inputs
from agent_obs.projection import Projection, find_projection
from agent_obs.samples import SampleIndex
from agent_obs.settings import Rows, Settings
from agent_obs.tensor_parallel import check_replicas, full_logits, tensor_parallel_mesh
from agent_obs.token_class import TokenClass
from agent_obs.tools import NO_TOOL, known_tools

Targets = torch.Tensor | Sequence[int | str] | None


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


@dataclass
class Window:
    """What a recorder saw since its last ``drain()``: this rank's sums, before any reduction.

    ``sums``: the accumulator's rows (class groups, then tool slots, the last one "other").
    ``slot_tools``: ``(tool id, name or None if unknown)`` per local tool slot, in slot order.
    ``samples``/``sample_sums``: the window's sample ids and their per-sample rows. ``blocks``:
    ``observe()`` blocks so far (the default step).
    """

    sums: torch.Tensor
    slot_tools: list[tuple[int, str | None]]
    samples: SampleIndex
    sample_sums: torch.Tensor
    blocks: int
    overflowed: frozenset[int] = frozenset()  # tool ids that found no free slot: their rows are not exact here


class Observing:
    """``with recorder.observe(...):`` -- ``begin()`` on entry, ``end()`` on exit (discarded on an exception)."""

    def __init__(self, recorder: Recorder, targets: dict[str, Targets]) -> None:
        self.recorder = recorder
        self.targets = targets

    def __enter__(self) -> None:
        self.recorder.begin(**self.targets)

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        self.recorder._end(discard=exc_type is not None)


class Recorder:
    """The hook on ``model``'s output projection: ``begin()``/``end()`` blocks record, ``drain()`` empties.

    Args:
        model: the model whose forwards are observed (its device places the targets).
        settings: how to record (see ``Settings``); share them with the ``Publisher``.
        layer: the projection (module, dotted name or torchtune ``TiedLinear``); found by name or
            vocabulary size when None.
    """

    def __init__(self, model: nn.Module, settings: Settings, *, layer: nn.Module | str | object | None = None) -> None:
        self.model = model
        self.settings = settings
        self.projection: Projection = find_projection(model, layer)
        self.blocks_seen = 0
        self._samples = SampleIndex()  # this window's sample ids -> rows of the per-sample table
        self._checked_mesh: object = None  # the TP mesh already checked against process_group
        self._empty = StatsAccumulator(settings.topk, num_tool_slots=settings.num_tool_slots).sums
        self._engines: dict[torch.device, Engine] = {}
        self._slots: dict[int, int] = {}  # tool id -> local slot, in slot order
        self._overflowed: set[int] = set()  # tool ids of this window that found no free slot
        self._slots_before: dict[int, int] = {}  # the slots when the open block began (restored if it fails)
        self._block: _Block | None = None
        self._skipping = False  # inside a block that every_n_steps (or graph capture) skips
        self._uncollected = False  # a block was committed since the last drain()
        self._warned: set[str] = set()
        self._handle = self.projection.module.register_forward_hook(torch.compiler.disable(self._on_output))

    # -- blocks ------------------------------------------------------------------------------

    def begin(
        self,
        labels: Targets = None,
        token_classes: Targets = None,
        tool_ids: Targets = None,
        tool_args: Targets = None,
        sample_ids: Targets = None,
    ) -> None:
        """Start a block: the projection calls until ``end()`` are recorded against these targets.

        Args:
            labels: ``[B, S]`` (or ``[S]``) token ids aligned to the logits positions (unshifted with
                ``shift_labels=True``); ``ignore_index`` where not scored.
            token_classes: ``TokenClass`` per position, same shape.
            tool_ids: ``tool_id(name)`` per tool-call token (needs ``token_classes``); mapped to slots on
                the host (a sync when on a GPU).
            tool_args: nonzero inside a tool-call argument value (``token_tool_args``); splits tool_call
                into ``tool_syntax_*``/``tool_args_*``.
            sample_ids: the sample of each sequence (``[B]`` ints or strs) or of each token (``[B, S]``
                ints, -1 for none, for packed batches); ``collect()`` then reports the hardest samples.

        Only every ``every_n_steps``-th block records; the others cost nothing. No host sync on CUDA
        except as noted and for ``rows="valid"`` with GPU labels; host targets are copied through
        pinned memory; label range checks run only for host labels.
        """
        if self._handle is None:
            raise RuntimeError("this observer is detached: call agent_obs.attach(model) again")
        if self._block is not None or self._skipping:
            raise RuntimeError("observe() blocks do not nest: close the previous block first")
        self.blocks_seen += 1
        if (self.blocks_seen - 1) % self.settings.every_n_steps or self._capture_skip():
            self._skipping = True
            return
        self._slots_before = dict(self._slots)
        targets = self._prepare(labels, token_classes, tool_ids, tool_args, sample_ids)
        self._block = _Block(targets, self.settings.rows, self.projection.name)

    def end(self, *, discard: bool = False) -> None:
        """Close the block; it counts all or nothing: its sums (and tool slots) are kept only when it is complete.

        Args:
            discard: drop the block (the step raised); otherwise a block whose targets the projection
                did not cover exactly raises ``ValueError`` and is dropped.
        """
        self._end(discard=discard)

    def observe(
        self,
        labels: Targets = None,
        token_classes: Targets = None,
        tool_ids: Targets = None,
        tool_args: Targets = None,
        sample_ids: Targets = None,
    ) -> Observing:
        """``begin()`` these targets for the ``with`` block and ``end()`` it (discarded when the block raises)."""
        targets = {"labels": labels, "token_classes": token_classes, "tool_ids": tool_ids}
        return Observing(self, targets | {"tool_args": tool_args, "sample_ids": sample_ids})

    def _end(self, *, discard: bool) -> None:
        if self._skipping:
            self._skipping = False
            return
        block = self._block
        if block is None:
            raise RuntimeError("end() without begin(): start the block with recorder.begin(...)")
        clean = False
        try:
            if not discard and not block.captured:
                block.check_complete()
                clean = True
        finally:
            self._block = None
            for engine in self._engines.values():
                engine.end_block(commit=clean)
            if not clean:
                self._slots = self._slots_before
        self._uncollected |= clean and block.calls > 0
        if not discard and block.edited_in_place():
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
            check_replicas(mesh, self.settings.process_group, self.projection.name)
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
                engine = self._engines[logits.device] = self._make_engine(logits.device, self.settings.side_stream)
            engine.submit(
                logits,
                labels,
                classes,
                tool_slots,
                ignore_index=self.settings.ignore_index,
                tool_args=tool_args,
                sample_rows=sample_rows,
                num_samples=len(self._samples),
            )

    def _make_engine(self, device: torch.device, side_stream: bool) -> Engine:
        s = self.settings
        return make_engine(
            device,
            s.topk,
            num_tool_slots=s.num_tool_slots,
            chunk_tokens=s.chunk_tokens,
            side_stream=side_stream,
            max_in_flight=s.max_in_flight,
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
        if self.settings.rows == "valid" and labels is None:
            raise ValueError('rows="valid" maps logits rows to the tokens whose label is not ignore_index: pass labels')
        if any(t.dim() == 1 for t in present.values()):
            labels, classes, tools, args = (
                None if t is None else t.unsqueeze(0) for t in (labels, classes, tools, args)
            )
        rows = None
        if sample_ids is not None:
            ref = next((t for t in (labels, classes, tools, args) if t is not None), None)
            rows = self._samples.rows(sample_ids, None if ref is None else tuple(ref.shape))
        if self.settings.shift_labels:
            labels = None if labels is None else shift_left(labels, self.settings.ignore_index)
            classes = None if classes is None else shift_left(classes, TokenClass.IGNORE)
            tools = None if tools is None else shift_left(tools, NO_TOOL)
            args = None if args is None else shift_left(args, 0)
            rows = None if rows is None else shift_left(rows, -1)
        self._validate(labels, classes)
        slots = None if tools is None or not self.settings.max_tools else self._tool_slots(tools, classes)
        targets = {
            "labels": labels,
            "token_classes": classes,
            "tool_slots": slots,
            "tool_args": args,
            "sample_rows": rows,
        }
        if self.settings.rows == "valid":
            keep = labels != self.settings.ignore_index  # a host sync when labels are on a GPU (documented)
            targets = {k: None if t is None else to_device(t, keep.device)[keep] for k, t in targets.items()}
        device = self._model_device()
        return {k: None if t is None else to_device(t, device) for k, t in targets.items()}

    def _validate(self, labels: torch.Tensor | None, classes: torch.Tensor | None) -> None:
        """Check label range and class values where that costs no device sync (CPU tensors)."""
        vocab = self.projection.vocab_size
        if labels is not None and labels.device.type == "cpu" and vocab is not None:
            check_inputs((*labels.shape, vocab), labels, None, ignore_index=self.settings.ignore_index)
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
            overflow = self.settings.num_tool_slots - 1
            if slot >= overflow:
                self._overflowed.add(tid)
                return overflow
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

        Each combination of targets is its own compiled variant; the kernel logs one line while
        compiling. Records nothing.

        Args:
            dtype: the logits dtype (default: the projection's weight dtype; pass the autocast dtype
                under autocast).
            vocab_size: the logits width (default: the projection's).
            labels: the blocks will pass ``labels``.
            token_classes: the blocks will pass ``token_classes``.
            tool_ids: the blocks will pass ``tool_ids`` (default: ``token_classes and max_tools > 0``).
        """
        vocab = vocab_size or self.projection.vocab_size
        if vocab is None:
            raise ValueError(f"the vocabulary of {self.projection.name} is unknown: pass warmup(vocab_size=...)")
        weight = getattr(self.projection.module, "weight", None)
        param = weight if isinstance(weight, torch.Tensor) else next(self.model.parameters(), None)
        dtype = dtype or (torch.float32 if param is None else param.dtype)
        tool_ids = token_classes and self.settings.max_tools > 0 if tool_ids is None else tool_ids
        device = self._model_device()
        engine = self._make_engine(device, side_stream=False)
        # >= 2 rows (fewer run eagerly), and a count unlike the vocabulary dims, which dynamo would tie to it
        rows = next(r for r in (2, 3, 4) if r not in (vocab, vocab // BLOCK))
        zeros = torch.zeros(rows, dtype=torch.long, device=device)
        engine.submit(
            torch.zeros(rows, vocab, dtype=dtype, device=device),
            zeros if labels else None,
            zeros + int(TokenClass.TOOL_CALL) if token_classes else None,
            zeros if token_classes and tool_ids else None,
            ignore_index=self.settings.ignore_index,
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

    # -- draining ----------------------------------------------------------------------------

    def drain(self) -> Window:
        """This window's sums (then empty): waits for the side streams; no collective, no export."""
        if self._block is not None or self._skipping:
            raise RuntimeError("collect() inside an observe() block: call it after the block")
        drained = [engine.drain() for engine in self._engines.values()]
        sums = self._empty.clone() if not drained else drained[0]
        for more in drained[1:]:
            sums += more.to(sums.device)
        n = len(self._samples)
        tables = [engine.acc.take_samples(n).cpu() for engine in self._engines.values()]
        sample_sums = sum(tables[1:], tables[0]) if tables else StatsAccumulator().take_samples(n)
        known = known_tools()
        window = Window(
            sums=sums,
            slot_tools=[(tid, known.get(tid)) for tid in self._slots],
            samples=self._samples,
            sample_sums=sample_sums,
            blocks=self.blocks_seen,
            overflowed=frozenset(self._overflowed),
        )
        self._slots, self._samples, self._uncollected = {}, SampleIndex(), False
        self._overflowed = set()
        return window

    def reserve_tools(self, tool_ids: Sequence[int]) -> None:
        """Give these tools (the ones kept globally, the same list on every rank) the first slots of the next
        window, so none of them ever lands in a rank's overflow; the other slots go to newcomers."""
        if self._block is not None or self._slots:
            raise RuntimeError("reserve_tools() right after drain(), before the next block")
        self._slots = {tid: i for i, tid in enumerate(list(tool_ids)[: self.settings.max_tools])}

    def detach(self) -> None:
        """Remove the hook and stop the engines; the model is as before. Warns when a window was never drained."""
        self._detach()

    def _detach(self) -> None:
        if self._handle is None:
            return
        self._handle.remove()
        self._handle = None
        if self._uncollected:
            self._warn_once(
                "uncollected",
                "detach() drops the metrics observed since the last collect(): call obs.collect() before detach()",
                stacklevel=4,  # the caller of detach() (through _detach)
            )
        for engine in self._engines.values():
            engine.close()  # no side-stream write may outlive the memory it writes
        self._engines.clear()
