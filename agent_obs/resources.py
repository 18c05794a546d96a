"""Files shipped inside the package: the torchtune recipe, its configs, the sample data and the dashboards.

The repository's top-level ``recipes/`` and ``dashboards/`` are the sources of the subpackages
``agent_obs.recipes`` and ``agent_obs.dashboards`` (pyproject.toml maps them; ``agent_obs/recipes`` and
``agent_obs/dashboards`` are symlinks so an editable install resolves them too), so these paths name
the same files in a checkout, an editable install and an installed wheel.
"""

from __future__ import annotations

import argparse
import importlib.resources
import sys
from pathlib import Path

RECIPE_FILE = "agent_sft_distributed.py"
# What a user needs to watch a run: the Grafana dashboard, Prometheus' scrape config and alert rules,
# and the compose file + Grafana provisioning that wire them together (paths relative to agent_obs.dashboards).
DASHBOARD_FILES = (
    "agent_obs.json",
    "prometheus.yml",
    "alerts.yml",
    "docker-compose.yml",
    "provisioning/dashboards/agent_obs.yml",
    "provisioning/datasources/prometheus.yml",
)


def shipped(package: str, name: str = "") -> Path:
    """``name`` inside the shipped resource ``package`` as a filesystem path (torchrun and users need real files)."""
    try:
        item = importlib.resources.files(package)
    except ModuleNotFoundError as exc:
        raise FileNotFoundError(f"{package} is not installed: reinstall agent-obs (pip install .)") from exc
    item = item / name if name else item
    if not isinstance(item, Path) or not item.exists():
        raise FileNotFoundError(
            f"{package}/{name} is missing from this installation of agent-obs ({item}): reinstall it "
            "(pip install . from a checkout, or pip install agent-obs) as files, not as a zip"
        )
    return item


def recipe_path() -> Path:
    """The agent SFT recipe file, started by torchrun."""
    return shipped("agent_obs.recipes", RECIPE_FILE)


def config_dir() -> Path:
    """The folder of the shipped recipe configs (``agent_sft_tiny_cpu.yaml``, ...)."""
    return shipped("agent_obs.recipes", "configs")


def data_dir() -> Path:
    """The folder of the project's sample conversations (``agent_sft_train.jsonl``, ``agent_sft_val.jsonl``)."""
    return shipped("agent_obs.data")


def write_dashboards(out: str | Path, *, force: bool = False) -> list[Path]:
    """Copy the dashboard files into ``out`` (with provisioning/); edited copies are kept unless ``force``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file: pass a directory to --out")
    pairs = [(shipped("agent_obs.dashboards", name), out / name) for name in DASHBOARD_FILES]
    edited = [dst for src, dst in pairs if dst.exists() and dst.read_bytes() != src.read_bytes()]
    if edited and not force:
        names = ", ".join(str(p) for p in edited)
        raise FileExistsError(f"{names} already exist(s) with other content: pass --force to overwrite")
    for src, dst in pairs:
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(src.read_bytes())
    return [dst for _, dst in pairs]


def _dashboards(args: argparse.Namespace) -> int:
    try:
        written = write_dashboards(args.out, force=args.force)
    except FileExistsError as exc:
        print(f"agent-obs dashboards: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    out = Path(args.out)
    print(
        f"\nPrometheus: prometheus --config.file={out / 'prometheus.yml'} (scrapes 127.0.0.1:9464, loads alerts.yml)\n"
        f"Prometheus + Grafana: docker compose -f {out / 'docker-compose.yml'} up -d, then http://127.0.0.1:3000\n"
        f"Grafana only: import {out / 'agent_obs.json'}"
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``agent-obs dashboards`` to the command line."""
    p = subparsers.add_parser(
        "dashboards",
        help="write the Grafana dashboard, Prometheus scrape config and alert rules to a folder",
        description="Write the shipped Grafana dashboard (agent_obs.json), Prometheus scrape config "
        "(prometheus.yml), alert rules (alerts.yml) and a docker-compose setup with Grafana provisioning.",
    )
    p.add_argument("--out", required=True, help="folder to write (created if missing)")
    p.add_argument("--force", action="store_true", help="overwrite files that differ from the shipped ones")
    p.set_defaults(func=_dashboards)
