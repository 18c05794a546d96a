"""``GRPOObsCallback``: agent-obs metrics on the policy's own completions in TRL's ``GRPOTrainer``.

Only the forwards inside ``trainer.compute_loss`` are observed (the policy's training forward,
once per optimisation step and micro-batch, as TRL's own ``entropy``); the no-grad forwards that
compute old-policy and reference log-probabilities run outside it and are never counted. TRL's
fused LM head never calls ``lm_head``, so the completion rows of the backbone's hidden states are
re-projected without grad, in bounded chunks, through the head at the sampling temperature.
Each completion is decoded token by token and classified (tool-call blocks TOOL_CALL, the rest
REASONING, per tool); prompt tokens are not counted.
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from agent_obs.integrations.transformers.callback import RECOMPUTE_BYTES, merge_into_logs, split_of
from torch import nn
from transformers import TrainerCallback

from agent_obs.accumulator import DEFAULT_TOPK
from agent_obs.classify import (
    FORMATS,
    classify_tokens,
    find_arg_spans,
    find_tool_calls,
    token_tool_args,
    token_tool_ids,
)
from agent_obs.keys import parse_key
from agent_obs.projection import find_projection
from agent_obs.publisher import Publisher
from agent_obs.recorder import Recorder
from agent_obs.settings import Settings
from agent_obs.token_class import TokenClass
from agent_obs.tools import NO_TOOL

IGNORE_INDEX = -100
# Perplexity and accuracy of the policy's own samples mean something else than in SFT: renamed in the logs.
SAMPLED_STATS = {"perplexity": "sampled_perplexity", "accuracy": "sampled_argmax_rate"}
EXPORT_SPLIT = "rl_{}"  # exporters get rl_train / rl_eval, so dashboards and alerts tell RL from SFT


class SampledHead(nn.Module):
    """``lm_head`` followed by TRL's logit transform (scale, soft-capping, 1/temperature), in float32.

    The recorders hook this wrapper, which only the re-projection calls: the metrics are those of
    the distribution the completions were sampled from, as TRL's ``entropy``.
    """

    def __init__(self, head: nn.Module, temperature: float, scale: float = 1.0, softcap: float | None = None) -> None:
        super().__init__()
        self.head = head
        self.temperature = temperature
        self.scale = scale
        self.softcap = softcap

    @property
    def weight(self) -> torch.Tensor:
        return self.head.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden).float() * self.scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits / self.temperature


def classify_completion(pieces: Sequence[str], fmt: str | re.Pattern = "function_xml", *, strict: bool = False):
    """Classes, tool ids and argument flags of one completion given each token's decoded text.

    The text is the concatenation of the pieces; special tokens (empty pieces, ``""``) come back IGNORE.
    The flags (``tool_args``: 1 on tool-call tokens inside an argument value) are None for a regex ``fmt``.
    """
    offsets, pos = [], 0
    for piece in pieces:
        offsets.append((pos, pos + len(piece)))
        pos += len(piece)
    text = "".join(pieces)
    calls = find_tool_calls(text, fmt, strict=strict)
    classes = classify_tokens(text, offsets, spans=[(c.start, c.end) for c in calls])
    args = token_tool_args(offsets, find_arg_spans(text, fmt, calls=calls, strict=strict)) if fmt in FORMATS else None
    return classes, token_tool_ids(offsets, calls), args


def sampled_key(key: str) -> str:
    """A collect() key as logged for sampled tokens: ``perplexity``/``accuracy`` renamed (``SAMPLED_STATS``)."""
    parsed = parse_key(key)
    if parsed is None or parsed.stat not in SAMPLED_STATS:
        return key
    return key[: -len(parsed.stat)] + SAMPLED_STATS[parsed.stat]


class GRPOObsCallback(TrainerCallback):
    """Entropy/top-k/sampled perplexity per token class and tool of a ``GRPOTrainer``'s completions.

    Add it with ``GRPOObsCallback.install(trainer)``. Keys: ``train_entropy``,
    ``train_reasoning_entropy``, ``train_tool_call_entropy``, ``train_tool_call.{tool}_*``,
    ``train_top{k}_prob``, ``train_sampled_perplexity``, ``train_sampled_argmax_rate`` (and ``eval_*``).

    Args:
        fmt: the tool-call format, as for ``find_tool_calls``.
        strict: as for ``find_tool_calls``.
        count_special_tokens: special tokens (the EOS that ends a completion) are sampled actions; True
            counts them in the overall metrics only (as TRL's entropy does), False in none.
        exporters: where the metrics go besides the logs (as ``rl_train``/``rl_eval``); closed by ``detach()``.
        topk: top-k probability masses to report.
        chunk_bytes: float32 logits per re-projection chunk.
        **attach_kwargs: other ``Settings`` fields (``max_tools``, ``every_n_steps``, ...), as for
            ``agent_obs.attach``.
    """

    def __init__(
        self,
        *,
        fmt: str | re.Pattern = "function_xml",
        strict: bool = False,
        count_special_tokens: bool = True,
        exporters: Sequence[Any] = (),
        topk: tuple[int, ...] = DEFAULT_TOPK,
        chunk_bytes: int = RECOMPUTE_BYTES,
        **attach_kwargs: Any,
    ) -> None:
        self.fmt = fmt
        self.strict = strict
        self.special_class = TokenClass.CONTEXT if count_special_tokens else TokenClass.IGNORE
        self.exporters = tuple(exporters)
        self.chunk_bytes = chunk_bytes
        self.settings = Settings(topk=topk, shift_labels=True, rows="valid", **attach_kwargs)
        self.recorders: dict[str, Recorder] = {}
        self.publisher: Publisher | None = None
        self.trainer: Any = None
        self.head: SampledHead | None = None
        self._handles: list[Any] = []
        self._original_compute_loss: Any = None
        self._inputs: dict[str, Any] | None = None
        self._row = 0
        self._pending: dict[str, torch.Tensor] | None = None
        self._hidden: torch.Tensor | None = None
        self._pieces: dict[int, str] = {}

    @classmethod
    def install(cls, trainer: Any, **kwargs: Any) -> GRPOObsCallback:
        """Create the callback, hook ``trainer`` and put it first in its callbacks (before ``report_to``).

        Args:
            trainer: a TRL ``GRPOTrainer``.
            **kwargs: the constructor's arguments.
        """
        callback = cls(**kwargs)
        callback.attach(trainer)
        trainer.callback_handler.callbacks.insert(0, callback)
        return callback

    # ---- attaching -------------------------------------------------------------------------
    def attach(self, trainer: Any) -> None:
        """Hook the policy of ``trainer`` (a TRL ``GRPOTrainer``) and wrap its ``compute_loss``."""
        for attr in ("temperature", "processing_class", "compute_loss"):
            if not hasattr(trainer, attr):
                raise TypeError(
                    f"{type(trainer).__name__} has no {attr!r}: GRPOObsCallback needs TRL's GRPOTrainer; for "
                    "SFT trainers use AgentObsCallback.install(trainer)"
                )
        model = trainer.model
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        config = inner.config.get_text_config() if hasattr(inner.config, "get_text_config") else inner.config
        head = find_projection(inner).module
        backbone = getattr(inner, "base_model", None)
        if not isinstance(backbone, nn.Module) or backbone is inner:
            raise TypeError(f"{type(inner).__name__} has no separate backbone (base_model) whose hidden states to hook")
        self.head = SampledHead(
            head,
            float(trainer.temperature),
            scale=float(getattr(config, "logit_scale", None) or 1.0),
            softcap=getattr(config, "final_logit_softcapping", None),
        )
        self.recorders = {split: Recorder(inner, self.settings, layer=self.head) for split in ("train", "eval")}
        self.publisher = Publisher(self.settings, self.exporters)
        self._handles = [
            inner.register_forward_pre_hook(self._pre_forward, with_kwargs=True),
            backbone.register_forward_hook(self._backbone_output),
            inner.register_forward_hook(self._post_forward),
        ]
        self.trainer = trainer
        self._original_compute_loss = trainer.compute_loss
        trainer.compute_loss = self._wrap(trainer.compute_loss)

    def _wrap(self, compute_loss: Any) -> Any:
        @functools.wraps(compute_loss)
        def observed_compute_loss(model, inputs, *args, **kwargs):
            self._inputs, self._row = inputs, 0
            try:
                return compute_loss(model, inputs, *args, **kwargs)
            finally:
                self._inputs, self._pending, self._hidden = None, None, None

        return observed_compute_loss

    def detach(self) -> None:
        """Remove every hook, restore ``compute_loss`` and close the exporters."""
        for handle in self._handles:
            handle.remove()
        if self.trainer is not None:
            self.trainer.compute_loss = self._original_compute_loss
        for recorder in self.recorders.values():
            recorder.detach()
        if self.publisher is not None:
            self.publisher.close()
        self._handles, self.recorders, self.publisher, self.trainer = [], {}, None, None

    # ---- hooks -----------------------------------------------------------------------------
    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._pending, self._hidden = None, None
        labels, input_ids = kwargs.get("labels"), kwargs.get("input_ids")
        if self._inputs is None or labels is None or input_ids is None:
            return  # generation, old-policy/reference log-probs, or a forward outside compute_loss
        rows = slice(self._row, self._row + input_ids.shape[0])
        self._row = rows.stop
        labels = labels.clone()
        tool_mask = self._inputs.get("tool_mask")
        if tool_mask is not None:  # tool results inside a completion are not the policy's samples (TRL masks them)
            completion = labels[:, -tool_mask.shape[1] :]
            completion.masked_fill_(tool_mask[rows].to(labels.device) == 0, IGNORE_INDEX)
        classes, tools, args = self._classify(input_ids, labels)
        labels.masked_fill_((classes == TokenClass.IGNORE).to(labels.device), IGNORE_INDEX)  # not projected at all
        self._pending = {
            "labels": labels,
            "classes": classes,
            "tools": tools,
            "args": args,
            "training": module.training,
        }

    def _backbone_output(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._pending is not None:
            hidden = getattr(output, "last_hidden_state", None)
            self._hidden = hidden if hidden is not None else output[0]

    def _post_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        pending, hidden = self._pending, self._hidden
        self._pending, self._hidden = None, None
        if pending is None or hidden is None:
            return
        labels = pending["labels"].to(hidden.device)
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX  # position t predicts token t + 1
        if not bool(keep.any()):
            return
        recorder = self.recorders["train" if pending["training"] else "eval"]
        vocab = self.head.weight.shape[0]
        step = max(1, self.chunk_bytes // (4 * vocab))
        observe = recorder.observe(
            labels=labels, token_classes=pending["classes"], tool_ids=pending["tools"], tool_args=pending["args"]
        )
        with torch.no_grad(), observe:
            for chunk in hidden.detach()[keep].split(step):
                self.head(chunk)

    def _classify(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per position: the class/tool/argument flag of the token there, from each run of counted tokens
        decoded and classified (flags None for a regex format)."""
        classes = torch.full(labels.shape, int(TokenClass.IGNORE), dtype=torch.long)
        tools = torch.full(labels.shape, NO_TOOL, dtype=torch.long)
        args = torch.zeros(labels.shape, dtype=torch.long) if self.fmt in FORMATS else None
        counted = (labels != IGNORE_INDEX).cpu()
        ids = input_ids.cpu()
        self._decode_pieces(ids[counted].unique().tolist())
        for b in range(labels.shape[0]):
            for run in _runs(counted[b]):
                pieces = [self._pieces[t] for t in ids[b, run].tolist()]
                cls, tids, flags = classify_completion(pieces, self.fmt, strict=self.strict)
                cls_t = torch.tensor([int(c) for c in cls], dtype=torch.long)
                classes[b, run] = torch.where(cls_t == TokenClass.IGNORE, int(self.special_class), cls_t)
                tools[b, run] = torch.tensor(tids, dtype=torch.long)
                if args is not None:
                    args[b, run] = torch.tensor(flags, dtype=torch.long)
        return classes, tools, args

    def _decode_pieces(self, token_ids: list[int]) -> None:
        """Cache each token's text on its own (special tokens decode to ``""``)."""
        new = [t for t in token_ids if t not in self._pieces]
        if new:
            tok = getattr(self.trainer.processing_class, "tokenizer", self.trainer.processing_class)
            texts = tok.batch_decode([[t] for t in new], skip_special_tokens=True)
            self._pieces.update(zip(new, texts, strict=True))

    # ---- Trainer events --------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer is None:
            warnings.warn(
                "agent-obs: GRPOObsCallback is not attached to a trainer, so it reports nothing; add it with "
                "GRPOObsCallback.install(trainer) instead of passing it in callbacks=[...]",
                UserWarning,
                stacklevel=2,
            )

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or self.publisher is None:
            return
        prefix = split_of(logs)
        recorder = self.recorders["train" if prefix == "train" else "eval"]
        metrics = self.publisher.publish(recorder, split=EXPORT_SPLIT.format(prefix), step=state.global_step)
        if metrics.get("tokens"):
            merge_into_logs(logs, state, {f"{prefix}_{sampled_key(k)}": float(v) for k, v in metrics.items()})


def _runs(mask: torch.Tensor) -> list[slice]:
    """Maximal runs of True in a 1-D bool mask, as slices (a completion split by masked tool results)."""
    idx = mask.nonzero().flatten().tolist()
    runs, start = [], None
    for i, j in zip(idx, [*idx[1:], None], strict=True):
        start = i if start is None else start
        if j != i + 1:
            runs.append(slice(start, i + 1))
            start = None
    return runs
