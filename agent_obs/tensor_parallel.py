"""Tensor-parallel output projections: exact logits from a ``DTensor`` and a guard against counting replicas.

Under tensor parallelism every rank of the TP mesh sees the same tokens. The projection's
logits arrive either as a plain (replicated) tensor with a ``DTensor`` input (torchtune's
``base_llama_tp_plan``: ``ColwiseParallel(output_layouts=Replicate())``) or as a vocab-sharded
``DTensor`` (loss parallel: ``use_local_output=False``). The observer gathers the latter to
full logits and sums its statistics over the data-parallel group only.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

FIX = (
    "attach(model, process_group=device_mesh['dp'].get_group()) with the data-parallel group of the "
    "(dp, tp) mesh (recipes/agent_sft_distributed.py does this; see recipes/configs/agent_sft_tp_tiny_cpu.yaml)"
)


def tensor_parallel_mesh(output: object, args: tuple) -> DeviceMesh | None:
    """The mesh of a ``DTensor`` output or first input of the projection (its TP mesh), else None."""
    for t in (output, *args[:1]):
        if isinstance(t, DTensor):
            return t.device_mesh
    return None


def check_replicas(mesh: DeviceMesh, group: dist.ProcessGroup | None, layer_name: str) -> None:
    """Raise unless ``group`` (the ranks ``collect()`` sums over) holds only this rank of the TP mesh.

    Ranks of one TP mesh observe the same tokens: summing over two of them counts each token twice.
    """
    if mesh.ndim != 1:
        raise ValueError(
            f"{layer_name} runs tensor-parallel on a {mesh.ndim}-D mesh {tuple(mesh.shape)}: parallelize the "
            "output projection over the 1-D tensor-parallel sub-mesh (device_mesh['tp']) and pass " + FIX
        )
    replicas = set(mesh.mesh.flatten().tolist())
    summed = set(dist.get_process_group_ranks(group if group is not None else dist.group.WORLD))
    shared = replicas & summed
    if len(shared) > 1:
        raise ValueError(
            f"{layer_name} runs tensor-parallel over ranks {sorted(replicas)}, which all see the same tokens, but "
            f"collect() sums over ranks {sorted(summed)}: each token would count {len(shared)} times. Pass " + FIX
        )


def full_logits(output: torch.Tensor, vocab_size: int | None, layer_name: str) -> torch.Tensor:
    """The whole logits of this rank's tokens: a ``DTensor`` (e.g. vocab-sharded) is gathered, exactly.

    Costs one all-gather over the TP mesh and the memory of the unsharded logits of this call
    (freed after its statistics); a collective, which every TP rank's hook reaches in step. A
    plain tensor holding only this rank's vocabulary columns cannot be scored: refused.
    """
    full = output.full_tensor() if isinstance(output, DTensor) else output
    if vocab_size is not None and full.shape[-1] != vocab_size:
        raise ValueError(
            f"{layer_name} returned {full.shape[-1]} of the {vocab_size} vocabulary columns (a local shard of "
            "tensor-parallel logits): entropy and top-k need the whole row. Parallelize it with "
            "ColwiseParallel(output_layouts=Replicate()) as torchtune's base_llama_tp_plan does "
            "(recipes/configs/agent_sft_tp_tiny_cpu.yaml), or use_local_output=False (a DTensor, gathered exactly)"
        )
    return full
