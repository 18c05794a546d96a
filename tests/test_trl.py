"""AgentObsCallback in TRL's SFTTrainer, whose fused LM head never calls ``lm_head``.

The callback re-projects the backbone's hidden states without grad; the reference recomputes
the logits in float64 from the hidden states and the ``lm_head`` weight of the same forward.
"""

from __future__ import annotations

import datasets
import pytest
import torch
import trl
from test_transformers import (
    TOOLS,
    AgentChatCollator,
    AgentObsCallback,
    assert_logged,
    make_model,
    make_samples,
    make_tokenizer,
    reference_metrics,
    shifted_rows,
    train_args,
)


class HiddenRecorder:
    """Each forward's targets (before the callback pops them), last hidden state and lm_head weight."""

    def __init__(self, model) -> None:
        self.records: list[dict] = []
        model.register_forward_pre_hook(self._pre, with_kwargs=True)
        model.model.register_forward_hook(self._hidden)
        self.model = model

    def _pre(self, module, args, kwargs):
        self.records.append(
            {
                "training": module.training,
                "fused": kwargs.get("fused_lm_head", False),
                "labels": kwargs["labels"].clone(),
                "classes": kwargs.get("token_classes"),
                "tools": kwargs.get("tool_ids"),
            }
        )

    def _hidden(self, module, args, output):
        weight = self.model.lm_head.weight.detach().double()
        self.records[-1]["logits"] = output.last_hidden_state.detach().double() @ weight.T

    def runs(self) -> list[tuple[bool, list[dict]]]:
        out: list[tuple[bool, list[dict]]] = []
        for r in self.records:
            if out and out[-1][0] == r["training"]:
                out[-1][1].append(r)
            else:
                out.append((r["training"], [r]))
        return out


def sft_config(out, **overrides):
    """``train_args`` as TRL's ``SFTConfig``: 2 steps, logging every step, no bf16."""
    base = dict(max_steps=2, logging_steps=1, bf16=False, remove_unused_columns=True)
    base.update(overrides)
    return train_args(out, trl.SFTConfig, **base)


def test_sft_trainer_with_agent_collator_equals_float64_reference(bpe_tokenizer_files, trajectories, tmp_path):
    """SFTTrainer + AgentChatCollator: the attach-time warning names the fused head; train_*/eval_*
    (per class and per tool) equal float64 metrics of hidden @ lm_head.weight; TRL's own
    eval_entropy is kept as eval_entropy_trainer."""
    tok = make_tokenizer(bpe_tokenizer_files.tokenizer_json)
    samples = make_samples(trajectories)
    model = make_model(len(tok))
    recorder = HiddenRecorder(model)
    trainer = trl.SFTTrainer(
        model=model,
        args=sft_config(tmp_path, remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True}),
        train_dataset=datasets.Dataset.from_list(samples[:8]),
        eval_dataset=datasets.Dataset.from_list(samples[8:14]),
        processing_class=tok,
        data_collator=AgentChatCollator(tok, max_length=256),
    )
    with pytest.warns(UserWarning, match="add_fused_lm_head"):
        AgentObsCallback.install(trainer)
    trainer.train()

    assert recorder.records and all(r["fused"] for r in recorder.records)  # the path that skips lm_head
    logs = [h for h in trainer.state.log_history if "loss" in h or "eval_loss" in h]
    runs = recorder.runs()
    assert [training for training, _ in runs] == [True, False]
    train_logs = [h for h in logs if "loss" in h]
    assert len(train_logs) == 2 and len(runs[0][1]) == 4  # 2 steps x 2 micro-batches, logged every step
    windows = [runs[0][1][:2], runs[0][1][2:], runs[1][1]]
    for records, log in zip(windows, [*train_logs, logs[-1]], strict=True):
        rows = shifted_rows(records)
        expected = reference_metrics(*rows)
        assert_logged(log, "train" if records[0]["training"] else "eval", expected, rows)
    eval_log = logs[-1]
    assert {f"eval_tool_call.{t}_entropy" for t in TOOLS} <= set(eval_log)
    assert "eval_entropy_trainer" in eval_log and eval_log["eval_entropy_trainer"] == pytest.approx(
        eval_log["eval_entropy"], rel=0.05
    )


def test_stock_sft_trainer_data_path_gets_overall_metrics(bpe_tokenizer_files, trajectories, tmp_path):
    """Without the agent collator (TRL tokenizes the conversations itself) there are no classes:
    the overall train_* metrics are still exact, no per-class keys are invented, and a callback
    given to the constructor still warns about the fused head (at train begin)."""
    tok = make_tokenizer(bpe_tokenizer_files.tokenizer_json)
    samples = make_samples(trajectories, per_tool=2)
    model = make_model(len(tok))
    recorder = HiddenRecorder(model)
    trainer = trl.SFTTrainer(
        model=model,
        args=sft_config(tmp_path, max_steps=1, gradient_accumulation_steps=1, eval_strategy="no", max_length=256),
        train_dataset=datasets.Dataset.from_list(samples[:2]),
        processing_class=tok,
        callbacks=[AgentObsCallback()],  # attached at init, before TRL patches the forward: warned at train begin
    )
    with pytest.warns(UserWarning, match="add_fused_lm_head"):
        trainer.train()
    log = next(h for h in trainer.state.log_history if "loss" in h)
    (record,) = recorder.records
    labels = record["labels"]
    record = {**record, "classes": torch.full_like(labels, 1), "tools": torch.full_like(labels, -1)}
    rows = shifted_rows([record])
    expected = {k: v for k, v in reference_metrics(*rows).items() if "_" not in k.replace("_prob", "")}
    got = {k[len("train_") :]: v for k, v in log.items() if k.startswith("train_")}
    assert not any(k.startswith(("reasoning_", "tool_call")) for k in got)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5), key
