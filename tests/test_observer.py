"""attach()/observe()/collect() on a plain PyTorch decoder: exact metrics, alignment modes, no effect on training."""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

import agent_obs
from agent_obs import TokenClass, attach, compute_metrics, tool_id

VOCAB = 97
IGNORE = -100


class TinyDecoder(nn.Module):
    """Embedding, residual MLP blocks, norm, ``lm_head``: the shape of any causal LM."""

    def __init__(self, vocab: int = VOCAB, dim: int = 24, checkpoint_head: bool | None = None) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)) for _ in range(2)
        )
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.checkpoint_head = checkpoint_head  # None: no checkpointing, else use_reentrant

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        for block in self.blocks:
            h = h + block(h)
        return self.norm(h)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.hidden(tokens)
        if self.checkpoint_head is None:
            return self.lm_head(h)
        return checkpoint(lambda x: self.lm_head(x * 1.0), h, use_reentrant=self.checkpoint_head)


def make_batch(batch: int, seq: int, seed: int, vocab: int = VOCAB):
    """Tokens, labels (some ignored), classes (all four classes present)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, seq), generator=g)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[torch.rand(batch, seq, generator=g) < 0.2] = IGNORE
    classes = torch.randint(0, 4, (batch, seq), generator=g)
    return tokens, labels, classes


def assert_same_metrics(got: dict, want: dict, rel: float = 1e-5) -> None:
    """Same keys, every value within ``rel`` relative error."""
    assert set(got) == set(want), set(got) ^ set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=rel, abs=1e-9), key


def float64_reference(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, float]:
    """Mean entropy, perplexity and accuracy over labelled rows, straight from the definitions in float64."""
    x = logits.reshape(-1, logits.shape[-1]).double()
    y = labels.reshape(-1)
    keep = y != IGNORE
    logp = torch.log_softmax(x[keep], dim=-1)
    entropy = -(logp.exp() * logp).sum(-1).mean().item()
    nll = -logp.gather(-1, y[keep, None]).mean().item()
    accuracy = (x[keep].argmax(-1) == y[keep]).double().mean().item()
    return entropy, math.exp(nll), accuracy


def test_full_logits_equal_compute_metrics_and_float64(model):
    tokens, labels, classes = make_batch(3, 17, seed=1)
    obs = attach(model)
    assert obs.recorder.projection.name == "lm_head"
    with obs.observe(labels=labels, token_classes=classes):
        logits = model(tokens)
    got = obs.collect(split="train", step=1)
    assert_same_metrics(got, compute_metrics(logits.detach(), labels, classes))
    # overall metrics select labelled, non-IGNORE-class tokens
    sel = (labels != IGNORE) & (classes != TokenClass.IGNORE)
    entropy, perplexity, accuracy = float64_reference(logits.detach()[sel], labels[sel])
    assert got["entropy"] == pytest.approx(entropy, rel=1e-5)
    assert got["perplexity"] == pytest.approx(perplexity, rel=1e-5)
    assert got["accuracy"] == pytest.approx(accuracy, rel=1e-9)
    assert got["tokens"] == int(sel.sum())
    assert {"reasoning_entropy", "tool_call_perplexity", "top10_prob"} <= set(got)


def test_micro_batches_are_token_weighted_and_collect_resets(model):
    obs = attach(model)
    batches = [make_batch(2, n, seed=n) for n in (5, 11)]
    logits, labels, classes = [], [], []
    for tokens, lab, cls in batches:
        with obs.observe(labels=lab, token_classes=cls):
            logits.append(model(tokens).detach().reshape(-1, VOCAB))
        labels.append(lab.reshape(-1))
        classes.append(cls.reshape(-1))
    want = compute_metrics(torch.cat(logits), torch.cat(labels), torch.cat(classes))
    assert_same_metrics(obs.collect(), want)
    assert "tokens" not in obs.collect()  # the interval was reset


def test_shift_labels_scores_position_t_against_token_t_plus_1(model):
    tokens, _, classes = make_batch(2, 13, seed=2)
    obs = attach(model, shift_labels=True)
    with obs.observe(labels=tokens, token_classes=classes):
        logits = model(tokens).detach()
    shifted_labels = torch.cat([tokens[:, 1:], torch.full((2, 1), IGNORE)], dim=1)
    shifted_classes = torch.cat([classes[:, 1:], torch.zeros(2, 1, dtype=classes.dtype)], dim=1)
    assert_same_metrics(obs.collect(), compute_metrics(logits, shifted_labels, shifted_classes))


def project_valid_rows(model: TinyDecoder, tokens, labels, num_chunks: int) -> list[torch.Tensor]:
    """What a linear-cross-entropy loss does: project only the valid rows, in ``num_chunks`` flat pieces."""
    h = model.hidden(tokens).reshape(-1, model.lm_head.in_features)
    valid = (labels.reshape(-1) != IGNORE).nonzero().squeeze(-1)
    return [model.lm_head(rows) for rows in h.index_select(0, valid).tensor_split(num_chunks)]


@pytest.mark.parametrize("num_chunks", [1, 3, 50])  # 50 > valid rows: empty chunks
@pytest.mark.parametrize("shift", [False, True])
def test_rows_valid_mode(model, num_chunks, shift):
    tokens, labels, classes = make_batch(2, 14, seed=3)
    obs = attach(model, rows="valid", shift_labels=shift)
    aligned_labels, aligned_classes = labels, classes
    if shift:
        aligned_labels = torch.cat([labels[:, 1:], torch.full((2, 1), IGNORE)], dim=1)
        aligned_classes = torch.cat([classes[:, 1:], torch.zeros(2, 1, dtype=classes.dtype)], dim=1)
    with obs.observe(labels=labels, token_classes=classes):
        chunks = project_valid_rows(model, tokens, aligned_labels, num_chunks)
    assert len(chunks) == num_chunks
    with torch.no_grad():
        full = model(tokens)
    assert_same_metrics(obs.collect(), compute_metrics(full, aligned_labels, aligned_classes))


def test_gradients_and_loss_bit_identical(model):
    tokens, labels, classes = make_batch(2, 16, seed=4)

    def step(observer) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        if observer is None:
            loss = nn.functional.cross_entropy(model(tokens).flatten(0, 1), labels.flatten())
        else:
            with observer.observe(labels=labels, token_classes=classes):
                loss = nn.functional.cross_entropy(model(tokens).flatten(0, 1), labels.flatten())
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss_plain, grads_plain = step(None)
    obs = attach(model)
    loss_obs, grads_obs = step(obs)
    assert obs.collect()["tokens"] > 0
    assert torch.equal(loss_plain, loss_obs)
    assert all(torch.equal(a, b) for a, b in zip(grads_plain, grads_obs, strict=True))


def test_no_reference_to_the_logits_survives_the_step(model):
    tokens, labels, classes = make_batch(2, 9, seed=5)
    obs = attach(model)
    with obs.observe(labels=labels, token_classes=classes):
        logits = model(tokens)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
    loss.backward()
    ref = weakref.ref(logits)
    del logits, loss
    gc.collect()
    assert ref() is None
    assert obs.collect()["tokens"] > 0


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpoint_recompute_is_not_counted_twice(reentrant):
    torch.manual_seed(0)
    model = TinyDecoder(checkpoint_head=reentrant)
    tokens, labels, classes = make_batch(2, 10, seed=6)
    obs = attach(model)
    calls = []
    model.lm_head.register_forward_hook(lambda *_: calls.append(1))
    # backward inside the block, so the recompute happens while observing; no early stop, so it reaches lm_head's hooks
    with obs.observe(labels=labels, token_classes=classes), set_checkpoint_early_stop(False):
        logits = model(tokens)
        nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()).backward()
    assert len(calls) == 2, "the projection must really be recomputed for this test to mean anything"
    assert_same_metrics(obs.collect(), compute_metrics(logits.detach(), labels, classes))


def test_every_n_steps_observes_every_nth_block_only(model):
    obs = attach(model, every_n_steps=3)
    seen_logits, seen_labels, seen_classes = [], [], []
    for i in range(7):
        tokens, labels, classes = make_batch(1, 8, seed=10 + i)
        with obs.observe(labels=labels, token_classes=classes):
            logits = model(tokens).detach()
        if i % 3 == 0:
            seen_logits.append(logits[0])
            seen_labels.append(labels[0])
            seen_classes.append(classes[0])
    want = compute_metrics(torch.cat(seen_logits), torch.cat(seen_labels), torch.cat(seen_classes))
    assert_same_metrics(obs.collect(), want)
    assert obs.recorder.blocks_seen == 7


def test_forwards_outside_observe_record_nothing(model):
    obs = attach(model)
    tokens, labels, _ = make_batch(2, 6, seed=7)
    model(tokens)
    assert obs.collect() == {"nonfinite_tokens": 0.0}
    with obs.observe(labels=labels):
        model(tokens)
    model(tokens)
    assert obs.collect()["tokens"] == int((labels != IGNORE).sum())


def test_tool_breakdown_caps_distinct_names_and_matches_subsets(model):
    tokens, labels, _ = make_batch(2, 30, seed=8)
    labels[:] = tokens.roll(-1, 1)  # every position labelled
    classes = torch.full_like(tokens, TokenClass.REASONING)
    tools = torch.full_like(tokens, -1)
    spans = {"bash": (0, 12), "str_replace_editor": (12, 20), "submit": (20, 23)}  # 24, 16, 6 tokens
    for name, (a, b) in spans.items():
        classes[:, a:b] = TokenClass.TOOL_CALL
        tools[:, a:b] = tool_id(name)
    tools[:, 27] = tool_id("bash")  # a tool id on a reasoning token counts nowhere
    obs = attach(model, max_tools=2)
    with obs.observe(labels=labels, token_classes=classes, tool_ids=tools):
        logits = model(tokens).detach()
    got = obs.collect()

    def subset(name_set):
        keep = torch.zeros_like(tokens, dtype=torch.bool)
        for name in name_set:
            a, b = spans[name]
            keep[:, a:b] = True
        return compute_metrics(logits, labels, torch.where(keep, classes, TokenClass.IGNORE))

    for key_name, members in (
        ("bash", ["bash"]),
        ("str_replace_editor", ["str_replace_editor"]),
        ("_other", ["submit"]),
    ):
        want = subset(members)
        for stat in ("entropy", "perplexity", "accuracy", "top1_prob", "top10_prob", "tokens"):
            assert got[f"tool_call.{key_name}_{stat}"] == pytest.approx(want[f"tool_call_{stat}"], rel=1e-5)
    assert not any(k.startswith("tool_call.submit_") for k in got)
    assert got["tool_call_tokens"] == sum(2 * (b - a) for a, b in spans.values())


def test_tool_ids_need_token_classes(model):
    obs = attach(model)
    with pytest.raises(ValueError, match="token_classes"), obs.observe(tool_ids=torch.zeros(1, 4, dtype=torch.long)):
        pass


def test_layer_lookup_errors_list_candidates_and_show_layer_fix():
    class NoHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, 8)
            self.proj_a = nn.Linear(8, 40)
            self.proj_b = nn.Linear(40, 30)

    with pytest.raises(ValueError) as err:
        attach(NoHead())
    text = str(err.value)
    assert "proj_a (8->40)" in text and "proj_b (40->30)" in text and 'layer="proj_a"' in text
    with pytest.raises(ValueError, match=r"no attribute 'proj_c'.*layer="):
        attach(NoHead(), layer="proj_c")
    model = NoHead()
    assert attach(model, layer="proj_b").recorder.projection.module is model.proj_b
    assert attach(model, layer=model.proj_a).recorder.projection.name == "proj_a"


def test_projection_found_by_vocabulary_when_unnamed():
    class Unnamed(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(31, 8)
            self.first = nn.Linear(8, 31)
            self.mid = nn.Linear(31, 8)
            self.last = nn.Linear(8, 31)

    model = Unnamed()
    assert attach(model).recorder.projection.name == "last"


def test_misaligned_targets_raise_clear_errors(model):
    tokens, labels, classes = make_batch(2, 8, seed=9)
    obs = attach(model)
    with pytest.raises(ValueError, match=r"produced 9 positions.*have 8"), obs.observe(labels=labels):
        model(torch.cat([tokens, tokens[:, :1]], dim=1))
    with pytest.raises(ValueError, match=r"produced 7 positions.*have 8.*shift_labels"), obs.observe(labels=labels):
        model(tokens[:, :7])
    with pytest.raises(ValueError, match="outside"), obs.observe(labels=torch.full((2, 8), VOCAB)):
        pass
    with pytest.raises(ValueError, match="one shape"), obs.observe(labels=labels, token_classes=classes[:, :4]):
        pass
    with pytest.warns(RuntimeWarning, match="without any call of lm_head"), obs.observe(labels=labels):
        model.hidden(tokens)


class RecordingExporter:
    """Keeps every export call and counts its closes (each exporter must be closed exactly once)."""

    def __init__(self):
        self.calls, self.closes = [], 0

    def export(self, metrics, *, step, split):
        self.calls.append((dict(metrics), step, split))

    def close(self):
        self.closes += 1


class BrokenExporter:
    def export(self, metrics, *, step, split):
        raise ConnectionError("collector down")

    def close(self):
        raise ConnectionError("collector down")


def test_exporters_get_metrics_and_a_failing_one_never_breaks_collect(model):
    tokens, labels, classes = make_batch(2, 6, seed=11)
    good = RecordingExporter()
    with attach(model, exporters=[BrokenExporter(), good]) as obs:
        with obs.observe(labels=labels, token_classes=classes):
            model(tokens)
        metrics = obs.collect(split="val", step=42)
        assert obs.collect(split="val", step=43) == {"nonfinite_tokens": 0.0}  # nothing observed: not exported
    assert good.calls == [(dict(metrics), 42, "val")]
    assert good.closes == 1
    assert not model.lm_head._forward_hooks  # detached
    with pytest.raises(RuntimeError, match="detached"), obs.observe(labels=labels):
        pass


def test_whole_model_compiled_still_observed(model):
    tokens, labels, classes = make_batch(2, 12, seed=12)
    obs = attach(model)
    compiled = torch.compile(model, backend="aot_eager")
    for _ in range(2):
        with obs.observe(labels=labels, token_classes=classes):
            logits = compiled(tokens).detach()
    want = compute_metrics(torch.cat([logits, logits]), torch.cat([labels, labels]), torch.cat([classes, classes]))
    assert_same_metrics(obs.collect(), want)


def test_package_exports_attach():
    assert agent_obs.attach is attach
