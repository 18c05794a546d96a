"""Two gloo ranks (torch.multiprocessing): collect() on each rank equals the metrics over the union of batches.

One spawn runs both scenarios to pay the process start-up once: a plain decoder whose ranks see
different tool sets (merged by name, capped) and a torchtune qwen2 sharded with FSDP2 with
chunked output and a backward pass.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_observer import RecordingExporter, TinyDecoder, assert_same_metrics, make_batch
from test_observer_torchtune import VOCAB as QWEN_VOCAB
from test_observer_torchtune import full_logits, tiny_qwen2

from agent_obs import TokenClass, attach, compute_metrics, tool_id

WORLD = 2
# tool spans per rank [start, end) on every row: rank 0 sees bash+find_file_x, rank 1 three tools.
# Only rank 0 ever calls tool_id("find_file_x"): rank 1 gets the ids as plain ints and learns the name in the merge.
# Rank 1 also sees bash, its third tool and its rarest: with one slot per kept tool only, bash (kept globally)
# would land in rank 1's overflow and its row would silently miss rank 1's tokens.
TOOL_SPANS = {
    0: {"bash": (0, 10), "find_file_x": (10, 14)},
    1: {"find_file_x": (0, 9), "str_replace_editor": (9, 15), "bash": (15, 16)},
}
MAX_TOOLS = 2  # globally: find_file_x (52 tokens), bash (44) keep their keys, str_replace_editor (24) -> _other


def contract_id(name: str) -> int:
    """The documented tool id (CRC32 of the sanitized name), computed without registering the name."""
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def plain_batches(rank: int) -> list[tuple[torch.Tensor, ...]]:
    """Two micro-batches of different lengths with tool-call spans; tool ids precomputed as plain ints."""
    out = []
    for seq in (16, 20):
        tokens, labels, classes = make_batch(2, seq, seed=100 * rank + seq)
        labels[:] = tokens.roll(-1, 1)
        classes[classes == TokenClass.TOOL_CALL] = TokenClass.REASONING
        tools = torch.full_like(tokens, -1)
        for name, (a, b) in TOOL_SPANS[rank].items():
            classes[:, a:b] = TokenClass.TOOL_CALL
            tools[:, a:b] = contract_id(name)
        out.append((tokens, labels, classes, tools))
    return out


def qwen_batch(rank: int) -> tuple[torch.Tensor, ...]:
    return make_batch(2, 10 + rank, seed=7 + rank, vocab=QWEN_VOCAB)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torchtune.modules.loss import CEWithChunkedOutputLoss

    from agent_obs.tools import known_tools

    torch.set_num_threads(1)  # two ranks on a 2-core machine: no oversubscription
    # eager statistics kernel: compiling it again in each fresh rank costs far more than this test computes
    os.environ["AGENT_OBS_COMPILE"] = "0"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        unknown_here = contract_id("find_file_x") not in known_tools()
        if rank == 0:
            tool_id("bash"), tool_id("find_file_x")
        batches = plain_batches_from_file(out_dir, rank)
        torch.manual_seed(0)
        model = TinyDecoder()
        exporter = RecordingExporter()
        obs = attach(model, max_tools=MAX_TOOLS, exporters=[exporter])  # exported on rank 0 only (the default)
        for tokens, labels, classes, tools in batches:
            with obs.observe(labels=labels, token_classes=classes, tool_ids=tools):
                model(tokens)
        plain = obs.collect(split="train", step=1)

        qwen = tiny_qwen2(tied=False)
        qwen.set_num_output_chunks(3)
        mesh = init_device_mesh("cpu", (WORLD,))  # explicit: the default mesh is CUDA wherever CUDA exists
        for layer in qwen.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(qwen, mesh=mesh)
        loss_fn = CEWithChunkedOutputLoss(num_output_chunks=3)
        obs = attach(qwen)
        tokens, labels, classes = qwen_batch(rank)
        with obs.observe(labels=labels, token_classes=classes):
            loss_fn(qwen(tokens), labels).backward()
        fsdp = obs.collect(split="train", step=1)
        sharded = all(isinstance(p, DTensor) for p in qwen.parameters())
        torch.save(
            {
                "plain": dict(plain),
                "fsdp": dict(fsdp),
                "unknown_here": unknown_here,
                "sharded": sharded,
                "exported": exporter.calls,
            },
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def plain_batches_from_file(out_dir: str, rank: int):
    return torch.load(Path(out_dir) / f"batches{rank}.pt")


def test_two_gloo_ranks_equal_single_process_over_the_union(tmp_path):
    for rank in range(WORLD):
        torch.save(plain_batches(rank), tmp_path / f"batches{rank}.pt")
    # spawn, not fork: forking a pytest process that already ran compiled kernels / OpenMP threads can deadlock
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert results[1]["unknown_here"]  # so rank 1's key for it can only come from rank 0 in the merge

    # plain decoder: the union of both ranks' micro-batches, per tool by name
    torch.manual_seed(0)
    model = TinyDecoder()
    rows = {"logits": [], "labels": [], "classes": [], "tool": []}
    with torch.no_grad():
        for rank in range(WORLD):
            for tokens, labels, classes, tools in plain_batches(rank):
                rows["logits"].append(model(tokens).reshape(-1, model.lm_head.out_features))
                rows["labels"].append(labels.reshape(-1))
                rows["classes"].append(classes.reshape(-1))
                rows["tool"].append(tools.reshape(-1))
    logits, labels, classes, tools = (torch.cat(v) for v in rows.values())
    want = dict(compute_metrics(logits, labels, classes))
    for key, members in (("bash", ["bash"]), ("find_file_x", ["find_file_x"]), ("_other", ["str_replace_editor"])):
        keep = torch.isin(tools, torch.tensor([contract_id(n) for n in members])) & (classes == TokenClass.TOOL_CALL)
        sub = compute_metrics(logits, labels, torch.where(keep, classes, TokenClass.IGNORE))
        want.update(
            {f"tool_call.{key}_{k[len('tool_call_') :]}": v for k, v in sub.items() if k.startswith("tool_call_")}
        )
    for result in results:
        assert_same_metrics(result["plain"], want)
    assert [(step, split) for _, step, split in results[0]["exported"]] == [(1, "train")]
    assert results[0]["exported"][0][0] == results[0]["plain"]
    assert results[1]["exported"] == []
    assert want["tool_call.find_file_x_tokens"] == 2 * (4 + 9) * 2
    assert want["tool_call.bash_tokens"] == 2 * (10 + 1) * 2  # rank 1's bash tokens are in its row
    assert all(contract_id(n) == tool_id(n) for spans in TOOL_SPANS.values() for n in spans)

    # FSDP2 qwen2 with chunked output: the union of both ranks' batches
    qwen = tiny_qwen2(tied=False)
    with torch.no_grad():
        batches = [qwen_batch(rank) for rank in range(WORLD)]
        logits = torch.cat([full_logits(qwen(t)).reshape(-1, QWEN_VOCAB) for t, _, _ in batches])
    want = compute_metrics(
        logits, torch.cat([b[1].reshape(-1) for b in batches]), torch.cat([b[2].reshape(-1) for b in batches])
    )
    for result in results:
        assert result["sharded"]
        assert_same_metrics(result["fsdp"], want)


@pytest.mark.parametrize("max_tools", [0, 3])
def test_single_process_reduce_is_a_plain_sum(max_tools):
    from agent_obs.distributed import reduce_sums
    from agent_obs.keys import CLASS_GROUPS

    n = len(CLASS_GROUPS)
    sums = torch.arange(n * 4 + (max_tools + 1 if max_tools else 0) * 4, dtype=torch.float64).reshape(-1, 4)
    out, names = reduce_sums(sums, [(11, "a")] if max_tools else [], max_tools)
    assert torch.equal(out[:n], sums[:n])
    assert out[n:].sum() == sums[n:].sum()
    assert names == ({0: "a", 1: "_other"} if max_tools else {0: "_other"})
