"""``agent-obs demo --rl``: a tiny Qwen2 policy learns the tool-call format by SFT, then GRPO, on CPU.

The SFT phase trains on the project's sample trajectories (each assistant turn after the message
before it, short sequences for the CPU); the GRPO phase samples first turns for the sample tasks
and rewards a well-formed ``<function=NAME>...</function>`` call of one of the sample's tools.
``GRPOObsCallback`` reports entropy per token class on the policy's own completions; the table
at the end compares the first and last GRPO steps, then TRL's own ``entropy`` and the reward
(with vs without a tool call) per step.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from pathlib import Path
from typing import Any

from agent_obs.integrations.transformers.grpo_rewards import completion_text

VOCAB_SIZE = 2048
TOOLS = ("bash", "str_replace_editor", "find_file", "submit")
WELL_FORMED = re.compile(r"<function=([a-z_]+)>\n(?:<parameter=[a-z_]+>.*?</parameter>\n)*</function>", re.DOTALL)
TABLE_STATS = (
    ("entropy", "entropy"),
    ("sampled_perplexity", "sampled ppl"),
    ("top1_prob", "top-1"),
    ("sampled_argmax_rate", "argmax rate"),
    ("tokens", "tokens"),
)


def tool_call_reward(completions: list, **kwargs: Any) -> list[float]:
    """1 for a completion with a well-formed call of an offered tool, 0.5 for another well-formed call, else 0."""
    rewards = []
    for completion in completions:
        match = WELL_FORMED.search(completion_text(completion))
        rewards.append(0.0 if match is None else 1.0 if match[1] in TOOLS else 0.5)
    return rewards


def load_conversations(split: str = "train") -> list[list[dict]]:
    """The sample conversations shipped with the package."""
    from agent_obs.integrations.torchtune.demo import DATA_DIR

    path = DATA_DIR / f"agent_sft_{split}.jsonl"
    return [json.loads(line)["messages"] for line in path.open(encoding="utf-8")]


def sft_examples(conversations: list[list[dict]]) -> list[dict]:
    """One example per assistant turn: the message before it and the turn (short sequences, fast on CPU)."""
    return [
        {"messages": [conv[i - 1], conv[i]]}
        for conv in conversations
        for i in range(2, len(conv))
        if conv[i]["role"] == "assistant"
    ]


def grpo_prompts(conversations: list[list[dict]]) -> list[dict]:
    """The task of each conversation: the policy writes the first assistant turn."""
    return [{"prompt": [conv[1]]} for conv in conversations]


def build_tokenizer(out_dir: Path):
    """The demo BPE (Qwen2.5 special tokens, ChatML template) trained on the sample conversations."""
    from agent_obs.integrations.torchtune.assets import CHATML_TEMPLATE, build_bpe_tokenizer
    from agent_obs.integrations.torchtune.demo import sample_files, sample_texts
    from transformers import PreTrainedTokenizerFast

    files = build_bpe_tokenizer(sample_texts(sample_files()), out_dir, vocab_size=VOCAB_SIZE)
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(files.tokenizer_json), eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def build_policy(tok, seed: int = 0):
    """A tiny random-init Qwen2ForCausalLM for ``tok``."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.Qwen2Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return transformers.Qwen2ForCausalLM(config)


def _common_args(out_dir: Path, steps: int, seed: int) -> dict:
    return dict(
        output_dir=str(out_dir),
        max_steps=steps,
        lr_scheduler_type="constant",
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=seed,
    )


def run_sft(model, tok, out_dir: Path, steps: int, seed: int = 0) -> dict:
    """SFT steps with the agent collator and ``AgentObsCallback``; the last log with agent-obs keys."""
    import datasets
    import transformers
    from agent_obs.integrations.transformers import AgentChatCollator, AgentObsCallback

    args = transformers.TrainingArguments(
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        logging_steps=max(1, steps // 5),
        remove_unused_columns=False,
        **_common_args(out_dir / "sft", steps, seed),
    )
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(sft_examples(load_conversations())),
        data_collator=AgentChatCollator(tok, max_length=256),
    )
    trainer.remove_callback(transformers.PrinterCallback)  # the demo prints its own summary
    callback = AgentObsCallback.install(trainer)
    trainer.train()
    callback.detach()
    return next(h for h in reversed(trainer.state.log_history) if "train_entropy" in h)


def run_grpo(model, tok, out_dir: Path, steps: int, *, exporters=(), seed: int = 0, **config):
    """GRPO steps with ``tool_call_reward`` and ``GRPOObsCallback``; ``config`` overrides the GRPOConfig."""
    import datasets
    import transformers
    import trl
    from agent_obs.integrations.transformers import GRPOObsCallback, reward_by_tool_call

    settings = dict(
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=48,
        gradient_checkpointing=False,  # TRL's default re-runs the layers in backward: slower on a tiny model
        learning_rate=1e-3,
        logging_steps=1,
        bf16=False,
        **_common_args(out_dir / "grpo", steps, seed),
    )
    trainer = trl.GRPOTrainer(
        model=model,
        reward_funcs=reward_by_tool_call(tool_call_reward),  # also logs the reward with vs without a call
        args=trl.GRPOConfig(**(settings | config)),
        train_dataset=datasets.Dataset.from_list(grpo_prompts(load_conversations())),
        processing_class=tok,
    )
    trainer.remove_callback(transformers.PrinterCallback)
    GRPOObsCallback.install(trainer, exporters=exporters)
    trainer.train()
    return trainer


def format_table(logs: list[dict]) -> str:
    """Class (all/reasoning/tool_call/each tool) x first/last GRPO step; TRL's entropy and the reward per step."""
    first, last = logs[0], logs[-1]
    tools = sorted(
        {k[len("train_tool_call.") : -len("_entropy")] for log in (first, last) for k in log if _is_tool_entropy(k)}
    )
    groups = [("all", ""), ("reasoning", "reasoning_"), ("tool_call", "tool_call_")]
    groups += [(f"  {t}", f"tool_call.{t}_") for t in tools]
    header = f"{'step':<6}{'class':<22}" + "".join(f"{label:>13}" for _, label in TABLE_STATS)
    lines = [header, "-" * len(header)]
    for log in (first, last):
        for name, prefix in groups:
            cells = [_cell(log.get(f"train_{prefix}{stat}"), stat) for stat, _ in TABLE_STATS]
            lines.append(f"{log['step']:<6}{name[:21]:<22}" + "".join(cells))
    sides = [f"rewards/tool_call_reward/{side}_tool_call" for side in ("with", "without")]
    lines += ["", f"{'step':<6}{'TRL entropy':>12}{'train_entropy':>15}{'reward':>9}{'with call':>11}{'without':>9}"]
    for h in logs:
        with_call, without = (_cell(h.get(key), "reward", width=w) for key, w in zip(sides, (11, 9), strict=True))
        lines.append(
            f"{h['step']:<6}{h['entropy']:>12.4f}{h['train_entropy']:>15.4f}{h['reward']:>9.3f}{with_call}{without}"
        )
    return "\n".join(lines)


def _is_tool_entropy(key: str) -> bool:
    return key.startswith("train_tool_call.") and key.endswith("_entropy")


def _cell(value: float | None, stat: str, width: int = 13) -> str:
    if value is None or not math.isfinite(value):
        return "-".rjust(width)
    return f"{int(value):>{width}d}" if stat == "tokens" else f"{value:>{width}.4f}"


def main(args) -> int:
    """SFT then GRPO on CPU; prints the per-class table and saves the policy, logs and metrics under the cache."""
    from agent_obs.exporters.jsonl import JsonlExporter

    t0 = time.perf_counter()
    out = Path(args.cache_dir).resolve() / "rl"
    shutil.rmtree(out, ignore_errors=True)
    tok = build_tokenizer(out / "tokenizer")
    model = build_policy(tok)
    print(f"SFT: {args.sft_steps} steps on the sample trajectories", flush=True)
    sft = run_sft(model, tok, out, args.sft_steps)
    print(
        f"  entropy after SFT: all {sft['train_entropy']:.3f}, "
        f"reasoning {sft.get('train_reasoning_entropy', math.nan):.3f}, "
        f"tool_call {sft.get('train_tool_call_entropy', math.nan):.3f} ({time.perf_counter() - t0:.0f}s)",
        flush=True,
    )
    print(f"GRPO: {args.grpo_steps} steps, reward = a well-formed <function=...> call of an offered tool", flush=True)
    trainer = run_grpo(model, tok, out, args.grpo_steps, exporters=[JsonlExporter(out / "agent_obs.jsonl")])
    logs = [h for h in trainer.state.log_history if "train_entropy" in h]
    (out / "grpo_logs.json").write_text(json.dumps(trainer.state.log_history, indent=1), encoding="utf-8")
    trainer.save_model(str(out / "policy"))
    tok.save_pretrained(str(out / "policy"))
    print("\nGRPO completions per token class (first and last step)\n")
    print(format_table(logs))
    print(f"\npolicy, GRPO logs and agent-obs JSONL (split rl_train) in {out}")
    print(f"demo finished in {time.perf_counter() - t0:.0f}s")
    return 0
