"""The HF Trainer path carries issue 13's extras: the collator's ``tool_args`` and row ids reach the
callback, which splits tool calls into syntax vs arguments and ranks the window's hardest rows."""

from __future__ import annotations

import json

import datasets
import torch
import transformers
from agent_obs.integrations.transformers import AgentChatCollator, AgentObsCallback, add_sample_ids
from metric_reference import assert_metrics_close, reference_metrics
from test_transformers import make_model, make_samples, make_tokenizer, train_args

from agent_obs.exporters.jsonl import JsonlExporter


class Seen:
    """Copies each forward's targets before the callback pops them, and its logits."""

    def __init__(self, model) -> None:
        self.records: list[dict] = []
        self.leaked: list[str] = []
        model.register_forward_pre_hook(self._pre, with_kwargs=True)
        model.register_forward_hook(self._post, with_kwargs=True)

    def _pre(self, module, args, kwargs):
        keys = ("labels", "token_classes", "tool_args")
        self.records.append({"training": module.training, **{k: kwargs[k].clone() for k in keys}})
        self.records[-1]["sample_ids"] = list(kwargs["sample_ids"])

    def _post(self, module, args, kwargs, output):
        self.leaked += [k for k in ("token_classes", "tool_ids", "tool_args", "sample_ids") if k in kwargs]
        self.records[-1]["logits"] = output.logits.detach().double().clone()


def shifted(records: list[dict], key: str) -> torch.Tensor:
    """``key`` of the next token for every position but the last, as flat rows (HF labels are unshifted)."""
    return torch.cat([r[key][:, 1:].reshape(-1) for r in records])


def test_trainer_splits_syntax_and_arguments_and_names_the_hardest_rows(
    bpe_tokenizer_files, trajectories, tmp_path
) -> None:
    tok = make_tokenizer(bpe_tokenizer_files.tokenizer_json)
    samples = make_samples(trajectories)
    model = make_model(len(tok))
    seen = Seen(model)  # registered first: sees the batch before the callback pops its extras
    train = add_sample_ids(datasets.Dataset.from_list(samples[:8]))
    evals = add_sample_ids(datasets.Dataset.from_list(samples[8:14]))
    trainer = transformers.Trainer(
        model=model,
        args=train_args(tmp_path, max_steps=2, logging_steps=2, eval_steps=2),
        train_dataset=train,
        eval_dataset=evals,
        data_collator=AgentChatCollator(tok, max_length=256, with_tool_args=True),
    )
    jsonl = tmp_path / "metrics.jsonl"
    AgentObsCallback.install(trainer, exporters=[JsonlExporter(jsonl)])
    trainer.train()

    assert seen.leaked == []  # the model never received the extras
    evaluated = [r for r in seen.records if not r["training"]]
    logits = torch.cat([r["logits"][:, :-1].reshape(-1, r["logits"].shape[-1]) for r in evaluated])
    labels, classes, args = (shifted(evaluated, k) for k in ("labels", "token_classes", "tool_args"))
    want, _ = reference_metrics(logits, labels, classes, tool_args=args)
    assert want["tool_args_tokens"] > 0 and want["tool_syntax_tokens"] > 0
    log = next(h for h in trainer.state.log_history if "eval_loss" in h)
    got = {k.removeprefix("eval_"): v for k, v in log.items() if k.startswith("eval_tool_") and "." not in k}
    assert_metrics_close(got, {k: v for k, v in want.items() if k.startswith("tool_")}, rtol=1e-5)
    assert got["tool_syntax_tokens"] + got["tool_args_tokens"] == got["tool_call_tokens"]

    record = next(json.loads(line) for line in jsonl.read_text().splitlines() if '"split": "eval"' in line)
    ranked = record["samples"]
    assert ranked and {s["id"] for s in ranked} <= set(range(len(evals)))  # the eval set's row indices
    per_row = {}
    for r in evaluated:  # each row's mean NLL over its counted tokens, straight from the logits
        for row, sid in enumerate(r["sample_ids"]):
            lab, cls = r["labels"][row, 1:], r["token_classes"][row, 1:]
            keep = (lab != -100) & (cls != 0)
            logp = torch.log_softmax(r["logits"][row, :-1][keep], -1)
            per_row[sid] = float(-logp.gather(1, lab[keep][:, None]).mean())
    hardest = max(per_row, key=per_row.get)
    assert ranked[0]["id"] == hardest and abs(ranked[0]["nll"] - per_row[hardest]) < 1e-5 * per_row[hardest]
