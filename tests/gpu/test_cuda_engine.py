"""The CUDA side-stream engine (skipped without CUDA): CPU-equal results, no host sync, nothing kept alive."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from test_observer import TinyDecoder, assert_same_metrics, make_batch
from test_observer_torchtune import VOCAB as QWEN_VOCAB
from test_observer_torchtune import full_logits, tiny_qwen2

from agent_obs import attach, compute_metrics, tool_id
from agent_obs.engine import SideStreamEngine

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _exact_fp32():
    """No TF32, so CUDA fp32 logits match the CPU reference to fp32 rounding."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize("max_in_flight", [1, 4])
@pytest.mark.parametrize("tied", [False, True])
def test_chunked_qwen2_on_cuda_equals_cpu_reference(tied, max_in_flight):
    model = tiny_qwen2(tied).to(CUDA)
    model.set_num_output_chunks(8)
    obs = attach(model, max_in_flight=max_in_flight)
    logits, labels_all, classes_all = [], [], []
    for seq in (10, 13):
        tokens, labels, classes = make_batch(2, seq, seed=seq, vocab=QWEN_VOCAB)
        with obs.observe(labels=labels, token_classes=classes):  # CPU targets: copied via pinned memory
            out = model(tokens.to(CUDA))
        logits.append(full_logits(out).detach().cpu().reshape(-1, QWEN_VOCAB))
        labels_all.append(labels.reshape(-1))
        classes_all.append(classes.reshape(-1))
    assert isinstance(next(iter(obs.recorder._engines.values())), SideStreamEngine)
    want = compute_metrics(torch.cat(logits), torch.cat(labels_all), torch.cat(classes_all))
    assert_same_metrics(obs.collect(), want)


def test_training_step_has_no_host_sync_and_frees_the_logits():
    torch.manual_seed(0)
    model = TinyDecoder(vocab=4096, dim=64).to(CUDA)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tokens, labels, classes = make_batch(4, 256, seed=1, vocab=4096)
    tools = torch.where(classes == 2, tool_id("bash"), -1)  # host tool ids: mapped to slots on the host
    tokens_d, labels_d = tokens.to(CUDA), labels.to(CUDA)
    obs = attach(model)

    def step() -> weakref.ref:
        with obs.observe(labels=labels, token_classes=classes, tool_ids=tools):
            logits = model(tokens_d)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels_d.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        return weakref.ref(logits)

    step()  # warm-up: one-time allocations (accumulator, side stream) and kernel compilation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ref = step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    gc.collect()
    assert ref() is None
    metrics = obs.collect()
    assert metrics["tokens"] == 2 * int(((labels != -100) & (classes != 0)).sum())
    assert metrics["tool_call.bash_tokens"] == metrics["tool_call_tokens"]


def test_valid_rows_with_gpu_targets_and_tool_ids():
    torch.manual_seed(0)
    model = TinyDecoder().to(CUDA)
    tokens, labels, classes = make_batch(2, 14, seed=3)
    tools = torch.where(classes == 2, tool_id("bash"), -1)
    obs = attach(model, rows="valid")
    valid = (labels.reshape(-1) != -100).nonzero().squeeze(-1).to(CUDA)
    with obs.observe(labels=labels.to(CUDA), token_classes=classes.to(CUDA), tool_ids=tools.to(CUDA)):
        h = model.hidden(tokens.to(CUDA)).reshape(-1, model.lm_head.in_features)
        for rows in h.index_select(0, valid).tensor_split(3):
            model.lm_head(rows)
    with torch.no_grad():
        full = model(tokens.to(CUDA)).cpu()
    got = obs.collect()
    want = compute_metrics(full, labels, classes)
    assert_same_metrics({k: v for k, v in got.items() if "." not in k}, want)
    assert got["tool_call.bash_tokens"] == want["tool_call_tokens"]
