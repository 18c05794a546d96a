"""Faults around observe(): failed or rejected blocks count nothing, misuse is detected, in-place edits warn."""

from __future__ import annotations

import warnings

import pytest
import torch
from metric_reference import assert_metrics_close, reference_metrics
from test_observer import IGNORE, TinyDecoder, make_batch
from torch import nn

from agent_obs import TokenClass, attach, tool_id

pytestmark = pytest.mark.usefixtures("eager_kernel")  # observer bookkeeping, not the kernel


class FailingForward(Exception):
    """What an OOM or a bad batch raises in the middle of a forward."""


def half_then_raise(model: TinyDecoder, tokens: torch.Tensor) -> None:
    """A forward that projects the first half of the sequence, then fails (torchtune-style chunked output)."""
    h = model.hidden(tokens)
    model.lm_head(h[:, : tokens.shape[1] // 2])
    raise FailingForward("CUDA out of memory (simulated in the model, after the first chunk)")


def reference(logits: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor) -> dict[str, float]:
    want, _ = reference_metrics(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), classes.reshape(-1))
    return want


def test_a_forward_that_raises_after_projecting_contributes_nothing(model):
    obs = attach(model)
    bad_tokens, bad_labels, bad_classes = make_batch(2, 16, seed=1)
    with pytest.raises(FailingForward), obs.observe(labels=bad_labels, token_classes=bad_classes):
        half_then_raise(model, bad_tokens)
    tokens, labels, classes = make_batch(2, 8, seed=2)
    labels[:] = tokens  # every position labelled: 16 tokens
    classes[:] = TokenClass.REASONING
    with obs.observe(labels=labels, token_classes=classes):
        logits = model(tokens).detach()
    got = obs.collect()
    assert got["tokens"] == 16  # before the fix: 32 (16 rows of the failed half leaked in)
    assert_metrics_close(got, reference(logits, labels, classes), rtol=1e-5)


def test_a_block_check_complete_rejects_contributes_nothing(model):
    obs = attach(model)
    tokens, labels, classes = make_batch(2, 8, seed=3)
    with pytest.raises(ValueError, match=r"produced 7 positions"), obs.observe(labels=labels, token_classes=classes):
        model(tokens[:, :7])
    with obs.observe(labels=labels, token_classes=classes):
        logits = model(tokens).detach()
    got = obs.collect()
    assert_metrics_close(got, reference(logits, labels, classes), rtol=1e-5)
    assert got["tokens"] == int(((labels != IGNORE) & (classes != TokenClass.IGNORE)).sum())


def test_a_failed_block_leaves_earlier_committed_blocks_intact(model):
    obs = attach(model)
    tokens, labels, classes = make_batch(1, 12, seed=4)
    with obs.observe(labels=labels, token_classes=classes):
        logits = model(tokens).detach()
    with pytest.raises(FailingForward), obs.observe(labels=labels, token_classes=classes):
        half_then_raise(model, tokens)
    assert_metrics_close(obs.collect(), reference(logits, labels, classes), rtol=1e-5)


def test_a_failed_block_takes_no_tool_slot(model):
    obs = attach(model, max_tools=1)
    tokens, labels, _ = make_batch(1, 10, seed=5)
    labels[:] = tokens
    classes = torch.full_like(tokens, int(TokenClass.TOOL_CALL))
    bash, submit = (torch.full_like(tokens, tool_id(name)) for name in ("bash", "submit"))
    with pytest.raises(FailingForward), obs.observe(labels=labels, token_classes=classes, tool_ids=bash):
        half_then_raise(model, tokens)
    with obs.observe(labels=labels, token_classes=classes, tool_ids=submit):
        model(tokens)
    got = obs.collect()
    assert got["tool_call.submit_tokens"] == 10  # the slot went to submit, not to the failed block's bash
    assert not any(k.startswith(("tool_call.bash_", "tool_call.other_")) for k in got)


def test_nesting_inside_a_skipped_block_is_detected(model):
    obs = attach(model, every_n_steps=2)
    tokens, labels, _ = make_batch(1, 6, seed=6)
    with obs.observe(labels=labels):  # block 1: observed
        model(tokens)
    with obs.observe(labels=labels):  # block 2: skipped by every_n_steps
        with pytest.raises(RuntimeError, match="do not nest"), obs.observe(labels=labels):
            pass
        with pytest.raises(RuntimeError, match="inside an observe"):
            obs.collect()
        model(tokens)
    with obs.observe(labels=labels):  # block 3 (the failed nested one did not count as a block)
        model(tokens)
    assert obs.recorder.blocks_seen == 3
    assert obs.collect()["tokens"] == 2 * int((labels != IGNORE).sum())


def test_detach_with_uncollected_metrics_warns_once_naming_collect(model):
    tokens, labels, _ = make_batch(1, 6, seed=7)
    obs = attach(model)
    with obs.observe(labels=labels):
        model(tokens)
    with pytest.warns(RuntimeWarning, match=r"obs\.collect\(\) before detach\(\)"):
        obs.detach()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        obs.detach()  # already detached: nothing more
        collected = attach(model)
        with collected.observe(labels=labels):
            model(tokens)
        assert collected.collect()["tokens"] > 0
        collected.detach()  # everything collected: silent
        attach(model).detach()  # nothing observed: silent


class InPlaceHead(TinyDecoder):
    """A model that scales its logits in place after the projection (a temperature applied with ``div_``)."""

    def __init__(self, in_place: bool) -> None:
        super().__init__()
        self.in_place = in_place

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self.hidden(tokens))
        return logits.div_(2.0) if self.in_place else logits / 2.0


def test_in_place_edit_of_the_projection_output_warns_once():
    tokens, labels, classes = make_batch(2, 6, seed=8)
    torch.manual_seed(0)
    obs = attach(InPlaceHead(in_place=True))
    warned = pytest.warns(RuntimeWarning, match=r"modified the output of lm_head in place.*out-of-place")
    with warned, obs.observe(labels=labels, token_classes=classes):
        logits = obs.recorder.model(tokens)  # still alive at the end of the block, as the loss's input is
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with obs.observe(labels=labels, token_classes=classes):  # warned once already
            logits = obs.recorder.model(tokens)
        clean = attach(InPlaceHead(in_place=False))
        with clean.observe(labels=labels, token_classes=classes):
            logits = clean.recorder.model(tokens)
            nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()).backward()  # backward: no edit
    assert obs.collect()["tokens"] > 0 and clean.collect()["tokens"] > 0
