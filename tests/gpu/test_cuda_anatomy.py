"""Tool-call anatomy and hardest samples on the CUDA side-stream engine (skipped without CUDA): no host sync in a
training step, and the same metrics and samples as the CPU engine."""

from __future__ import annotations

import copy

import pytest
import torch
from test_observer import TinyDecoder, assert_same_metrics, make_batch

from agent_obs import attach

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _exact_fp32():
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def test_anatomy_and_samples_sync_free_and_equal_to_cpu():
    torch.manual_seed(0)
    cpu_model = TinyDecoder(vocab=4096, dim=64)
    gpu_model = copy.deepcopy(cpu_model).to(CUDA)
    batches = []
    for seed in range(3):
        tokens, labels, classes = make_batch(4, 96, seed=seed, vocab=4096)
        args = (torch.arange(96) % 3 == 0).long().expand(4, 96)
        batches.append((tokens, labels, classes, args, [f"s{seed}-{i}" for i in range(4)]))
    gpu = attach(gpu_model, binary_entropy=True, top_n=5)
    cpu = attach(cpu_model, binary_entropy=True, top_n=5)

    def observe(obs, model, batch, device):
        tokens, labels, classes, args, ids = batch
        with obs.observe(labels=labels, token_classes=classes, tool_args=args, sample_ids=ids):
            model(tokens.to(device))

    observe(gpu, gpu_model, batches[0], CUDA)  # warm-up: accumulator, sample table and side stream allocations
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch in batches[1:]:
            observe(gpu, gpu_model, batch, CUDA)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for batch in batches:
        observe(cpu, cpu_model, batch, "cpu")
    got, want = gpu.collect(), cpu.collect()
    assert_same_metrics(got, want)
    assert [s["id"] for s in got.samples] == [s["id"] for s in want.samples]
    for a, b in zip(got.samples, want.samples, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == (b[key] if not isinstance(b[key], float) else pytest.approx(b[key], rel=1e-4)), key
