"""The compiled kernel's variants stay bounded: new vocabulary sizes reuse a dynamic graph, tool-argument masks and
per-sample rows add none, warmup() compiles ahead, and a dynamo recompile-limit fallback is announced once and then
runs eager-sized calls (compiled mode; each test starts from an empty dynamo cache and no fallback)."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from metric_reference import assert_metrics_close, reference_metrics
from test_observer import TinyDecoder, make_batch
from torch._dynamo.utils import counters

from agent_obs import accumulator, attach, compute_metrics, kernel, tool_id
from agent_obs.accumulator import StatsAccumulator


@pytest.fixture(autouse=True)
def compiled(monkeypatch):
    """Compiled mode, an empty dynamo cache, no recompile-limit fallback and a fresh 'compiling' announcement,
    whatever ran before (the fallback state goes with the cache whose limit it records)."""
    monkeypatch.setenv("AGENT_OBS_COMPILE", "1")
    monkeypatch.setattr(kernel, "_announced", set())
    monkeypatch.setattr(kernel.Fused, "limit_hit", False)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def check_vocab(vocab: int, dtype: torch.dtype, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(19, vocab, generator=gen) * 4).to(dtype)
    labels = torch.randint(0, vocab, (19,), generator=gen)
    labels[::4] = -100
    classes = torch.randint(0, 4, (19,), generator=gen)
    want, _ = reference_metrics(logits, labels, classes)
    assert_metrics_close(compute_metrics(logits, labels, classes, chunk_tokens=8), want, rtol=1e-5)


def test_vocabulary_sizes_compile_a_bounded_number_of_variants_per_dtype():
    start = graphs()
    check_vocab(1500, torch.float32, seed=1)
    static = graphs() - start
    assert 1 <= static <= 2  # one graph per pass (block stats, chunk sums), the vocabulary static
    # more sizes: one dynamic-vocabulary graph with a partial last 128-logit block, one without
    check_vocab(4099, torch.float32, seed=2)
    check_vocab(2048, torch.float32, seed=3)
    bound = graphs() - start
    assert bound <= 3 * static
    for seed, vocab in enumerate((5000, 32003, 4096, 1500, 151936), start=4):
        check_vocab(vocab, torch.float32, seed)
    assert graphs() - start == bound, "a new vocabulary size compiled the kernel again"
    for seed, vocab in enumerate((1500, 4099, 2048, 32003, 4096), start=10):
        check_vocab(vocab, torch.bfloat16, seed)
    assert graphs() - start <= bound + 2 * static, "bf16 needs at most one graph per vocabulary class"


def test_tool_argument_masks_and_per_sample_rows_compile_no_other_variant():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(40, 1500, generator=gen) * 4
    labels = torch.randint(0, 1500, (40,), generator=gen)
    classes = torch.randint(0, 4, (40,), generator=gen)
    args = torch.randint(0, 2, (40,), generator=gen)
    rows = torch.randint(-1, 3, (40,), generator=gen)
    StatsAccumulator(chunk_tokens=8).update(logits, labels, classes)
    compiled = graphs()
    acc = StatsAccumulator(chunk_tokens=8)
    acc.update(logits, labels, classes, tool_args=args.bool(), sample_rows=rows, num_samples=3)
    acc.update(logits, labels, classes, tool_args=args)
    assert graphs() == compiled, "a tool_args mask or per-sample rows compiled another kernel variant"
    want, _ = reference_metrics(
        torch.cat([logits, logits]), labels.repeat(2), classes.repeat(2), tool_args=args.repeat(2)
    )
    assert_metrics_close(acc.metrics(), want, rtol=1e-5)


def test_recompile_limit_fallback_warns_once_then_runs_eager_sized_calls_and_stays_correct(monkeypatch):
    sums = accumulator._fused_chunk_sums
    eager_rows = []  # rows of each chunk_sums call that ran eagerly
    monkeypatch.setattr(sums, "fn", lambda x, *args: eager_rows.append(x.shape[0]) or accumulator.chunk_sums(x, *args))
    with torch._dynamo.config.patch(recompile_limit=1):
        check_vocab(1500, torch.float32, seed=1)  # the one variant the limit allows
        assert max(eager_rows, default=0) < 2, "a compiled-mode call of >= 2 rows ran eagerly"
        with pytest.warns(RuntimeWarning, match=r"recompile limit.*run eagerly from now on") as caught:
            check_vocab(1500, torch.float16, seed=2)
        assert len([w for w in caught if "recompile limit" in str(w.message)]) == 1
        assert not sums.compiling and not kernel.fused_block_stats.compiling
        eager_rows.clear()
        compiled = graphs()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            check_vocab(4099, torch.float32, seed=3)  # eager without another word, on eager-sized calls
        assert graphs() == compiled
        assert sum(eager_rows) == 19 and max(eager_rows) <= kernel.rows_per_call(8, 4099, 10, compiling=False)


def test_warmup_compiles_ahead_with_one_log_line(caplog):
    torch.manual_seed(0)
    model = TinyDecoder()
    obs = attach(model)
    before = graphs()
    with caplog.at_level(logging.INFO, logger="agent_obs"):
        obs.warmup()
    assert graphs() > before, "warmup() compiled nothing"
    assert [r.getMessage() for r in caplog.records if "compiling" in r.getMessage()] == [
        "agent_obs: compiling the metric kernel for torch.float32 logits on cpu (once per process; "
        "obs.warmup() does it before training)"
    ]
    assert obs.collect() == {"nonfinite_tokens": 0.0}  # the dummy chunk recorded nothing
    compiled_by_warmup = graphs()
    tokens, labels, classes = make_batch(2, 17, seed=1)
    tools = torch.where(classes == 2, tool_id("bash"), -1)
    with obs.observe(labels=labels, token_classes=classes, tool_ids=tools):
        logits = model(tokens).detach()
    assert graphs() == compiled_by_warmup, "the first observed step compiled although warmup() ran"
    want, _ = reference_metrics(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), classes.reshape(-1))
    got = obs.collect()
    assert_metrics_close({k: v for k, v in got.items() if "." not in k}, want, rtol=1e-5)
    assert got["tool_call.bash_tokens"] == want["tool_call_tokens"]
