"""The agent_sft_distributed recipe end to end: 2 gloo ranks on CPU via `agent-obs run`, the tiny checkpoint."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc: int, config: str, *overrides: str, ok: bool = True) -> subprocess.CompletedProcess:
    """Run the recipe file with torchrun, its rendezvous on 127.0.0.1 only; assert the exit status."""
    from agent_obs.launch import recipe_path, resolve_config

    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}",
        str(recipe_path()), "--config", str(resolve_config(config)), *overrides,
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=400, env={**os.environ, "MASTER_ADDR": "127.0.0.1"}
    )
    assert (proc.returncode == 0) == ok, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _disk_log(logs: Path) -> dict[int, dict[str, float]]:
    """A torchtune DiskLogger file, or a folder of them (one per run, oldest first, merged), by step."""
    by_step: dict[int, dict[str, float]] = {}
    for log in [logs] if logs.is_file() else sorted(logs.glob("log_*.txt")):
        for line in log.read_text().splitlines():
            head, _, body = line.partition(" | ")
            step = int(head.split()[1])
            for item in body.split():
                key, _, value = item.rpartition(":")
                by_step.setdefault(step, {})[key] = float(value)
    return by_step


def _run(tmp: Path, assets: Path, *overrides: str) -> dict[int, dict[str, float]]:
    """Run the tiny config with 2 ranks; return the metric log by step."""
    _torchrun(
        2, "agent_sft_tiny_cpu", f"demo_dir={assets}", f"data_dir={DATA_DIR}", f"output_dir={tmp}", "epochs=1",
        "progress_lines=False", *overrides,
    )  # fmt: skip
    return _disk_log(tmp / "logs")


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

    cmd = launch_command(2, "agent_sft_tiny_cpu", ["epochs=1"], rdzv_port=29555)
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--standalone" not in cmd  # its store listens everywhere
    assert cmd[3:13] == [
        "--nnodes", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:29555", "--local-addr", "127.0.0.1",
        "--nproc_per_node", "2",
    ]  # fmt: skip
    assert cmd[13] == str(recipe_path()) and Path(cmd[15]).name == "agent_sft_tiny_cpu.yaml" and cmd[-1] == "epochs=1"
    host, port = launch_command(1, "agent_sft_tiny_cpu")[8].split(":")
    assert host == "127.0.0.1" and 0 < int(port) < 65536  # a free loopback port by default
    with pytest.raises(
        FileNotFoundError,
        match="agent_sft_distributed, agent_sft_seed_tiny_cpu, agent_sft_tiny_cpu, agent_sft_tp_tiny_cpu",
    ):
        launch_command(1, "no_such_config")


@pytest.mark.parametrize("name", ["agent_sft_distributed", "agent_sft_tiny_cpu", "agent_sft_seed_tiny_cpu"])
def test_config_components_resolve_and_agent_keys_are_set(name):
    from agent_obs.integrations.torchtune.seed_config import project_component
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
        elif isinstance(node, list):  # agent_obs.exporters
            for value in node:
                walk(value)

    walk(OmegaConf.to_container(cfg, resolve=False))
    assert len(components) >= 8
    for path in [*components, cfg.get("collate_fn", "torchtune.data.padded_collate_sft")]:
        _get_component_from_path(project_component(path))  # the seed's torchtune.* paths map to agent-obs
    for key in ("enable_detailed_metrics", "enable_token_classification", "entropy_k"):
        assert key in cfg
    assert cfg.get("batch_size_val", cfg.batch_size) <= cfg.batch_size
    for exporter in OmegaConf.select(cfg, "agent_obs.exporters", default=None) or []:  # loopback only
        assert exporter.get("host", "127.0.0.1") == "127.0.0.1", exporter
    if name == "agent_sft_distributed":  # the 32B config follows the seed and says what memory it needs
        assert cfg.tokenizer.max_seq_len == 32768 and cfg.model._component_.endswith("qwen2_5_32b_instruct")
        assert "# Memory" in resolve_config(name).read_text(encoding="utf-8")


SEED_ALIAS_LINE = "the design document's component paths resolve to this project's classes"
NO_CLASSES_WARNING = "enable_token_classification is True but a batch arrived without token_classes"


@pytest.mark.slow
def test_seed_yaml_as_printed_runs_and_logs_all_36_train_and_val_keys(tmp_path, assets):
    """The design document's config block (paths and model swapped only): aliases, collate, end-of-epoch val."""
    from omegaconf import OmegaConf

    from agent_obs.launch import resolve_config

    cfg = OmegaConf.load(resolve_config("agent_sft_seed_tiny_cpu"))
    assert cfg.dataset._component_ == "torchtune.datasets.AgentSFTDataset"  # as printed in the seed
    assert cfg.dataset.message_transform._component_ == "torchtune.data.JSONToMessages"
    assert OmegaConf.to_container(cfg.dataset.message_transform.column_map) == {"messages": "messages"}
    assert "collate_fn" not in cfg and "run_val_every_n_steps" not in cfg and "max_val_steps" not in cfg
    assert (cfg.entropy_k, cfg.log_detailed_metrics_every_n_steps, cfg.tokenizer.max_seq_len) == (10, 10, 32768)

    proc = _torchrun(
        2, "agent_sft_seed_tiny_cpu", f"demo_dir={assets}", f"data_dir={DATA_DIR}", f"output_dir={tmp_path}"
    )
    out = proc.stdout + proc.stderr
    assert out.count(SEED_ALIAS_LINE) == 1, out[-3000:]
    assert "torchtune.datasets.AgentSFTDataset -> agent_obs.integrations.torchtune.dataset.AgentSFTDataset" in out
    assert "use agent_obs.integrations.torchtune.collate.padded_collate_agent_sft" in out
    assert NO_CLASSES_WARNING not in out
    log = _disk_log(tmp_path / "logs")
    steps = sorted(log)  # 32 rows / 2 ranks / batch 1 = 16 steps; detailed train metrics every 10; val at epoch end
    assert steps == list(range(1, 17))
    stats = ("entropy", "perplexity", "top1_prob", "top2_prob", "top5_prob", "top10_prob")
    keys = [f"{split}_{group}{stat}" for split in ("train", "val") for group in GROUPS for stat in stats]
    assert len(keys) == 36
    logged = {**log[10], **log[16]}
    for key in keys:
        assert key in logged and math.isfinite(logged[key]), key
    assert not any(k.startswith("val_") for k in log[10]) and not any(k.startswith("train_") for k in log[16])
    assert logged["val_tokens"] == logged["val_reasoning_tokens"] + logged["val_tool_call_tokens"]


def _val_rows(n: int, out: Path) -> Path:
    """The first ``n`` conversations of the sample val set as their own file."""
    lines = (DATA_DIR / "agent_sft_val.jsonl").read_text(encoding="utf-8").splitlines()[:n]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def _val_overrides(run: Path, assets: Path, val_file: Path) -> list[str]:
    return [
        f"demo_dir={assets}", f"data_dir={DATA_DIR}", f"output_dir={run}", f"agent_obs.jsonl_path={run}/m.jsonl",
        "agent_obs.prometheus_port=0", "progress_lines=False", "epochs=2", "max_steps_per_epoch=1",
        "run_val_every_n_steps=null", "max_val_steps=null", f"dataset_val.data_files={val_file}",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def two_epoch_run(tmp_path_factory, assets) -> tuple[Path, Path]:
    """2 gloo ranks, 2 epochs of 1 step, a 5-row val set (rank 0 gets 3 rows, rank 1 gets 2), val at epoch ends."""
    tmp = tmp_path_factory.mktemp("two_epoch")
    val_file = _val_rows(5, tmp / "val5.jsonl")
    _torchrun(2, "agent_sft_tiny_cpu", *_val_overrides(tmp / "run", assets, val_file))
    return tmp / "run", val_file


def _records(jsonl: Path) -> list[dict]:
    return [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]


@pytest.mark.slow
def test_validation_counts_every_val_row_once_across_two_ranks_like_one_process(two_epoch_run, assets):
    """Val at the end of each epoch over the whole file; the 2-rank metrics equal a float64 one-process reference."""
    from agent_obs.integrations.torchtune.dataset import AgentSFTDataset
    from agent_obs.integrations.torchtune.messages import JSONToMessages
    from metric_reference import reference_metrics
    from torchtune.data import CROSS_ENTROPY_IGNORE_IDX
    from torchtune.models.qwen2_5 import qwen2_5_tokenizer

    run, val_file = two_epoch_run
    log = _disk_log(run / "logs")
    assert sorted(log) == [1, 2] and all("val_loss" in log[s] for s in (1, 2))  # no run_val_every_n_steps

    # one process: the epoch_0 weights (validated at step 1, before the checkpoint) over every val row
    tok_dir = assets / "tokenizer"
    tok = qwen2_5_tokenizer(
        path=str(tok_dir / "vocab.json"), merges_file=str(tok_dir / "merges.txt"),
        special_tokens_path=str(tok_dir / "tokenizer.json"), max_seq_len=1024,
    )  # fmt: skip
    ds = AgentSFTDataset(tok, source="json", data_files=str(val_file), message_transform=JSONToMessages())
    files = sorted(p.name for p in (run / "epoch_0").glob("*.safetensors"))
    model = _load(run / "epoch_0", files, run.parent / "reload", TinyQwen2Config()).eval()
    logits, labels, classes, args, per_row = [], [], [], [], {}
    with torch.no_grad():
        for i in range(len(ds)):
            row = ds[i]
            logits.append(model(torch.tensor([row["tokens"]]))[0])
            labels.append(torch.tensor([*row["labels"][1:], CROSS_ENTROPY_IGNORE_IDX]))
            classes.append(torch.tensor([*row["token_classes"][1:], 0]))
            args.append(torch.tensor([*row["tool_args"][1:], 0]))
            per_row[row["sample_id"]] = reference_metrics(logits[-1], labels[-1], classes[-1])[0]
    logits, labels, classes, args = torch.cat(logits), torch.cat(labels), torch.cat(classes), torch.cat(args)
    want, _ = reference_metrics(logits, labels, classes, tool_args=args)
    loss_tokens = labels != CROSS_ENTROPY_IGNORE_IDX
    want_loss = torch.nn.functional.cross_entropy(logits[loss_tokens].double(), labels[loss_tokens]).item()

    (val,) = [r for r in _records(run / "m.jsonl") if r["split"] == "val" and r["step"] == 1]
    assert val["tokens"] == want["tokens"]  # every row exactly once: none dropped, none repeated
    assert log[1]["val_tokens"] == want["tokens"]
    for key, value in want.items():
        assert val[key] == pytest.approx(value, rel=2e-5, abs=1e-7), key
    assert log[1]["val_loss"] == pytest.approx(want_loss, rel=1e-5)

    # tool-call anatomy: syntax + args == tool_call tokens, train and val, in the metric logger's keys
    for split in ("train", "val"):
        values = log[1]
        for part in ("tool_syntax_", "tool_args_"):
            for stat in ("entropy", "accuracy", "perplexity"):
                assert math.isfinite(values[f"{split}_{part}{stat}"]), f"{split}_{part}{stat}"
        tokens = values[f"{split}_tool_syntax_tokens"] + values[f"{split}_tool_args_tokens"]
        assert values[f"{split}_tool_args_tokens"] > 0 and tokens == values[f"{split}_tool_call_tokens"]
    # the hardest samples: every val row, named by its file and line, each mean NLL as one process computes it
    assert sorted(per_row) == [f"{val_file.name}:{line}" for line in range(1, 6)]
    assert {s["id"] for s in val["samples"]} == set(per_row)
    assert [s["nll"] for s in val["samples"]] == sorted((s["nll"] for s in val["samples"]), reverse=True)
    for sample in val["samples"]:
        ref = per_row[sample["id"]]
        assert sample["tokens"] == ref["tokens"], sample["id"]
        for key in ("nll", "tool_call_nll", "reasoning_nll"):
            assert sample[key] == pytest.approx(math.log(ref[key.replace("nll", "perplexity")]), rel=2e-5), key


@pytest.mark.slow
def test_demo_summary_shows_syntax_vs_args_rows_and_the_hardest_val_trajectories(two_epoch_run):
    """The demo's closing summary, from the JSONL the recipe wrote: tool_syntax/tool_args rows, the hardest table."""
    from agent_obs.integrations.torchtune.demo import HARDEST_SHOWN, format_samples, format_table, last_records

    run, val_file = two_epoch_run
    records = last_records(run / "m.jsonl")
    table = format_table(records).splitlines()
    for split in ("train", "val"):
        for group in ("tool_syntax", "tool_args"):
            (row,) = [line for line in table if line.split()[:2] == [split, group]]
            assert int(row.split()[-1]) == records[split][f"{group}_tokens"]
    samples = records["val"]["samples"]
    lines = format_samples(records["val"]).splitlines()
    assert lines[0].split() == ["id", "tokens", "mean", "NLL", "tool-call", "NLL", "outlier"]
    assert len(lines) == 2 + min(HARDEST_SHOWN, len(samples))
    for line, sample in zip(lines[2:], samples, strict=False):  # hardest first, as collected
        cells = line.split()
        assert cells[0] == sample["id"] and cells[0].startswith(f"{val_file.name}:")
        assert (int(cells[1]), float(cells[2]), float(cells[3])) == (
            sample["tokens"], pytest.approx(sample["nll"], abs=5e-5), pytest.approx(sample["tool_call_nll"], abs=5e-5)
        )  # fmt: skip
        assert cells[4] == ("yes" if sample["outlier"] else "no")
    assert format_samples({"split": "val"}) == ""


@pytest.mark.slow
def test_resume_from_the_written_checkpoint_continues_steps_and_never_repeats_a_logged_step(
    two_epoch_run, assets, tmp_path
):
    """resume_from_checkpoint=True alone: step 2 is trained again from epoch_0 (same loss) and logged once."""
    src, val_file = two_epoch_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    before = _records(run / "m.jsonl")
    assert [(r["step"], r["split"]) for r in before] == [(1, "train"), (1, "val"), (2, "train"), (2, "val")]
    first = _disk_log(run / "logs")
    assert sorted(first) == [1, 2]

    proc = _torchrun(
        2, "agent_sft_tiny_cpu", *_val_overrides(run, assets, val_file), "resume_from_checkpoint=True",
        "collate_fn=torchtune.data.padded_collate_sft",  # drops token_classes: one warning names cause and fix
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert "epoch_0/model-00001-of-00001.safetensors" in out  # the recipe state is from the end of epoch 0
    assert out.count(NO_CLASSES_WARNING) == 1 and "padded_collate_agent_sft" in out.split(NO_CLASSES_WARNING)[1]

    _, new_log = sorted((run / "logs").glob("log_*.txt"))  # torchtune's DiskLogger: a file per run
    again = _disk_log(new_log)
    assert sorted(again) == [2]  # numbering continues after the checkpoint's step 1
    after = _records(run / "m.jsonl")
    assert [(r["step"], r["split"]) for r in after] == [(1, "train"), (1, "val"), (2, "train"), (2, "val")]
    assert after[:2] == before[:2] and after[2]["time"] > before[3]["time"]
    again = again[2]
    assert again["loss"] == pytest.approx(first[2]["loss"], rel=1e-6)  # weights and optimizer state restored
    assert again["val_loss"] == pytest.approx(first[2]["val_loss"], rel=1e-6)
    assert "val_reasoning_entropy" not in again  # no classes in the resumed run: overall metrics only


@pytest.mark.slow
def test_missing_val_file_error_names_dataset_val_data_files(tmp_path, assets):
    missing = tmp_path / "nope" / "val.jsonl"
    proc = _torchrun(
        1, "agent_sft_tiny_cpu", f"demo_dir={assets}", f"data_dir={DATA_DIR}", f"output_dir={tmp_path}",
        "agent_obs.prometheus_port=null", f"dataset_val.data_files={missing}", ok=False,
    )  # fmt: skip
    assert f"dataset_val.data_files: {missing}: no such data file" in proc.stdout + proc.stderr
