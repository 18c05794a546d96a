"""Alert rules: promtool check/test rules, the unit tests catch broken rules, and the alerts fire in a real
Prometheus when an observed training run collapses or produces NaN logits."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest
from servers import prometheus_server, require_binary

DASHBOARDS = Path(__file__).resolve().parents[1] / "dashboards"
RULES = DASHBOARDS / "alerts.yml"
RULE_TESTS = DASHBOARDS / "alerts_test.yml"
RUN = "alerts-e2e"


def promtool(*args: str | Path, cwd: Path = DASHBOARDS) -> subprocess.CompletedProcess:
    binary = require_binary("promtool")
    return subprocess.run([binary, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_promtool_check_rules_and_config():
    rules = promtool("check", "rules", RULES)
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert "SUCCESS: 5 rules found" in rules.stdout
    config = promtool("check", "config", DASHBOARDS / "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr


def test_promtool_unit_tests_pass():
    result = promtool("test", "rules", RULE_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.parametrize(
    ("pattern", "replacement"),
    [
        (r"< 0\.9", "< 0.2"),  # collapse guard on accuracy
        (r"agent_obs_entropy_nats < 0\.05", "agent_obs_entropy_nats < 0.005"),
        (r"> 2 \*", "> 3 *"),  # spike factor
        (r" unless agent_obs_nonfinite_tokens_total offset 5m", ""),  # first-appearance arm
        (r"> 600", "> 1200"),  # stall threshold
        (r'\{split="train"\}', ""),  # stall only on train
        (r"< 0\.3 \*", "< 0.2 *"),  # RL entropy collapse, slow arm: fraction of the 6-hour peak
        (r"< 0\.5 \*", "< 0.3 *"),  # RL entropy collapse, fast arm: fraction of the 30-minute peak
        (r"\[30m\]", "[60m]"),  # fast arm window
        (r'\{split=~"rl_\.\*"\}', ""),  # RL splits only: an SFT run's falling entropy is learning
    ],
)
def test_unit_tests_catch_a_broken_rule(tmp_path, pattern, replacement):
    """A copy of the rules with one threshold or matcher changed fails alerts_test.yml."""
    text = RULES.read_text()
    assert re.search(pattern, text), pattern
    (tmp_path / "alerts.yml").write_text(re.sub(pattern, replacement, text, count=1))
    (tmp_path / "alerts_test.yml").write_text(RULE_TESTS.read_text())
    result = promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert result.returncode != 0 and "FAILED" in result.stdout + result.stderr


def _firing(prom, name: str) -> list[dict]:
    return [a for a in prom.alerts() if a["labels"]["alertname"] == name and a["state"] == "firing"]


@pytest.mark.slow
def test_alerts_fire_on_collapse_and_nan_logits(tmp_path):
    """Healthy training: no collapse/NaN alert. Then the model puts all its mass on one token (entropy ~0,
    accuracy ~1/64): entropy collapse and perplexity spike fire; then NaN logits: non-finite fires.
    The rules are the committed ones with ``for:`` set to 0s (evaluated every second)."""
    from observed_training import ObservedTraining

    from agent_obs.exporters import PrometheusExporter

    require_binary("prometheus")
    rules = tmp_path / "alerts.yml"
    rules.write_text(re.sub(r"for: \d+m", "for: 0s", RULES.read_text()))
    exporter = PrometheusExporter(port=0, run=RUN)
    training = ObservedTraining([exporter])
    try:
        with prometheus_server([f"127.0.0.1:{exporter.port}"], rule_files=[rules]) as prom:

            def run_until(condition, timeout: float, step) -> None:
                deadline = time.monotonic() + timeout
                while not condition():
                    assert time.monotonic() < deadline, f"timed out; alerts: {prom.alerts()}"
                    step()
                    time.sleep(0.1)

            run_until(lambda: prom.query(f'agent_obs_entropy_nats{{run="{RUN}"}}'), 60, training.train_step)
            for _ in range(10):  # 2-3 s of healthy, scraped and evaluated training
                training.train_step()
            assert prom.value(f'agent_obs_entropy_nats{{run="{RUN}",split="train",token_class="all"}}') > 0.5
            assert not _firing(prom, "AgentObsEntropyCollapse")
            assert not _firing(prom, "AgentObsNonFiniteTokens")

            training.collapse()
            run_until(lambda: _firing(prom, "AgentObsEntropyCollapse"), 30, lambda: training.eval_step("train"))
            collapsed = _firing(prom, "AgentObsEntropyCollapse")
            assert {a["labels"]["token_class"] for a in collapsed} <= {"all", "reasoning", "tool_call"}
            assert all(a["labels"]["run"] == RUN and a["labels"]["split"] == "train" for a in collapsed)
            assert all(float(a["value"]) < 0.05 for a in collapsed)
            run_until(lambda: _firing(prom, "AgentObsPerplexitySpike"), 30, lambda: training.eval_step("train"))
            assert not _firing(prom, "AgentObsNonFiniteTokens")

            training.poison()
            run_until(lambda: _firing(prom, "AgentObsNonFiniteTokens"), 30, lambda: training.eval_step("train"))
            (alert,) = _firing(prom, "AgentObsNonFiniteTokens")
            assert alert["labels"]["severity"] == "critical" and alert["labels"]["split"] == "train"
            assert "NaN/Inf" in alert["annotations"]["description"]
    finally:
        training.close()
