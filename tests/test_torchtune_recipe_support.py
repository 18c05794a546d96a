"""The recipe's helpers: exact val sharding, resume file lookup, JSONL truncation, the seed's component paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from agent_obs.integrations.torchtune.collate import AGENT_COLLATE, TORCHTUNE_COLLATE, default_collate
from agent_obs.integrations.torchtune.resume import resume_checkpoint_files, truncate_jsonl
from agent_obs.integrations.torchtune.sampler import ShardSampler
from agent_obs.integrations.torchtune.seed_config import resolve_seed_components
from omegaconf import OmegaConf
from torchtune.config._utils import _get_component_from_path

from agent_obs.exporters.jsonl import JsonlExporter


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
