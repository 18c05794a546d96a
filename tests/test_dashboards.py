"""The Grafana dashboard: committed JSON = generator output, valid against Grafana's schema, and every
panel query returns data from a real Prometheus scraping a real observed training run."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import re
import time
from pathlib import Path

import jsonschema
import pytest
import yaml

from agent_obs.accumulator import ENTROPY_BUCKETS
from agent_obs.exporters.families import ALL_FAMILIES, HISTOGRAM_FAMILY

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = ROOT / "dashboards"
COMMITTED = DASHBOARDS / "agent_obs.json"
SCHEMA = DASHBOARDS / "schema" / "dashboard.schema.json"
SDK_ONLY_VARIABLE_KEYS = ("auto", "auto_count", "auto_min")  # see dashboards/schema/README.md
RUN = "dash-e2e"
RATE_INTERVAL = "10s"


def _build_module():
    spec = importlib.util.spec_from_file_location("dashboards_build", DASHBOARDS / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(COMMITTED.read_text(encoding="utf-8"))


def _panels(dashboard: dict) -> list[dict]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def _validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(json.loads(SCHEMA.read_text(encoding="utf-8")))


def _schema_view(dashboard: dict) -> dict:
    view = copy.deepcopy(dashboard)
    for var in view["templating"]["list"]:
        for key in SDK_ONLY_VARIABLE_KEYS:
            var.pop(key, None)
    return view


def test_committed_json_is_what_the_generator_writes():
    """Edit dashboards/build.py and run it: the committed JSON must be its exact output."""
    assert COMMITTED.read_text(encoding="utf-8") == _build_module().render(), (
        "dashboards/agent_obs.json is stale: run `python dashboards/build.py` and commit the result"
    )


def test_dashboard_validates_against_grafana_schema(dashboard):
    """Strict JSON Schema of @grafana/schema 11.6's Dashboard; a misspelt or mistyped key is caught."""
    validator = _validator()
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(_schema_view(dashboard))]
    assert errors == []
    assert dashboard["schemaVersion"] >= 39

    def mutated(change) -> list[tuple]:  # where validation fails
        broken = _schema_view(dashboard)
        change(broken)
        return sorted({tuple(e.absolute_path)[:2] for e in validator.iter_errors(broken)})

    assert mutated(lambda d: d["panels"][1].update(titel="typo")) == [("panels", 1)]
    assert mutated(lambda d: d["panels"][2]["gridPos"].update(w="wide")) == [("panels", 2)]
    assert mutated(lambda d: d["templating"]["list"][1].update(refresh="often")) == [("templating", "list")]
    assert mutated(lambda d: d.update(refresh=10)) == [("refresh",)]


def test_every_panel_has_unit_description_and_the_datasource_variable(dashboard):
    panels = _panels(dashboard)
    assert len(panels) >= 14
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels:
        assert len(p.get("description", "")) > 20, p["title"]
        assert p["fieldConfig"]["defaults"].get("unit"), p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        for t in p["targets"]:
            assert t["refId"] and t["expr"] and t["datasource"]["uid"] == "${datasource}"
        if "$split" in p["title"]:
            assert p["repeat"] == "split" and p["repeatDirection"] == "h", p["title"]
    names = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {"datasource", "job", "run", "split"} <= set(names)
    assert names["datasource"]["type"] == "datasource" and names["datasource"]["query"] == "prometheus"
    assert names["split"]["multi"] and names["split"]["includeAll"]


_METRIC = re.compile(r"\b(agent_obs_[a-z_]+)")


def test_queries_use_only_contract_families_and_cover_them(dashboard):
    """Every metric a panel queries is an exporter family (so a rename breaks this test), and every
    family of the contract is on some panel."""
    known = {f.name for f in ALL_FAMILIES} | {HISTOGRAM_FAMILY.name + "_bucket"}
    used = {m for p in _panels(dashboard) for t in p["targets"] for m in _METRIC.findall(t["expr"])}
    assert used <= known, used - known
    wanted = {
        "agent_obs_entropy_nats",
        "agent_obs_perplexity",
        "agent_obs_topk_prob_ratio",
        "agent_obs_accuracy_ratio",
        "agent_obs_tokens_total",
        "agent_obs_nonfinite_tokens_total",
        "agent_obs_step",
        "agent_obs_last_collect_timestamp_seconds",
        "agent_obs_token_entropy_nats_bucket",
        "agent_obs_tool_entropy_nats",
        "agent_obs_tool_accuracy_ratio",
        "agent_obs_outlier_samples_total",
    }
    assert wanted <= used, wanted - used
    anatomy = [p for p in _panels(dashboard) if "syntax vs arguments" in p["title"]]
    assert {p["title"].split(":")[0] for p in anatomy} == {"Tool call entropy", "Tool call accuracy"}
    assert all('token_class=~"tool_syntax|tool_args"' in p["targets"][0]["expr"] for p in anatomy)
    by_title = {p["title"]: p for p in _panels(dashboard)}
    assert by_title["Perplexity — $split"]["fieldConfig"]["defaults"]["custom"]["scaleDistribution"]["type"] == "log"
    assert any(p["type"] == "heatmap" and p["targets"][0]["format"] == "heatmap" for p in _panels(dashboard))
    assert any("rate(agent_obs_tokens_total" in t["expr"] for p in _panels(dashboard) for t in p["targets"])


def test_compose_and_provisioning_point_at_the_committed_files():
    """docker-compose mounts files that exist, everything listens on loopback (host networking), Grafana's
    provider path is where the dashboard is mounted and its datasource is that Prometheus."""
    from agent_obs.exporters.prometheus import DEFAULT_PORT

    compose = yaml.safe_load((DASHBOARDS / "docker-compose.yml").read_text())
    services = compose["services"]
    mounts = {}
    for service in services.values():
        assert service["network_mode"] == "host" and "ports" not in service
        for volume in service["volumes"]:
            src, dst = volume.split(":")[:2]
            if src.startswith("./"):
                assert (DASHBOARDS / src).exists(), src
                mounts[src] = dst
    assert "--web.listen-address=127.0.0.1:9090" in services["prometheus"]["command"]
    assert services["grafana"]["environment"]["GF_SERVER_HTTP_ADDR"] == "127.0.0.1"
    assert mounts["./alerts.yml"] == "/etc/prometheus/alerts.yml"
    assert mounts["./prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    scrape = yaml.safe_load((DASHBOARDS / "prometheus.yml").read_text())
    assert scrape["rule_files"] == ["alerts.yml"]  # relative: beside prometheus.yml in the container too
    assert scrape["scrape_configs"][0]["static_configs"][0]["targets"] == [f"127.0.0.1:{DEFAULT_PORT}"]
    provider = yaml.safe_load((DASHBOARDS / "provisioning/dashboards/agent_obs.yml").read_text())
    assert Path(mounts["./agent_obs.json"]).parent == Path(provider["providers"][0]["options"]["path"])
    assert mounts["./provisioning"] == "/etc/grafana/provisioning"
    (datasource,) = yaml.safe_load((DASHBOARDS / "provisioning/datasources/prometheus.yml").read_text())["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://127.0.0.1:9090"


# ------------------------------------------------------------------ against a real Prometheus


def substitute(expr: str, values: dict[str, str]) -> str:
    """Grafana's variable interpolation for the variables this dashboard uses (regex-escaped like Grafana)."""
    out = expr.replace("$__rate_interval", RATE_INTERVAL)
    for name in sorted(values, key=len, reverse=True):
        out = out.replace("${" + name + "}", values[name]).replace("$" + name, values[name])
    assert "$" not in out, f"unsubstituted variable in {out!r}"
    return out


@pytest.fixture(scope="module")
def scraped_run():
    """A short observed training run (train every step, val every 4th) scraped every second."""
    from observed_training import ObservedTraining
    from servers import prometheus_server, require_binary

    from agent_obs.exporters import PrometheusExporter

    require_binary("prometheus")
    exporter = PrometheusExporter(port=0, run=RUN)
    training = ObservedTraining([exporter], anatomy=True)
    try:
        with prometheus_server([f"127.0.0.1:{exporter.port}"]) as prom:
            start = time.time()
            seen_at = None
            while seen_at is None or time.time() < seen_at + 8:  # 8 s of scrapes after the first one
                training.train_step()
                if training.step % 4 == 0:
                    training.eval_step("val")
                if seen_at is None and prom.query(f'agent_obs_step{{run="{RUN}"}}'):
                    seen_at = time.time()
                assert time.time() - start < 60, f"no scrape after 60 s: {prom.targets()}"
                time.sleep(0.1)
            yield prom, start, time.time(), training.step
    finally:
        training.close()


@pytest.mark.slow
def test_template_variable_queries_return_the_run(dashboard, scraped_run):
    """label_values(...) of each query variable, asked the way Grafana does (/api/v1/label/.../values)."""
    prom, start, end, _ = scraped_run
    values = {"job": "agent_obs", "run": RUN}
    expected = {"job": {"agent_obs"}, "run": {RUN}, "split": {"train", "val"}, "k": {"1", "5"}}
    for var in dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((.+), (\w+)\)", var["query"])
        selector, label = substitute(m[1], values), m[2]
        got = prom.api(f"label/{label}/values", **{"match[]": selector, "start": start, "end": end})
        assert set(got) == expected[var["name"]], (var["name"], got)


@pytest.mark.slow
def test_every_panel_query_returns_data(dashboard, scraped_run):
    """Each panel's query (variables substituted, repeated panels once per split) is non-empty over the
    run in /api/v1/query_range, with the series the panel's legend expects."""
    prom, start, end, last_step = scraped_run
    base = {"job": "agent_obs", "run": RUN, "k": "1", "split": "(train|val)"}
    checked = 0
    for panel in _panels(dashboard):
        splits = ["train", "val"] if panel.get("repeat") == "split" else ["(train|val)"]
        for split in splits:
            for target in panel["targets"]:
                expr = substitute(target["expr"], {**base, "split": split})
                result = prom.query_range(expr, start=start, end=end + 1, step=1)
                assert result, f"{panel['title']} ({split}): no data for {expr}"
                values = [float(v) for series in result for _, v in series["values"]]
                assert all(math.isfinite(v) for v in values), (panel["title"], expr)
                labels = [series["metric"] for series in result]
                legend = target["legendFormat"]
                if "{{token_class}}" in legend:
                    parts = "tool_syntax" in target["expr"]
                    want = {"tool_syntax", "tool_args"} if parts else {"all", "reasoning", "tool_call"}
                    assert {m["token_class"] for m in labels} == want, expr
                if "{{tool}}" in legend:
                    assert {m["tool"] for m in labels} == {"bash", "submit"}, expr
                if "{{le}}" in legend:
                    assert len(labels) == len(ENTROPY_BUCKETS) + 1, expr
                if legend == "{{split}}":
                    assert {m["split"] for m in labels} == {"train", "val"}, expr
                checked += 1
    assert checked >= 20
    step = prom.query_range(
        substitute(_panel(dashboard, "Current step")["targets"][0]["expr"], base), start=start, end=end + 1, step=1
    )
    train = next(s for s in step if s["metric"]["split"] == "train")
    assert float(train["values"][-1][1]) <= last_step and float(train["values"][-1][1]) > 1


def _panel(dashboard: dict, title: str) -> dict:
    return next(p for p in _panels(dashboard) if p["title"] == title)
