"""Load probe: 1,000 observed collects over 48 tools under a real Prometheus scraping every second.

Bounded in count (1,000 collects) and time (the loop stops at LOOP_BUDGET_S); loopback only.
Asserts what the issue probed by hand: the ``tool`` label never takes more than ``max_tools`` + 1
values on any scrape, nothing raises or is reported, and RSS stays flat after warm-up.
"""

from __future__ import annotations

import random
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from exporter_cases import TinyLM
from prometheus_client.parser import text_string_to_metric_families
from servers import prometheus_server, require_binary

from agent_obs import TokenClass, attach, tool_id
from agent_obs.exporters import PrometheusExporter

COLLECTS = 1000
WARMUP = 200
MAX_TOOLS = 8
NAMES = [f"tool_{i:02d}" for i in range(48)]
LOOP_BUDGET_S = 45.0
MIN_RUN_S = 6.0  # collects are paced to last at least this long: several 1 s scrapes see them
RSS_GROWTH_MB = 16.0  # after warm-up; a per-collect leak of 16 KB would already exceed it
VOCAB = 64


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def scrape_tools(url: str) -> set[str]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    return {s.labels["tool"] for fam in text_string_to_metric_families(text) for s in fam.samples if "tool" in s.labels}


@pytest.fixture
def one_thread():
    """Tiny matmuls: OpenMP threads only contend (with Prometheus and the other tests) here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_thousand_collects_many_tools_under_a_real_prometheus(monkeypatch, one_thread):
    require_binary("prometheus")
    monkeypatch.setenv("AGENT_OBS_COMPILE", "0")  # eager kernels: same math, no compile in a bounded test
    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    model = TinyLM(VOCAB)
    exp = PrometheusExporter(port=0, run="load")
    ids = torch.tensor([tool_id(n) for n in NAMES])
    seq = 64
    tokens = torch.randint(0, VOCAB, (1, seq), generator=g)
    labels = torch.randint(0, VOCAB, (1, seq), generator=g)
    classes = torch.full((1, seq), int(TokenClass.TOOL_CALL))
    classes[0, :8] = int(TokenClass.REASONING)
    used: set[str] = set()
    max_seen = 0
    with prometheus_server([f"127.0.0.1:{exp.port}"], scrape_interval="1s") as prom:
        prom.wait_for('up{job="agent_obs"} == 1', timeout=30)
        start = time.time()
        with attach(model, layer="lm_head", max_tools=MAX_TOOLS, exporters=[exp]) as obs:
            t0 = time.monotonic()
            deadline = t0 + LOOP_BUDGET_S
            for step in range(1, COLLECTS + 1):
                time.sleep(max(0.0, t0 + step * MIN_RUN_S / COLLECTS - time.monotonic()))
                assert time.monotonic() < deadline, f"only {step} collects in {LOOP_BUDGET_S} s"
                pick = rng.sample(range(len(NAMES)), 20)  # 20 tools per collect, skewed towards low indices
                pick = [min(p, rng.randrange(len(NAMES))) for p in pick]
                tool_ids = torch.full((1, seq), -1)
                tool_ids[0, 8:] = ids[torch.tensor(pick)].repeat_interleave((seq - 8) // 20 + 1)[: seq - 8]
                used.update(NAMES[p] for p in pick)
                with obs.observe(labels=labels, token_classes=classes, tool_ids=tool_ids):
                    model(tokens)
                got = obs.collect("train", step=step)
                assert got["tool_call_tokens"] == seq - 8
                if step == WARMUP:
                    rss_after_warmup = rss_mb()
                if step % 50 == 0:
                    tools = scrape_tools(exp.url)
                    max_seen = max(max_seen, len(tools))
                    assert len(tools) <= MAX_TOOLS + 1, (step, sorted(tools))
            rss_end = rss_mb()
            end = time.time()
            time.sleep(2.5)  # two more scrapes of the final state
            # the largest number of tool values in any scrape Prometheus took during the run
            per_scrape = prom.query(
                'max_over_time(count(count by (tool) ({__name__=~"agent_obs_tool_.+", run="load"}))'
                f"[{int(end - start) + 3}s:1s])"
            )
            scrapes = prom.query(f'count_over_time(up{{job="agent_obs"}}[{int(end - start) + 3}s])')
            ups = prom.query(f'min_over_time(up{{job="agent_obs"}}[{int(end - start) + 3}s])')
            step_seen = prom.value('agent_obs_step{run="load",split="train"}')
    assert len(used) >= 40
    assert float(per_scrape[0]["value"][1]) <= MAX_TOOLS + 1
    assert 0 < max_seen <= MAX_TOOLS + 1
    assert float(scrapes[0]["value"][1]) >= MIN_RUN_S - 1 and float(ups[0]["value"][1]) == 1.0  # all succeeded
    assert step_seen == COLLECTS
    assert exp._reporter.failures == 0  # nothing raised inside the exporter
    assert rss_end - rss_after_warmup < RSS_GROWTH_MB, (rss_after_warmup, rss_end)
