"""AgentChatCollator and AgentObsCallback in a real Hugging Face Trainer (tiny Qwen2, offline tokenizer).

References are independent: token classes from template arithmetic + the plain block regex,
metrics recomputed in float64 from the logits each forward produced (captured by hooks).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import datasets
import pytest
import torch
import transformers
from agent_obs.integrations.transformers import AgentChatCollator, AgentObsCallback, encode_conversation
from test_observer import RecordingExporter

from agent_obs import TokenClass, compute_metrics, tool_id
from agent_obs.exporters.jsonl import JsonlExporter
from agent_obs.keys import parse_key

# Qwen2.5's chat template for plain messages: a default system prompt, tool results wrapped in <tool_response>.
QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message['content'] + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
BLOCK = re.compile(r"<function=([^>]+)>.*?</function>", re.DOTALL)
TOPK = (1, 2, 5, 10)
GROUP_CLASS = {"reasoning": TokenClass.REASONING, "tool_call": TokenClass.TOOL_CALL}
TOOLS = ("bash", "str_replace_editor", "submit")


def make_tokenizer(tokenizer_json: Path):
    """The offline BPE as a fast tokenizer with Qwen's special tokens and chat template."""
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_json), eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tok.chat_template = QWEN_TEMPLATE
    return tok


def make_model(vocab_size: int, seed: int = 0):
    """A tiny random-init Qwen2 (no download); init std 0.2 so the distributions are far from uniform."""
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,
        tie_word_embeddings=False,
    )
    return transformers.Qwen2ForCausalLM(config)


def make_samples(conversations: dict[str, list[list[dict]]], per_tool: int = 6) -> list[dict]:
    """Short real examples: a system excerpt quoting a call, the observation before, one assistant turn.

    Interleaved by tool (bash, str_replace_editor, submit) so every batch mixes several tools.
    """
    by_tool: dict[str, list[dict]] = {t: [] for t in TOOLS}
    for name in sorted(conversations):
        for conv in conversations[name]:
            system = conv[0]["content"]
            at = max(0, system.find("<function="))
            excerpt = system[max(0, at - 80) : at + 220]
            for i in range(1, len(conv)):
                msg = conv[i]
                match = BLOCK.search(msg["content"]) if msg["role"] == "assistant" else None
                if match and match[1] in by_tool and len(msg["content"]) < 700:
                    by_tool[match[1]].append(
                        {
                            "messages": [
                                {"role": "system", "content": excerpt},
                                {"role": conv[i - 1]["role"], "content": conv[i - 1]["content"][:160]},
                                {"role": "assistant", "content": msg["content"]},
                            ]
                        }
                    )
    assert all(len(v) >= per_tool for v in by_tool.values()), {k: len(v) for k, v in by_tool.items()}
    return [by_tool[t][i] for i in range(per_tool) for t in TOOLS]


@pytest.fixture(scope="module")
def tok(bpe_tokenizer_files):
    return make_tokenizer(bpe_tokenizer_files.tokenizer_json)


@pytest.fixture(scope="module")
def samples(trajectories):
    return make_samples(trajectories)


# ---- independent float64 reference -------------------------------------------------------------
def reference_metrics(logits: torch.Tensor, labels, classes, tools, names: dict[int, str] | None = None) -> dict:
    """Float64 metrics of aligned rows ``logits [N, V]`` per group, straight from the definitions.

    ``names``: tool id -> name (default: the ``TOOLS`` of these tests).
    """
    names = names or {tool_id(t): t for t in TOOLS}
    logp = torch.log_softmax(logits.double(), dim=-1)
    p = logp.exp()
    entropy = -(p * logp).sum(-1)
    nll = -logp.gather(-1, labels.clamp(min=0)[:, None])[:, 0]
    correct = (logits.argmax(-1) == labels).double()
    masses = {k: p.topk(k, dim=-1).values.sum(-1) for k in TOPK}
    selected = (labels != -100) & (classes != TokenClass.IGNORE)
    groups = {"": selected}
    for name, cls in GROUP_CLASS.items():
        groups[f"{name}_"] = selected & (classes == cls)
    for tid in sorted(set(tools[selected & (classes == TokenClass.TOOL_CALL)].tolist()) - {-1}):
        groups[f"tool_call.{names[tid]}_"] = selected & (classes == TokenClass.TOOL_CALL) & (tools == tid)
    out: dict[str, float] = {}
    for prefix, mask in groups.items():
        n = int(mask.sum())
        if n == 0:
            continue
        out[prefix + "tokens"] = float(n)
        out[prefix + "entropy"] = float(entropy[mask].mean())
        out[prefix + "perplexity"] = float(torch.exp(nll[mask].mean()))
        out[prefix + "accuracy"] = float(correct[mask].mean())
        for k in TOPK:
            out[prefix + f"top{k}_prob"] = float(masses[k][mask].mean())
    return out


def shifted_rows(records: list[dict]) -> tuple[torch.Tensor, ...]:
    """Concatenate forwards' ``logits[:, :-1]`` with the targets of the next token, as flat rows."""
    parts = [
        (
            r["logits"][:, :-1].reshape(-1, r["logits"].shape[-1]),
            r["labels"][:, 1:].reshape(-1),
            r["classes"][:, 1:].reshape(-1),
            r["tools"][:, 1:].reshape(-1),
        )
        for r in records
    ]
    return tuple(torch.cat(column) for column in zip(*parts, strict=True))


def assert_logged(logs: dict, prefix: str, expected: dict[str, float], rows: tuple[torch.Tensor, ...]) -> None:
    """Every expected key is logged with ``prefix`` and equal (rel 1e-5), and matches compute_metrics."""
    got = {
        k[len(prefix) + 1 :]: v
        for k, v in logs.items()
        if k.startswith(prefix + "_") and parse_key(k[len(prefix) + 1 :])
    }
    assert set(got) == set(expected), sorted(set(got) ^ set(expected))
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-9), key
    logits, labels, classes, _ = rows
    cm = compute_metrics(logits.float(), labels, classes, topk=TOPK)
    for key in cm:
        if "." not in key and parse_key(key) is not None:
            assert got[key] == pytest.approx(cm[key], rel=1e-5, abs=1e-9), key


class Recorder:
    """Copies each forward's targets (before the callback pops them) and its logits."""

    def __init__(self, model) -> None:
        self.records: list[dict] = []
        self.leaked: list[str] = []
        model.register_forward_pre_hook(self._pre, with_kwargs=True)
        model.register_forward_hook(self._post, with_kwargs=True)

    def _pre(self, module, args, kwargs):
        self.records.append(
            {
                "training": module.training,
                "labels": kwargs["labels"].clone(),
                "classes": kwargs["token_classes"].clone(),
                "tools": kwargs["tool_ids"].clone(),
            }
        )

    def _post(self, module, args, kwargs, output):
        self.leaked += [k for k in ("token_classes", "tool_ids") if k in kwargs]
        self.records[-1]["logits"] = output.logits.detach().double().clone()

    def runs(self) -> list[tuple[bool, list[dict]]]:
        """Consecutive records of one mode (a logging window or one evaluation)."""
        out: list[tuple[bool, list[dict]]] = []
        for r in self.records:
            if out and out[-1][0] == r["training"]:
                out[-1][1].append(r)
            else:
                out.append((r["training"], [r]))
        return out


# ---- collator -------------------------------------------------------------------------------------
def expected_encoding(tok, messages: list[dict]) -> tuple[list[int], list[int], list[int], list[int]]:
    """Classes/tool ids/labels by template arithmetic (content starts after the role header) and BLOCK."""
    text = tok.apply_chat_template(messages, tokenize=False)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    classes, tools, labels = [0] * len(ids), [-1] * len(ids), [-100] * len(ids)
    for i, msg in enumerate(messages):
        start = len(tok.apply_chat_template(messages[:i], tokenize=False)) if i else 0
        start += len(f"<|im_start|>{msg['role']}\n")
        end = start + len(msg["content"])
        assert text[start:end] == msg["content"]
        blocks = [(start + m.start(), start + m.end(), m[1]) for m in BLOCK.finditer(msg["content"])]
        last = None
        for t, (s, e) in enumerate(offsets):
            if not (s < end and e > start and e > s):
                continue
            if msg["role"] != "assistant":
                classes[t] = TokenClass.CONTEXT
                continue
            hit = [b for b in blocks if s < b[1] and e > b[0]]
            classes[t] = TokenClass.TOOL_CALL if hit else TokenClass.REASONING
            tools[t] = tool_id(hit[0][2]) if hit else -1
            labels[t] = ids[t]
            last = t
        if last is not None and last + 1 < len(ids) and ids[last + 1] == tok.eos_token_id:
            labels[last + 1] = ids[last + 1]
    return ids, [int(c) for c in classes], tools, labels


def test_collator_matches_template_arithmetic_on_real_conversations(tok, trajectories):
    """Whole real conversations (system prompts quoting calls, long observations): every token's class,
    tool id and label equal an independent computation; system-prompt examples are CONTEXT, not TOOL_CALL."""
    convs = [c for name in sorted(trajectories) for c in trajectories[name][:2]]
    seen_tools = set()
    for messages in convs:
        enc = encode_conversation(tok, messages)
        ids, classes, tools, labels = expected_encoding(tok, messages)
        assert enc.input_ids == ids
        assert enc.token_classes == classes
        assert enc.tool_ids == tools
        assert enc.labels == labels
        seen_tools |= set(tools) - {-1}
        text = tok.apply_chat_template(messages, tokenize=False)
        if "<function=" in messages[0]["content"]:
            sys_end = len(tok.apply_chat_template(messages[:1], tokenize=False))
            enc_offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            first = [c for c, (s, _) in zip(enc.token_classes, enc_offsets, strict=True) if s < sys_end]
            assert TokenClass.TOOL_CALL not in first and TokenClass.CONTEXT in first
        specials = {tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>")}
        assert all(
            c == TokenClass.IGNORE for i, c in zip(enc.input_ids, enc.token_classes, strict=True) if i in specials
        )
    assert {tool_id(t) for t in TOOLS} <= seen_tools


def test_collator_locates_contents_that_also_appear_in_headers(tok):
    """A message whose content is 'user' or 'assistant' is found at its own position, not in a header."""
    messages = [
        {"role": "system", "content": "assistant"},
        {"role": "user", "content": "user"},
        {"role": "assistant", "content": "user\n<function=submit>\n</function>"},
    ]
    enc = encode_conversation(tok, messages)
    assert (enc.input_ids, enc.token_classes, enc.tool_ids, enc.labels) == expected_encoding(tok, messages)
    assert enc.token_classes.count(TokenClass.CONTEXT) >= 2


def test_collator_pads_truncates_and_batches(tok, samples):
    collator = AgentChatCollator(tok, max_length=64, pad_to_multiple_of=8)
    batch = collator(samples[:3])
    singles = [collator.encode(s) for s in samples[:3]]
    assert set(batch) == {"input_ids", "attention_mask", "labels", "token_classes", "tool_ids"}
    assert batch["input_ids"].shape[1] % 8 == 0 and batch["input_ids"].shape[1] <= 64
    for row, enc in enumerate(singles):
        n = len(enc.input_ids)
        assert batch["input_ids"][row, :n].tolist() == enc.input_ids
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        assert set(batch["labels"][row, n:].tolist()) <= {-100}
        assert set(batch["token_classes"][row, n:].tolist()) <= {0}
        assert set(batch["tool_ids"][row, n:].tolist()) <= {-1}
    tok.padding_side = "left"
    try:
        left = collator(samples[:3])
    finally:
        tok.padding_side = "right"
    n = len(singles[0].input_ids)
    assert left["token_classes"][0, -n:].tolist() == singles[0].token_classes


def test_collator_errors_name_the_fix(tok, samples, bpe_tokenizer_files):
    rewriting = make_tokenizer(bpe_tokenizer_files.tokenizer_json)
    rewriting.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | upper }}\n{% endfor %}"
    with pytest.raises(ValueError, match=r"does not appear verbatim.*chat_template"):
        encode_conversation(rewriting, samples[0]["messages"])
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        AgentChatCollator(tok)([{"input_ids": [1, 2]}])
    with pytest.raises(ValueError, match="only text messages"):
        encode_conversation(tok, [{"role": "user", "content": [{"type": "text", "text": "hi"}]}])


# ---- Trainer --------------------------------------------------------------------------------------
def train_args(out: Path, args_class=None, **overrides):
    """CPU ``TrainingArguments`` (or a subclass such as TRL's ``SFTConfig``) for a few quick steps."""
    base = dict(
        output_dir=str(out),
        per_device_train_batch_size=2,
        per_device_eval_batch_size=3,
        gradient_accumulation_steps=2,
        max_steps=4,
        logging_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        learning_rate=1e-2,
        report_to=[],
        remove_unused_columns=False,
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    base.update(overrides)
    return (args_class or transformers.TrainingArguments)(**base)


def test_trainer_logs_equal_float64_reference_with_grad_accumulation(tok, samples, tmp_path):
    """train_*/eval_* keys in the logs equal float64 metrics of the logits each forward produced,
    token-weighted over the 4 micro-batches of each logging window (2 steps x 2 accumulation)."""
    model = make_model(len(tok))
    recorder = Recorder(model)
    trainer = transformers.Trainer(
        model=model,
        args=train_args(tmp_path),
        train_dataset=datasets.Dataset.from_list(samples[:12]),
        eval_dataset=datasets.Dataset.from_list(samples[12:18]),
        data_collator=AgentChatCollator(tok, max_length=256),
    )
    jsonl = tmp_path / "metrics.jsonl"
    closes = RecordingExporter()
    callback = AgentObsCallback.install(trainer, exporters=[JsonlExporter(jsonl), closes])
    trainer.train()

    assert recorder.leaked == []  # the model never received token_classes/tool_ids
    logs = [h for h in trainer.state.log_history if "loss" in h or "eval_loss" in h]
    runs = recorder.runs()
    assert [training for training, _ in runs] == [True, False, True, False]
    assert len(logs) == len(runs)
    for (training, records), log in zip(runs, logs, strict=True):
        rows = shifted_rows(records)
        expected = reference_metrics(*rows)
        assert_logged(log, "train" if training else "eval", expected, rows)
        assert {f"tool_call.{t}_entropy" for t in TOOLS} <= set(expected)
        if training:
            assert len(records) == 4
            per_batch = [reference_metrics(*shifted_rows([r])) for r in records]
            counts = [b["tokens"] for b in per_batch]
            assert len(set(counts)) > 1 and sum(counts) == log["train_tokens"]
            # unequal micro-batches: a plain mean of per-micro-batch means would be off by far more than rel 1e-5
            stats = ["entropy", "perplexity", "top1_prob", "top10_prob"]
            gaps = [abs(sum(b[k] for b in per_batch) / len(per_batch) / log[f"train_{k}"] - 1) for k in stats]
            assert max(gaps) > 1e-3, dict(zip(stats, gaps, strict=True))

    before = len(recorder.records)
    metrics = trainer.evaluate()
    rows = shifted_rows(recorder.records[before:])
    assert_logged(metrics, "eval", reference_metrics(*rows), rows)

    # the exporters got exactly what the logs got, with the split and the trainer's step
    callback.detach()
    callback.detach()
    assert closes.closes == 1  # train and eval recorders share one publisher: each exporter is closed once
    exported = [json.loads(line) for line in jsonl.read_text().splitlines()]
    splits = [("train", 2), ("eval", 2), ("train", 4), ("eval", 4), ("eval", 4)]
    assert [(e["split"], e["step"]) for e in exported] == splits
    for line, log in zip(exported, [*logs, metrics], strict=True):
        for key, value in line.items():
            if parse_key(key):
                assert log[f"{line['split']}_{key}"] == pytest.approx(value, rel=1e-12), key


def test_callback_passed_to_trainer_init_still_logs(tok, samples, tmp_path):
    """``Trainer(callbacks=[AgentObsCallback()])`` attaches at init; keys reach the history, evaluate()
    and predict() (``test_*``)."""
    model = make_model(len(tok))
    recorder = Recorder(model)
    trainer = transformers.Trainer(
        model=model,
        args=train_args(tmp_path, max_steps=1, logging_steps=1, gradient_accumulation_steps=1, eval_strategy="no"),
        train_dataset=datasets.Dataset.from_list(samples[:4]),
        data_collator=AgentChatCollator(tok, max_length=128),
        callbacks=[AgentObsCallback()],
    )
    trainer.train()
    log = next(h for h in trainer.state.log_history if "loss" in h)
    rows = shifted_rows(recorder.records)
    assert_logged(log, "train", reference_metrics(*rows), rows)
    for split in ("eval", "test"):
        before = len(recorder.records)
        held_out = datasets.Dataset.from_list(samples[4:7])
        metrics = trainer.evaluate(held_out) if split == "eval" else trainer.predict(held_out).metrics
        rows = shifted_rows(recorder.records[before:])
        assert_logged(metrics, split, reference_metrics(*rows), rows)


def test_callback_after_report_to_integrations_says_how_to_install_it(tok, samples, tmp_path):
    """Added after the report_to callbacks, the keys would miss them: one warning naming install()."""
    model = make_model(len(tok))
    callback = AgentObsCallback(model)
    model.train()
    model(**AgentChatCollator(tok, max_length=256)(samples[:2]))
    args = train_args(tmp_path, report_to=["wandb"])
    state = transformers.TrainerState(global_step=1)
    logs = {"loss": 1.0}
    with pytest.warns(UserWarning, match=r"AgentObsCallback.install\(trainer\)"):
        callback.on_log(args, state, transformers.TrainerControl(), logs=logs)
    assert "train_entropy" in logs
    callback.detach()


def test_liger_fused_cross_entropy_warns_at_attach_naming_the_option(tok, tmp_path):
    callback = AgentObsCallback(make_model(len(tok)))
    with pytest.warns(UserWarning, match=r"use_liger_kernel=True.*fused_linear_cross_entropy': False"):
        callback.check_args(train_args(tmp_path, use_liger_kernel=True))
    quiet = AgentObsCallback(make_model(len(tok)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet.check_args(
            train_args(tmp_path, use_liger_kernel=True, liger_kernel_config={"fused_linear_cross_entropy": False})
        )
        quiet.check_args(train_args(tmp_path))


def test_forward_that_skips_lm_head_is_reprojected(tok, samples):
    """A loss path that never calls lm_head (here: the backbone + a manual matmul, like a fused
    linear-cross-entropy kernel) warns and still yields the metrics of the true logits."""
    model = make_model(len(tok))
    callback = AgentObsCallback(model)
    batch = AgentChatCollator(tok, max_length=96)(samples[:3])

    def fused_forward(input_ids=None, attention_mask=None, labels=None, **kwargs):
        hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return hidden @ model.lm_head.weight.T  # never calls the lm_head module

    model.forward = fused_forward
    model.train()
    with pytest.warns(UserWarning, match="did not call lm_head"):
        logits = model(**batch)
    metrics = callback.publisher.publish(callback.recorders["train"], split="train", step=1)
    rows = shifted_rows([{"logits": logits.detach().double(), **_targets(batch)}])
    expected = reference_metrics(*rows)
    assert {k: metrics[k] for k in expected} == pytest.approx(expected, rel=1e-5)
    callback.detach()


def _targets(batch: dict) -> dict:
    return {"labels": batch["labels"], "classes": batch["token_classes"], "tools": batch["tool_ids"]}


# ---- two processes ----------------------------------------------------------------------------------
def _ddp_main(tokenizer_json: str, out_dir: str) -> None:
    """torchrun entry point: train 2 steps on 2 gloo ranks, save each rank's logs and forward records."""
    from conftest import load_conversations

    rank = int(os.environ["RANK"])
    tok = make_tokenizer(Path(tokenizer_json))
    samples = make_samples(load_conversations())
    model = make_model(len(tok))
    recorder = Recorder(model)
    trainer = transformers.Trainer(
        model=model,
        args=train_args(Path(out_dir) / "trainer", max_steps=2, eval_steps=2),
        train_dataset=datasets.Dataset.from_list(samples[:8]),
        eval_dataset=datasets.Dataset.from_list(samples[8:14]),
        data_collator=AgentChatCollator(tok, max_length=128),
    )
    AgentObsCallback.install(trainer)
    trainer.train()
    torch.save(recorder.records, Path(out_dir) / f"records{rank}.pt")
    (Path(out_dir) / f"logs{rank}.json").write_text(json.dumps(trainer.state.log_history))


@pytest.mark.slow
def test_two_gloo_ranks_reduce_to_the_union_of_their_batches(bpe_tokenizer_files, tmp_path):
    """torchrun with 2 CPU ranks: each rank logs the metrics of both ranks' micro-batches together."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        __file__,
        str(bpe_tokenizer_files.tokenizer_json),
        str(tmp_path),
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [torch.load(tmp_path / f"records{r}.pt") for r in range(2)]
    logs = [json.loads((tmp_path / f"logs{r}.json").read_text()) for r in range(2)]
    for training, prefix, key in ((True, "train", "loss"), (False, "eval", "eval_loss")):
        union = [rec for per_rank in records for rec in per_rank if rec["training"] == training]
        assert all(any(rec["training"] == training for rec in per_rank) for per_rank in records)
        rows = shifted_rows(union)
        expected = reference_metrics(*rows)
        for per_rank in logs:
            assert_logged(next(h for h in per_rank if key in h), prefix, expected, rows)


if __name__ == "__main__":
    _ddp_main(sys.argv[1], sys.argv[2])
