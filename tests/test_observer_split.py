"""Recorder and Publisher used directly: begin()/end() blocks, one publisher for two recorders, validated Settings."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from metric_reference import assert_metrics_close, reference_metrics
from test_observer import RecordingExporter, make_batch

from agent_obs import attach
from agent_obs.exporters import JsonlExporter
from agent_obs.publisher import Publisher
from agent_obs.recorder import Recorder
from agent_obs.settings import Settings

RTOL = 1e-5


pytestmark = pytest.mark.usefixtures("eager_kernel")  # observer bookkeeping, not the kernel


def reference(logits: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor) -> dict[str, float]:
    want, _ = reference_metrics(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), classes.reshape(-1))
    return want


def test_begin_end_without_a_context_manager_records_exactly_one_block(model):
    settings = Settings()
    recorder, publisher = Recorder(model, settings), Publisher(settings)
    tokens, labels, classes = make_batch(2, 9, seed=1)
    recorder.begin(labels=labels, token_classes=classes)
    logits = model(tokens).detach()
    recorder.end()
    model(tokens)  # after end(): not recorded
    recorder.begin(labels=labels, token_classes=classes)
    model(tokens)
    recorder.end(discard=True)  # the step failed: the block counts nothing
    got = publisher.publish(recorder, split="train")
    assert_metrics_close(got, reference(logits, labels, classes), rtol=RTOL)
    with pytest.raises(RuntimeError, match=r"end\(\) without begin\(\)"):
        recorder.end()
    recorder.begin(labels=labels, token_classes=classes)
    with pytest.raises(RuntimeError, match="do not nest"):
        recorder.begin(labels=labels, token_classes=classes)
    model(tokens)
    recorder.end()
    assert publisher.publish(recorder)["tokens"] == got["tokens"]
    recorder.detach()
    assert not model.lm_head._forward_hooks


def test_end_rejects_a_block_the_projection_did_not_cover_and_keeps_nothing(model):
    settings = Settings()
    recorder, publisher = Recorder(model, settings), Publisher(settings)
    tokens, labels, classes = make_batch(2, 8, seed=2)
    recorder.begin(labels=labels, token_classes=classes)
    model(tokens[:, :5])  # fewer positions than the labels
    with pytest.raises(ValueError, match=r"produced 5 positions .* targets have 8"):
        recorder.end()
    assert "tokens" not in publisher.publish(recorder)


def test_one_publisher_serves_train_and_eval_recorders_with_one_set_of_exporters_and_one_close(model, tmp_path):
    settings = Settings(max_tools=4)
    path = tmp_path / "metrics.jsonl"
    counter = RecordingExporter()
    publisher = Publisher(settings, [JsonlExporter(path), counter])
    train, evaluation = Recorder(model, settings), Recorder(model, settings)  # both on lm_head
    batches = {split: make_batch(2, 7 + i, seed=10 + i) for i, split in enumerate(("train", "eval"))}
    logits = {}
    for split, recorder in (("train", train), ("eval", evaluation)):
        tokens, labels, classes = batches[split]
        recorder.begin(labels=labels, token_classes=classes)
        logits[split] = model(tokens).detach()  # only the recorder with an open block sees it
        recorder.end()
    got = {
        split: publisher.publish(rec, split=split, step=3) for split, rec in (("eval", evaluation), ("train", train))
    }
    for split, (_, labels, classes) in batches.items():
        assert_metrics_close(got[split], reference(logits[split], labels, classes), rtol=RTOL)
    train.detach()
    evaluation.detach()
    publisher.close()
    publisher.close()  # idempotent: each exporter is closed exactly once
    assert counter.closes == 1
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(line["split"], line["step"]) for line in lines] == [("eval", 3), ("train", 3)]
    for line in lines:
        assert line["tokens"] == got[line["split"]]["tokens"]
    assert not model.lm_head._forward_hooks


def test_publisher_rejects_a_recorder_whose_sums_are_laid_out_differently(model):
    recorder = Recorder(model, Settings(topk=(1, 5)))
    with pytest.raises(ValueError, match="same Settings"):
        Publisher(Settings(topk=(1, 2, 5, 10))).publish(recorder)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"every_n_steps": 0}, "every_n_steps must be an integer >= 1"),
        ({"every_n_steps": 1.5}, "every_n_steps must be an integer >= 1"),
        ({"rows": "flat"}, 'rows must be "all"'),
        ({"max_tools": -1}, "need max_tools >= 0"),
        ({"max_in_flight": 0}, "max_in_flight >= 1"),
        ({"topk": ()}, "topk must be positive integers"),
        ({"topk": (0, 5)}, "topk must be positive integers"),
        ({"chunk_tokens": 0}, "chunk_tokens must be None"),
        ({"top_n": -1}, "top_n must be an integer >= 0"),
        ({"outlier_k": 0.0}, "outlier_k must be > 0"),
    ],
)
def test_settings_reject_bad_values_naming_the_option_in_attach_too(model, bad, message):
    with pytest.raises(ValueError, match=message):
        Settings(**bad)
    with pytest.raises(ValueError, match=message):
        attach(model, **bad)
    assert not model.lm_head._forward_hooks  # nothing hooked when the settings are rejected


def test_settings_are_frozen_and_normalised():
    settings = Settings(topk=[5, 1])
    assert settings.topk == (5, 1)
    assert settings.num_tool_slots == 33 and Settings(max_tools=0).num_tool_slots == 0  # 16 kept + 16 new + 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.max_tools = 3


def tool_block(spans: dict[int, int], seq: int = 48, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """One row whose first positions are tool calls: ``spans`` maps tool id -> its number of tokens, in order."""
    tokens, labels, _ = make_batch(1, seq, seed)
    labels[:] = tokens.roll(-1, 1)
    classes = torch.full_like(tokens, 1)  # REASONING
    tools = torch.full_like(tokens, -1)
    pos = 0
    for tid, n in spans.items():
        classes[0, pos : pos + n], tools[0, pos : pos + n] = 2, tid  # TOOL_CALL
        pos += n
    return tokens, labels, classes, tools


def test_every_per_tool_row_is_exact_and_kept_tools_never_overflow(model):
    """max_tools=1: 2 local slots + the overflow. A tool that found no slot gets no row of its own (its tokens
    count under _other), the kept tool is reserved a slot in the next window, and the per-tool rows always
    add up to tool_call_tokens."""
    obs = attach(model, max_tools=1)
    a, b, c, d = 101, 102, 103, 104
    windows = [
        [{a: 10, b: 5}, {c: 20}],  # c finds no free slot: no row for c although it has the most tokens
        [{c: 20, b: 5, d: 3}],  # a is reserved (kept); c takes the free slot, b and d overflow
        [{d: 30}, {c: 20}],  # c (kept now) is reserved, d takes the free slot
    ]
    rows = []
    for w, blocks in enumerate(windows):
        for i, spans in enumerate(blocks):
            tokens, labels, classes, tools = tool_block(spans, seed=10 * w + i)
            with obs.observe(labels=labels, token_classes=classes, tool_ids=tools):
                model(tokens)
        got = obs.collect()
        per_tool = {k: v for k, v in got.items() if k.startswith("tool_call.") and k.endswith("_tokens")}
        assert sum(per_tool.values()) == got["tool_call_tokens"]
        rows.append(per_tool)
    names = {tid: f"tool_{tid:08x}" for tid in (a, b, c, d)}  # ids never registered by name
    assert rows[0] == {f"tool_call.{names[a]}_tokens": 10, "tool_call._other_tokens": 25}
    assert rows[1] == {f"tool_call.{names[c]}_tokens": 20, "tool_call._other_tokens": 8}
    assert rows[2] == {f"tool_call.{names[c]}_tokens": 20, "tool_call._other_tokens": 30}
