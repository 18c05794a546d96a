"""compute_metrics and the fused kernel equal an independent float64 reference, in eager and compiled mode."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from metric_reference import assert_metrics_close, reference_metrics
from torch._dynamo.utils import counters

from agent_obs import compute_metrics
from agent_obs.kernel import Fused, row_stats

FP32_RTOL = 1e-5


@pytest.fixture
def eager(monkeypatch):
    """Run the kernel's math as plain torch ops (the same code, uncompiled): fast for many shapes."""
    monkeypatch.setenv("AGENT_OBS_COMPILE", "0")


def _check(logits, labels=None, classes=None, *, rtol=FP32_RTOL, chunk_tokens=None, topk=(1, 2, 5, 10)):
    got = compute_metrics(logits, labels, classes, chunk_tokens=chunk_tokens, topk=topk)
    want, hists = reference_metrics(logits, labels, classes, topk=topk)
    assert_metrics_close(got, want, rtol=rtol)
    assert set(got.histograms) == set(hists)
    for name, counts in hists.items():
        assert list(got.histograms[name].counts) == counts, name
    return got


@st.composite
def batches(draw):
    """Random [B, T, V] logits with heavy masking, random classes and a chunk size not dividing the tokens."""
    vocab = draw(st.sampled_from([2, 3, 10, 127, 128, 129, 1000, 4099]))
    b, t = draw(st.integers(1, 3)), draw(st.integers(1, 25))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.01, 1.0, 8.0, 100.0]))
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, vocab, generator=gen) * scale
    labels = torch.randint(0, vocab, (b, t), generator=gen)
    mask_p = draw(st.sampled_from([0.0, 0.5, 0.95, 1.0]))
    labels[torch.rand(b, t, generator=gen) < mask_p] = -100
    classes = torch.randint(0, 4, (b, t), generator=gen) if draw(st.booleans()) else None
    chunk = draw(st.integers(1, b * t + 3))
    return logits, labels if draw(st.booleans()) else None, classes, chunk


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches())
def test_random_batches_match_float64_reference(eager, batch):
    logits, labels, classes, chunk = batch
    _check(logits, labels, classes, chunk_tokens=chunk)


def test_large_vocab_fp32(eager):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 7, 50257, generator=gen) * 4
    labels = torch.randint(0, 50257, (2, 7), generator=gen)
    got = _check(logits, labels, torch.randint(1, 4, (2, 7), generator=gen), chunk_tokens=3)
    assert got["tokens"] == 14


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_computed_in_fp32(eager, dtype):
    gen = torch.Generator().manual_seed(2)
    ref32 = torch.randn(40, 50000, generator=gen) * 3
    logits = ref32.to(dtype)
    labels = torch.randint(0, 50000, (40,), generator=gen)
    _check(logits, labels, rtol=FP32_RTOL)  # exact for the half-precision values themselves
    got = compute_metrics(logits, labels)
    want, _ = reference_metrics(ref32, labels)
    for key in ("entropy", "perplexity", "top1_prob", "top10_prob"):  # and close to the fp32 logits' metrics
        assert math.isclose(got[key], want[key], rel_tol=2e-2), key


def test_extreme_logits_infinities_and_ties(eager):
    vocab = 300
    logits = torch.randn(12, vocab) * 3
    logits[0] = -1e4
    logits[0, 7] = 1e4  # one certain token: entropy 0, top1 1
    logits[1, ::2] = 1e4  # 150 tied maxima
    logits[1, 1::2] = -1e4
    logits[2, :] = -math.inf
    logits[2, 299] = 5.0  # a single finite entry in the tail block
    logits[3, :250] = -math.inf  # -inf entries, the rest random
    logits[4] = 0.0  # uniform: entropy log V, ties everywhere
    logits[5, 3] = 1e4
    logits[5, 200] = 1e4  # two tied maxima: argmax is the first
    labels = torch.tensor([7, 2, 299, 260, 0, 200, 1, 2, 3, 4, 5, 6])
    got = _check(logits, labels, chunk_tokens=5)
    uniform = compute_metrics(logits[4:5], labels[4:5])
    assert math.isclose(uniform["entropy"], math.log(vocab), rel_tol=1e-6)
    assert math.isclose(uniform["top10_prob"], 10 / vocab, rel_tol=1e-6)
    assert compute_metrics(logits[5:6], labels[5:6])["accuracy"] == 0.0  # label 200 is the second maximum
    assert compute_metrics(logits[0:1], labels[0:1])["entropy"] == 0.0
    assert got["tokens"] == 12


def test_label_at_minus_inf_caps_perplexity(eager):
    logits = torch.randn(4, 50)
    logits[0, 3] = -math.inf
    got = _check(logits, torch.tensor([3, 1, 2, 3]))
    assert got["perplexity"] == 1e6


def test_nonfinite_rows_are_counted_and_excluded(eager):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(10, 200, generator=gen)
    logits[1, 5] = math.nan
    logits[4, 0] = math.inf
    logits[6] = -math.inf
    logits[8, 199] = math.nan  # NaN in the tail block
    labels = torch.randint(0, 200, (10,), generator=gen)
    labels[8] = -100  # a masked non-finite row is not counted
    got = _check(logits, labels, chunk_tokens=3)
    assert got["nonfinite_tokens"] == 3
    assert got["tokens"] == 6
    finite_only = compute_metrics(logits[[0, 2, 3, 5, 7, 9]], labels[[0, 2, 3, 5, 7, 9]])
    assert_metrics_close(got, {**finite_only, "nonfinite_tokens": 3.0}, rtol=1e-12)


def test_empty_groups_have_no_keys_never_nan(eager):
    logits = torch.randn(6, 30)
    classes = torch.tensor([1, 1, 3, 0, 1, 3])
    got = _check(logits, torch.randint(0, 30, (6,)), classes)
    assert not any(k.startswith("tool_call") for k in got)
    assert got["reasoning_tokens"] == 3 and got["tokens"] == 5
    nothing = compute_metrics(logits, torch.full((6,), -100))
    assert dict(nothing) == {"nonfinite_tokens": 0.0} and nothing.histograms == {}
    unlabeled = _check(logits, None, classes)
    assert "perplexity" not in unlabeled and "accuracy" not in unlabeled


def test_topk_beyond_vocab_and_large_k(eager):
    logits = torch.randn(9, 3) * 2
    got = _check(logits, torch.randint(0, 3, (9,)))
    assert math.isclose(got["top10_prob"], 1.0, rel_tol=1e-6)
    _check(torch.randn(9, 700), torch.randint(0, 700, (9,)), topk=(1, 17, 40))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"labels": torch.tensor([[0, 1, 30]])}, "label 30 is outside [0, 30)"),
        ({"labels": torch.tensor([[0, 1]])}, "labels has shape (1, 2)"),
        ({"labels": torch.zeros(1, 3)}, "integer token ids"),
        ({"token_classes": torch.tensor([[0, 1]])}, "token_classes has shape (1, 2)"),
        ({"token_classes": torch.tensor([[0, 1, 7]])}, "TokenClass values 0..3"),
        ({"token_classes": torch.tensor([[0.0, 1.5, 2.0]])}, "integer tensor of TokenClass values"),
    ],
)
def test_bad_inputs_raise_helpful_errors(kwargs, message):
    with pytest.raises(ValueError, match=r"fix|need|pass|must|mask") as err:
        compute_metrics(torch.randn(1, 3, 30), **kwargs)
    assert message in str(err.value)


def test_bad_logits_shape_and_topk_raise():
    with pytest.raises(ValueError, match=r"V >= 1"):
        compute_metrics(torch.randn(4, 0))
    with pytest.raises(ValueError, match="topk must be positive"):
        compute_metrics(torch.randn(4, 5), topk=(0, 1))


def test_row_stats_keeps_columns_and_handles_zero_and_one_rows(eager):
    x = torch.randn(1, 50)
    stats = row_stats(x, torch.tensor([int(x.argmax())]), (1, 5))
    assert stats.shape == (1, 6) and stats[0, 2] == 1.0 and stats[0, 3] == 1.0
    assert row_stats(x[:0], None, (1, 5)).shape == (0, 6)


# --- compiled mode: one vocabulary (a tail block of 104) so the suite compiles only a few graphs ---

COMPILED_VOCAB = 1000


def _compiled_batch(n: int, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, COMPILED_VOCAB, generator=gen) * 4).to(dtype)
    logits[0, 5] = 1e4
    logits[1, :] = -math.inf
    logits[1, 998] = 0.0
    labels = torch.randint(0, COMPILED_VOCAB, (n,), generator=gen)
    labels[::5] = -100
    return logits, labels, torch.randint(0, 4, (n,), generator=gen)


def test_compiled_matches_reference_and_never_recompiles_for_new_token_counts():
    for n in (37, 64):
        logits, labels, classes = _compiled_batch(n, seed=n)
        _check(logits, labels, classes, chunk_tokens=16)
    graphs = counters["stats"]["unique_graphs"]
    for n in (2, 3, 50, 129, 1):
        logits, labels, classes = _compiled_batch(max(n, 2), seed=n)
        _check(logits[:n], labels[:n], classes[:n], chunk_tokens=16)
    assert counters["stats"]["unique_graphs"] == graphs, "a new token count recompiled the kernel"


def test_compiled_bf16_matches_reference():
    logits, labels, classes = _compiled_batch(33, torch.bfloat16)
    _check(logits, labels, classes)


def test_compile_failure_warns_once_and_falls_back_to_eager():
    def double(x):
        return x * 2

    fused = Fused(double)

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    fused._compiled = broken
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        assert torch.equal(fused(torch.ones(3, 2)), torch.full((3, 2), 2.0))
    assert not fused.compiling
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(fused(torch.ones(4, 2)), torch.full((4, 2), 2.0))


def test_env_switch_disables_compilation(monkeypatch):
    monkeypatch.setenv("AGENT_OBS_COMPILE", "0")
    frames = counters["frames"]["total"]
    logits, labels, classes = _compiled_batch(20, seed=9)
    _check(logits, labels, classes)
    assert counters["frames"]["total"] == frames


def test_infinite_nll_in_one_class_does_not_poison_the_others(eager):
    logits = torch.randn(4, 50)
    logits[0, 3] = -math.inf
    got = _check(logits, torch.tensor([3, 1, 2, 3]), torch.tensor([1, 2, 2, 1]))
    assert got["reasoning_perplexity"] == 1e6 and got["tool_call_perplexity"] < 1e6


def _peak_allocated_bytes(fn) -> int:
    """Peak bytes held through torch's CPU allocator while ``fn`` runs (profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return peak


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extra_memory_stays_below_one_fp32_chunk(monkeypatch, compiled, dtype):
    monkeypatch.setenv("AGENT_OBS_COMPILE", "1" if compiled else "0")
    logits, labels, classes = _compiled_batch(400, dtype, seed=5)
    chunk = 32
    compute_metrics(logits, labels, classes, chunk_tokens=chunk)  # compile outside the measurement
    peak = _peak_allocated_bytes(lambda: compute_metrics(logits, labels, classes, chunk_tokens=chunk))
    bound = chunk * COMPILED_VOCAB * 4 + 200 * logits.shape[0]  # chunk x V x 4 + O(tokens)
    assert peak < bound, f"peak {peak} bytes >= {bound}"
    assert peak < logits.numel() * 4 / 4  # far from a full fp32 copy of the logits
