"""Tensor parallelism: tokens counted once, DTensor logits observed exactly, replicas and vocab shards refused.

The unit test spawns 2 gloo ranks holding a TinyDecoder whose ``lm_head`` is ``ColwiseParallel``:
vocab-sharded ``DTensor`` logits (``use_local_output=False``), replicated plain logits
(torchtune's plan) and plain local vocab shards (refused). The slow test runs the torchtune recipe
with TP 2 on 2 ranks and DP 2 x TP 2 on 4 ranks and compares every logged metric with one process
on the same batches.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from metric_reference import assert_metrics_close, reference_metrics
from test_observer import VOCAB, TinyDecoder, make_batch

from agent_obs import attach

WORLD = 2
FP32_RTOL = 1e-5  # the observer's fp32 kernel against the float64 reference
REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "agent_sft_distributed.py"
TP_CONFIG = REPO / "recipes" / "configs" / "agent_sft_tp_tiny_cpu.yaml"


def _observe(model, process_group, tokens, labels, classes) -> tuple[dict | str, torch.Tensor | None]:
    """Metrics of one observed forward (or the error message) and the full logits the model produced."""
    obs = attach(model, process_group=process_group)
    try:
        with obs.observe(labels=labels, token_classes=classes):
            out = model(tokens)
        full = out.full_tensor() if hasattr(out, "full_tensor") else out
        return dict(obs.collect()), full.detach()
    except ValueError as exc:
        return str(exc), None
    finally:
        obs.detach()


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    torch.set_num_threads(1)
    os.environ["AGENT_OBS_COMPILE"] = "0"  # eager kernel: a fresh compile per rank costs more than this test
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("dp", "tp"))
        dp_group = mesh["dp"].get_group()
        tokens, labels, classes = make_batch(2, 12, seed=5)  # TP: every rank gets the same batch
        results = {}
        for name, style in (
            ("sharded", ColwiseParallel(use_local_output=False)),  # vocab-sharded DTensor logits (97 = 49 + 48)
            ("replicated", ColwiseParallel(output_layouts=Replicate())),  # torchtune's plan: plain full logits
            ("local_shard", ColwiseParallel()),  # plain tensors of this rank's vocab columns: cannot be scored
        ):
            torch.manual_seed(0)
            model = parallelize_module(TinyDecoder(), mesh["tp"], {"lm_head": style})
            results[name] = _observe(model, dp_group, tokens, labels, classes)
            results[f"{name}_default_group"] = _observe(model, None, tokens, labels, classes)[0]
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_tensor_parallel_logits_are_observed_exactly_and_counted_once(tmp_path):
    # spawn, not fork: forking a pytest process that already ran kernels / OpenMP threads can deadlock
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    tokens, labels, classes = make_batch(2, 12, seed=5)
    torch.manual_seed(0)
    with torch.no_grad():
        unsharded = TinyDecoder()(tokens)
    for name in ("sharded", "replicated"):
        for result in results:
            got, logits = result[name]
            assert isinstance(got, dict), got
            assert logits.shape == (2, 12, VOCAB)
            torch.testing.assert_close(logits, unsharded, rtol=1e-5, atol=1e-6)  # gathered in the right order
            want, _ = reference_metrics(logits, labels, classes)
            assert_metrics_close(got, want, rtol=FP32_RTOL)
            assert got["tokens"] == int(((labels != -100) & (classes != 0)).sum())  # once, not once per TP rank
        # the default group holds both TP ranks: refused, naming the fix and the config that works
        for result in results:
            message = result[f"{name}_default_group"]
            assert isinstance(message, str), f"{name}: tokens would be counted twice without an error"
            assert "count 2 times" in message and "process_group=device_mesh['dp'].get_group()" in message
            assert "agent_sft_tp_tiny_cpu.yaml" in message
    for result in results:  # a plain local vocab shard is refused, naming the layouts that work
        message = result["local_shard"][0]
        assert isinstance(message, str), "statistics of a vocab shard would be silently wrong"
        assert "returned 49 of the 97 vocabulary columns" in message or "returned 48 of the 97" in message
        assert "output_layouts=Replicate()" in message and "use_local_output=False" in message
        assert "agent_sft_tp_tiny_cpu.yaml" in message


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _recipe_run(out: Path, assets: Path, nproc: int, *overrides: str) -> dict[int, dict[str, float]]:
    """The TP config through torchrun on 127.0.0.1 with ``nproc`` ranks; the metric log by step."""
    from agent_obs.integrations.torchtune.demo import DATA_DIR

    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", str(RECIPE),
        "--config", str(TP_CONFIG), f"demo_dir={assets}", f"data_dir={DATA_DIR}", f"output_dir={out}", "epochs=1",
        "max_steps_per_epoch=2", "run_val_every_n_steps=2", "max_val_steps=null", "progress_lines=False",
        "agent_obs.prometheus_port=null", "agent_obs.jsonl_path=null", *overrides,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    by_step: dict[int, dict[str, float]] = {}
    (log,) = (out / "logs").glob("log_*.txt")
    for line in log.read_text().splitlines():
        head, _, body = line.partition(" | ")
        for item in body.split():
            key, _, value = item.rpartition(":")
            by_step.setdefault(int(head.split()[1]), {})[key] = float(value)
    return by_step


@pytest.mark.slow
def test_recipe_tp2_and_dp2_x_tp2_log_the_metrics_of_one_process(tmp_path):
    """Same batches per step: 1 process x 4 rows, TP 2 (dp 1) x 4 rows, DP 2 x TP 2 with 2 rows per dp rank."""
    from agent_obs.integrations.torchtune.demo import prepare_assets

    assets = prepare_assets(tmp_path / "assets")
    one = _recipe_run(tmp_path / "one", assets, 1, "tensor_parallel_dim=1", "batch_size=4", "batch_size_val=4")
    runs = {
        "tp2": _recipe_run(tmp_path / "tp2", assets, 2, "batch_size=4", "batch_size_val=4"),
        "dp2xtp2": _recipe_run(tmp_path / "dp2xtp2", assets, 4, "batch_size=2", "batch_size_val=2"),
    }
    assert sorted(one) == [1, 2] and "val_tokens" in one[2] and "train_tool_call.bash_tokens" in one[1]
    for name, log in runs.items():
        assert sorted(log) == sorted(one), name
        for step, want in one.items():
            got = log[step]
            assert set(got) == set(want), (name, step, set(got) ^ set(want))
            for key, value in want.items():
                if key.endswith("tokens"):  # counted once, not once per TP rank
                    assert got[key] == value, (name, step, key)
                elif key != "tokens_per_second_per_gpu":
                    # TP splits the matmuls (fp32 partial sums in another order): agree to fp32 roundoff
                    assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-9), (name, step, key)


def test_tp_config_plan_covers_every_layer_of_its_model():
    """parallelize_module only warns on a plan key that matches nothing: check the plan against the model."""
    from fnmatch import fnmatch

    from omegaconf import OmegaConf
    from torchtune import config

    cfg = OmegaConf.load(TP_CONFIG)
    plan = config.instantiate(cfg.tensor_parallel_plan)
    with torch.device("meta"):
        model = config.instantiate(cfg.model)
    names = [name for name, _ in model.named_modules()]
    for key in plan:
        assert any(fnmatch(name, key) for name in names), f"plan key {key!r} matches no module of {cfg.model}"
    assert "output" in plan  # the observer's projection is parallel: its DTensor input reveals the TP group
    tp = cfg.tensor_parallel_dim
    assert tp == 2 and cfg.model.num_heads % tp == 0 and cfg.model.num_kv_heads % tp == 0
    assert cfg.clip_grad_norm is None  # TP alone (no FSDP) mixes DTensor and plain grads in clip_grad_norm_
