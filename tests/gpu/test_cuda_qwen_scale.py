"""Qwen2.5-scale CUDA checks (skipped without CUDA): bf16 logits of a 151,936-token vocabulary equal the float64
reference, peak memory stays within the documented in-flight bound, and the recipe's observed step never syncs."""

from __future__ import annotations

import pytest
import torch
from agent_obs.integrations.torchtune.recipe_hooks import observe_block
from metric_reference import assert_metrics_close, reference_metrics
from test_observer import TinyDecoder, make_batch
from torchtune.models.qwen2 import qwen2
from torchtune.modules.loss import CEWithChunkedOutputLoss

from agent_obs import TokenClass, attach, tool_id
from agent_obs.tools import NO_TOOL

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")
QWEN25_VOCAB = 151936  # Qwen2.5-0.5B's embedding rows
MiB = 2**20
KERNEL_WORKING_SET = 64 * MiB  # DEFAULT_CHUNK_BYTES: the metric kernel's scratch per call


class ChunkedDecoder(TinyDecoder):
    """torchtune-style chunked output (one projection call per sequence chunk)."""

    def __init__(self, vocab: int, dim: int, chunks: int) -> None:
        super().__init__(vocab=vocab, dim=dim)
        self.chunks = chunks

    def forward(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        return [self.lm_head(c) for c in self.hidden(tokens).chunk(self.chunks, dim=1)]


def test_bf16_logits_with_the_qwen2_5_vocabulary_equal_the_float64_reference():
    torch.manual_seed(0)
    model = ChunkedDecoder(QWEN25_VOCAB, dim=64, chunks=8).to(CUDA, torch.bfloat16)
    for p in model.parameters():  # a spread of confident and flat rows
        torch.nn.init.normal_(p, std=0.5)
    obs = attach(model)
    tokens, labels, classes = make_batch(1, 200, seed=1, vocab=QWEN25_VOCAB)
    with torch.no_grad(), obs.observe(labels=labels, token_classes=classes):
        chunks = model(tokens.to(CUDA))
    logits = torch.cat(chunks, dim=1)
    assert logits.dtype == torch.bfloat16
    want, _ = reference_metrics(logits.cpu().reshape(-1, QWEN25_VOCAB), labels.reshape(-1), classes.reshape(-1))
    assert_metrics_close(obs.collect(), want, rtol=1e-5)


def chunked_ce(chunks: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    return CEWithChunkedOutputLoss(num_output_chunks=len(chunks))(chunks, labels)


@pytest.mark.parametrize("max_in_flight", [1, 4])
def test_peak_memory_with_the_observer_stays_within_the_in_flight_bound(max_in_flight):
    """Extra peak <= max_in_flight x one logits chunk + the kernel's working set + 64 MiB (the issue's goal)."""
    torch.manual_seed(0)
    seq, chunks = 4096, 8
    model = ChunkedDecoder(QWEN25_VOCAB, dim=256, chunks=chunks).to(CUDA, torch.bfloat16)
    tokens, labels, classes = make_batch(1, seq, seed=2, vocab=QWEN25_VOCAB)
    tokens_d, labels_d = tokens.to(CUDA), labels.to(CUDA)
    obs = attach(model, max_in_flight=max_in_flight)

    def peak(observe: bool) -> int:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        if observe:
            with obs.observe(labels=labels, token_classes=classes):
                loss = chunked_ce(model(tokens_d), labels_d)
        else:
            loss = chunked_ce(model(tokens_d), labels_d)
        loss.backward()
        model.zero_grad(set_to_none=True)
        del loss
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    peak(True)  # warm-up: kernel compilation, side stream, accumulators
    peak(False)
    obs.collect()
    without, with_observer = min(peak(False) for _ in range(2)), min(peak(True) for _ in range(2))
    assert obs.collect()["tokens"] > 0
    chunk_bytes = seq // chunks * QWEN25_VOCAB * 2
    bound = max_in_flight * chunk_bytes + KERNEL_WORKING_SET
    extra = with_observer - without
    print(f"peak without {without / MiB:.0f} MiB, with {with_observer / MiB:.0f} MiB: extra {extra / MiB:+.0f} MiB")
    assert extra <= bound + 64 * MiB, f"extra peak {extra / MiB:.0f} MiB > bound {bound / MiB:.0f} MiB + 64 MiB"


def test_recipe_observed_forward_backward_has_no_host_sync():
    """The recipe's step (targets popped on the host, labels on the GPU, its observe block) under sync debug mode."""
    torch.manual_seed(0)
    model = qwen2(
        vocab_size=QWEN25_VOCAB,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        embed_dim=64,
        intermediate_dim=128,
        max_seq_len=512,
        tie_word_embeddings=True,  # as Qwen2.5-0.5B
    ).to(CUDA, torch.bfloat16)
    model.set_num_output_chunks(8)
    loss_fn = CEWithChunkedOutputLoss(num_output_chunks=8)
    observer = attach(model)
    ignore_cache = torch.full((2, 1), -100, device=CUDA)
    tokens, labels, classes = make_batch(2, 256, seed=3, vocab=QWEN25_VOCAB)
    tool_ids = torch.where(classes == TokenClass.TOOL_CALL, tool_id("bash"), NO_TOOL)  # host, as the collate gives
    tokens_d, labels_d = tokens.to(CUDA), labels.to(CUDA)

    def step() -> None:
        num_tokens = (labels_d != -100).sum()
        shifted = torch.hstack((labels_d[..., 1:], ignore_cache[: labels_d.shape[0]]))
        with observe_block(observer, labels_d, classes, tool_ids, ignore_index=-100):  # what the recipe's step calls
            logits = model(tokens_d)
        loss = loss_fn(logits, shifted) * num_tokens
        loss.backward()

    step()  # warm-up: allocations, side stream, kernel compilation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    metrics = observer.collect()
    assert metrics["tool_call.bash_tokens"] == metrics["tool_call_tokens"] > 0
