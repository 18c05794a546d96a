"""attach() on torchtune qwen2 decoders: untied and tied (TiedLinear), full and chunked output, compile, AC."""

from __future__ import annotations

import pytest
import torch
from test_observer import assert_same_metrics, make_batch
from torchtune.models.qwen2 import qwen2
from torchtune.modules import TransformerSelfAttentionLayer
from torchtune.modules.loss import CEWithChunkedOutputLoss
from torchtune.training import set_activation_checkpointing

from agent_obs import attach, compute_metrics

VOCAB = 211
IGNORE = -100


def tiny_qwen2(tied: bool, seed: int = 0):
    """A 2-layer qwen2 with tiny dims (tied -> the output is torchtune's TiedLinear)."""
    torch.manual_seed(seed)
    model = qwen2(
        vocab_size=VOCAB,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        embed_dim=32,
        intermediate_dim=64,
        max_seq_len=64,
        tie_word_embeddings=tied,
    )
    for p in model.parameters():  # random init at a scale that gives non-degenerate distributions
        torch.nn.init.normal_(p, std=0.3)
    return model


def full_logits(output) -> torch.Tensor:
    """torchtune returns a list of sequence chunks when chunked."""
    return torch.cat(output, dim=1) if isinstance(output, list) else output


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("num_chunks", [0, 1, 3, 8])
def test_equal_to_compute_metrics_full_and_chunked(tied, num_chunks):
    model = tiny_qwen2(tied)
    if num_chunks:
        model.set_num_output_chunks(num_chunks)
    obs = attach(model)
    assert obs.recorder.projection.name == ("output.linear" if tied else "output")
    all_logits, all_labels, all_classes = [], [], []
    for seq in (10, 13):  # not divisible by 3 or 8; seq 10 with 8 chunks gives 5 chunks
        tokens, labels, classes = make_batch(2, seq, seed=seq, vocab=VOCAB)
        with obs.observe(labels=labels, token_classes=classes):
            out = model(tokens)
        if num_chunks:
            assert isinstance(out, list) and len(out) == len(torch.arange(seq).chunk(num_chunks))
        all_logits.append(full_logits(out).detach().reshape(-1, VOCAB))
        all_labels.append(labels.reshape(-1))
        all_classes.append(classes.reshape(-1))
    want = compute_metrics(torch.cat(all_logits), torch.cat(all_labels), torch.cat(all_classes))
    assert_same_metrics(obs.collect(), want)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_chunked_loss_gradients_bit_identical(tied):
    tokens, labels, classes = make_batch(2, 11, seed=3, vocab=VOCAB)
    loss_fn = CEWithChunkedOutputLoss()

    def step(observe: bool):
        model = tiny_qwen2(tied)
        model.set_num_output_chunks(loss_fn.num_output_chunks)
        obs = attach(model) if observe else None
        if obs is None:
            loss = loss_fn(model(tokens), labels)
        else:
            with obs.observe(labels=labels, token_classes=classes):
                loss = loss_fn(model(tokens), labels)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, obs

    loss_a, grads_a, _ = step(False)
    loss_b, grads_b, obs = step(True)
    assert obs.collect()["tokens"] > 0
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)


def test_compiled_blocks_and_activation_checkpointing():
    model = tiny_qwen2(tied=True)
    model.set_num_output_chunks(3)
    set_activation_checkpointing(model, auto_wrap_policy={TransformerSelfAttentionLayer})
    for layer in model.layers:  # as torchtune's compile_model does (aot_eager: inductor takes minutes on 2 cores)
        layer.compile(backend="aot_eager")
    obs = attach(model)
    tokens, labels, classes = make_batch(2, 10, seed=5, vocab=VOCAB)
    loss_fn = CEWithChunkedOutputLoss(num_output_chunks=3)
    with obs.observe(labels=labels, token_classes=classes):
        out = model(tokens)
        loss_fn(out, labels).backward()  # recomputes the checkpointed layers inside the block
    assert_same_metrics(obs.collect(), compute_metrics(full_logits(out).detach(), labels, classes))


def test_tied_linear_passed_explicitly_and_by_name():
    model = tiny_qwen2(tied=True)
    assert attach(model, layer=model.output).recorder.projection.module is model.output.linear
    assert attach(model, layer="output").recorder.projection.vocab_size == VOCAB
