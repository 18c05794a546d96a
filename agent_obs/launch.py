"""``agent-obs run`` and ``agent-obs demo``: launch the agent SFT recipe with torchrun.

The recipe and its configs are package data (``agent_obs.resources``), so this works from a
checkout and from an installed wheel alike. The recipe is started as a file because the installed
torchtune owns the module name ``recipes`` (``tune run recipes/...`` would resolve to torchtune's).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

from agent_obs.resources import config_dir, data_dir, recipe_path

# The shipped configs read the sample data from ${oc.env:AGENT_OBS_DATA_DIR,agent_obs/data}: the launcher
# points it at the installed sample, so a config name runs from any directory.
DATA_DIR_ENV = "AGENT_OBS_DATA_DIR"


def resolve_config(name: str) -> Path:
    """A config path, or a bare name such as ``agent_sft_tiny_cpu`` of the shipped configs."""
    path = Path(name)
    if path.is_file():
        return path.resolve()
    configs = config_dir()
    candidate = configs / (name if name.endswith(".yaml") else f"{name}.yaml")
    if candidate.is_file():
        return candidate
    known = ", ".join(sorted(p.stem for p in configs.glob("*.yaml")))
    raise FileNotFoundError(f"config {name!r} not found: pass a YAML path or one of: {known}")


def launch_env() -> dict[str, str]:
    """This process's environment plus the sample-data folder the shipped configs read (unless already set)."""
    env = os.environ.copy()
    env.setdefault(DATA_DIR_ENV, str(data_dir()))
    return env


def require_torchtune(command: str) -> None:
    """The recipe and the demo need the ``torchtune`` extra; say how to install it instead of a child's traceback."""
    if importlib.util.find_spec("torchtune") is None:
        raise ModuleNotFoundError(f"agent-obs {command} needs torchtune: pip install 'agent-obs[torchtune]'")


def free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 now (the rendezvous binds it moments later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(
    nproc_per_node: int, config: str | Path, overrides: list[str] = (), *, rdzv_port: int | None = None
) -> list[str]:
    """``torchrun`` on one node for this Python: ``<recipe file> --config CFG key=value ...``.

    The rendezvous store and the workers' address are 127.0.0.1 only (``--standalone``'s store would
    listen on every interface), the store on ``rdzv_port`` or a free port.
    """
    if nproc_per_node < 1:
        raise ValueError(f"--nproc-per-node must be >= 1, got {nproc_per_node}")
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{free_loopback_port() if rdzv_port is None else rdzv_port}",
        "--local-addr",
        "127.0.0.1",
        "--nproc_per_node",
        str(nproc_per_node),
        str(recipe_path()),
        "--config",
        str(resolve_config(str(config))),
        *overrides,
    ]


def _run(args: argparse.Namespace) -> int:
    try:
        require_torchtune("run")
        cmd = launch_command(args.nproc_per_node, args.config, args.overrides)
    except (ImportError, FileNotFoundError, ValueError) as exc:
        print(f"agent-obs run: {exc}", file=sys.stderr)
        return 2
    env = launch_env()
    print(f"+ {DATA_DIR_ENV}={env[DATA_DIR_ENV]} " + " ".join(cmd), flush=True)
    return subprocess.call(cmd, env=env)


def _demo(args: argparse.Namespace) -> int:
    if args.rl:
        from agent_obs.integrations.transformers.grpo_demo import main as rl_main

        return rl_main(args)
    try:
        require_torchtune("demo")
    except ImportError as exc:
        print(exc, file=sys.stderr)
        return 2
    from agent_obs.integrations.torchtune.demo import main

    return main(args)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``run`` and ``demo`` to the ``agent-obs`` command line."""
    run = subparsers.add_parser(
        "run",
        help="launch the agent SFT torchtune recipe with torchrun",
        description="Launch the shipped recipe (recipes/agent_sft_distributed.py) with torchrun "
        "(1 process, N processes, N GPUs).",
    )
    run.add_argument("--nproc-per-node", type=int, default=1, help="processes (GPUs) on this node (default 1)")
    run.add_argument("--config", required=True, help="YAML path or a shipped config name (recipes/configs/)")
    run.add_argument("overrides", nargs=argparse.REMAINDER, help="config overrides, e.g. batch_size=4")
    run.set_defaults(func=_run)

    demo = subparsers.add_parser(
        "demo",
        help="tiny 2-rank CPU agent SFT run with live metrics",
        description="Build (once) a tokenizer and a tiny Qwen2 checkpoint, then fine-tune with 2 gloo ranks on CPU "
        "with validation, Prometheus on 127.0.0.1, a JSONL log, and print train vs val metrics per token class.",
    )
    demo.add_argument("--cache-dir", default=".cache/agent_obs_demo", help="where assets and the run are kept")
    demo.add_argument("--nproc-per-node", type=int, default=2, help="gloo ranks (default 2)")
    demo.add_argument("--epochs", type=int, default=4, help="epochs of the 32-conversation sample (8 steps each)")
    demo.add_argument("--prometheus-port", type=int, default=9464, help="0 picks a free port")
    demo.add_argument("--prepare-only", action="store_true", help="build the cached assets and stop")
    demo.add_argument("--rebuild", action="store_true", help="rebuild the cached tokenizer and checkpoint")
    demo.add_argument(
        "--rl",
        action="store_true",
        help="instead: a tiny Qwen2 policy on CPU, SFT then GRPO (TRL), with per-class metrics of its completions",
    )
    demo.add_argument("--sft-steps", type=int, default=80, help="--rl: SFT steps before GRPO (default 80)")
    demo.add_argument("--grpo-steps", type=int, default=16, help="--rl: GRPO steps (default 16)")
    demo.set_defaults(func=_demo)
