"""``AgentObsCallback``: agent-obs metrics in a Hugging Face ``Trainer`` (and TRL's ``SFTTrainer``).

The callback puts one recorder per mode (train, eval) on the model's output projection, both
publishing through one ``Publisher`` (one set of exporters, closed once). A forward pre-hook
``begin()``s a block (popping the collator's ``token_classes``/``tool_ids``/``tool_args``/``sample_ids``
so the model never sees them) and a forward hook ``end()``s it. At each logging step it publishes (all ranks: the
reduction is collective) and adds ``train_*``/``eval_*`` keys to the logs.
When the loss path never calls the projection (Liger's or TRL's fused linear cross entropy), the
hidden states are re-projected without grad so the metrics are still reported.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import TrainerCallback

from agent_obs.accumulator import DEFAULT_TOPK
from agent_obs.projection import find_projection
from agent_obs.publisher import Publisher
from agent_obs.recorder import Recorder
from agent_obs.settings import Settings

RECOMPUTE_BYTES = 64 * 2**20
_RUNTIME = "_runtime"


def fused_head_reasons(args: Any, model: torch.nn.Module | None) -> list[str]:
    """Why this run's training loss would skip ``lm_head`` (empty when it calls it), each naming the fix."""
    reasons = []
    liger_config = getattr(args, "liger_kernel_config", None) or {}
    if getattr(args, "use_liger_kernel", False) and liger_config.get("fused_linear_cross_entropy", True):
        reasons.append(
            "use_liger_kernel=True: Liger's fused linear cross entropy computes the training loss without calling "
            "lm_head; set liger_kernel_config={'fused_linear_cross_entropy': False} (keeps Liger's other kernels) "
            "or use_liger_kernel=False to observe the real projection"
        )
    if model is not None and _has_trl_fused_head(model):
        reasons.append(
            "TRL's SFTTrainer scores tokens with a fused LM head (trl add_fused_lm_head) that never calls lm_head "
            "and has no option to turn it off"
        )
    return reasons


def _has_trl_fused_head(model: torch.nn.Module) -> bool:
    func = getattr(model.__dict__.get("forward"), "__func__", None)
    return getattr(getattr(func, "__code__", None), "co_name", "") == "_fused_forward"


class AgentObsCallback(TrainerCallback):
    """Entropy/perplexity/top-k/accuracy per token class and tool in a ``Trainer``'s logs and exporters.

    Add it with ``AgentObsCallback.install(trainer, ...)`` so it runs before the ``report_to``
    integrations; train batches need ``token_classes`` (and optionally ``tool_ids``) from
    ``AgentChatCollator``.

    Args:
        model: attach to this model now (``install`` and the trainer's events attach otherwise).
        exporters: where the metrics go besides the logs (train and eval alike); closed by ``detach()``.
        topk: top-k probability masses to report.
        layer: the output projection, when it cannot be found by name or vocabulary size.
        chunk_tokens: logits rows per kernel call (None: sized from the vocabulary).
        recompute_fused_head: when the loss never calls ``lm_head`` (a fused linear cross entropy),
            re-project the hidden states without grad so the metrics are still reported.
        **attach_kwargs: other ``Settings`` fields (``max_tools``, ``every_n_steps``, ...), as for
            ``agent_obs.attach``.
    """

    def __init__(
        self,
        model: torch.nn.Module | None = None,
        *,
        exporters: Sequence[Any] = (),
        topk: tuple[int, ...] = DEFAULT_TOPK,
        layer: torch.nn.Module | str | None = None,
        chunk_tokens: int | None = None,
        recompute_fused_head: bool = True,
        **attach_kwargs: Any,
    ) -> None:
        self.exporters = tuple(exporters)
        self.layer = layer
        self.recompute_fused_head = recompute_fused_head
        self.settings = Settings(topk=topk, chunk_tokens=chunk_tokens, shift_labels=True, **attach_kwargs)
        self.recorders: dict[str, Recorder] = {}
        self.publisher: Publisher | None = None
        self.model: torch.nn.Module | None = None
        self._head: torch.nn.Module | None = None
        self._handles: list[Any] = []
        self._open: Recorder | None = None  # the recorder whose block is open
        self._head_calls = 0
        self._hidden: torch.Tensor | None = None
        self._warned_reasons: set[str] = set()
        self._warned_skip = False
        self._first = False
        self._warned_order = False
        if model is not None:
            self.attach(model)

    @classmethod
    def install(cls, trainer: Any, **kwargs: Any) -> AgentObsCallback:
        """Create the callback, attach it to ``trainer.model`` and put it first in the trainer's callbacks.

        First, so the ``train_*``/``eval_*`` keys it adds in ``on_log`` reach every ``report_to``
        integration (user callbacks otherwise run after them).

        Args:
            trainer: a ``transformers.Trainer`` (or TRL ``SFTTrainer``).
            **kwargs: the constructor's arguments.
        """
        callback = cls(**kwargs)
        trainer.callback_handler.callbacks.insert(0, callback)
        callback._first = True
        callback.attach(trainer.model)
        callback.check_args(trainer.args)
        return callback

    # ---- attaching -------------------------------------------------------------------------
    def attach(self, model: torch.nn.Module) -> None:
        """Hook ``model`` (a ``PreTrainedModel``); a no-op when already attached to it."""
        if self.model is model:
            return
        if self.model is not None:
            self.detach()
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        head = find_projection(inner, self.layer).module
        self.recorders = {split: Recorder(inner, self.settings, layer=head) for split in ("train", "eval")}
        self.publisher = Publisher(self.settings, self.exporters)
        self._head = head
        backbone = getattr(inner, "base_model", None)
        self._handles = [
            inner.register_forward_pre_hook(self._pre_forward, with_kwargs=True),
            inner.register_forward_hook(self._post_forward, always_call=True),
            self._head.register_forward_hook(self._head_called),
        ]
        if isinstance(backbone, torch.nn.Module) and backbone is not inner:
            self._handles.append(backbone.register_forward_hook(self._backbone_output))
        self.model = model

    def detach(self) -> None:
        """Remove every hook and recorder and close the exporters."""
        self._close_block()
        for handle in self._handles:
            handle.remove()
        for recorder in self.recorders.values():
            recorder.detach()
        if self.publisher is not None:
            self.publisher.close()
        self._handles, self.recorders, self.publisher, self.model = [], {}, None, None

    def check_args(self, args: Any) -> None:
        """Warn (once each) when the configured loss path never calls ``lm_head``, naming the option that fixes it.

        Called at init and again at train begin: TRL patches the forward after ``Trainer.__init__``.
        """
        for reason in fused_head_reasons(args, self.model):
            if reason not in self._warned_reasons:
                self._warned_reasons.add(reason)
                self._warn_fused(reason)

    def _warn_fused(self, reason: str) -> None:
        self._warned_skip = True
        if self.recompute_fused_head:
            tail = (
                "agent-obs re-projects the hidden states through lm_head without grad to observe them (one extra "
                "lm_head forward per micro-batch); AgentObsCallback(recompute_fused_head=False) skips that and "
                "then reports no metrics for those forwards"
            )
        else:
            tail = "with recompute_fused_head=False agent-obs reports no metrics for those forwards"
        warnings.warn(f"agent-obs: {reason}. {tail}.", UserWarning, stacklevel=3)

    # ---- hooks -----------------------------------------------------------------------------
    def _pre_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        self._close_block()
        classes = kwargs.pop("token_classes", None)
        tool_ids = kwargs.pop("tool_ids", None)
        tool_args = kwargs.pop("tool_args", None)  # AgentChatCollator(with_tool_args=True)
        sample_ids = kwargs.pop("sample_ids", None)  # with add_sample_ids(dataset)
        labels = kwargs.get("labels")
        if classes is None and labels is None:
            return args, kwargs
        recorder = self.recorders["train" if module.training else "eval"]
        recorder.begin(
            labels=labels, token_classes=classes, tool_ids=tool_ids, tool_args=tool_args, sample_ids=sample_ids
        )
        self._open, self._head_calls, self._hidden = recorder, 0, None
        return args, kwargs

    def _head_called(self, module: torch.nn.Module, inputs: tuple, output: Any) -> None:
        self._head_calls += 1

    def _backbone_output(self, module: torch.nn.Module, inputs: tuple, output: Any) -> None:
        if self._open is not None:
            hidden = getattr(output, "last_hidden_state", None)
            if hidden is None:
                hidden = output[0] if isinstance(output, tuple) else output
            self._hidden = hidden if isinstance(hidden, torch.Tensor) else None

    def _post_forward(self, module: torch.nn.Module, inputs: tuple, output: Any) -> None:
        if self._open is None:
            return
        try:
            if self._head_calls == 0 and output is not None:
                self._observe_skipped_head()
        finally:
            self._close_block()

    def _observe_skipped_head(self) -> None:
        """The forward never called the head (a fused loss): project the saved hidden states without grad."""
        if not self._warned_skip:
            self._warn_fused("this model's forward did not call lm_head (a fused linear-cross-entropy loss?)")
        hidden = self._hidden
        if not self.recompute_fused_head or hidden is None or hidden.dim() != 3:
            return
        batch = hidden.shape[0]
        vocab = getattr(self._head, "out_features", None) or self._head.weight.shape[0]
        step = max(1, RECOMPUTE_BYTES // (4 * batch * vocab))
        with torch.no_grad():
            for chunk in hidden.detach().split(step, dim=1):
                self._head(chunk)

    def _close_block(self) -> None:
        recorder, self._open, self._hidden = self._open, None, None
        if recorder is not None:
            recorder.end()

    # ---- Trainer events --------------------------------------------------------------------
    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.attach(model)
        self.check_args(args)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.attach(model)
        self.check_args(args)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or self.publisher is None:
            return
        prefix = split_of(logs)
        recorder = self.recorders["train" if prefix == "train" else "eval"]
        metrics = self.publisher.publish(recorder, split=prefix, step=state.global_step)
        added = {f"{prefix}_{key}": float(value) for key, value in metrics.items()} if metrics.get("tokens") else {}
        merge_into_logs(logs, state, added)
        if added and not self._first and args.report_to and not self._warned_order:
            self._warned_order = True
            warnings.warn(
                "agent-obs: AgentObsCallback runs after the report_to integrations, so they miss its train_*/eval_* "
                "keys (the logs history and exporters still get them); add it with AgentObsCallback.install(trainer)",
                UserWarning,
                stacklevel=2,
            )

    def on_predict(self, args, state, control, metrics=None, **kwargs):
        if metrics is None or self.publisher is None:
            return
        prefix = split_of(metrics, default="test")
        values = self.publisher.publish(self.recorders["eval"], split=prefix, step=state.global_step)
        if values.get("tokens"):
            metrics.update({f"{prefix}_{key}": float(value) for key, value in values.items()})

    def on_train_end(self, args, state, control, **kwargs):
        self._close_block()


def merge_into_logs(logs: dict[str, Any], state: Any, added: Mapping[str, float]) -> None:
    """Add agent-obs keys to ``logs`` and to this step's ``state.log_history`` entry.

    A trainer's own value of a key agent-obs also writes (TRL's ``eval_entropy``) moves to ``{key}_trainer``.
    """
    added = {f"{key}_trainer": logs[key] for key in added.keys() & logs.keys()} | dict(added)
    logs.update(added)
    if state.log_history and state.log_history[-1].get("step") == state.global_step:
        state.log_history[-1].update(added)


def split_of(logs: Mapping[str, Any], default: str = "train") -> str:
    """``eval``/``eval_<name>``/``test`` for an evaluation's metrics (from its ``*_runtime`` key), else ``default``."""
    for key in logs:
        if key.endswith(_RUNTIME) and not key.startswith("train_"):
            return key[: -len(_RUNTIME)]
    return default
