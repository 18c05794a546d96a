"""Per-tool keys and series: the overflow bucket is distinct from every tool, the tool set is stable and bounded.

Collects go through the real ``attach()/observe()/collect()`` path (eager kernels, tiny model);
the Prometheus bound is checked on real ``/metrics`` scrapes, the OTel bound on the points the SDK's
ConsoleMetricExporter receives.
"""

from __future__ import annotations

import random
import urllib.request

import pytest
import torch
from exporter_cases import TinyLM, console_exporter, console_metrics, sample_metrics
from prometheus_client.parser import text_string_to_metric_families
from servers import promtool_check_metrics

from agent_obs import TokenClass, attach, tool_id
from agent_obs.distributed import OVERFLOW_TOOL, ToolSelector
from agent_obs.exporters import OTelExporter, PrometheusExporter
from agent_obs.keys import parse_key, sanitize_tool_name

VOCAB = 64
NAMES = [f"tool{i:03d}" for i in range(400)]


@pytest.fixture(autouse=True)
def eager(monkeypatch):
    monkeypatch.setenv("AGENT_OBS_COMPILE", "0")  # the metric kernels' math is the same; no 12 s compile


def observe_tools(obs, model, tool_tokens: dict[str, int], seed: int = 0) -> dict[str, float]:
    """One observed forward with ``tool_tokens[name]`` tool-call tokens per tool (plus reasoning), collected."""
    g = torch.Generator().manual_seed(seed)
    ids = [tool_id(name) for name, n in tool_tokens.items() for _ in range(n)]
    n_tool, n_reason = len(ids), 16
    tokens = torch.randint(0, VOCAB, (1, n_tool + n_reason), generator=g)
    labels = torch.randint(0, VOCAB, tokens.shape, generator=g)
    classes = torch.full(tokens.shape, int(TokenClass.REASONING))
    classes[0, :n_tool] = int(TokenClass.TOOL_CALL)
    tool_ids = torch.full(tokens.shape, -1)
    tool_ids[0, :n_tool] = torch.tensor(ids, dtype=torch.long)
    with obs.observe(labels=labels, token_classes=classes, tool_ids=tool_ids):
        model(tokens)
    return obs.collect("train")


def per_tool_tokens(metrics: dict[str, float]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        parsed = parse_key(key)
        if parsed is not None and parsed.tool is not None and parsed.stat == "tokens":
            out[parsed.tool] = value
    return out


def scraped_tools(url: str) -> set[str]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    return {s.labels["tool"] for fam in text_string_to_metric_families(text) for s in fam.samples if "tool" in s.labels}


def test_a_tool_named_other_keeps_its_tokens_apart_from_the_overflow_bucket():
    """The issue's numbers: max_tools=1, tools other 104, bash 20, ls 4 (before: tool_call.other_tokens 24)."""
    model = TinyLM(VOCAB)
    with attach(model, layer="lm_head", max_tools=1) as obs:
        got = observe_tools(obs, model, {"other": 104, "bash": 20, "ls": 4})
    assert got["tool_call.other_tokens"] == 104
    assert got[f"tool_call.{OVERFLOW_TOOL}_tokens"] == 24
    assert sum(per_tool_tokens(got).values()) == got["tool_call_tokens"] == 128


@pytest.mark.parametrize("name", ["other", "_other", "__other__", " _Other", "-other", "(other)", "", "_"])
def test_no_tool_name_sanitizes_to_the_overflow_name_and_its_keys_parse(name):
    assert sanitize_tool_name(name) != OVERFLOW_TOOL
    parsed = parse_key(f"tool_call.{OVERFLOW_TOOL}_top5_prob")
    assert parsed is not None and parsed.tool == OVERFLOW_TOOL and parsed.k == 5


@pytest.mark.parametrize("max_tools", [4, 16])
def test_prometheus_tool_labels_stay_within_max_tools_plus_one_over_many_collects(max_tools):
    """20 tools per collect drawn from 400 names (before: 17, 177, then 321 tool labels after 21 collects)."""
    rng = random.Random(0)
    model = TinyLM(VOCAB)
    exp = PrometheusExporter(port=0, run="cap")
    seen_sets = []
    with attach(model, layer="lm_head", max_tools=max_tools, exporters=[exp]) as obs:
        for step in range(21):
            tools = {name: rng.randint(1, 6) for name in rng.sample(NAMES, 20)}
            got = observe_tools(obs, model, tools, seed=step)
            assert sum(per_tool_tokens(got).values()) == got["tool_call_tokens"] == sum(tools.values())
            scraped = scraped_tools(exp.url)
            assert len(scraped) <= max_tools + 1, (step, sorted(scraped))
            seen_sets.append(scraped)
        with urllib.request.urlopen(exp.url, timeout=5) as resp:
            check = promtool_check_metrics(resp.read().decode())
    assert check.returncode == 0, check.stdout + check.stderr
    assert OVERFLOW_TOOL in seen_sets[-1]


def test_a_stable_workload_keeps_the_same_series_and_a_shift_evicts_the_old_tools():
    rng = random.Random(1)
    model = TinyLM(VOCAB)
    exp = PrometheusExporter(port=0, run="stable")
    heavy, new_heavy = NAMES[:4], NAMES[4:8]
    with attach(model, layer="lm_head", max_tools=4, exporters=[exp]) as obs:
        for step in range(12):  # 4 busy tools and 16 rare ones that change every collect
            rare = {name: rng.randint(1, 5) for name in rng.sample(NAMES[8:], 16)}
            observe_tools(obs, model, {**dict.fromkeys(heavy, 40), **rare}, seed=step)
            assert scraped_tools(exp.url) == {*heavy, OVERFLOW_TOOL}, step
        sizes = []
        for step in range(30):  # the busy tools change: the new ones take over, the old ones' series go
            observe_tools(obs, model, dict.fromkeys(new_heavy, 40), seed=100 + step)
            scraped = scraped_tools(exp.url)
            sizes.append(len(scraped))
            if scraped == {*new_heavy, OVERFLOW_TOOL}:  # the overflow counter stays: it only grows
                break
    assert scraped == {*new_heavy, OVERFLOW_TOOL}, scraped  # the old busy tools' series (counters too) went
    assert 5 <= len(sizes) <= 25 and max(sizes) <= 5, sizes  # not at once (hysteresis), not never


def test_otel_tool_attributes_stay_within_max_tools_plus_one():
    rng = random.Random(2)
    model = TinyLM(VOCAB)
    sdk_exporter, out = console_exporter()
    exp = OTelExporter(exporter=sdk_exporter, run="cap", export_interval_s=3600)
    with attach(model, layer="lm_head", max_tools=3, exporters=[exp]) as obs:
        for step in range(15):
            observe_tools(obs, model, {name: rng.randint(1, 6) for name in rng.sample(NAMES, 12)}, seed=step)
            out.seek(0)
            out.truncate()
            assert exp.force_flush(timeout_s=5.0) is True
            tools = {
                p["attributes"]["tool"]
                for m in console_metrics(out)
                for p in m["data"]["data_points"]
                if "tool" in p["attributes"]
            }
            assert 1 <= len(tools) <= 3 + 1, (step, sorted(tools))


def test_an_exporter_alone_keeps_the_busiest_tools_evicts_the_least_recent_and_reports_the_cut(caplog):
    exp = PrometheusExporter(port=0, max_tools=2)
    three = sample_metrics(1, tools=("bash", "edit", "ls"))
    tokens = per_tool_tokens(three)
    busiest = sorted(tokens, key=lambda t: (-tokens[t], t))[:2]
    exp.export(three, step=1, split="train")
    assert scraped_tools(exp.url) == set(busiest)
    assert "more than max_tools=2 tools" in caplog.text
    exp.export(sample_metrics(2, tools=("find",)), step=2, split="val")
    exp.export(sample_metrics(3, tools=("grep",)), step=3, split="val")
    assert scraped_tools(exp.url) == {"find", "grep"}  # train's gauges and counters of both busiest tools went
    exp.close()


def test_tool_selector_swaps_only_past_the_margin_and_bounds_its_memory():
    sel = ToolSelector(max_tools=2, window=10)
    assert sel.update({1: 100, 2: 90, 3: 80}) == [1, 2]
    for _ in range(5):  # 3 gets 1.5x the score of 2: not enough to swap
        kept = sel.update({1: 100, 2: 60, 3: 90})
    assert kept == [1, 2]
    for _ in range(30):  # 2 stops, 3 goes on: it takes 2's place once it has more than twice 2's score
        kept = sel.update({1: 100, 3: 90})
    assert kept == [1, 3]
    for i in range(1000):
        sel.update({1000 + i: 1})
    assert len(sel.scores) <= 2 + 4 * 2 + 64
