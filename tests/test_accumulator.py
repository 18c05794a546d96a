"""StatsAccumulator: sync-free updates, token-weighted merging, per-tool groups, histograms vs a float64 reference."""

from __future__ import annotations

import math

import pytest
import torch
from metric_reference import assert_metrics_close, reference_metrics
from torch._subclasses.fake_tensor import FakeTensorMode

from agent_obs.accumulator import ENTROPY_BUCKETS, StatsAccumulator, default_chunk_tokens

RTOL = 1e-5


@pytest.fixture(autouse=True)
def eager(monkeypatch):
    """The kernel's math uncompiled (the compiled path is compared with the reference in test_metrics)."""
    monkeypatch.setenv("AGENT_OBS_COMPILE", "0")


def _batch(n: int, vocab: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=gen) * 3
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < 0.3] = -100
    classes = torch.randint(0, 4, (n,), generator=gen)
    slots = torch.randint(-1, 4, (n,), generator=gen)  # slot 3 is beyond 3 slots: folded into the last one
    return logits, labels, classes, slots


def test_update_is_free_of_host_syncs_and_data_dependent_shapes():
    """Under FakeTensorMode, .item()/bool(tensor)/nonzero-style ops raise: update must need none of them."""
    with FakeTensorMode():
        acc = StatsAccumulator(num_tool_slots=2, chunk_tokens=8)
        logits = torch.randn(37, 300)
        acc.update(logits, torch.randint(0, 300, (37,)), torch.randint(0, 4, (37,)), torch.randint(-1, 2, (37,)))
        acc.update(logits.bfloat16(), None, None)
        acc.update(
            logits,
            torch.randint(0, 300, (37,)),
            torch.randint(0, 4, (37,)),
            tool_args=torch.randint(0, 2, (37,)),
            sample_rows=torch.randint(-1, 3, (37,)),
            num_samples=3,
        )
        assert acc.sums.shape == (7, acc.num_cols) and acc.samples.shape[1] == 15


def test_merge_and_uneven_updates_equal_one_batch_and_the_reference():
    logits, labels, classes, slots = _batch(90, 257, seed=0)
    one = StatsAccumulator(num_tool_slots=3)
    one.update(logits, labels, classes, slots)
    parts = StatsAccumulator(num_tool_slots=3, chunk_tokens=7)
    other = StatsAccumulator(num_tool_slots=3, chunk_tokens=64)
    for start, stop in ((0, 1), (1, 30), (30, 31)):
        parts.update(logits[start:stop], labels[start:stop], classes[start:stop], slots[start:stop])
    other.update(logits[31:], labels[31:], classes[31:], slots[31:])
    parts.merge(other)
    torch.testing.assert_close(parts.sums, one.sums, rtol=1e-12, atol=1e-9)
    names = {0: "bash", 1: "edit", 2: "other"}
    ref_slots = slots.clamp(max=2)
    want, hists = reference_metrics(logits, labels, classes, tool_slots=ref_slots, tool_names=names)
    got = parts.metrics(names)
    assert_metrics_close(got, want, rtol=RTOL)
    assert {name: list(h.counts) for name, h in got.histograms.items()} == hists
    assert (
        got["tool_call.bash_tokens"] + got["tool_call.edit_tokens"] + got["tool_call.other_tokens"]
        <= got["tool_call_tokens"]
    )


def test_tool_slots_count_only_tool_call_tokens_with_a_tool():
    logits = torch.randn(6, 40)
    classes = torch.tensor([2, 2, 1, 2, 3, 2])
    slots = torch.tensor([0, 0, 0, -1, 1, 1])
    acc = StatsAccumulator(num_tool_slots=2)
    acc.update(logits, torch.arange(6), classes, slots)
    got = acc.metrics({0: "bash", 1: "submit"})
    assert got["tool_call.bash_tokens"] == 2 and got["tool_call.submit_tokens"] == 1
    assert got["tool_call_tokens"] == 4 and got["reasoning_tokens"] == 1 and got["tokens"] == 6
    want, _ = reference_metrics(logits, torch.arange(6), classes, tool_slots=slots, tool_names={0: "bash", 1: "submit"})
    assert_metrics_close(got, want, rtol=RTOL)


def test_histogram_buckets_sum_and_reset():
    vocab = 64
    logits = torch.randn(50, vocab) * torch.logspace(-2, 1.5, 50)[:, None]  # entropies spread over the buckets
    acc = StatsAccumulator(chunk_tokens=9)
    acc.update(logits)
    got = acc.metrics()
    _, hists = reference_metrics(logits)
    h = got.histograms["all"]
    assert h.edges == ENTROPY_BUCKETS and list(h.counts) == hists["all"]
    assert sum(h.counts) == 50 and len([c for c in h.counts if c]) >= 4
    assert h.total == pytest.approx(got["entropy"] * 50, rel=1e-9)
    acc.reset()
    assert dict(acc.metrics()) == {"nonfinite_tokens": 0.0}


def test_state_sums_and_merge_across_devices_keep_float64():
    acc = StatsAccumulator(chunk_tokens=3)
    logits, labels, classes, _ = _batch(11, 30, seed=4)
    acc.update(logits.half(), labels, classes)
    assert acc.sums.dtype == torch.float64
    copy = StatsAccumulator()
    copy.merge(acc)
    copy.merge(acc)
    torch.testing.assert_close(copy.sums, 2 * acc.sums)
    acc.all_reduce()  # outside torch.distributed: a no-op
    torch.testing.assert_close(copy.sums, 2 * acc.sums)


def test_default_chunk_is_about_64_mib():
    assert default_chunk_tokens(151936) == 110
    assert default_chunk_tokens(10**9) == 1


def test_top1_binary_entropy_and_tool_parts_match_the_float64_reference():
    """The seed's H2(p1) per group, and tool_syntax/tool_args splitting tool_call exactly (with tool slots)."""
    logits, labels, classes, slots = _batch(120, 97, seed=7)
    logits[:5] *= 40  # p1 close to 1: H2 near 0 where 1 - p1 loses precision first
    args = torch.randint(0, 2, (120,), generator=torch.Generator().manual_seed(1))
    names = {0: "bash", 1: "edit", 2: "other"}
    for topk in ((1, 5), (2, 10)):  # without k=1 the top-1 mass is still computed for H2
        acc = StatsAccumulator(topk, num_tool_slots=3, chunk_tokens=11)
        acc.update(logits, labels, classes, slots, tool_args=args)
        got = acc.metrics(names, binary_entropy=True)
        want, hists = reference_metrics(
            logits,
            labels,
            classes,
            topk=topk,
            tool_slots=slots.clamp(max=2),
            tool_names=names,
            tool_args=args,
            binary_entropy=True,
        )
        assert_metrics_close(got, want, rtol=RTOL)
        assert {name: list(h.counts) for name, h in got.histograms.items()} == hists
        assert got["tool_syntax_tokens"] + got["tool_args_tokens"] == got["tool_call_tokens"]
        assert 0 < got["top1_binary_entropy"] <= 0.6932  # H2 <= ln 2
    plain = StatsAccumulator(num_tool_slots=3)
    plain.update(logits, labels, classes, slots)
    assert not any(k.startswith(("tool_syntax", "tool_args")) or "binary" in k for k in plain.metrics(names))


def test_per_sample_sums_match_brute_force_and_survive_growth():
    """Rows land in their sample's row (ids -1 nowhere), per class, across chunks and table growth."""
    logits, labels, classes, _ = _batch(150, 61, seed=9)
    rows = torch.randint(-1, 70, (150,), generator=torch.Generator().manual_seed(2))
    acc = StatsAccumulator(chunk_tokens=16)
    acc.update(logits[:50], labels[:50], classes[:50], sample_rows=rows[:50], num_samples=70)
    acc.update(logits[50:], labels[50:], classes[50:], sample_rows=rows[50:], num_samples=70)
    table = acc.take_samples(70)
    assert table.shape == (70, 15) and acc.samples.shape[0] == 1
    for sample in (0, 13, 69):
        for g, cls in enumerate((None, 1, 2)):
            member = (rows == sample) & (labels != -100) & (classes != 0)
            if cls is not None:
                member &= classes == cls
            idx = member.nonzero().flatten()
            want, _ = reference_metrics(logits[idx], labels[idx])
            tokens, labeled, entropy, nll, correct = table[sample, 5 * g : 5 * g + 5].tolist()
            assert tokens == labeled == len(idx)
            if len(idx):
                assert entropy / tokens == pytest.approx(want["entropy"], rel=RTOL)
                assert math.exp(nll / tokens) == pytest.approx(want["perplexity"], rel=RTOL)
                assert correct / tokens == pytest.approx(want["accuracy"], abs=1e-12)


def test_compiled_kernel_gives_the_same_anatomy_binary_entropy_and_sample_sums(monkeypatch):
    """The inductor-compiled chunk sums (tool_args groups, H2, per-sample rows) equal the eager ones."""
    logits, labels, classes, slots = _batch(200, 300, seed=12)
    args = torch.randint(0, 2, (200,), generator=torch.Generator().manual_seed(3))
    rows = torch.randint(-1, 9, (200,), generator=torch.Generator().manual_seed(4))
    out = {}
    for mode in ("0", "1"):
        monkeypatch.setenv("AGENT_OBS_COMPILE", mode)
        acc = StatsAccumulator((2, 5), num_tool_slots=2, chunk_tokens=64)
        acc.update(logits, labels, classes, slots, tool_args=args, sample_rows=rows, num_samples=9)
        out[mode] = (acc.sums.clone(), acc.take_samples(9), acc.metrics({0: "a", 1: "b"}, binary_entropy=True))
    torch.testing.assert_close(out["1"][0], out["0"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["1"][1], out["0"][1], rtol=1e-5, atol=1e-6)
    want, _ = reference_metrics(
        logits,
        labels,
        classes,
        topk=(2, 5),
        tool_slots=slots.clamp(max=1),
        tool_names={0: "a", 1: "b"},
        tool_args=args,
        binary_entropy=True,
    )
    assert_metrics_close(out["1"][2], want, rtol=RTOL)


def test_compute_metrics_binary_entropy_and_tool_args_options():
    """compute_metrics(binary_entropy=True, tool_args=...) on [B, S, V] equals the float64 reference; tool_args
    without token classes is refused."""
    from agent_obs import compute_metrics

    logits, labels, classes, _ = _batch(60, 33, seed=21)
    args = torch.arange(60) % 2
    got = compute_metrics(
        logits.reshape(3, 20, 33),
        labels.reshape(3, 20),
        classes.reshape(3, 20),
        tool_args=args.reshape(3, 20),
        binary_entropy=True,
    )
    want, _ = reference_metrics(logits, labels, classes, tool_args=args, binary_entropy=True)
    assert_metrics_close(got, want, rtol=RTOL)
    with pytest.raises(ValueError, match="pass token_classes of the same shape"):
        compute_metrics(logits, labels, tool_args=args)
