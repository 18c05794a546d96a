"""``agent-obs report``: a JsonlExporter log drawn as self-contained HTML/PNG with the dashboard's panels."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from agent_obs import TokenClass
from agent_obs.accumulator import StatsAccumulator
from agent_obs.cli import main
from agent_obs.exporters.jsonl import JsonlExporter
from agent_obs.report import ReportError, draw, load_records
from agent_obs.samples import hardest_samples

V, N = 64, 96
SAMPLES = 8  # rows are split evenly into this many samples, ids "s0".."s7"
TOOLS = {0: "bash", 1: "submit"}
STEPS = {"train": [0, 2, 4, 6, 8], "val": [4, 8]}


def _batch(step: int, split: str) -> tuple[torch.Tensor, ...]:
    """Logits that sharpen with the step; tool-call tokens sharpen faster; one NaN row at train step 6."""
    g = torch.Generator().manual_seed(step * 10 + (split == "val"))
    labels = torch.randint(0, V, (N,), generator=g)
    classes = torch.randint(int(TokenClass.REASONING), int(TokenClass.TOOL_CALL) + 1, (N,), generator=g)
    slots = torch.where(classes == TokenClass.TOOL_CALL, torch.randint(0, 2, (N,), generator=g), -1)
    logits = torch.randn(N, V, generator=g)
    logits[torch.arange(N), labels] += (1 + step / 2) * torch.where(classes == TokenClass.TOOL_CALL, 1.5, 1.0)
    if split == "train" and step == 6:
        logits[3, 5] = float("nan")
    return logits, labels, classes, slots


def _reference(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Independent float64 entropy/accuracy/perplexity over the finite rows selected by ``mask``."""
    x = logits.double()
    keep = mask & torch.isfinite(x).all(dim=1)
    logp = torch.log_softmax(x[keep], dim=1)
    entropy = -(logp.exp() * logp).sum(dim=1).mean().item()
    nll = -logp[torch.arange(int(keep.sum())), labels[keep]].mean().item()
    accuracy = (x[keep].argmax(dim=1) == labels[keep]).double().mean().item()
    return {"entropy": entropy, "accuracy": accuracy, "perplexity": float(np.exp(nll))}


@pytest.fixture(scope="module")
def run_log(tmp_path_factory):
    """A JSONL log written by the real JsonlExporter, and the float64 references per (split, step, class)."""
    path = tmp_path_factory.mktemp("report") / "run.jsonl"
    exporter = JsonlExporter(path, histograms=True)
    with pytest.MonkeyPatch.context() as mp:  # the kernel's math uncompiled: the report is under test, not the kernel
        mp.setenv("AGENT_OBS_COMPILE", "0")
        return _write_log(path, exporter)


def _write_log(path, exporter):
    """Export each (step, split) collect to ``path``; return the path and the float64 references."""
    refs: dict[tuple[str, int, str], dict[str, float]] = {}
    for step in range(0, 9, 2):
        for split in ("train", "val"):
            if step not in STEPS[split]:
                continue
            logits, labels, classes, slots = _batch(step, split)
            args = torch.arange(N) % 3 == 0
            rows = torch.arange(N) % SAMPLES
            acc = StatsAccumulator((1, 5), num_tool_slots=2)
            acc.update(logits, labels, classes, slots, tool_args=args, sample_rows=rows, num_samples=SAMPLES)
            metrics = acc.metrics(TOOLS)
            metrics.samples, _ = hardest_samples(acc.take_samples(SAMPLES), [f"s{i}" for i in range(SAMPLES)], top_n=3)
            exporter.export(metrics, step=step, split=split)
            tool_call = classes == TokenClass.TOOL_CALL
            for cls, mask in (
                ("all", torch.ones(N, dtype=torch.bool)),
                ("reasoning", classes == TokenClass.REASONING),
                ("tool_call", tool_call),
                ("tool_syntax", tool_call & ~args),
                ("tool_args", tool_call & args),
                ("bash", slots == 0),
                *((f"s{i}", rows == i) for i in range(SAMPLES)),
            ):
                refs[(split, step, cls)] = _reference(logits, labels, mask)
    exporter.close()
    return path, refs


@pytest.fixture(scope="module")
def figure(run_log):
    fig = draw(load_records(run_log[0]))
    return {ax.get_title(): ax for ax in fig.axes if ax.get_title()}


def _line(ax, label: str) -> tuple[np.ndarray, np.ndarray]:
    (line,) = [ln for ln in ax.get_lines() if ln.get_label() == label]
    return np.asarray(line.get_xdata(), dtype=float), np.asarray(line.get_ydata(), dtype=float)


@pytest.mark.parametrize("stat", ["entropy", "accuracy", "perplexity"])
@pytest.mark.parametrize("split", ["train", "val"])
def test_class_curves_equal_float64_reference(figure, run_log, stat, split):
    """Each split's panel has one curve per class whose points are the reference values at the logged steps."""
    refs = run_log[1]
    ax = figure[f"{stat.capitalize()} — {split}"]
    for cls in ("all", "reasoning", "tool_call"):
        x, y = _line(ax, cls)
        assert x.tolist() == STEPS[split]
        np.testing.assert_allclose(y, [refs[(split, s, cls)][stat] for s in STEPS[split]], rtol=1e-5, atol=1e-6)
    assert (ax.get_yscale() == "log") == (stat == "perplexity")


def test_gap_and_per_tool_curves(figure, run_log):
    """tool_call - reasoning gap per split, and the per-tool panel, from the same reference."""
    refs = run_log[1]
    for split in ("train", "val"):
        x, y = _line(figure["Entropy gap (tool_call - reasoning)"], split)
        expected = [refs[(split, s, "tool_call")]["entropy"] - refs[(split, s, "reasoning")]["entropy"] for s in x]
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
        assert x.tolist() == STEPS[split]
        x, y = _line(figure[f"Accuracy per tool — {split}"], "bash")
        np.testing.assert_allclose(y, [refs[(split, s, "bash")]["accuracy"] for s in x], rtol=1e-6)
    # tool_call sharpens faster, so its entropy ends below reasoning's: the gap is negative at the end.
    assert _line(figure["Entropy gap (tool_call - reasoning)"], "train")[1][-1] < 0


def test_nonfinite_and_heatmap_panels(figure, run_log):
    """The one NaN row at train step 6 shows as a cumulative count of 1; heatmaps exist per class and split."""
    x, y = _line(figure["Non-finite tokens (cumulative)"], "train")
    assert x.tolist() == STEPS["train"]
    assert y.tolist() == [0, 0, 0, 1, 1]
    for cls in ("reasoning", "tool_call"):
        for split in ("train", "val"):
            mesh = figure[f"Per-token entropy, {cls} — {split}"].collections[0]
            shares = np.asarray(mesh.get_array()).reshape(10, len(STEPS[split]))  # buckets x collects
            np.testing.assert_allclose(shares.sum(axis=0), 1.0)  # each collect's tokens add up to 100 %


def test_cli_writes_self_contained_html_and_png(run_log, tmp_path):
    """`agent-obs report LOG -o X.html --png Y.png`: one HTML with inline SVG and no external resource, a PNG."""
    out, png = tmp_path / "report.html", tmp_path / "report.png"
    assert main(["report", str(run_log[0]), "-o", str(out), "--png", str(png)]) == 0
    page = out.read_text(encoding="utf-8")
    assert page.count("<svg") == 1
    assert not re.search(r"""(?:src|href)\s*=\s*["'](?!#|data:)""", page), "external resource in the report"
    assert "<link" not in page and "<script" not in page
    for title in ("Entropy — train", "Entropy — val", "Perplexity — val", "Accuracy per tool — train"):
        assert title in page  # matplotlib keeps titles as SVG text
    from matplotlib.image import imread

    img = imread(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert img.shape[0] > img.shape[1] > 500


def test_bad_logs_name_file_line_and_fix(tmp_path, run_log):
    lines = run_log[0].read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(lines[0] + "\n{not json\n" + lines[1] + "\n")
    with pytest.raises(ReportError, match=r"bad\.jsonl:2: not valid JSON.*fix or delete"):
        load_records(bad)
    torn = tmp_path / "torn.jsonl"
    torn.write_text("\n".join(lines) + '\n{"step": 10, "spl')  # a crash mid-line loses only that line
    assert len(load_records(torn)) == len(lines)
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"loss": 1.0}) + "\n")
    with pytest.raises(ReportError, match=r"other\.jsonl:1: no 'step'/'split'.*JsonlExporter"):
        load_records(other)
    with pytest.raises(SystemExit, match=r"missing\.jsonl: no such file"):
        main(["report", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "x.html")])
    with pytest.raises(SystemExit, match=r"top-3 is not in the log \(logged: \[1, 5\]\)"):
        main(["report", str(run_log[0]), "-o", str(tmp_path / "x.html"), "--k", "3"])


@pytest.mark.parametrize("stat", ["entropy", "accuracy"])
def test_tool_call_syntax_vs_arguments_panel(figure, run_log, stat):
    """One curve per split and part, equal to the float64 reference over the syntax / argument tokens."""
    refs = run_log[1]
    ax = figure[f"Tool call: syntax vs arguments — {stat}"]
    for split in ("train", "val"):
        for part in ("tool_syntax", "tool_args"):
            x, y = _line(ax, f"{part} — {split}")
            assert x.tolist() == STEPS[split]
            np.testing.assert_allclose(y, [refs[(split, s, part)][stat] for s in x], rtol=1e-5, atol=1e-6)


def test_hardest_trajectories_table(run_log, tmp_path):
    """The last collect's hardest samples per split, hardest first, with their float64 mean NLL."""
    refs = run_log[1]
    out = tmp_path / "report.html"
    assert main(["report", str(run_log[0]), "-o", str(out)]) == 0
    page = out.read_text(encoding="utf-8")
    assert "<h2>Hardest trajectories</h2>" in page
    tables = re.findall(r"<h3>(\w+), step (\d+)</h3><table class=samples>(.*?)</table>", page, re.S)
    assert [(split, int(step)) for split, step, _ in tables] == [("train", 8), ("val", 8)]
    for split, step, table in tables:
        rows = re.findall(r"<tr><td>(s\d)</td><td>(\d*)</td><td>\d*</td><td>[^<]*</td><td>([^<]*)</td>", table)
        nll = {sid: np.log(refs[(split, int(step), sid)]["perplexity"]) for sid in (f"s{i}" for i in range(SAMPLES))}
        hardest = sorted(nll, key=lambda sid: -nll[sid])[:3]
        assert [sid for sid, rank, _ in rows if rank] == hardest
        for sid, _, shown in rows:
            assert float(shown) == pytest.approx(nll[sid], abs=5e-5)
