"""Generate the agent-obs Grafana dashboard (``dashboards/agent_obs.json``) with grafana-foundation-sdk.

Run ``python dashboards/build.py`` after editing; ``tests/test_dashboards.py`` fails when the
committed JSON differs from what this file generates. Queries use the metric families of
``agent_obs.exporters.prometheus`` (see the team contract in the README).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import heatmap, prometheus, stat, timeseries
from grafana_foundation_sdk.builders.common import ReduceDataOptions, ScaleDistributionConfig, VizLegendOptions
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import (
    DataSourceRef,
    Threshold,
    ThresholdsMode,
    VariableOption,
    VariableRefresh,
    VariableSort,
)
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

OUT = Path(__file__).resolve().parent / "agent_obs.json"
UID = "agent-obs"
DS = DataSourceRef(type_val="prometheus", uid="${datasource}")
# Label matchers shared by every query: one run of one job; ``SPLIT`` for panels repeated per split.
SEL = 'job=~"$job", run="$run"'
SPLIT = 'split="$split"'
SPLITS = 'split=~"$split"'
NATS = "suffix: nats"
CLASS_COLORS = {
    "all": "text",
    "reasoning": "blue",
    "tool_call": "orange",
    "tool_syntax": "purple",
    "tool_args": "green",
}
# The token classes proper; tool_syntax/tool_args (a split of tool_call) have their own row.
CLASSES = 'token_class=~"all|reasoning|tool_call"'
TOOL_PARTS = 'token_class=~"tool_syntax|tool_args"'


def _q(expr: str, legend: str) -> prometheus.Dataquery:
    """A range query against the dashboard's datasource (one per panel, so always refId A)."""
    return prometheus.Dataquery().expr(expr).legend_format(legend).ref_id("A").range().datasource(DS)


def _class_colors(panel: timeseries.Panel) -> timeseries.Panel:
    """Fixed colours per token class, so reasoning/tool_call read the same in every panel."""
    for cls, color in CLASS_COLORS.items():
        panel = panel.override_by_name(cls, [{"id": "color", "value": {"mode": "fixed", "fixedColor": color}}])
    return panel


def _series(title: str, description: str, unit: str, expr: str, legend: str, *, width: int = 12) -> timeseries.Panel:
    """A time series panel with one query."""
    return (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DS)
        .unit(unit)
        .span(width)
        .height(8)
        .line_width(2)
        .show_points(common.VisibilityMode.NEVER)
        .span_nulls(True)
        .legend(
            VizLegendOptions()
            .display_mode(common.LegendDisplayMode.LIST)
            .placement(common.LegendPlacement.BOTTOM)
            .show_legend(True)
        )
        .with_target(_q(expr, legend))
    )


def class_panel(
    title: str,
    description: str,
    unit: str,
    family: str,
    *,
    extra: str = "",
    legend: str = "{{token_class}}",
    classes: str = CLASSES,
) -> timeseries.Panel:
    """One statistic for all/reasoning/tool_call (or ``classes``), repeated per selected split (train and val side
    by side)."""
    expr = f"avg by (token_class{', k' if 'k=' in extra else ''}) ({family}{{{SEL}, {SPLIT}, {classes}{extra}}})"
    panel = _series(f"{title} — $split", description, unit, expr, legend, width=24)
    return _class_colors(panel.repeat("split").repeat_direction("h").max_per_row(4))


def gap_panel(title: str, description: str, unit: str, family: str) -> timeseries.Panel:
    """tool_call minus reasoning of one statistic, one series per split."""

    def side(cls: str) -> str:
        return f'avg by (split) ({family}{{{SEL}, {SPLITS}, token_class="{cls}"}})'

    return _series(title, description, unit, f"{side('tool_call')} - {side('reasoning')}", "{{split}}")


def entropy_heatmap(cls: str) -> heatmap.Panel:
    """Per-token entropy distribution of one class over time, from the cumulative histogram."""
    bucket = f'agent_obs_token_entropy_nats_bucket{{{SEL}, {SPLIT}, token_class="{cls}"}}'
    expr = f"sum by (le) (increase({bucket}[$__rate_interval]))"
    return (
        heatmap.Panel()
        .title(f"Per-token entropy, {cls} — $split")
        .description(
            f"Distribution of the entropy of single {cls} tokens (nats) over time: tokens added to each "
            "histogram bucket per interval. Mass piling up in the lowest bucket means over-confidence; "
            "in the top buckets, near-uniform predictions."
        )
        .datasource(DS)
        .unit("short")
        .span(24)
        .height(8)
        .repeat("split")
        .repeat_direction("h")
        .max_per_row(4)
        .calculate(False)
        .y_axis(heatmap.YAxisConfig().unit(NATS).axis_label("entropy (nats)"))
        .cell_values(heatmap.CellValues().unit("short"))
        .color(
            heatmap.HeatmapColorOptions().mode("scheme").scheme("Oranges").scale("exponential").exponent(0.5).steps(64)
        )
        .with_target(_q(expr, "{{le}}").format(PromQueryFormat.HEATMAP))
    )


def tool_panel(title: str, description: str, unit: str, family: str) -> timeseries.Panel:
    """One statistic per tool name (agent_obs_tool_* families), repeated per split."""
    expr = f"avg by (tool) ({family}{{{SEL}, {SPLIT}}})"
    return (
        _series(f"{title} — $split", description, unit, expr, "{{tool}}", width=24)
        .repeat("split")
        .repeat_direction("h")
        .max_per_row(4)
    )


def rl_entropy_rows() -> list:
    """RL (GRPO): each class's entropy as a fraction of its 6-hour peak, the AgentObsRLEntropyCollapse signal."""

    def side(expr: str) -> str:
        return f"avg by (token_class) ({expr})"

    entropy = f"agent_obs_entropy_nats{{{SEL}, {SPLIT}, {CLASSES}}}"
    expr = f"{side(entropy)} / {side(f'max_over_time({entropy}[6h])')}"
    panel = _series(
        "Entropy / its 6h peak (RL) — $split",
        "Entropy of each class divided by its highest value over the last 6 hours. For a GRPO run (split "
        "rl_train) the peak is the start: the AgentObsRLEntropyCollapse alert fires under 0.3 (or under half "
        "of the 30-minute peak). In SFT splits a falling ratio is ordinary learning.",
        "percentunit",
        expr,
        "{{token_class}}",
        width=24,
    )
    panel = _class_colors(panel.repeat("split").repeat_direction("h").max_per_row(4)).min(0).max(1)
    return [dash.Row("RL (GRPO): entropy collapse"), panel]


def stat_panel(title: str, description: str, unit: str, expr: str, legend: str, steps: list[Threshold]) -> stat.Panel:
    """A single-value panel with a sparkline and colour thresholds."""
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DS)
        .unit(unit)
        .span(6)
        .height(5)
        .thresholds(dash.ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps(steps))
        .color_mode(common.BigValueColorMode.VALUE)
        .graph_mode(common.BigValueGraphMode.AREA)
        .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .with_target(_q(expr, legend))
    )


def _variables() -> list:
    """datasource, job, run, split (multi, all by default) and k (top-k)."""
    ds_var = dash.DatasourceVariable("datasource").label("Data source").type("prometheus")

    def query_var(name: str, label: str, query: str, description: str) -> dash.QueryVariable:
        return (
            dash.QueryVariable(name)
            .label(label)
            .description(description)
            .datasource(DS)
            .query(query)  # classic string form: Grafana parses label_values(...) itself
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(VariableSort.ALPHABETICAL_ASC)
        )

    job = query_var(
        "job", "Job", "label_values(agent_obs_step, job)", "Prometheus scrape job(s) of the training processes."
    )
    job = (
        job.multi(True)
        .include_all(True)
        .all_value(".*")
        .current(VariableOption(selected=True, text="All", value="$__all"))
    )
    run = query_var(
        "run", "Run", 'label_values(agent_obs_step{job=~"$job"}, run)', "The run name given to the exporter."
    )
    split = query_var(
        "split",
        "Split",
        'label_values(agent_obs_step{job=~"$job", run="$run"}, split)',
        "train, val, ...: panels repeat per selected split.",
    )
    split = split.multi(True).include_all(True).current(VariableOption(selected=True, text="All", value="$__all"))
    k = query_var(
        "k",
        "Top-k",
        'label_values(agent_obs_topk_prob_ratio{job=~"$job", run="$run"}, k)',
        "k of the top-k probability mass panel.",
    )
    k = k.sort(VariableSort.NUMERICAL_ASC)
    return [ds_var, job, run, split, k]


GREEN, YELLOW, RED = "green", "yellow", "red"


def tool_anatomy_items() -> list:
    """The row "Tool call: syntax vs arguments" and the hardest-samples outlier count."""
    return [
        dash.Row("Tool call: syntax vs arguments"),
        class_panel(
            "Tool call entropy: syntax vs arguments",
            "Mean entropy (nats) of tool-call tokens split into syntax (tags, function and parameter names, "
            "delimiters) and argument values. Syntax entropy near 0 with high argument entropy: the format is "
            "learnt, the content is not yet.",
            NATS,
            "agent_obs_entropy_nats",
            classes=TOOL_PARTS,
        ),
        class_panel(
            "Tool call accuracy: syntax vs arguments",
            "Token accuracy of tool-call syntax vs argument values. Syntax accuracy lagging behind means the "
            "model still breaks the call format.",
            "percentunit",
            "agent_obs_accuracy_ratio",
            classes=TOOL_PARTS,
        )
        .min(0)
        .max(1),
        _series(
            "Outlier samples per interval",
            "Samples whose mean NLL was above median + k x MAD of their log window "
            "(increase of agent_obs_outlier_samples_total); their ids are in the JSONL log and structlog events, "
            "never in Prometheus labels. Needs sample_ids in observe().",
            "short",
            f"sum by (split) (increase(agent_obs_outlier_samples_total{{{SEL}, {SPLITS}}}[$__rate_interval]))",
            "{{split}}",
            width=24,
        ),
    ]


def build() -> dict:
    """The dashboard as a JSON-ready dict."""
    steps_ok = [Threshold(value=None, color=GREEN)]
    d = (
        dash.Dashboard("agent-obs: token-class metrics")
        .uid(UID)
        .description("Entropy, perplexity, top-k mass and accuracy of reasoning vs tool-call tokens during agent SFT.")
        .tags(["agent-obs", "training", "llm"])
        .refresh("10s")
        .time("now-1h", "now")
        .timezone("browser")
        .tooltip(1)  # shared crosshair
        .editable()
        .variables(_variables())
    )
    items = [
        dash.Row("Status"),
        (
            stat_panel(
                "Current step",
                "Global optimizer step of the latest collect, per split (agent_obs_step).",
                "none",
                f"max by (split) (agent_obs_step{{{SEL}, {SPLITS}}})",
                "{{split}}",
                steps_ok,
            )
        ),
        (
            stat_panel(
                "Time since last collect",
                "Seconds since the observer last collected metrics "
                "(time() - agent_obs_last_collect_timestamp_seconds). Growing without bound on train means "
                "training stalled; val collects only at evaluation.",
                "s",
                f"time() - max by (split) (agent_obs_last_collect_timestamp_seconds{{{SEL}, {SPLITS}}})",
                "{{split}}",
                [
                    Threshold(value=None, color=GREEN),
                    Threshold(value=300, color=YELLOW),
                    Threshold(value=900, color=RED),
                ],
            )
        ),
        (
            stat_panel(
                "Non-finite tokens",
                "Tokens whose logits contained NaN or Inf since the run started (agent_obs_nonfinite_tokens_total); "
                "they are left out of every other statistic. Anything above 0 needs a look "
                "(loss scaling, bf16 overflow).",
                "short",
                f"max by (split) (agent_obs_nonfinite_tokens_total{{{SEL}, {SPLITS}}})",
                "{{split}}",
                [Threshold(value=None, color=GREEN), Threshold(value=1, color=RED)],
            )
        ),
        (
            _series(
                "Tokens per second by class",
                "Labeled tokens observed per second (rate of agent_obs_tokens_total), per split and token class.",
                "suffix: tok/s",
                f"sum by (split, token_class) (rate(agent_obs_tokens_total{{{SEL}, {SPLITS}, {CLASSES}}}"
                "[$__rate_interval]))",
                "{{split}} {{token_class}}",
                width=6,
            ).height(5)
        ),
        dash.Row("Token-class metrics (train and val side by side)"),
        (
            class_panel(
                "Entropy",
                "Mean entropy of the predicted next-token distribution (nats) for all, reasoning and tool-call "
                "tokens. A fall toward 0 while accuracy stays low is entropy collapse.",
                NATS,
                "agent_obs_entropy_nats",
            )
        ),
        (
            class_panel(
                "Perplexity",
                "exp(mean NLL of the label token) per class (log scale); capped at 1e6.",
                "none",
                "agent_obs_perplexity",
            ).scale_distribution(ScaleDistributionConfig().type(common.ScaleDistribution.LOG).log(10))
        ),
        (
            class_panel(
                "Top-k probability mass",
                "Mean probability mass of the k most likely tokens (k from the Top-k variable) per class.",
                "percentunit",
                "agent_obs_topk_prob_ratio",
                extra=', k=~"$k"',
                legend="{{token_class}} top-{{k}}",
            )
            .min(0)
            .max(1)
        ),
        (
            class_panel(
                "Accuracy",
                "Fraction of labeled tokens whose argmax prediction equals the label, per class.",
                "percentunit",
                "agent_obs_accuracy_ratio",
            )
            .min(0)
            .max(1)
        ),
        dash.Row("tool_call - reasoning gap"),
        (
            gap_panel(
                "Entropy gap (tool_call - reasoning)",
                "Mean entropy of tool-call tokens minus that of reasoning tokens, per split. Negative: the model is "
                "surer of its tool calls than of its reasoning.",
                NATS,
                "agent_obs_entropy_nats",
            )
        ),
        (
            gap_panel(
                "Accuracy gap (tool_call - reasoning)",
                "Token accuracy of tool-call tokens minus that of reasoning tokens, per split.",
                "percentunit",
                "agent_obs_accuracy_ratio",
            )
        ),
        dash.Row("Per-token entropy distribution"),
        entropy_heatmap("reasoning"),
        entropy_heatmap("tool_call"),
        dash.Row("Per tool"),
        (
            tool_panel(
                "Entropy per tool",
                "Mean entropy (nats) of the tokens inside each tool's calls (agent_obs_tool_entropy_nats); "
                "rare tools beyond the cap are grouped as '_other'.",
                NATS,
                "agent_obs_tool_entropy_nats",
            )
        ),
        (
            tool_panel(
                "Accuracy per tool",
                "Token accuracy inside each tool's calls (agent_obs_tool_accuracy_ratio).",
                "percentunit",
                "agent_obs_tool_accuracy_ratio",
            )
            .min(0)
            .max(1)
        ),
        *rl_entropy_rows(),
        *tool_anatomy_items(),
    ]
    for panel_id, item in enumerate(items, start=1):
        d = d.with_row(item.id(panel_id)) if isinstance(item, dash.Row) else d.with_panel(item.id(panel_id))
    return json.loads(JSONEncoder(sort_keys=True, indent=2).encode(d.build()))


def render() -> str:
    """The committed file's exact text."""
    return json.dumps(build(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main() -> int:
    OUT.write_text(render(), encoding="utf-8")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
