"""The agent_sft_distributed recipe end to end: 2 gloo ranks on CPU via `agent-obs run`, the tiny checkpoint."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from agent_obs.integrations.torchtune.checkpoint import INIT_STD, TinyQwen2Config, build_tiny_qwen2_checkpoint
from agent_obs.integrations.torchtune.demo import DATA_DIR, prepare_assets
from torchtune.models.qwen2 import qwen2
from torchtune.training import FullModelHFCheckpointer

STATS = ("entropy", "perplexity", "top1_prob", "top2_prob", "top5_prob", "top10_prob", "accuracy", "tokens")
GROUPS = ("", "reasoning_", "tool_call_")
TOOLS = ("bash", "str_replace_editor", "submit")


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    return prepare_assets(tmp_path_factory.mktemp("demo_assets"))


def _load(checkpoint_dir: Path, files: list[str], out: Path, cfg: TinyQwen2Config) -> torch.nn.Module:
    ckpt = FullModelHFCheckpointer(
        checkpoint_dir=str(checkpoint_dir), checkpoint_files=files, model_type="QWEN2", output_dir=str(out)
    )
    model = qwen2(**cfg.__dict__)
    model.load_state_dict(ckpt.load_checkpoint()["model"], strict=True)
    return model


def test_tiny_checkpoint_loads_in_torchtune_and_starts_near_uniform(tmp_path):
    cfg = TinyQwen2Config()
    build_tiny_qwen2_checkpoint(tmp_path / "model", cfg, seed=3)
    model = _load(tmp_path / "model", ["model.safetensors"], tmp_path / "out", cfg)
    emb = model.tok_embeddings.weight.detach().double()
    assert abs(emb.std().item() - INIT_STD) < 0.002
    tokens = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(tokens)
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, cfg.vocab_size).double(), tokens[:, 1:].reshape(-1)
    )
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.05  # std 0.02: near-uniform start, not a loss of ~58


def _run(tmp: Path, assets: Path, *overrides: str) -> dict[int, dict[str, float]]:
    """Launch the tiny config with 2 ranks through `agent-obs run`; return the metric log by step."""
    cmd = [
        sys.executable, "-m", "agent_obs.cli", "run", "--nproc-per-node", "2", "--config", "agent_sft_tiny_cpu",
        f"demo_dir={assets}", f"data_dir={DATA_DIR}", f"output_dir={tmp}", "epochs=1", "progress_lines=False",
        *overrides,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    by_step: dict[int, dict[str, float]] = {}
    (log,) = (tmp / "logs").glob("log_*.txt")
    for line in log.read_text().splitlines():
        head, _, body = line.partition(" | ")
        step = int(head.split()[1])
        for item in body.split():
            key, _, value = item.rpartition(":")
            by_step.setdefault(step, {})[key] = float(value)
    return by_step


@pytest.mark.slow
def test_two_rank_cpu_run_logs_every_metric_for_train_and_val_and_saves_a_reloadable_checkpoint(tmp_path, assets):
    jsonl = tmp_path / "metrics.jsonl"
    log = _run(
        tmp_path, assets, "max_steps_per_epoch=4", "run_val_every_n_steps=2", "max_val_steps=1",
        "log_detailed_metrics_every_n_steps=1", "agent_obs.prometheus_port=0", f"agent_obs.jsonl_path={jsonl}",
        "agent_obs.otlp_endpoint=http://127.0.0.1:9/v1/metrics",  # nothing listens: exporters must not stop training
    )  # fmt: skip
    assert sorted(log) == [1, 2, 3, 4]
    for step, values in log.items():
        splits = ("train", "val") if step % 2 == 0 else ("train",)
        for split in splits:
            for group in GROUPS:
                for stat in STATS:
                    key = f"{split}_{group}{stat}"
                    assert key in values and math.isfinite(values[key]), f"step {step}: {key} missing or not finite"
            assert (
                values[f"{split}_tokens"] >= values[f"{split}_reasoning_tokens"] + values[f"{split}_tool_call_tokens"]
            )
        assert "loss" in values and (step % 2 or "val_loss" in values)
    tool_keys = {k for v in log.values() for k in v if k.startswith("train_tool_call.")}
    for tool in TOOLS:  # per-tool metrics from the <function=NAME> blocks
        assert f"train_tool_call.{tool}_entropy" in tool_keys, sorted(tool_keys)

    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["split"] for r in records].count("val") == 2 and [r["split"] for r in records].count("train") == 4
    assert records[-1]["perplexity"] == pytest.approx(log[4]["val_perplexity"], rel=1e-9)

    files = sorted(p.name for p in (tmp_path / "epoch_0").glob("*.safetensors"))
    assert files, "no checkpoint written at the end of the epoch"
    cfg = TinyQwen2Config()
    trained = _load(tmp_path / "epoch_0", files, tmp_path / "reload", cfg)
    start = _load(assets / "model", ["model.safetensors"], tmp_path / "reload0", cfg)
    assert not torch.equal(trained.output.weight, start.output.weight)  # it trained, and the result reloads


@pytest.mark.slow
def test_observer_overall_nll_equals_the_logged_loss(tmp_path, assets):
    """With classification off the observer covers exactly the loss tokens: log(perplexity) == loss, every step."""
    log = _run(
        tmp_path, assets, "max_steps_per_epoch=3", "gradient_accumulation_steps=2", "enable_token_classification=False",
        "log_detailed_metrics_every_n_steps=1", "run_val_every_n_steps=null", "agent_obs.prometheus_port=null",
        "agent_obs.jsonl_path=null",
    )  # fmt: skip
    assert sorted(log) == [1, 2, 3]
    for step, values in log.items():
        assert "train_reasoning_entropy" not in values
        assert math.log(values["train_perplexity"]) == pytest.approx(values["loss"], rel=1e-5), step


def test_launch_command_runs_the_recipe_file_with_torchrun_and_names_known_configs():
    from agent_obs.launch import launch_command
    from agent_obs.resources import recipe_path

    cmd = launch_command(2, "agent_sft_tiny_cpu", ["epochs=1"])
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    assert cmd[6] == str(recipe_path()) and Path(cmd[8]).name == "agent_sft_tiny_cpu.yaml" and cmd[-1] == "epochs=1"
    with pytest.raises(FileNotFoundError, match="agent_sft_distributed, agent_sft_tiny_cpu"):
        launch_command(1, "no_such_config")


@pytest.mark.parametrize("name", ["agent_sft_distributed", "agent_sft_tiny_cpu"])
def test_config_components_resolve_and_agent_keys_are_set(name):
    from omegaconf import OmegaConf
    from torchtune.config._utils import _get_component_from_path

    from agent_obs.launch import resolve_config

    cfg = OmegaConf.load(resolve_config(name))
    components = []

    def walk(node):
        if isinstance(node, dict):
            components.extend([node["_component_"]] if "_component_" in node else [])
            for value in node.values():
                walk(value)

    walk(OmegaConf.to_container(cfg, resolve=False))
    assert len(components) >= 8
    for path in [*components, cfg.collate_fn]:
        _get_component_from_path(path)
    for key in ("enable_detailed_metrics", "enable_token_classification", "entropy_k", "run_val_every_n_steps"):
        assert key in cfg
    assert cfg.batch_size_val <= cfg.batch_size
    assert cfg.agent_obs.prometheus_host == "127.0.0.1"
