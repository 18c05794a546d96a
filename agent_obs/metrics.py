"""``compute_metrics``: the exact metrics of one batch of logits, and input validation."""

from __future__ import annotations

import torch

from agent_obs.accumulator import DEFAULT_TOPK, Metrics, StatsAccumulator


def check_inputs(
    logits_shape: torch.Size | tuple[int, ...],
    labels: torch.Tensor | None,
    token_classes: torch.Tensor | None,
    *,
    ignore_index: int = -100,
) -> None:
    """Raise ``ValueError`` naming the problem when labels/classes do not fit the logits."""
    if len(logits_shape) < 1 or logits_shape[-1] < 1:
        raise ValueError(f"logits must be [..., V] with V >= 1, got shape {tuple(logits_shape)}")
    lead = tuple(logits_shape[:-1])
    for name, t in (("labels", labels), ("token_classes", token_classes)):
        if t is not None and tuple(t.shape) != lead:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but logits {tuple(logits_shape)} need {lead}: "
                f"pass one {name[:-1]} per logits position, aligned (position t predicts labels[t])"
            )
    if labels is not None and labels.numel():
        if labels.is_floating_point():
            raise ValueError(f"labels must be integer token ids, got dtype {labels.dtype}")
        vocab = logits_shape[-1]
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            value = int(labels[bad][0])
            raise ValueError(
                f"label {value} is outside [0, {vocab}) and is not ignore_index={ignore_index}: "
                "mask padding with ignore_index or check that the tokenizer matches the model's vocabulary"
            )
    if token_classes is not None and (token_classes.is_floating_point() or token_classes.is_complex()):
        raise ValueError(
            f"token_classes must be an integer tensor of TokenClass values, got dtype {token_classes.dtype}: "
            "build it with dtype=torch.long (a float class such as 1.5 has no meaning)"
        )
    if token_classes is not None and bool(((token_classes < 0) | (token_classes > 3)).any()):
        raise ValueError("token_classes must hold TokenClass values 0..3 (IGNORE, REASONING, TOOL_CALL, CONTEXT)")


def compute_metrics(
    logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    token_classes: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    topk: tuple[int, ...] = DEFAULT_TOPK,
    chunk_tokens: int | None = None,
    tool_args: torch.Tensor | None = None,
    binary_entropy: bool = False,
) -> Metrics:
    """Entropy, perplexity, top-k mass and accuracy overall and per class of ``logits [..., V]``.

    Computed chunk by chunk in fp32: extra memory stays about ``chunk_tokens x V x 4`` bytes.
    ``tool_args`` (nonzero inside argument values) adds ``tool_syntax_*``/``tool_args_*``;
    ``binary_entropy`` the seed's ``top1_binary_entropy``.
    """
    check_inputs(logits.shape, labels, token_classes, ignore_index=ignore_index)
    if tool_args is not None and (token_classes is None or tool_args.shape != token_classes.shape):
        raise ValueError("tool_args split the tool_call tokens: pass token_classes of the same shape too")
    vocab = logits.shape[-1]
    acc = StatsAccumulator(topk, device=logits.device, chunk_tokens=chunk_tokens)
    acc.update(
        logits.reshape(-1, vocab),
        None if labels is None else labels.reshape(-1),
        None if token_classes is None else token_classes.reshape(-1),
        ignore_index=ignore_index,
        tool_args=None if tool_args is None else tool_args.reshape(-1),
    )
    return acc.metrics(binary_entropy=binary_entropy)
