"""``agent-obs report RUN.jsonl -o report.html [--png out.png]``: the dashboard's panels drawn from a JSONL log.

For people without Grafana: one self-contained HTML page (inline SVG, no external files)
with train/val curves per token class, the tool_call - reasoning gap, throughput,
non-finite tokens, per-tool curves, tool-call syntax vs arguments, the per-token entropy heatmap
and the hardest trajectories table when the log has them.
"""

from __future__ import annotations

import argparse
import html
import io
import itertools
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from agent_obs.keys import CLASS_GROUPS, NONFINITE, TOOL_PARTS, group_prefix, parse_key

CLASS_COLORS = {
    "all": "#3d3d3d",
    "reasoning": "#1f77b4",
    "tool_call": "#ff7f0e",
    "tool_syntax": "#9467bd",
    "tool_args": "#2ca02c",
}
CLASSES = tuple(c for c in CLASS_GROUPS if c not in TOOL_PARTS)  # the class panels; TOOL_PARTS have their own
_META_KEYS = {"step", "split", "time", "timestamp", "ts", "run", "event", "histograms", "metrics", "samples"}
SAMPLE_COLUMNS = (
    "rank",
    "tool_call_rank",
    "tokens",
    "nll",
    "entropy",
    "accuracy",
    "reasoning_nll",
    "tool_call_nll",
    "tool_call_accuracy",
)


@dataclass
class Record:
    """One collect: its step, split, wall time (None if not logged), metrics and entropy histograms."""

    step: int
    split: str
    time: float | None
    metrics: dict[str, float]
    histograms: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)  # class -> (edges, counts)
    samples: list[dict] = field(default_factory=list)  # the window's hardest samples, hardest first


class ReportError(ValueError):
    """The log cannot be turned into a report (the message names the file, line and fix)."""


def _time(raw: object) -> float | None:
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return float(raw)
    if isinstance(raw, str):
        try:
            return datetime.fromisoformat(raw.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


def _histograms(raw: object) -> dict[str, tuple[list[float], list[float]]]:
    out = {}
    for cls, h in (raw or {}).items() if isinstance(raw, dict) else ():
        if isinstance(h, dict) and "edges" in h and "counts" in h:
            out[cls] = ([float(e) for e in h["edges"]], [float(c) for c in h["counts"]])
    return out


def parse_record(obj: object, where: str) -> Record:
    """One JSONL object -> Record; metrics nested under ``"metrics"`` or flat beside step/split."""
    if not isinstance(obj, dict):
        raise ReportError(f"{where}: expected a JSON object per line, got {type(obj).__name__}")
    if "step" not in obj or "split" not in obj:
        raise ReportError(f"{where}: no 'step'/'split' field; is this an agent-obs JSONL log (JsonlExporter)?")
    values = obj["metrics"] if isinstance(obj.get("metrics"), dict) else obj
    metrics = {
        k: float(v)
        for k, v in values.items()
        if k not in _META_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    return Record(
        int(obj["step"]),
        str(obj["split"]),
        _time(obj.get("time", obj.get("timestamp"))),
        metrics,
        _histograms(obj.get("histograms")),
        [x for x in obj.get("samples") or () if isinstance(x, dict) and "id" in x],
    )


def load_records(path: str | Path) -> list[Record]:
    """Read a JsonlExporter log; a malformed line is an error naming the file and line (a torn last line is skipped)."""
    path = Path(path)
    if not path.is_file():
        raise ReportError(
            f"{path}: no such file; pass the JSONL log written by JsonlExporter (jsonl path in the config)"
        )
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            if i == len(lines):  # a crash while writing loses at most the last line
                continue
            raise ReportError(f"{path}:{i}: not valid JSON ({err.msg}); fix or delete that line") from err
        records.append(parse_record(obj, f"{path}:{i}"))
    if not records:
        raise ReportError(f"{path}: no collects logged yet; run training with the JSONL exporter first")
    return records


def split_order(records: Iterable[Record]) -> list[str]:
    """train first, then val, then the other splits alphabetically."""
    splits = {r.split for r in records}
    rank = {"train": 0, "val": 1, "validation": 1, "eval": 1}
    return sorted(splits, key=lambda s: (rank.get(s, 2), s))


def series(records: list[Record], split: str, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one key over one split's collects, in log order."""
    pts = [(r.step, r.metrics[key]) for r in records if r.split == split and key in r.metrics]
    return [p[0] for p in pts], [p[1] for p in pts]


def gap_series(records: list[Record], split: str, stat: str) -> tuple[list[int], list[float]]:
    """tool_call minus reasoning of one stat, at the collects that have both."""
    a, b = "tool_call_" + stat, "reasoning_" + stat
    pts = [
        (r.step, r.metrics[a] - r.metrics[b]) for r in records if r.split == split and a in r.metrics and b in r.metrics
    ]
    return [p[0] for p in pts], [p[1] for p in pts]


def rate_series(records: list[Record], split: str, key: str) -> tuple[list[int], list[float], str]:
    """Tokens per second between collects when times are logged, else tokens per collect; plus the unit."""
    rows = [r for r in records if r.split == split and key in r.metrics]
    if len(rows) >= 2 and all(r.time is not None for r in rows):
        pts = [(b.step, b.metrics[key] / (b.time - a.time)) for a, b in itertools.pairwise(rows) if b.time > a.time]
        return [p[0] for p in pts], [p[1] for p in pts], "tokens/s"
    return [r.step for r in rows], [r.metrics[key] for r in rows], "tokens per collect"


def cumulative(records: list[Record], split: str, key: str) -> tuple[list[int], list[float]]:
    """Running sum of a per-collect count (the non-finite tokens) over one split."""
    steps, values = series(records, split, key)
    total, out = 0.0, []
    for v in values:
        total += v
        out.append(total)
    return steps, out


def topk_values(records: list[Record]) -> list[int]:
    """The k's logged as top{k}_prob."""
    return sorted({p.k for r in records for key in r.metrics if (p := parse_key(key)) and p.k is not None})


def tool_names(records: list[Record]) -> list[str]:
    """Tools with per-tool keys (tool_call.{tool}_*), most tokens first."""
    tokens: dict[str, float] = {}
    for r in records:
        for key, v in r.metrics.items():
            p = parse_key(key)
            if p and p.tool is not None and p.stat == "tokens":
                tokens[p.tool] = tokens.get(p.tool, 0.0) + v
    return sorted(tokens, key=lambda t: -tokens[t])


def draw(records: list[Record], *, k: int | None = None, title: str = ""):
    """The report figure: one column per split, one row per panel group (a bare Figure, no pyplot state)."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    splits = split_order(records)
    ks = topk_values(records)
    if k is None:
        k = ks[0] if ks else None
    elif k not in ks:
        raise ReportError(f"top-{k} is not in the log (logged: {ks}); pass --k with one of them")
    tools = tool_names(records)
    hist_classes = [c for c in ("reasoning", "tool_call") if any(c in r.histograms for r in records)]
    anatomy = any("tool_syntax_tokens" in r.metrics for r in records)
    ncols = max(2, len(splits))
    stat_rows = [
        ("entropy", "Entropy", "nats", False),
        ("perplexity", "Perplexity", "log scale", True),
        *([(f"top{k}_prob", f"Top-{k} probability mass", "fraction", False)] if k else []),
        ("accuracy", "Accuracy", "fraction", False),
    ]
    nrows = len(stat_rows) + 2 + (2 if tools else 0) + anatomy + len(hist_classes)
    fig = Figure(figsize=(6.2 * ncols, 3.1 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    if title:
        fig.suptitle(title, fontsize=14, fontweight="bold")
    row = 0
    for stat, name, unit, log in stat_rows:
        for col, split in enumerate(splits):
            ax = axes[row][col]
            for cls in CLASSES:
                x, y = series(records, split, group_prefix(cls) + stat)
                if x:
                    ax.plot(x, y, marker="o" if len(x) < 30 else None, ms=3, lw=1.8, color=CLASS_COLORS[cls], label=cls)
            ax.set_title(f"{name} — {split}")
            ax.set_ylabel(unit)
            if log:
                ax.set_yscale("log")
            if ax.lines:
                ax.legend(fontsize=8, loc="best")
        row += 1
    for col, (stat, unit) in enumerate((("entropy", "nats"), ("accuracy", "fraction"))):
        ax = axes[row][col]
        for split in splits:
            x, y = gap_series(records, split, stat)
            if x:
                ax.plot(x, y, marker="o" if len(x) < 30 else None, ms=3, lw=1.8, label=split)
        ax.axhline(0, color="#999999", lw=0.8)
        ax.set_title(f"{stat.capitalize()} gap (tool_call - reasoning)")
        ax.set_ylabel(unit)
        if len(ax.lines) > 1:  # the zero line is always there
            ax.legend(fontsize=8)
    row += 1
    ax = axes[row][0]
    train = splits[0]
    for cls in CLASSES:
        x, y, rate_unit = rate_series(records, train, group_prefix(cls) + "tokens")
        if x:
            ax.plot(x, y, lw=1.5, color=CLASS_COLORS[cls], label=cls)
            ax.set_ylabel(rate_unit)
    ax.set_title(f"Tokens by class — {train}")
    if ax.lines:
        ax.legend(fontsize=8)
    ax = axes[row][1]
    for split in splits:
        x, y = cumulative(records, split, NONFINITE)
        if x:
            ax.step(x, y, where="post", lw=1.8, label=split)
    ax.set_title("Non-finite tokens (cumulative)")
    ax.set_ylabel("tokens")
    ax.set_ylim(bottom=0, top=max(1.0, *(max(line.get_ydata(), default=0) for line in ax.lines)) * 1.1)
    if ax.lines:
        ax.legend(fontsize=8)
    row += 1
    if tools:
        palette = colormaps["tab10"]
        for stat, name, unit in (
            ("entropy", "Entropy per tool", "nats"),
            ("accuracy", "Accuracy per tool", "fraction"),
        ):
            for col, split in enumerate(splits):
                ax = axes[row][col]
                for i, tool in enumerate(tools):
                    x, y = series(records, split, group_prefix("tool_call", tool) + stat)
                    if x:
                        ax.plot(
                            x, y, lw=1.5, marker="o" if len(x) < 30 else None, ms=2.5, color=palette(i % 10), label=tool
                        )
                ax.set_title(f"{name} — {split}")
                ax.set_ylabel(unit)
                if ax.lines:
                    ax.legend(fontsize=7, ncols=2)
            row += 1
    if anatomy:
        _anatomy_row(axes[row], records, splits)
        row += 1
    for cls in hist_classes:
        for col, split in enumerate(splits):
            _heatmap(axes[row][col], records, split, cls)
        row += 1
    for r in range(nrows):
        for c in range(ncols):
            ax = axes[r][c]
            if not ax.has_data():
                ax.set_axis_off()
            else:
                ax.set_xlabel("step")
                ax.grid(alpha=0.3)
    return fig


def _anatomy_row(axes, records: list[Record], splits: list[str]) -> None:
    """Tool call: syntax vs arguments: entropy and accuracy of tool_syntax and tool_args (colour), per split (line)."""
    for ax, (stat, unit) in zip(axes, (("entropy", "nats"), ("accuracy", "fraction")), strict=False):
        for split, style in zip(splits, itertools.cycle(("-", "--", ":", "-.")), strict=False):
            for part in TOOL_PARTS:
                x, y = series(records, split, group_prefix(part) + stat)
                if x:
                    ax.plot(x, y, style, lw=1.8, color=CLASS_COLORS[part], label=f"{part} — {split}")
        ax.set_title(f"Tool call: syntax vs arguments — {stat}")
        ax.set_ylabel(unit)
        if ax.lines:
            ax.legend(fontsize=8)


def _heatmap(ax, records: list[Record], split: str, cls: str) -> None:
    """Share of one collect's tokens per entropy bucket (columns: collects; rows: buckets)."""
    import numpy as np

    rows = [r for r in records if r.split == split and cls in r.histograms]
    if not rows:
        return
    edges = rows[0].histograms[cls][0]
    grid = np.array([r.histograms[cls][1] for r in rows], dtype=np.float64)
    grid = grid / np.maximum(grid.sum(axis=1, keepdims=True), 1.0)
    x = np.arange(len(rows) + 1)
    y = np.arange(grid.shape[1] + 1)
    mesh = ax.pcolormesh(x, y, grid.T, cmap="Oranges", vmin=0, vmax=max(grid.max(), 1e-9), shading="flat")
    labels = [f"≤{e:g}" for e in edges] + ([f">{edges[-1]:g}"] if grid.shape[1] > len(edges) else [])
    ax.set_yticks(np.arange(grid.shape[1]) + 0.5, labels, fontsize=7)
    ticks = np.linspace(0, len(rows) - 1, min(len(rows), 8)).round().astype(int)
    ax.set_xticks(ticks + 0.5, [str(rows[i].step) for i in ticks], fontsize=7)
    ax.set_title(f"Per-token entropy, {cls} — {split}")
    ax.set_ylabel("entropy (nats)")
    ax.figure.colorbar(mesh, ax=ax, label="share of tokens", pad=0.01)


def summary_rows(records: list[Record]) -> list[tuple[str, str, dict[str, float]]]:
    """Last value per split x class of entropy, perplexity, top-k masses, accuracy and tokens."""
    out = []
    for split in split_order(records):
        last = [r for r in records if r.split == split][-1]
        for cls in CLASS_GROUPS:
            p = group_prefix(cls)
            vals = {
                key[len(p) :]: v
                for key, v in last.metrics.items()
                if key.startswith(p) and (pk := parse_key(key)) and pk.group == cls and pk.tool is None
            }
            if vals:
                out.append((split, cls, vals))
    return out


def hardest_table(records: list[Record]) -> str:
    """HTML of the hardest trajectories of the last collect with samples, per split ("" when none logged)."""
    parts = []
    for split in split_order(records):
        last = next((r for r in reversed(records) if r.split == split and r.samples), None)
        if last is None:
            continue
        head = "".join(f"<th>{html.escape(c)}</th>" for c in ("id", *SAMPLE_COLUMNS, "outlier"))
        rows = []
        for sample in last.samples:
            cells = "".join(f"<td>{_fmt_cell(sample.get(c))}</td>" for c in SAMPLE_COLUMNS)
            flag = "yes" if sample.get("outlier") else ""
            rows.append(f"<tr><td>{html.escape(str(sample['id']))}</td>{cells}<td>{flag}</td></tr>")
        parts.append(
            f"<h3>{html.escape(split)}, step {last.step}</h3>"
            f"<table class=samples><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
        )
    if not parts:
        return ""
    return (
        "<h2>Hardest trajectories</h2>\n<p>The window's samples with the highest mean NLL (rank) and tool-call mean "
        "NLL (tool_call_rank); outlier: mean NLL above median + k x MAD of the window.</p>\n" + "\n".join(parts)
    )


def _fmt_cell(v: object) -> str:
    if v is None or isinstance(v, bool):
        return ""
    return str(v) if isinstance(v, int) else _fmt(float(v))


def render_html(records: list[Record], fig, *, source: str) -> str:
    """A self-contained page: header, last-value table and the figure as inline SVG."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    svg = buf.getvalue()
    svg = svg[svg.index("<svg") :]
    columns = ["entropy", "perplexity", *[f"top{k}_prob" for k in topk_values(records)], "accuracy", "tokens"]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["split", "class", *columns])
    body = []
    for split, cls, vals in summary_rows(records):
        cells = "".join(f"<td>{_fmt(vals.get(c))}</td>" for c in columns)
        body.append(f"<tr><td>{html.escape(split)}</td><td>{html.escape(cls)}</td>{cells}</tr>")
    steps = [r.step for r in records]
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>agent-obs report: {html.escape(source)}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:1.5rem;color:#222}} table{{border-collapse:collapse;margin:1rem 0}}
td,th{{border:1px solid #ccc;padding:.25rem .6rem;text-align:right}} td:nth-child(-n+2),th{{text-align:left}}
svg{{max-width:100%;height:auto}}
</style></head><body>
<h1>agent-obs report</h1>
<p>Log <code>{html.escape(source)}</code>: {len(records)} collects, steps {min(steps)} to {max(steps)},
splits {", ".join(html.escape(s) for s in split_order(records))}. Generated {generated}.</p>
<h2>Last collect per split and token class</h2>
<table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>
{hardest_table(records)}
<h2>Curves</h2>
{svg}
</body></html>
"""


def _fmt(v: float | None) -> str:
    if v is None:
        return ""
    if not math.isfinite(v) or abs(v) >= 1e4:
        return f"{v:.4g}"
    return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"


def write_report(log: str | Path, out_html: str | Path, *, png: str | Path | None = None, k: int | None = None) -> None:
    """Read ``log`` and write the HTML report (and a PNG of the same figure when ``png`` is given)."""
    records = load_records(log)
    fig = draw(records, k=k, title=f"agent-obs — {Path(log).name}")
    Path(out_html).write_text(render_html(records, fig, source=str(log)), encoding="utf-8")
    if png is not None:
        fig.savefig(png, format="png", dpi=90)


def _run(args: argparse.Namespace) -> int:
    try:
        write_report(args.log, args.output, png=args.png, k=args.k)
    except ReportError as err:
        raise SystemExit(f"agent-obs report: {err}") from None
    print(f"wrote {args.output}" + (f" and {args.png}" if args.png else ""))
    return 0


def register(subparsers) -> None:
    """Add ``agent-obs report`` to the CLI."""
    p = subparsers.add_parser("report", help="Draw a JSONL metrics log as a self-contained HTML page (and PNG).")
    p.add_argument("log", help="JSONL log written by JsonlExporter")
    p.add_argument("-o", "--output", default="report.html", help="HTML file to write (default: report.html)")
    p.add_argument("--png", default=None, help="also write the figure as a PNG here")
    p.add_argument("--k", type=int, default=None, help="k of the top-k mass panel (default: the smallest logged)")
    p.set_defaults(func=_run)
