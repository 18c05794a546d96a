"""The recipe's helpers: exact val sharding, resume file lookup, JSONL truncation, the seed's component paths,
the ``agent_obs:`` config node, the observe block, and the recipe's diff against torchtune's."""

from __future__ import annotations

import difflib
import json
import logging
import socket
from pathlib import Path

import pytest
import torch
from agent_obs.integrations.torchtune.collate import AGENT_COLLATE, TORCHTUNE_COLLATE, default_collate
from agent_obs.integrations.torchtune.observer_config import (
    JSONL,
    OTEL,
    PROMETHEUS,
    build_exporters,
    observer_settings,
    topk_from_entropy_k,
)
from agent_obs.integrations.torchtune.recipe_hooks import Extras, observe_block, pop_extras
from agent_obs.integrations.torchtune.resume import resume_checkpoint_files, truncate_jsonl
from agent_obs.integrations.torchtune.sampler import ShardSampler
from agent_obs.integrations.torchtune.seed_config import resolve_seed_components
from omegaconf import OmegaConf
from torchtune.config._utils import _get_component_from_path

from agent_obs import TokenClass, attach
from agent_obs.exporters.jsonl import JsonlExporter
from agent_obs.exporters.prometheus import PortInUseError, PrometheusExporter
from agent_obs.resources import recipe_path


@pytest.mark.parametrize(("rows", "ranks"), [(5, 2), (7, 3), (2, 4), (0, 2), (8, 1)])
def test_shard_sampler_gives_every_row_exactly_once_without_padding(rows, ranks):
    shards = [list(ShardSampler(rows, num_replicas=ranks, rank=r)) for r in range(ranks)]
    assert sorted(i for shard in shards for i in shard) == list(range(rows))
    assert [len(ShardSampler(rows, num_replicas=ranks, rank=r)) for r in range(ranks)] == [len(s) for s in shards]
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_shard_sampler_rejects_a_rank_outside_the_group():
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\)"):
        ShardSampler(4, num_replicas=2, rank=2)


def _write(path: Path, steps: list[tuple[int, str]], tail: bytes = b"") -> None:
    lines = [json.dumps({"step": s, "split": split, "time": 0.0, "entropy": 1.0}) for s, split in steps]
    path.write_bytes(("\n".join(lines) + "\n").encode() + tail)


def test_truncate_jsonl_cuts_after_the_step_in_place_and_an_open_exporter_appends_at_the_new_end(tmp_path):
    path = tmp_path / "m.jsonl"
    _write(path, [(1, "train"), (1, "val"), (2, "train"), (2, "val"), (3, "train")], tail=b'{"step": 4, "spl')
    exporter = JsonlExporter(path)  # opened for appending before the cut, as in the recipe
    try:
        assert truncate_jsonl(path, 1) == 4  # steps 2, 2, 3 and the torn line
        exporter.export({"entropy": 2.0}, step=2, split="train")
    finally:
        exporter.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in records] == [(1, "train"), (1, "val"), (2, "train")]
    assert records[-1]["entropy"] == 2.0


def test_truncate_jsonl_keeps_a_log_that_ends_at_the_step_and_ignores_a_missing_file(tmp_path):
    path = tmp_path / "m.jsonl"
    _write(path, [(1, "train"), (2, "train"), (2, "val")])
    before = path.read_bytes()
    assert truncate_jsonl(path, 2) == 0 and path.read_bytes() == before
    assert truncate_jsonl(tmp_path / "none.jsonl", 3) == 0


def test_resume_files_come_from_the_epoch_the_recipe_state_belongs_to(tmp_path):
    from torchtune import training

    (tmp_path / "recipe_state").mkdir()
    torch.save({training.EPOCHS_KEY: 2, training.SEED_KEY: 0}, tmp_path / "recipe_state" / "recipe_state.pt")
    for epoch in range(3):  # epoch_2 is the final save, which writes no recipe state
        (tmp_path / f"epoch_{epoch}").mkdir()
        for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "config.json"):
            (tmp_path / f"epoch_{epoch}" / name).write_bytes(b"")
    assert resume_checkpoint_files(tmp_path) == [
        "epoch_1/model-00001-of-00002.safetensors",
        "epoch_1/model-00002-of-00002.safetensors",
    ]


def test_resume_without_recipe_state_says_where_it_looked_and_why(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"recipe_state\.pt does not exist.*end of every epoch except the last"):
        resume_checkpoint_files(tmp_path)


def test_seed_component_paths_resolve_to_the_project_classes():
    cfg = OmegaConf.create(
        {
            "dataset": {
                "_component_": "torchtune.datasets.AgentSFTDataset",
                "message_transform": {"_component_": "torchtune.data.JSONToMessages"},
            },
            "dataset_val": [{"_component_": "torchtune.datasets.AgentSFTDataset"}],
            "model": {"_component_": "torchtune.models.qwen2.qwen2"},
        }
    )
    pairs = resolve_seed_components(cfg)
    assert [seed for seed, _ in pairs] == ["torchtune.datasets.AgentSFTDataset", "torchtune.data.JSONToMessages"]
    assert _get_component_from_path(cfg.dataset._component_).__name__ == "AgentSFTDataset"
    assert _get_component_from_path(cfg.dataset.message_transform._component_).__name__ == "JSONToMessages"
    assert cfg.dataset_val[0]._component_ == cfg.dataset._component_
    assert cfg.model._component_ == "torchtune.models.qwen2.qwen2"
    assert resolve_seed_components(cfg) == []  # nothing left to rewrite


def test_default_collate_follows_the_samples():
    assert default_collate({"tokens": [1], "labels": [1], "token_classes": [1]}) == AGENT_COLLATE
    assert default_collate({"tokens": [1], "labels": [1]}) == TORCHTUNE_COLLATE
    for path in (AGENT_COLLATE, TORCHTUNE_COLLATE):
        assert callable(_get_component_from_path(path))


MAX_CHANGED_LINES = 300


def _upstream_recipe() -> Path:
    """torchtune 0.6.1's full_finetune_distributed.py as installed (torchtune ships its recipes beside itself)."""
    import torchtune

    assert torchtune.__version__.split("+")[0] == "0.6.1", torchtune.__version__  # the release the recipe copies
    return Path(torchtune.__file__).parents[1] / "recipes" / "full_finetune_distributed.py"


def _marked_lines(lines: list[str]) -> set[int]:
    """Indices of lines that say ``agent-obs`` or sit inside an ``agent-obs: begin`` ... ``agent-obs: end`` block."""
    marked, inside = set(), False
    for i, line in enumerate(lines):
        inside = inside or "agent-obs: begin" in line
        if inside or "agent-obs" in line:
            marked.add(i)
        inside = inside and "agent-obs: end" not in line
    assert not inside, "an agent-obs: begin without its agent-obs: end"
    return marked


def test_recipe_is_upstream_torchtune_plus_marked_agent_obs_changes_only():
    upstream = _upstream_recipe().read_text(encoding="utf-8").splitlines()
    ours = recipe_path().read_text(encoding="utf-8").splitlines()
    marked = _marked_lines(ours)
    groups = [
        op for op in difflib.SequenceMatcher(a=upstream, b=ours, autojunk=False).get_opcodes() if op[0] != "equal"
    ]
    assert groups, "no agent-obs changes at all"
    changed = 0
    for _, i1, i2, j1, j2 in groups:
        added = [j for j in range(j1, j2) if ours[j].strip()]  # blank lines around a block may align either way
        where = f"upstream lines {i1 + 1}-{i2}, recipe lines {j1 + 1}-{j2}"
        assert added, f"{where}: upstream code removed with no marked agent-obs line in its place"
        unmarked = [f"{j + 1}: {ours[j]}" for j in added if j not in marked]
        assert not unmarked, f"{where}: changed lines without an agent-obs mark:\n" + "\n".join(unmarked)
        changed += (i2 - i1) + (j2 - j1)
    assert changed <= MAX_CHANGED_LINES, f"{changed} changed lines against upstream (aim: <= {MAX_CHANGED_LINES})"


def test_marked_lines_cover_blocks_and_single_lines_only():
    lines = ["a", "# agent-obs: begin", "b", "# agent-obs: end", "c", "d  # agent-obs", "e"]
    assert _marked_lines(lines) == {1, 2, 3, 5}


def _cfg(**top) -> OmegaConf:
    return OmegaConf.create({"output_dir": "/tmp/run", **top})


def test_the_seed_top_level_keys_map_onto_the_observer_settings():
    s = observer_settings(_cfg(entropy_k=5, log_detailed_metrics_every_n_steps=3, enable_detailed_metrics=True))
    assert (s.enabled, s.topk, s.every_n_steps, s.max_tools, s.max_in_flight, s.exporters) == (
        True, (1, 2, 5), 3, 16, 4, ()
    )  # fmt: skip
    assert topk_from_entropy_k(7) == (1, 2, 5, 7) and topk_from_entropy_k(1) == (1,)
    assert observer_settings(_cfg(enable_detailed_metrics=False)).enabled is False
    assert observer_settings(_cfg()).topk == (1, 2, 5, 10) and observer_settings(_cfg()).every_n_steps == 10
    with pytest.raises(ValueError, match="entropy_k must be >= 1"):
        observer_settings(_cfg(entropy_k=0))
    with pytest.raises(
        ValueError, match=r"log_detailed_metrics_every_n_steps \(agent_obs.every_n_steps\) must be >= 1"
    ):
        observer_settings(_cfg(log_detailed_metrics_every_n_steps=0))


def test_node_keys_win_over_the_seed_keys_and_a_disagreement_is_logged(caplog):
    node = {"topk": [1, 3], "every_n_steps": 4, "max_tools": 2, "max_in_flight": 8}
    with caplog.at_level(logging.WARNING):
        s = observer_settings(_cfg(entropy_k=10, log_detailed_metrics_every_n_steps=10, agent_obs=node))
    assert (s.topk, s.every_n_steps, s.max_tools, s.max_in_flight) == ((1, 3), 4, 2, 8)
    assert "agent_obs.topk=[1, 3] wins over entropy_k=10" in caplog.text
    assert "agent_obs.every_n_steps=4 wins over log_detailed_metrics_every_n_steps=10" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        observer_settings(_cfg(log_detailed_metrics_every_n_steps=4, agent_obs={"every_n_steps": 4}))
        observer_settings(_cfg(entropy_k=5, agent_obs={"topk": [1, 2, 5]}))
    assert "wins over" not in caplog.text  # the same value twice is no conflict
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['prometheus_prot'\]"):
        observer_settings(_cfg(agent_obs={"prometheus_prot": 9464}))


def _entries(cfg) -> list[dict]:
    return [spec.entry for spec in observer_settings(cfg).exporters]


def test_exporters_list_with_shorthand_keys_setting_adding_and_removing_entries():
    listed = {
        "run_name": "r1",
        "exporters": [
            {"_component_": PROMETHEUS, "port": 9464, "host": "127.0.0.1"},
            {"_component_": JSONL, "path": "${output_dir}/m.jsonl", "histograms": True},
        ],
    }
    assert _entries(_cfg(agent_obs=listed)) == [
        {"_component_": PROMETHEUS, "port": 9464, "host": "127.0.0.1", "run": "r1"},
        {"_component_": JSONL, "path": "/tmp/run/m.jsonl", "histograms": True},  # interpolation resolved
    ]
    overridden = {**listed, "prometheus_port": 0, "jsonl_path": None, "otlp_endpoint": "http://127.0.0.1:9/v1/metrics"}
    assert _entries(_cfg(agent_obs=overridden)) == [
        {"_component_": PROMETHEUS, "port": 0, "host": "127.0.0.1", "run": "r1"},
        {"_component_": OTEL, "endpoint": "http://127.0.0.1:9/v1/metrics", "run": "r1"},
    ]
    assert _entries(_cfg(agent_obs={**listed, "prometheus_port": None})) == [
        listed["exporters"][1] | {"path": "/tmp/run/m.jsonl"}
    ]
    # today's flat keys alone, as configs before the exporters list wrote them
    flat = {"prometheus_port": 0, "prometheus_host": "127.0.0.1", "on_bind_error": "warn", "otlp_endpoint": None,
            "jsonl_path": "/tmp/a.jsonl"}  # fmt: skip
    settings = observer_settings(_cfg(agent_obs=flat))
    assert [s.entry for s in settings.exporters] == [
        {"_component_": PROMETHEUS, "port": 0, "host": "127.0.0.1", "on_bind_error": "warn"},
        {"_component_": JSONL, "histograms": True, "path": "/tmp/a.jsonl"},
    ]
    assert settings.jsonl_path == "/tmp/a.jsonl"
    with pytest.raises(ValueError, match=r"agent_obs\.exporters must be a list of entries with a _component_"):
        observer_settings(_cfg(agent_obs={"exporters": [{"port": 1}]}))


def test_exporters_are_built_with_config_instantiate(tmp_path):
    node = {
        "exporters": [
            {"_component_": "agent_obs.exporters.prometheus.PrometheusExporter", "port": 0, "run": "t"},
            {"_component_": "agent_obs.exporters.jsonl.JsonlExporter", "path": str(tmp_path / "m.jsonl")},
        ]
    }
    prom, jsonl = build_exporters(observer_settings(_cfg(agent_obs=node)))
    try:
        assert isinstance(prom, PrometheusExporter) and isinstance(jsonl, JsonlExporter)
        assert prom.port and prom.url.startswith("http://127.0.0.1:")
    finally:
        prom.close()
        jsonl.close()


def _prometheus_nodes(port: int) -> list[tuple[dict, dict, str, str]]:
    """(node, the same node with on_bind_error=warn, the key naming the port, the key naming on_bind_error)."""
    listed = {"_component_": PROMETHEUS, "port": port}
    return [
        ({"prometheus_port": port}, {"prometheus_port": port, "on_bind_error": "warn"},
         "agent_obs.prometheus_port", "agent_obs.on_bind_error"),
        ({"exporters": [listed]}, {"exporters": [{**listed, "on_bind_error": "warn"}]},
         "agent_obs.exporters[0].port", "agent_obs.exporters[0].on_bind_error"),
        ({"exporters": [{**listed, "port": 1}], "prometheus_port": port},
         {"exporters": [{**listed, "port": 1}], "prometheus_port": port, "on_bind_error": "warn"},
         "agent_obs.prometheus_port", "agent_obs.on_bind_error"),
    ]  # fmt: skip


@pytest.mark.parametrize("case", range(3))
def test_a_taken_port_names_the_config_key_the_user_set_and_on_bind_error_warn_trains_on(case):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        node, warn_node, port_key, bind_key = _prometheus_nodes(port)[case]
        with pytest.raises(PortInUseError) as err:
            build_exporters(observer_settings(_cfg(agent_obs=node)))
        message = str(err.value)
        assert f"{port_key}={port}: port {port} on 127.0.0.1 is already in use" in message
        assert f"Set {port_key} to a free port" in message and f"{bind_key}=warn" in message
        assert "PrometheusExporter(" not in message
        (prom,) = build_exporters(observer_settings(_cfg(agent_obs=warn_node)))
        try:
            assert prom.port is None  # not serving, but the run goes on
        finally:
            prom.close()


class _Head(torch.nn.Module):
    """Embedding + output projection: logits for every position."""

    def __init__(self, vocab: int = 40, dim: int = 16) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.output = torch.nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.output(self.emb(tokens))


def test_observe_block_scores_each_position_against_the_next_token_and_its_class():
    """Unshifted labels and classes in, as the recipe has them at the forward; the float64 reference on the shift."""
    from metric_reference import reference_metrics

    torch.manual_seed(0)
    model = _Head()
    tokens = torch.randint(0, 40, (2, 9))
    labels = tokens.clone()
    labels[:, :2] = -100  # prompt
    classes = torch.randint(1, 3, (2, 9))  # reasoning / tool call
    obs = attach(model, topk=(1, 5))
    with torch.no_grad(), observe_block(obs, labels, Extras(classes), ignore_index=-100):
        logits = model(tokens)
    got = obs.collect()
    obs.detach()
    shifted = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], dim=1)
    shifted_classes = torch.cat([classes[:, 1:], torch.full((2, 1), int(TokenClass.IGNORE))], dim=1)
    want, _ = reference_metrics(logits.reshape(-1, 40), shifted.reshape(-1), shifted_classes.reshape(-1), topk=(1, 5))
    assert got["tokens"] == want["tokens"] == int((shifted != -100).sum())
    for key in ("entropy", "perplexity", "reasoning_entropy", "tool_call_top5_prob", "accuracy"):
        assert got[key] == pytest.approx(want[key], rel=1e-5), key


@pytest.mark.parametrize("packed", [False, True])
def test_observe_block_shifts_tool_args_and_packed_sample_ids_and_ranks_the_samples(packed):
    """tool_args split tool_call (syntax + args == tool_call); each sample's mean NLL equals a float64 reference."""
    from metric_reference import reference_metrics, reference_rows

    torch.manual_seed(1)
    model = _Head()
    tokens = torch.randint(0, 40, (2, 10))
    labels = tokens.clone()
    labels[:, :2] = -100
    classes = torch.randint(1, 3, (2, 10))
    args = torch.randint(0, 2, (2, 10)) * (classes == int(TokenClass.TOOL_CALL))
    if packed:  # row 0 packs samples 3 and 8 then padding; row 1 is sample 5
        ids = torch.tensor([[3] * 4 + [8] * 4 + [-1] * 2, [5] * 10])
        labels[0, 8:] = -100
    else:
        ids = ["val.jsonl:3", "val.jsonl:5"]
    batch = {"tokens": tokens, "labels": labels, "token_classes": classes, "tool_ids": None, "tool_args": args}
    batch["sample_ids"] = ids
    extras = pop_extras(batch)
    assert set(batch) == {"tokens", "labels"}  # nothing the model does not take
    obs = attach(model, topk=(1,), top_n=5)
    with torch.no_grad(), observe_block(obs, labels, extras, ignore_index=-100):
        logits = model(tokens)
    got = obs.collect()
    obs.detach()

    def shift(t: torch.Tensor, fill: int) -> torch.Tensor:
        return torch.cat([t[:, 1:], torch.full((2, 1), fill)], dim=1)

    s_labels, s_classes, s_args = shift(labels, -100), shift(classes, int(TokenClass.IGNORE)), shift(args, 0)
    want, _ = reference_metrics(
        logits.reshape(-1, 40), s_labels.reshape(-1), s_classes.reshape(-1), topk=(1,), tool_args=s_args.reshape(-1)
    )
    assert got["tool_syntax_tokens"] + got["tool_args_tokens"] == got["tool_call_tokens"] == want["tool_call_tokens"]
    for key in ("tool_syntax_entropy", "tool_args_entropy", "tool_args_accuracy", "tool_syntax_tokens"):
        assert got[key] == pytest.approx(want[key], rel=1e-5), key
    nll = reference_rows(logits.reshape(-1, 40).double(), s_labels.reshape(-1).clamp(min=0), (1,))["nll"]
    token_ids = shift(ids, -1) if packed else torch.tensor([[3] * 10, [5] * 10])
    names = {3: "val.jsonl:3", 5: "val.jsonl:5"} if not packed else {3: 3, 8: 8, 5: 5}
    valid = (s_labels != -100).reshape(-1)
    expected = {}
    for sid, name in names.items():
        mine = valid & (token_ids.reshape(-1) == sid)
        if mine.any():
            expected[name] = (int(mine.sum()), nll[mine].mean().item())
    samples = {s["id"]: s for s in got.samples}
    assert set(samples) == set(expected)
    for name, (n, mean_nll) in expected.items():
        assert samples[name]["tokens"] == n and samples[name]["nll"] == pytest.approx(mean_nll, rel=1e-5), name


def _hooks(tmp_path: Path, **top):
    from agent_obs.integrations.torchtune.recipe_hooks import AgentObsRecipe

    cfg = OmegaConf.create({"output_dir": str(tmp_path), **top})
    return cfg, AgentObsRecipe(cfg, device=torch.device("cpu"), is_rank_zero=True, log=logging.getLogger("t"))


def test_validation_runs_every_n_steps_or_else_at_each_epoch_end(tmp_path):
    _, every = _hooks(tmp_path, run_val_every_n_steps=2)
    _, at_end = _hooks(tmp_path)
    every.val_loader = at_end.val_loader = [{"tokens": [1]}]
    assert [every.val_due(s) for s in (1, 2, 3, 4)] == [False, True, False, True]
    assert not every.val_due(4, epoch_end=True)
    assert not any(at_end.val_due(s) for s in (1, 2, 3)) and at_end.val_due(3, epoch_end=True)
    at_end.val_loader = None  # no dataset_val: never
    assert not at_end.val_due(3, epoch_end=True)


def test_prepare_config_resolves_seed_paths_and_leaves_the_collate_to_the_samples(tmp_path, caplog):
    cfg, hooks = _hooks(
        tmp_path,
        enable_token_classification=False,
        dataset={"_component_": "torchtune.datasets.AgentSFTDataset"},
        dataset_val=[{"_component_": "torchtune.datasets.AgentSFTDataset"}],
    )
    with caplog.at_level(logging.INFO):
        hooks.prepare_config(cfg)
    assert (
        "torchtune.datasets.AgentSFTDataset -> agent_obs.integrations.torchtune.dataset.AgentSFTDataset" in caplog.text
    )
    assert "collate_fn" in cfg and cfg.collate_fn is None  # unset: chosen per dataset from its samples
    assert (cfg.dataset.enable_token_classification, cfg.dataset.config_key) == (False, "dataset")
    assert cfg.dataset_val[0].config_key == "dataset_val[0]"
    assert hooks.collate_for([{"tokens": [1], "labels": [1], "token_classes": [1]}], False, None) == AGENT_COLLATE
    assert hooks.collate_for([{"tokens": [1], "labels": [1]}], False, "x.y") == "x.y"
    assert hooks.collate_name == AGENT_COLLATE  # the first, named by the missing-classes warning


def test_train_metrics_reach_the_metric_logger_through_torchtune_metric_logger(tmp_path):
    """An observed step's collect goes to the recipe's DiskLogger as train_* and to the JSONL exporter alike."""
    from torchtune.training.metric_logging import DiskLogger

    _, hooks = _hooks(
        tmp_path, log_detailed_metrics_every_n_steps=2, agent_obs={"jsonl_path": str(tmp_path / "m.jsonl")}
    )
    logger = DiskLogger(log_dir=str(tmp_path / "logs"))
    hooks.start_exporters(logger)
    model = _Head()
    hooks.attach(model, None, -100)
    tokens = torch.randint(0, 40, (1, 7), generator=torch.Generator().manual_seed(1))
    classes = torch.tensor([[1, 1, 1, 2, 2, 2, 2]])  # reasoning, then a tool call
    for step in (1, 2):  # step 1 is not observed (every 2)
        with torch.no_grad(), hooks.observe(step, tokens, Extras(classes)):
            model(tokens)
        hooks.after_step(step, 0, 1.0, 2)
    hooks.close()
    logger.close()
    (line,) = next((tmp_path / "logs").glob("log_*.txt")).read_text().splitlines()
    logged = dict(item.rsplit(":", 1) for item in line.partition(" | ")[2].split())
    (record,) = [json.loads(r) for r in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert line.startswith("Step 2 |") and record["step"] == 2 and record["split"] == "train"
    assert float(logged["train_tokens"]) == record["tokens"] == 6
    assert float(logged["train_entropy"]) == pytest.approx(record["entropy"], rel=1e-6)
    assert "train_reasoning_entropy" in logged and "train_tool_call_entropy" in logged


def test_agent_obs_node_sets_binary_entropy_top_n_and_outlier_k_of_the_attached_observer(tmp_path):
    """top_n 4 of 6 samples; outlier_k ~0 puts the threshold at the median, so the 3 hardest are outliers."""
    _, hooks = _hooks(tmp_path, agent_obs={"binary_entropy": True, "top_n": 4, "outlier_k": 1e-9})
    model = _Head()
    hooks.attach(model, None, -100)
    torch.manual_seed(2)
    try:
        for rows in ([0, 1, 2], [3, 4, 5]):
            tokens = torch.randint(0, 40, (3, 8))
            with torch.no_grad(), hooks.observe(10, tokens, Extras(sample_ids=[f"f:{r}" for r in rows])):
                model(tokens)
        got = hooks.observer.collect()
    finally:
        hooks.close()
    assert "top1_binary_entropy" in got
    assert len(got.samples) == 4 and [s["outlier"] for s in got.samples] == [True, True, True, False]
    s = observer_settings(_cfg())
    assert (s.binary_entropy, s.top_n, s.outlier_k) == (False, 10, 3.5)
    with pytest.raises(ValueError, match=r"agent_obs.binary_entropy must be true or false, got 'false'"):
        observer_settings(_cfg(agent_obs={"binary_entropy": "false"}))
    for bad in (-1, 2.5, "3"):
        with pytest.raises(ValueError, match=rf"agent_obs.top_n must be an integer >= 0 .*got {bad!r}"):
            observer_settings(_cfg(agent_obs={"top_n": bad}))
    for bad in (0, -1.0, float("inf"), "3.5"):
        with pytest.raises(ValueError, match=r"agent_obs.outlier_k must be a positive number"):
            observer_settings(_cfg(agent_obs={"outlier_k": bad}))
