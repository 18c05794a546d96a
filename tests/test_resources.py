"""The shipped files are found as package resources, and the CLI names the fix when something is missing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from agent_obs import resources
from agent_obs.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_resources_are_the_repository_folders_in_a_checkout():
    assert resources.recipe_path().read_bytes() == (REPO / "recipes" / "agent_sft_distributed.py").read_bytes()
    assert sorted(p.name for p in resources.config_dir().glob("*.yaml")) == sorted(
        p.name for p in (REPO / "recipes" / "configs").glob("*.yaml")
    )
    assert (resources.data_dir() / "agent_sft_train.jsonl").is_file()


def test_missing_resource_names_the_reinstall():
    with pytest.raises(FileNotFoundError, match=r"agent_obs.recipes/no_such.py is missing .* reinstall"):
        resources.shipped("agent_obs.recipes", "no_such.py")


def test_dashboards_out_must_be_a_folder(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["dashboards", "--out", str(tmp_path / "file")]) == 2
    assert "pass a directory to --out" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["run", "--config", "agent_sft_tiny_cpu"], ["demo", "--prepare-only"]])
def test_run_and_demo_without_torchtune_say_how_to_install_it(monkeypatch, capsys, argv):
    monkeypatch.setitem(sys.modules, "torchtune", None)  # find_spec() then reports it absent
    assert main(argv) == 2
    assert "pip install 'agent-obs[torchtune]'" in capsys.readouterr().err
