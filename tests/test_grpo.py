"""GRPOObsCallback in TRL's GRPOTrainer, and ``agent-obs demo --rl``.

The demo (short form: a tiny Qwen2 learns the tool-call format by SFT, then GRPO) runs once per
module; its logs give the peer-agreement test (TRL's own ``entropy``) and its policy the float64
reference run. References are independent: hooks record every fused forward of the policy and of
the reference model; the completions are classified from prefix decodes and the block regex; the
metrics are recomputed in float64 from ``hidden @ lm_head.weight / temperature``.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import re

import datasets
import pytest
import torch
import transformers
import trl
from agent_obs.integrations.transformers import GRPOObsCallback, classify_completion, grpo_demo, reward_by_tool_call
from agent_obs.integrations.transformers.grpo import sampled_key
from metric_reference import reference_metrics as parts_reference
from test_classify import ref_xml_values
from test_transformers import reference_metrics

from agent_obs import TokenClass, tool_id
from agent_obs.cli import main as cli_main
from agent_obs.exporters.jsonl import JsonlExporter
from agent_obs.keys import parse_key, sanitize_tool_name

OPEN_BLOCK = re.compile(r"<function=([^>]+)>.*?(?:</function>|\Z)", re.DOTALL)  # non-strict: unclosed runs to the end
SFT_STEPS, GRPO_STEPS = 60, 3
RENAMED = {"perplexity": "sampled_perplexity", "accuracy": "sampled_argmax_rate"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """``agent-obs demo --rl`` in short form: its printed output and its output folder."""
    cache = tmp_path_factory.mktemp("rl_demo")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli_main(
            ["demo", "--rl", "--cache-dir", str(cache), "--sft-steps", str(SFT_STEPS), "--grpo-steps", str(GRPO_STEPS)]
        )
    assert rc == 0, out.getvalue()
    return out.getvalue(), cache / "rl"


def test_demo_prints_the_per_class_table_and_agrees_with_trl_entropy(demo):
    """Every logged GRPO step: train_entropy equals TRL's own entropy (within 2e-3) and train_tokens
    equals TRL's completion-token count; per-class keys are logged, perplexity/accuracy under their
    sampled-token names; exporters got the same numbers under split rl_train."""
    printed, out = demo
    history = json.loads((out / "grpo_logs.json").read_text())
    logs = [h for h in history if "entropy" in h]
    assert len(logs) == GRPO_STEPS
    for log in logs:
        assert log["train_entropy"] == pytest.approx(log["entropy"], abs=2e-3)
        assert log["train_tokens"] == pytest.approx(log["completions/mean_length"] * 8)  # 8 completions a step
        assert {"train_reasoning_entropy", "train_sampled_perplexity", "train_sampled_argmax_rate"} <= set(log)
        assert not {"train_perplexity", "train_accuracy", "train_reasoning_accuracy"} & set(log)
    records = [json.loads(line) for line in (out / "agent_obs.jsonl").read_text().splitlines()]
    assert [r["split"] for r in records] == ["rl_train"] * GRPO_STEPS
    assert [r["entropy"] for r in records] == pytest.approx([h["train_entropy"] for h in logs], rel=1e-9)
    assert "GRPO completions per token class" in printed
    for row in ("all", "reasoning", "tool_call"):
        assert re.search(rf"^{logs[-1]['step']}\s+{row}\s", printed, re.MULTILINE), row
    assert (out / "policy" / "config.json").is_file()
    # the demo's reward needs a well-formed call: completions without any tool call all score 0
    without = [
        h["rewards/tool_call_reward/without_tool_call"]
        for h in logs
        if "rewards/tool_call_reward/without_tool_call" in h
    ]
    with_call = [
        h["rewards/tool_call_reward/with_tool_call"] for h in logs if "rewards/tool_call_reward/with_tool_call" in h
    ]
    assert with_call and all(0 <= v <= 1 for v in with_call) and all(v == 0 for v in without)


# ---- the float64 reference ----------------------------------------------------------------------
class ForwardRecorder:
    """Every fused forward of a model: grad mode, TRL's labels and float64 logits at the sampling temperature."""

    def __init__(self, model, temperature: float) -> None:
        self.records: list[dict] = []
        self.temperature = temperature
        self.model = model
        model.register_forward_pre_hook(self._pre, with_kwargs=True)
        model.model.register_forward_hook(self._hidden)

    def _pre(self, module, args, kwargs):
        if kwargs.get("fused_lm_head"):
            self.records.append(
                {"grad": torch.is_grad_enabled(), "training": module.training, "labels": kwargs["labels"].clone()}
            )

    def _hidden(self, module, args, output):
        if self.records and "logits" not in self.records[-1]:
            weight = self.model.lm_head.weight.detach().double()
            self.records[-1]["logits"] = output.last_hidden_state.detach().double() @ weight.T / self.temperature


def reference_classes(tok, ids: list[int]) -> tuple[list[int], list[int], dict[int, str], list[int]]:
    """Classes/tool ids/argument flags of one completion from prefix decodes (character offsets), ``OPEN_BLOCK``
    and the regex reference of parameter values."""
    specials = {i for i, t in tok.added_tokens_decoder.items() if t.special}
    text = tok.decode(ids, skip_special_tokens=True)
    blocks = [(m.start(), m.end(), m[1]) for m in OPEN_BLOCK.finditer(text)]
    values = ref_xml_values(text, strict=False)
    classes, tools, names, args = [], [], {}, []
    for i, token in enumerate(ids):
        start = len(tok.decode(ids[:i], skip_special_tokens=True))
        end = len(tok.decode(ids[: i + 1], skip_special_tokens=True))
        hit = [b for b in blocks if start < b[1] and end > b[0]]
        args.append(int(bool(hit) and any(start < b and end > a for a, b in values)))
        if token in specials:
            classes.append(TokenClass.CONTEXT)  # counted overall only, as TRL's entropy counts the EOS
            tools.append(-1)
        elif hit:
            classes.append(TokenClass.TOOL_CALL)
            tools.append(tool_id(hit[0][2]))
            names[tool_id(hit[0][2])] = sanitize_tool_name(hit[0][2])
        else:
            classes.append(TokenClass.REASONING)
            tools.append(-1)
    return [int(c) for c in classes], tools, names, args


def reference_rows(tok, records: list[dict]) -> tuple[tuple[torch.Tensor, ...], dict[int, str]]:
    """Flat rows (logits of position t, token t + 1, its class, tool and argument flag) of the completion tokens."""
    parts, names = [], {}
    for r in records:
        labels = r["labels"][:, 1:]
        for b in range(labels.shape[0]):
            pos = (labels[b] != -100).nonzero().flatten()
            ids = labels[b, pos].tolist()
            classes, tools, found, args = reference_classes(tok, ids)
            names |= found
            parts.append(
                (r["logits"][b, pos], labels[b, pos], torch.tensor(classes), torch.tensor(tools), torch.tensor(args))
            )
    return tuple(torch.cat(column) for column in zip(*parts, strict=True)), names


def grpo_trainer(out, tmp_path, temperature: float, eval_prompts: int = 0, rollout_func=None, **overrides):
    """A GRPOTrainer on the demo's SFT'd policy and prompts (``eval_prompts`` from the val split)."""
    tok = transformers.AutoTokenizer.from_pretrained(out / "policy")
    settings = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        num_generations=4,
        temperature=temperature,
        max_completion_length=40,
        learning_rate=1e-3,
        logging_steps=1,
        bf16=False,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=1,
    )
    evals = grpo_demo.grpo_prompts(grpo_demo.load_conversations("val"))[:eval_prompts]
    return trl.GRPOTrainer(
        model=transformers.AutoModelForCausalLM.from_pretrained(out / "policy"),
        reward_funcs=grpo_demo.tool_call_reward,
        args=trl.GRPOConfig(**(settings | overrides)),
        train_dataset=datasets.Dataset.from_list(grpo_demo.grpo_prompts(grpo_demo.load_conversations())),
        eval_dataset=datasets.Dataset.from_list(evals) if evals else None,
        processing_class=tok,
        rollout_func=rollout_func,
    )


def assert_equals_reference(log: dict, prefix: str, tok, records: list[dict]) -> dict:
    """The ``{prefix}_*`` agent-obs keys of ``log`` equal float64 metrics of these forwards' completions."""
    return assert_metrics(log, prefix, *reference_rows(tok, records))


def assert_metrics(log: dict, prefix: str, rows: tuple[torch.Tensor, ...], names: dict[int, str]) -> dict:
    """The ``{prefix}_*`` agent-obs keys of ``log`` (not TRL's) equal float64 metrics of these rows
    (logits, labels, classes, tools, argument flags)."""
    logits, labels, classes, tools, args = rows
    expected = reference_metrics(logits, labels, classes, tools, names=names)
    parts, _ = parts_reference(logits, labels, classes, tool_args=args)  # tool_syntax_* / tool_args_*
    expected |= {k: v for k, v in parts.items() if k.startswith(("tool_syntax_", "tool_args_"))}
    expected = {_renamed(k): v for k, v in expected.items()}
    got = {k[len(prefix) + 1 :]: v for k, v in log.items() if k.startswith(prefix + "_")}
    got = {k: v for k, v in got.items() if parse_key(_grammar(k))}  # agent-obs keys, not TRL's
    assert set(got) == set(expected), sorted(set(got) ^ set(expected))
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-9), key
    return got


def test_grpo_metrics_equal_float64_reference_once_per_optimisation_step(demo, tmp_path):
    """num_iterations=2, gradient accumulation 2, beta > 0, temperature 0.7: each logged step equals float64
    metrics of its 2 training forwards only (not the old-policy nor the reference-model forwards, which
    also run); the same completions are counted again in the second optimisation step over them."""
    _, out = demo
    trainer = grpo_trainer(out, tmp_path, 0.7, gradient_accumulation_steps=2, num_iterations=2, beta=0.04, max_steps=2)
    tok = trainer.processing_class
    recorder = ForwardRecorder(trainer.model, 0.7)
    reference_calls = []
    trainer.ref_model.register_forward_pre_hook(lambda m, a, k: reference_calls.append(1), with_kwargs=True)
    jsonl = tmp_path / "m.jsonl"
    GRPOObsCallback.install(trainer, exporters=[JsonlExporter(jsonl)])
    trainer.train()

    logs = [h for h in trainer.state.log_history if "entropy" in h]
    training = [r for r in recorder.records if r["grad"]]
    old_policy = [r for r in recorder.records if not r["grad"]]
    assert len(logs) == 2 and len(training) == 4  # 2 optimisation steps x 2 micro-batches
    assert len(old_policy) == 2 and len(reference_calls) == 2  # ran, over the same 8 completions, uncounted
    seen_tool = False
    for log, step in zip(logs, (training[:2], training[2:]), strict=True):
        seen_tool |= "tool_call_tokens" in assert_equals_reference(log, "train", tok, step)
    assert logs[0]["train_tokens"] == logs[1]["train_tokens"]  # the same completions, once per optimisation step
    assert seen_tool, "the SFT'd policy wrote no tool call: the per-tool path went untested"
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["tokens"] for r in records] == [h["train_tokens"] for h in logs]


def test_grpo_eval_keys_equal_float64_reference_and_keep_trls_eval_entropy(demo, tmp_path):
    """An evaluation (8 completions, one batch): eval_* keys equal float64 metrics of the eval loss forward
    only (its old-policy forward also runs in eval mode, uncounted); TRL's own eval_entropy moves to
    eval_entropy_trainer and agrees within 2e-3; exporters get split rl_eval."""
    _, out = demo
    trainer = grpo_trainer(
        out, tmp_path, 1.0, eval_prompts=2, num_iterations=2, max_steps=1, eval_strategy="steps", eval_steps=1
    )
    recorder = ForwardRecorder(trainer.model, 1.0)
    jsonl = tmp_path / "m.jsonl"
    GRPOObsCallback.install(trainer, exporters=[JsonlExporter(jsonl)])
    trainer.train()

    (log,) = [h for h in trainer.state.log_history if "eval_loss" in h]
    evaluation = [r for r in recorder.records if not r["training"]]
    assert len(evaluation) == 2 and not any(r["grad"] for r in evaluation)  # old-policy, then the loss forward
    got = assert_equals_reference(log, "eval", trainer.processing_class, evaluation[1:])
    assert got["tokens"] == pytest.approx(log["eval_completions/mean_length"] * 8)
    assert log["eval_entropy"] == pytest.approx(log["eval_entropy_trainer"], abs=2e-3)
    assert [json.loads(line)["split"] for line in jsonl.read_text().splitlines()] == ["rl_train", "rl_eval"]


class TwoTurnRollout:
    """TRL's rollout_func for agent environments: each completion is a real assistant turn (with its call),
    the environment's observation (env_mask 0) and the next assistant turn, all distinct."""

    def __init__(self, tok) -> None:
        self.tok = tok
        self.convs = [c for c in grpo_demo.load_conversations() if len(c) > 4]
        self.env_masks: dict[tuple[int, ...], list[int]] = {}

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def __call__(self, prompts: list, trainer) -> dict:
        prompt_ids, completion_ids, masks = [], [], []
        for prompt in prompts:
            n = len(self.env_masks)
            conv = self.convs[n % len(self.convs)]
            first = self._ids(conv[2]["content"] + "<|im_end|>")
            env = self._ids(f"\n<|im_start|>user\n{conv[3]['content']}<|im_end|>\n<|im_start|>assistant\n")
            second = self._ids(conv[4]["content"][: 30 + n] + "<|im_end|>")  # cut differently: all distinct
            ids, mask = first + env + second, [1] * len(first) + [0] * len(env) + [1] * len(second)
            self.env_masks[tuple(ids)] = mask
            text = self.tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            prompt_ids.append(self._ids(text))
            completion_ids.append(ids)
            masks.append(mask)
        logprobs = [[0.0] * len(ids) for ids in completion_ids]
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": logprobs, "env_mask": masks}


def test_environment_feedback_is_not_counted_and_each_turn_is_classified_alone(demo, tmp_path, monkeypatch):
    """Two-turn completions from a rollout_func with env_mask (TRL leaves the observation out of its loss and
    entropy): train_* count exactly the policy's tokens (TRL's completion length and entropy agree) and equal
    float64 metrics of those tokens (each assistant turn classified as its own message); only those rows are
    re-projected, without grad, in chunks of the configured size."""
    _, out = demo
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    rollout = TwoTurnRollout(transformers.AutoTokenizer.from_pretrained(out / "policy"))
    trainer = grpo_trainer(out, tmp_path, 1.0, rollout_func=rollout, max_steps=2)
    tok = trainer.processing_class
    recorder = ForwardRecorder(trainer.model, 1.0)
    callback = GRPOObsCallback.install(trainer, chunk_bytes=4 * len(tok) * 7)  # re-projects 7 rows at a time
    projected = []
    callback.head.register_forward_hook(lambda m, a, o: projected.append((a[0].shape[0], o.requires_grad)))
    trainer.train()

    logs = [h for h in trainer.state.log_history if "entropy" in h]
    training = [r for r in recorder.records if r["grad"]]
    assert len(logs) == len(training) == 2
    assert sum(n for n, _ in projected) == sum(h["train_tokens"] for h in logs)  # only the counted rows
    assert max(n for n, _ in projected) == 7 and not any(grad for _, grad in projected)
    for log, record in zip(logs, training, strict=True):
        assert log["train_tokens"] == pytest.approx(log["completions/mean_length"] * 4)  # env tokens left out
        assert log["train_entropy"] == pytest.approx(log["entropy"], abs=2e-3)
        parts, names = [], {}
        labels = record["labels"][:, 1:]
        for b in range(labels.shape[0]):
            pos = (labels[b] != -100).nonzero().flatten()
            ids = labels[b, pos].tolist()
            mask = torch.tensor(rollout.env_masks[tuple(ids)])
            assert 0 < int(mask.sum()) < len(ids)
            classes, tools = torch.zeros(len(ids), dtype=torch.long), torch.full((len(ids),), -1)
            args = torch.zeros(len(ids), dtype=torch.long)
            bounds = [0, *((mask[1:] != mask[:-1]).nonzero().flatten() + 1).tolist(), len(ids)]
            for start, end in itertools.pairwise(bounds):
                if mask[start]:  # one assistant turn, classified alone
                    cls, tids, found, flags = reference_classes(tok, ids[start:end])
                    classes[start:end], tools[start:end] = torch.tensor(cls), torch.tensor(tids)
                    args[start:end] = torch.tensor(flags)
                    names |= found
            turn_labels = labels[b, pos].masked_fill(mask == 0, -100)
            parts.append((record["logits"][b, pos], turn_labels, classes, tools, args))
        rows = tuple(torch.cat(column) for column in zip(*parts, strict=True))
        assert "tool_call_tokens" in assert_metrics(log, "train", rows, names)


def _grammar(key: str) -> str:
    """A logged sampled-token key back in the metric-key grammar."""
    for stat, name in RENAMED.items():
        if key.endswith(name):
            return key[: -len(name)] + stat
    return key


def _renamed(key: str) -> str:
    for stat, name in RENAMED.items():
        if key.endswith(stat):
            return key[: -len(stat)] + name
    return key


# ---- classification and naming -----------------------------------------------------------------
def test_classify_completion_matches_offsets_of_real_assistant_turns(tmp_path):
    """Real assistant turns of the sample data, tokenized: classes/tool ids from per-token pieces equal
    those from the tokenizer's character offsets and the block regex; a special token is IGNORE."""
    tok = grpo_demo.build_tokenizer(tmp_path)
    turns = [m["content"] for conv in grpo_demo.load_conversations("val") for m in conv if m["role"] == "assistant"]
    assert len(turns) > 20
    for content in turns:
        enc = tok(content, add_special_tokens=False, return_offsets_mapping=True)
        ids = [*enc["input_ids"], tok.eos_token_id]
        blocks = [(m.start(), m.end(), m[1]) for m in OPEN_BLOCK.finditer(content)]
        values = ref_xml_values(content, strict=False)
        expected_cls, expected_tools, expected_args = [], [], []
        for s, e in enc["offset_mapping"]:
            hit = [b for b in blocks if s < b[1] and e > b[0]]
            expected_cls.append(TokenClass.TOOL_CALL if hit else TokenClass.REASONING)
            expected_tools.append(tool_id(hit[0][2]) if hit else -1)
            expected_args.append(int(any(s < b and e > a for a, b in values)))
        pieces = tok.batch_decode([[i] for i in ids], skip_special_tokens=True)
        classes, tools, args = classify_completion(pieces)
        assert classes == [*expected_cls, TokenClass.IGNORE]
        assert tools == [*expected_tools, -1]
        assert args == [*expected_args, 0]


def test_sampled_key_renames_only_perplexity_and_accuracy():
    assert sampled_key("perplexity") == "sampled_perplexity"
    assert sampled_key("tool_call.bash_accuracy") == "tool_call.bash_sampled_argmax_rate"
    assert sampled_key("reasoning_entropy") == "reasoning_entropy"
    assert sampled_key("top5_prob") == "top5_prob"
    assert sampled_key("nonfinite_tokens") == "nonfinite_tokens"


def test_misuse_names_the_fix(tmp_path):
    """install() on a plain Trainer names AgentObsCallback; a callback only passed in callbacks=[...] (never
    attached, so it could report nothing) warns at train begin naming install()."""
    model = transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=1, save_strategy="no", disable_tqdm=True
    )
    rows = datasets.Dataset.from_list([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}])
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
    with pytest.raises(TypeError, match=r"AgentObsCallback\.install"):
        GRPOObsCallback.install(trainer)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows, callbacks=[GRPOObsCallback()])
    with pytest.warns(UserWarning, match=r"GRPOObsCallback\.install\(trainer\)"):
        trainer.train()


def test_reward_by_tool_call_logs_the_mean_reward_with_and_without_a_call():
    """Real assistant turns (all with a call) and their reasoning alone (none): the wrapper returns the
    rewards unchanged and logs each side's mean through the log_metric callable TRL passes; None rewards
    (unscorable) are left out; an async reward function is refused."""
    turns = [m["content"] for conv in grpo_demo.load_conversations("val") for m in conv if m["role"] == "assistant"]
    with_call = [[{"role": "assistant", "content": t}] for t in turns[:6]]
    without = [[{"role": "assistant", "content": t[: t.index("<function=")]}] for t in turns[:6]]

    def length_reward(completions, **kwargs):
        return [float(len(c[0]["content"])) if i != 1 else None for i, c in enumerate(completions)]

    logged: dict[str, float] = {}
    completions = with_call + without
    wrapped = reward_by_tool_call(length_reward)
    rewards = wrapped(prompts=[None] * 12, completions=completions, log_metric=logged.__setitem__)
    assert rewards == length_reward(completions) and wrapped.__name__ == "length_reward"
    scored = [len(c[0]["content"]) for i, c in enumerate(with_call) if i != 1]
    assert logged["rewards/length_reward/with_tool_call"] == pytest.approx(sum(scored) / 5)
    assert logged["rewards/length_reward/without_tool_call"] == pytest.approx(
        sum(len(c[0]["content"]) for c in without) / 6
    )

    async def async_reward(completions, **kwargs):
        return [0.0] * len(completions)

    with pytest.raises(TypeError, match="synchronous"):
        reward_by_tool_call(async_reward)
