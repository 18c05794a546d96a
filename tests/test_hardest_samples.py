"""observe(sample_ids=...) and tool_args through attach(): per-sample means, rankings, outliers and the
tool_syntax/tool_args split against brute-force float64 references; two gloo ranks merge exactly."""

from __future__ import annotations

import math
import os
import statistics
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from metric_reference import assert_metrics_close, reference_metrics
from test_observer import TinyDecoder, make_batch

from agent_obs import attach, compute_metrics
from agent_obs.samples import MAD_SCALE

RTOL = 1e-5


pytestmark = pytest.mark.usefixtures("eager_kernel")  # observer bookkeeping, not the kernel


def window(seed: int, batches: int = 3, batch: int = 4, seq: int = 12):
    """Micro-batches with per-sequence string ids; two samples get argmax labels (easy) so the ranking has spread."""
    out = []
    for b in range(batches):
        tokens, labels, classes = make_batch(batch, seq, seed=seed + b)
        ids = [f"row{seed}-{b}-{i}" for i in range(batch)]
        out.append((tokens, labels, classes, torch.randint(0, 2, (batch, seq)), ids))
    return out


def reference_samples(logits, labels, classes, sample_of) -> dict[str, dict]:
    """Brute force: each sample's rows through the float64 reference, per class."""
    out = {}
    for sid in sorted(set(sample_of)):
        idx = torch.tensor([i for i, s in enumerate(sample_of) if s == sid])
        rec: dict = {"id": sid}
        for prefix, cls in (("", None), ("reasoning_", 1), ("tool_call_", 2)):
            keep = [int(i) for i in idx if int(labels[i]) != -100 and int(classes[i]) != 0]
            keep = [i for i in keep if cls is None or int(classes[i]) == cls]
            if not keep:
                continue
            want, _ = reference_metrics(logits[keep], labels[keep])
            rec |= {
                prefix + "tokens": want["tokens"],
                prefix + "entropy": want["entropy"],
                prefix + "nll": math.log(want["perplexity"]),
                prefix + "accuracy": want["accuracy"],
            }
        out[sid] = rec
    return out


def flat(model, batches):
    """Rows of every micro-batch: logits, labels, classes, tool_args, and each row's sample id."""
    cols = [[], [], [], [], []]
    with torch.no_grad():
        for tokens, labels, classes, args, ids in batches:
            cols[0].append(model(tokens).reshape(-1, model.lm_head.out_features))
            cols[1].append(labels.reshape(-1))
            cols[2].append(classes.reshape(-1))
            cols[3].append(args.reshape(-1))
            cols[4] += [sid for sid in ids for _ in range(tokens.shape[1])]
    return (*(torch.cat(c) for c in cols[:4]), cols[4])


def check_samples(got: list[dict], ref: dict[str, dict], top_n: int, k: float) -> float:
    """Rankings, fields and outlier flags of ``got`` against the brute-force records; returns the outlier count."""
    ranked = sorted((r for r in ref.values() if "nll" in r), key=lambda r: (-r["nll"], r["id"]))
    by_tool = sorted((r for r in ref.values() if "tool_call_nll" in r), key=lambda r: (-r["tool_call_nll"], r["id"]))
    nlls = [r["nll"] for r in ranked]
    median = statistics.median(nlls)
    threshold = median + k * MAD_SCALE * statistics.median(abs(x - median) for x in nlls)
    chosen = {r["id"] for r in ranked[:top_n]} | {r["id"] for r in by_tool[:top_n]}
    assert [g["id"] for g in got] == [r["id"] for r in ranked if r["id"] in chosen]
    for g in got:
        want = ref[g["id"]]
        assert set(g) - {"rank", "tool_call_rank", "outlier"} == set(want)
        for key, value in want.items():
            assert g[key] == (value if key == "id" else pytest.approx(value, rel=RTOL, abs=1e-9)), key
        rank = [r["id"] for r in ranked].index(g["id"]) + 1
        assert g["rank"] == (rank if rank <= top_n else None)
        tool = [r["id"] for r in by_tool].index(g["id"]) + 1 if "tool_call_nll" in want else None
        assert g["tool_call_rank"] == (tool if tool is not None and tool <= top_n else None)
        assert g["outlier"] == (want["nll"] > threshold)
    return float(sum(x > threshold for x in nlls))


def test_hardest_samples_per_sequence_ids_match_brute_force(model):
    batches = window(seed=3)
    tokens, labels, classes, args, ids = batches[1]
    with torch.no_grad():
        logits = model(tokens)
    labels[:2] = logits[:2].argmax(-1)  # two easy samples, and one whose labels are the least likely tokens
    labels[2] = logits[2].argmin(-1)
    obs = attach(model, top_n=4, outlier_k=1.0, binary_entropy=True)
    for tokens, labels, classes, args, ids in batches:
        with obs.observe(labels=labels, token_classes=classes, tool_args=args, sample_ids=ids):
            model(tokens)
    got = obs.collect()
    logits, lab, cls, arg, sample_of = flat(model, batches)
    outliers = check_samples(got.samples, reference_samples(logits, lab, cls, sample_of), top_n=4, k=1.0)
    assert got["outlier_samples"] == outliers > 0
    assert 4 <= len(got.samples) <= 8
    want, _ = reference_metrics(logits, lab, cls, tool_args=arg, binary_entropy=True)
    assert_metrics_close({k: v for k, v in got.items() if k != "outlier_samples"}, want, rtol=RTOL)
    assert got["tool_syntax_tokens"] + got["tool_args_tokens"] == got["tool_call_tokens"]
    with obs.observe(labels=batches[0][1], token_classes=batches[0][2]):
        model(batches[0][0])
    again = obs.collect()
    assert again.samples == [] and "outlier_samples" not in again  # a new window, without sample ids


@pytest.mark.parametrize("rows", ["all", "valid"])
def test_packed_per_token_ids_with_shift_labels(model, rows):
    """Packed rows: ids per token (-1 padding), unshifted labels; position t belongs to token t+1's sample."""
    tokens, labels, classes = make_batch(2, 30, seed=11)
    ids = torch.tensor([[5] * 10 + [9] * 12 + [-1] * 8, [7] * 25 + [5] * 5])
    args = (torch.arange(60).reshape(2, 30) % 3 == 0).long()
    labels[ids < 0] = -100
    obs = attach(model, shift_labels=True, rows=rows)
    with obs.observe(labels=labels, token_classes=classes, tool_args=args, sample_ids=ids):
        if rows == "all":
            model(tokens)
        else:  # the loss projects only the valid rows, in order
            keep = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1) != -100
            model.lm_head(model.hidden(tokens)[keep])
    got = obs.collect()
    with torch.no_grad():
        logits = model(tokens)[:, :-1].reshape(-1, model.lm_head.out_features)
    lab, cls, arg = (t[:, 1:].reshape(-1) for t in (labels, classes, args))
    sample_of = ids[:, 1:].reshape(-1).tolist()
    ref = reference_samples(logits, lab, cls, sample_of)
    ref.pop(-1, None)
    check_samples(got.samples, ref, top_n=10, k=3.5)
    assert {s["id"] for s in got.samples} == {5, 7, 9}
    want = compute_metrics(logits, lab, cls, tool_args=arg)
    assert_metrics_close({k: v for k, v in got.items() if k != "outlier_samples"}, dict(want), rtol=RTOL)


def test_bad_sample_ids_raise_clear_errors(model):
    tokens, labels, classes = make_batch(2, 6, seed=1)
    obs = attach(model)
    cases = [
        ({"labels": labels, "sample_ids": ["a", "b", "c"]}, r"one id per sequence \(\[2\]\)"),
        ({"sample_ids": ["a", "b"]}, "need labels"),
        ({"labels": labels, "sample_ids": torch.zeros(2)}, "integer ids"),
        ({"labels": labels, "tool_args": classes}, "pass token_classes too"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message), obs.observe(**kwargs):
            model(tokens)


WORLD = 2


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ["AGENT_OBS_COMPILE"] = "0"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = TinyDecoder()
        obs = attach(model, top_n=3, outlier_k=1.0)
        for tokens, labels, classes, args, ids in window(seed=20 + 5 * rank):
            with obs.observe(labels=labels, token_classes=classes, tool_args=args, sample_ids=ids):
                model(tokens)
        got = obs.collect()
        one_rank = []  # then a window where only rank 0 has ids, and one where no rank has: collect never hangs
        for ids_here in (rank == 0, False):
            tokens, labels, classes, args, ids = window(seed=40 + rank, batches=1)[0]
            with obs.observe(labels=labels, token_classes=classes, sample_ids=ids if ids_here else None):
                model(tokens)
            m = obs.collect()
            one_rank.append(([s["id"] for s in m.samples], m.get("outlier_samples")))
        torch.save(
            {"samples": got.samples, "outliers": got["outlier_samples"], "one_rank": one_rank},
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_merge_the_top_n_exactly(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    torch.manual_seed(0)
    model = TinyDecoder()
    union = window(seed=20) + window(seed=25)
    logits, lab, cls, _, sample_of = flat(model, union)
    ref = reference_samples(logits, lab, cls, sample_of)
    for result in results:
        assert result["outliers"] == check_samples(result["samples"], ref, top_n=3, k=1.0)
        (ids, outliers), (no_ids, no_outliers) = result["one_rank"]
        assert 3 <= len(ids) <= 4 and all(i.startswith("row40-") for i in ids) and outliers >= 0  # rank 0 only
        assert no_ids == [] and no_outliers is None
    assert {s["id"][:5] for s in results[0]["samples"]} == {"row20", "row25"}  # both ranks' samples in the top


def test_samples_reach_jsonl_structlog_and_prometheus_without_id_labels(model, tmp_path):
    """The JSONL line carries the samples, structlog logs a samples event, Prometheus only counts outliers."""
    import io
    import json
    import urllib.request

    from agent_obs.exporters import JsonlExporter, PrometheusExporter, StructlogExporter

    log, stream = tmp_path / "m.jsonl", io.StringIO()
    prom = PrometheusExporter(port=0, run="samples")
    obs = attach(
        model,
        top_n=3,
        outlier_k=1.0,
        exporters=[JsonlExporter(log), StructlogExporter(renderer="json", file=stream), prom],
    )
    batches = window(seed=3)
    tokens, labels, classes, args, ids = batches[0]
    with torch.no_grad():
        labels[0] = model(tokens[:1])[0].argmin(-1)  # one far-off sample: an outlier
    for tokens, labels, classes, args, ids in batches:
        with obs.observe(labels=labels, token_classes=classes, tool_args=args, sample_ids=ids):
            model(tokens)
    got = obs.collect(step=7)
    assert got["outlier_samples"] >= 1 and any(s["outlier"] for s in got.samples)
    line = json.loads(log.read_text().splitlines()[-1])
    assert line["samples"] == json.loads(json.dumps(got.samples))
    events = [json.loads(x) for x in stream.getvalue().splitlines()]
    assert [e["event"] for e in events] == ["agent_obs.metrics", "agent_obs.samples"]
    assert events[1]["samples"] == line["samples"] and events[1]["step"] == 7
    scrape = urllib.request.urlopen(prom.url, timeout=10).read().decode()
    assert f'agent_obs_outlier_samples_total{{run="samples",split="train"}} {got["outlier_samples"]}' in scrape
    assert 'token_class="tool_args"' in scrape and 'token_class="tool_syntax"' in scrape
    assert not any(s["id"] in scrape for s in got.samples), "a sample id leaked into Prometheus"
    obs.detach()
