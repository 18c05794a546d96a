"""Tool-call anatomy and sample ids from the integrations: the HF collator and the torchtune transform on the real
trajectories against brute-force references, then through attach() against compute_metrics."""

from __future__ import annotations

import json
import re
import unicodedata

import datasets
import pytest
import torch
from agent_obs.integrations.transformers import AgentChatCollator, add_sample_ids, message_content_spans
from metric_reference import assert_metrics_close
from test_classify import ref_args_tokens, ref_xml_values
from test_transformers import make_model, make_samples, make_tokenizer

from agent_obs import TokenClass, attach, compute_metrics


@pytest.fixture(scope="module")
def tok(bpe_tokenizer_files):
    return make_tokenizer(bpe_tokenizer_files.tokenizer_json)


def expected_args(tok, messages: list[dict]) -> list[int]:
    """Per token of the rendered chat: 1 where it overlaps an argument value of an assistant message (regex values,
    brute-force character overlap)."""
    text = tok.apply_chat_template(messages, tokenize=False)
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    spans = []
    for (start, end), m in zip(message_content_spans(tok, messages, text), messages, strict=True):
        if m["role"] == "assistant":
            spans += [(start + a, start + b) for a, b in ref_xml_values(text[start:end], strict=False)]
    return ref_args_tokens(offsets, spans, len(text))


def test_collator_tool_args_and_row_ids_match_references(tok, trajectories):
    """Every real conversation: tool_args equals the brute-force reference and marks only TOOL_CALL tokens; row ids
    from add_sample_ids come out as sample_ids; without the options the batch keys are unchanged."""
    rows = [{"messages": conv} for convs in trajectories.values() for conv in convs]
    ds = add_sample_ids(datasets.Dataset.from_list([{"messages": json.dumps(r["messages"])} for r in rows]))
    collator = AgentChatCollator(tok, with_tool_args=True)
    marked = 0
    for i in range(0, len(rows), 4):
        feats = [
            {"messages": json.loads(f["messages"]), "sample_id": f["sample_id"]}
            for f in ds.select(range(i, min(i + 4, len(rows))))
        ]
        batch = collator(feats)
        assert batch["sample_ids"] == list(range(i, i + len(feats)))  # a list: stays on the host
        for row, f in enumerate(feats):
            n = int(batch["attention_mask"][row].sum())
            args = batch["tool_args"][row, :n].tolist()
            assert args == expected_args(tok, f["messages"])
            classes = batch["token_classes"][row, :n]
            assert bool((classes[torch.tensor(args, dtype=torch.bool)] == TokenClass.TOOL_CALL).all())
            assert batch["tool_args"][row, n:].eq(0).all()
            marked += sum(args)
    assert marked > 1000
    plain = AgentChatCollator(tok)([{"messages": rows[0]["messages"]}])
    assert set(plain) == {"input_ids", "attention_mask", "labels", "token_classes", "tool_ids"}
    with pytest.raises(ValueError, match="non-negative int ids"):
        AgentChatCollator(tok)([{"messages": rows[0]["messages"], "sample_id": -3}])


def test_collator_batches_through_attach_equal_compute_metrics(tok, trajectories, monkeypatch):
    """tool_syntax/tool_args keys and per-row samples from collated real data equal the float64-checked
    compute_metrics over the same shifted rows."""
    monkeypatch.setenv("AGENT_OBS_COMPILE", "0")  # the data path is under test; the compiled kernel in test_accumulator
    samples = make_samples(trajectories, per_tool=2)
    for i, s in enumerate(samples):
        s["sample_id"] = i
    batch = AgentChatCollator(tok, max_length=160, with_tool_args=True)(samples)
    model = make_model(len(tok))
    obs = attach(model, layer="lm_head", shift_labels=True)
    with (
        torch.no_grad(),
        obs.observe(
            labels=batch["labels"],
            token_classes=batch["token_classes"],
            tool_args=batch["tool_args"],
            sample_ids=batch["sample_ids"],
        ),
    ):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    got = obs.collect()
    x = logits[:, :-1].reshape(-1, logits.shape[-1])
    lab, cls, args = (batch[k][:, 1:].reshape(-1) for k in ("labels", "token_classes", "tool_args"))
    want = compute_metrics(x, lab, cls, tool_args=args)
    assert_metrics_close(
        {k: v for k, v in got.items() if "." not in k and k != "outlier_samples"}, dict(want), rtol=1e-5
    )
    assert got["tool_syntax_tokens"] + got["tool_args_tokens"] == got["tool_call_tokens"] > 0
    assert got["tool_args_tokens"] > 0 and got["tool_syntax_tokens"] > 0
    assert sorted(s["id"] for s in got.samples) == list(range(len(samples)))
    for s in got.samples:
        row = s["id"]
        one = compute_metrics(logits[row, :-1], batch["labels"][row, 1:], batch["token_classes"][row, 1:])
        assert s["tokens"] == one["tokens"]
        assert s["nll"] == pytest.approx(torch.tensor(one["perplexity"]).log().item(), rel=1e-5)


def test_torchtune_transform_emits_tool_args_and_passes_sample_ids(trajectories, torchtune_bpe, tokenizers_bpe):
    """AgentSFTTransform: tool_args equal the brute-force reference on every assistant item of the real data (the
    transform's own token layout), only on TOOL_CALL tokens; a sample_id goes through unchanged."""
    from agent_obs.integrations.torchtune.transform import AgentSFTTransform
    from torchtune.data import Message

    from agent_obs.offsets import token_offsets

    transform = AgentSFTTransform(torchtune_bpe)
    marked = 0
    for convs in trajectories.values():
        for conv in convs[:3]:
            messages = [Message(role=m["role"] if m["role"] != "tool" else "user", content=m["content"]) for m in conv]
            out = transform({"messages": messages, "sample_id": "f.jsonl:7"})
            assert out["sample_id"] == "f.jsonl:7"
            assert len(out["tool_args"]) == len(out["tokens"])
            for m in conv:
                if m["role"] != "assistant" or not m["content"]:
                    continue
                text = unicodedata.normalize("NFC", m["content"])
                ids = torchtune_bpe.encode(m["content"], add_bos=False, add_eos=False)
                offsets = token_offsets(ids, tokenizers_bpe)
                want = ref_args_tokens(offsets, ref_xml_values(text, strict=False), len(text))
                _, _, got = transform._classify_item("assistant", m["content"], ids)
                assert got == want
            classes = torch.tensor(out["token_classes"])
            args = torch.tensor(out["tool_args"], dtype=torch.bool)
            assert bool((classes[args] == TokenClass.TOOL_CALL).all())
            marked += int(args.sum())
    assert marked > 100
    assert "sample_id" not in transform({"messages": messages})


def test_collator_rejects_tool_args_for_a_regex_format(tok):
    with pytest.raises(ValueError, match="function_xml, hermes"):
        AgentChatCollator(tok, fmt=re.compile("<x>.*?</x>"), with_tool_args=True)
