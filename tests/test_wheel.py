"""The built wheel, installed into a fresh venv, runs the recipe, the demo and `agent-obs dashboards` from a
directory outside the checkout (no editable install, no repository files)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from servers import require_binary

from agent_obs.resources import DASHBOARD_FILES

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 480

pytestmark = pytest.mark.slow


def _working_tree_copy(dest: Path) -> Path:
    """The checkout's tracked and untracked-but-not-ignored files (symlinks kept), so edits are tested too."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        src, dst = REPO / name, dest / name
        if src.is_symlink() or src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst, follow_symlinks=False)
    return dest


class WheelEnv:
    """A fresh venv holding only the wheel; this venv's dependencies reach it through a .pth (no network)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        src = _working_tree_copy(root / "src")
        offline = {**os.environ, "PIP_NO_INDEX": "1"}
        pip = [sys.executable, "-m", "pip"]
        subprocess.run(
            [*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", root / "dist", src],
            check=True, env=offline, capture_output=True, timeout=TIMEOUT,
        )  # fmt: skip
        (self.wheel,) = (root / "dist").glob("agent_obs-*.whl")
        self.venv = root / "venv"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", self.venv], check=True, timeout=TIMEOUT)
        self.python = self.venv / "bin" / "python"
        site = subprocess.run(
            [self.python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        self.site = Path(site)
        deps = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
        # A .pth line only extends sys.path: this venv's editable-install hook (itself a .pth) does not run there.
        (self.site / "zz_agent_obs_test_dependencies.pth").write_text("\n".join(deps) + "\n")
        subprocess.run(
            [*pip, "--python", self.python, "install", "-q", "--no-deps", "--no-index", self.wheel],
            check=True, env=offline, capture_output=True, timeout=TIMEOUT,
        )  # fmt: skip
        self.user_dir = root / "user"  # a user's project folder: no checkout in it or above it
        self.user_dir.mkdir()

    def run(self, *args: str | Path, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
        """Run a command of the venv (``agent-obs ...`` or ``python ...``) in the user's folder."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        cmd = [str(self.venv / "bin" / str(args[0])), *map(str, args[1:])]
        return subprocess.run(cmd, cwd=self.user_dir, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory) -> WheelEnv:
    return WheelEnv(tmp_path_factory.mktemp("wheel"))


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    return proc.stdout


def test_wheel_ships_the_recipe_configs_sample_data_and_dashboards(wheel_env):
    names = set(zipfile.ZipFile(wheel_env.wheel).namelist())
    expected = {"agent_obs/recipes/agent_sft_distributed.py"}
    expected |= {f"agent_obs/recipes/configs/{p.name}" for p in (REPO / "recipes" / "configs").glob("*.yaml")}
    expected |= {f"agent_obs/data/{p.name}" for p in (REPO / "agent_obs" / "data").glob("*.jsonl")}
    expected |= {f"agent_obs/dashboards/{name}" for name in DASHBOARD_FILES}
    assert expected <= names, sorted(expected - names)
    assert not any(n.startswith(("recipes/", "dashboards/", "tests/")) for n in names), "top-level folders leaked"


def test_installed_package_is_the_wheel_not_the_checkout(wheel_env):
    out = _ok(
        wheel_env.run(
            "python", "-c",
            "import agent_obs, agent_obs.integrations.torchtune.demo as demo, agent_obs.resources as r; "
            "print(agent_obs.__file__, demo.__file__, r.recipe_path(), r.config_dir(), r.data_dir(), sep='\\n')",
        )
    )  # fmt: skip
    paths = [Path(line) for line in out.split()]
    assert len(paths) == 5
    for path in paths:
        assert path.is_relative_to(wheel_env.site / "agent_obs"), path
        assert path.exists()


def test_dashboards_command_writes_the_grafana_json_scrape_config_and_alert_rules(wheel_env):
    out = _ok(wheel_env.run("agent-obs", "dashboards", "--out", "monitoring"))
    target = wheel_env.user_dir / "monitoring"
    for name in DASHBOARD_FILES:
        assert (target / name).read_bytes() == (REPO / "dashboards" / name).read_bytes(), name
        assert str(Path("monitoring") / name) in out
    json.loads((target / "agent_obs.json").read_text())
    check = subprocess.run(
        [require_binary("promtool"), "check", "config", target / "prometheus.yml"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert check.returncode == 0 and "1 rule files found" in check.stdout, check.stdout + check.stderr
    (target / "alerts.yml").write_text("# edited by the user\n")
    refused = wheel_env.run("agent-obs", "dashboards", "--out", "monitoring")
    assert refused.returncode == 2 and "--force" in refused.stderr
    assert (target / "alerts.yml").read_text() == "# edited by the user\n"
    _ok(wheel_env.run("agent-obs", "dashboards", "--out", "monitoring", "--force"))
    assert (target / "alerts.yml").read_bytes() == (REPO / "dashboards" / "alerts.yml").read_bytes()


def test_demo_runs_from_the_installed_wheel(wheel_env):
    out = _ok(wheel_env.run("agent-obs", "demo", "--epochs", "1", "--prometheus-port", "0"))
    run_dir = wheel_env.user_dir / ".cache" / "agent_obs_demo" / "run"
    assert "Prometheus endpoint live" in out
    for row in ("train all", "train tool_call", "val   reasoning", "val   tool_call"):
        assert row in out, out[-3000:]
    splits = {json.loads(line)["split"] for line in (run_dir / "agent_obs.jsonl").read_text().splitlines()}
    assert splits == {"train", "val"}
    assert (run_dir / "report.html").stat().st_size > 0


def test_run_by_config_name_from_the_installed_wheel(wheel_env):
    _ok(wheel_env.run("agent-obs", "demo", "--prepare-only"))  # the tokenizer and checkpoint the config reads
    out = _ok(
        wheel_env.run(
            "agent-obs", "run", "--config", "agent_sft_tiny_cpu", "output_dir=short_run", "epochs=1",
            "max_steps_per_epoch=2", "run_val_every_n_steps=2", "agent_obs.prometheus_port=null",
        )
    )  # fmt: skip
    launched = next(line for line in out.splitlines() if line.startswith("+ "))
    assert f"AGENT_OBS_DATA_DIR={wheel_env.site / 'agent_obs' / 'data'} " in launched
    assert str(wheel_env.site / "agent_obs" / "recipes" / "agent_sft_distributed.py") in launched
    assert str(wheel_env.site / "agent_obs" / "recipes" / "configs" / "agent_sft_tiny_cpu.yaml") in launched
    records = [json.loads(line) for line in (wheel_env.user_dir / "short_run" / "agent_obs.jsonl").open()]
    assert [(r["step"], r["split"]) for r in records] == [(1, "train"), (2, "train"), (2, "val")]
    for record in records:
        assert record["tool_call_tokens"] > 0 and record["reasoning_tokens"] > 0
