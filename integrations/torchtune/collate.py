"""Collate functions that carry ``token_classes`` (padded IGNORE), ``tool_ids`` (padded -1), ``tool_args``
(padded 0) and ``sample_ids`` with the batch.

``sample_ids`` is a list with one id per sequence (``"file:line"`` from ``AgentSFTDataset``) in the
unpacked collate, and a ``[B, S]`` long tensor of per-token dataset row indices (-1 for padding) in
the packed one (see ``AgentPackedDataset``): both go to ``observe(sample_ids=...)`` as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from agent_obs.integrations.torchtune.transform import NO_TOOL
from torch.nn.utils.rnn import pad_sequence
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, padded_collate_packed, padded_collate_sft

from agent_obs.token_class import TokenClass

EXTRA_FIELDS = {"token_classes": int(TokenClass.IGNORE), "tool_ids": NO_TOOL, "tool_args": 0}
SAMPLE_IDS = "sample_ids"
NO_SAMPLE = -1  # a packed batch's padding tokens belong to no sample
AGENT_COLLATE = "agent_obs.integrations.torchtune.collate.padded_collate_agent_sft"
TORCHTUNE_COLLATE = "torchtune.data.padded_collate_sft"


def default_collate(sample: Mapping[str, Any]) -> str:
    """The collate for a config without ``collate_fn``: the agent one when samples carry ``token_classes``."""
    return AGENT_COLLATE if "token_classes" in sample else TORCHTUNE_COLLATE


def _pad_extra(batch: list[dict[str, Any]], seq_len: int) -> dict[str, torch.Tensor]:
    """Pad each per-token extra field present in every sample to ``seq_len``."""
    out = {}
    for key, fill in EXTRA_FIELDS.items():
        if not all(key in x for x in batch):
            continue
        rows = [torch.as_tensor(x[key], dtype=torch.long) for x in batch]
        padded = pad_sequence(rows, batch_first=True, padding_value=fill)
        if padded.shape[-1] < seq_len:
            padded = torch.nn.functional.pad(padded, (0, seq_len - padded.shape[-1]), value=fill)
        out[key] = padded
    return out


def padded_collate_agent_sft(
    batch: list[dict[str, Any]], padding_idx: int = 0, ignore_idx: int = CROSS_ENTROPY_IGNORE_IDX
) -> dict[str, torch.Tensor]:
    """``padded_collate_sft`` plus the per-token extras padded to the same length and the samples' ids as a list."""
    out = padded_collate_sft(batch, padding_idx=padding_idx, ignore_idx=ignore_idx)
    out.update(_pad_extra(batch, out["tokens"].shape[-1]))
    if batch and all("sample_id" in x for x in batch):
        out[SAMPLE_IDS] = [x["sample_id"] for x in batch]
    return out


def padded_collate_agent_packed(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """``padded_collate_packed`` (block-causal mask, input_pos) plus the packed per-token extras and sample ids."""
    out = padded_collate_packed(batch)
    for key in (*EXTRA_FIELDS, SAMPLE_IDS):
        if all(key in x for x in batch):
            out[key] = torch.stack([x[key] for x in batch])
    return out
