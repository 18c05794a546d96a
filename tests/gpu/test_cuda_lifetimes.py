"""Lifetimes on the CUDA side stream (skipped without CUDA): a slowed side stream must never see memory the
producing stream freed and rewrote, before or after detach(); graph capture is refused with one warning."""

from __future__ import annotations

import gc

import pytest
import torch
from metric_reference import assert_metrics_close, reference_metrics
from test_observer import TinyDecoder, make_batch

from agent_obs import attach
from agent_obs.accumulator import StatsAccumulator

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")
VOCAB = 4096
SLEEP_CYCLES = 2_000_000_000  # ~1 s at ~2 GHz: far longer than the host needs to free, reallocate and overwrite


@pytest.fixture(autouse=True)
def _exact_fp32():
    """No TF32, so CUDA fp32 logits match the CPU reference to fp32 rounding."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


class ChunkedDecoder(TinyDecoder):
    """torchtune-style chunked output: one projection call per sequence chunk, all chunks returned."""

    def forward(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        return [self.lm_head(c) for c in self.hidden(tokens).chunk(4, dim=1)]


def warmed_observer(max_in_flight: int = 4):
    """A CUDA model and an observer whose engine exists and whose kernel is compiled (one collected block)."""
    torch.manual_seed(0)
    model = ChunkedDecoder(vocab=VOCAB, dim=64).to(CUDA)
    obs = attach(model, max_in_flight=max_in_flight)
    tokens, labels, classes = make_batch(2, 64, seed=0, vocab=VOCAB)
    with torch.no_grad(), obs.observe(labels=labels, token_classes=classes):
        model(tokens.to(CUDA))
    obs.collect()
    (engine,) = obs.recorder._engines.values()
    return model, obs, engine.stream


def sleep_on(stream: torch.cuda.Stream) -> None:
    """Queue a long busy-wait on ``stream``: whatever is queued on it next runs about a second later."""
    with torch.cuda.stream(stream):
        torch.cuda._sleep(SLEEP_CYCLES)


def overwrite_like(shapes: list[torch.Size], dtype: torch.dtype, value: float, copies: int = 4) -> list[torch.Tensor]:
    """Allocate tensors of these shapes on the producing stream and fill them with ``value`` (reusing freed blocks)."""
    return [torch.full(s, value, dtype=dtype, device=CUDA) for s in shapes for _ in range(copies)]


@pytest.mark.parametrize("max_in_flight", [1, 4])
def test_logits_freed_and_overwritten_while_the_side_stream_sleeps(max_in_flight):
    model, obs, side = warmed_observer(max_in_flight)
    want_logits, want_labels, want_classes = [], [], []
    for seed in (1, 2):
        tokens, labels, classes = make_batch(2, 64, seed=seed, vocab=VOCAB)
        sleep_on(side)
        with torch.no_grad(), obs.observe(labels=labels, token_classes=classes):
            chunks = model(tokens.to(CUDA))
        want_logits.append(torch.cat(chunks, dim=1).cpu().reshape(-1, VOCAB))  # syncs the producing stream only
        want_labels.append(labels.reshape(-1))
        want_classes.append(classes.reshape(-1))
        shapes = [c.shape for c in chunks]
        del chunks
        # Reuse of a freed logits block would now hand it to these: a certain token 0 (entropy 0) in every row,
        # and targets that are all ignored.
        junk = overwrite_like(shapes, torch.float32, 0.0)
        for t in junk:
            t[..., 0] = 1e4
        junk += overwrite_like([torch.Size([2 * 64 // 4])], torch.long, -100, copies=16)
        if max_in_flight >= 4:  # 4 chunks: nothing waited on the side stream, so it still sleeps
            assert not side.query(), "the side stream finished before the overwrite: the test proves nothing"
        del junk
    want, _ = reference_metrics(torch.cat(want_logits), torch.cat(want_labels), torch.cat(want_classes))
    assert_metrics_close(obs.collect(), want, rtol=1e-5)


def slow_interval_reset(obs) -> None:
    """Make the side stream sleep right before it zeroes the interval's sums (what collect() queues last)."""
    (engine,) = obs.recorder._engines.values()
    acc = engine.acc

    def slow_reset() -> None:
        torch.cuda._sleep(SLEEP_CYCLES)  # runs on the side stream: drain() calls reset() under it
        StatsAccumulator.reset(acc)

    acc.reset = slow_reset


@pytest.mark.parametrize("collect_first", [False, True], ids=["detach-uncollected", "collect-then-detach"])
def test_detach_frees_nothing_the_sleeping_side_stream_still_writes(collect_first):
    model, obs, side = warmed_observer()
    (engine,) = obs.recorder._engines.values()
    sums_shape = engine.acc.sums.shape
    del engine
    tokens, labels, classes = make_batch(2, 64, seed=3, vocab=VOCAB)
    if collect_first:
        with torch.no_grad(), obs.observe(labels=labels, token_classes=classes):
            model(tokens.to(CUDA))
        slow_interval_reset(obs)
        assert obs.collect()["tokens"] > 0
        obs.detach()
    else:
        sleep_on(side)  # the block's updates, its merge and the staging reset all run after the sleep
        with torch.no_grad(), obs.observe(labels=labels, token_classes=classes):
            model(tokens.to(CUDA))
        with pytest.warns(RuntimeWarning, match="collect"):
            obs.detach()
    del obs
    gc.collect()  # the accumulators are gone: their memory is back in the allocator
    junk = overwrite_like([sums_shape], torch.float64, 7.0, copies=64)
    assert not side.query(), "the side stream finished before the overwrite: the test proves nothing"
    torch.cuda.synchronize()
    assert all(bool((t == 7.0).all()) for t in junk), "the side stream wrote into memory freed by detach()"


def test_graph_capture_is_skipped_with_one_warning():
    model, obs, _ = warmed_observer()
    tokens, labels, classes = make_batch(2, 64, seed=4, vocab=VOCAB)
    static = tokens.to(CUDA)
    warm = torch.cuda.Stream()  # warm up on a side stream before capturing, as torch.cuda.graph's docs ask
    warm.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(warm):
        for _ in range(3):
            model(static)
    torch.cuda.current_stream().wait_stream(warm)
    outer, inner = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    warned = pytest.warns(RuntimeWarning, match="CUDA graph capture")
    with torch.no_grad(), warned, torch.cuda.graph(outer), obs.observe(labels=labels, token_classes=classes):
        model(static)  # the block opened during capture
    with torch.no_grad(), obs.observe(labels=labels, token_classes=classes), torch.cuda.graph(inner):
        model(static)  # capture inside an open block: warned once already
    outer.replay()
    inner.replay()
    torch.cuda.synchronize()
    assert obs.collect() == {"nonfinite_tokens": 0.0}  # nothing recorded, nothing raised
    with torch.no_grad(), obs.observe(labels=labels, token_classes=classes):  # eager steps are observed again
        model(static)
    assert obs.collect()["tokens"] > 0
