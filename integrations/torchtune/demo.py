"""``agent-obs demo``: build and cache the demo assets, run the recipe on CPU, print train vs val metrics.

Assets (cached under ``--cache-dir``, rebuilt when the sample data or model shape changes): a
byte-level BPE with Qwen2.5's special tokens trained on the project's sample conversations, and
a tiny random-init Qwen2 checkpoint. The run uses the shipped config ``agent_sft_tiny_cpu``
(recipes/configs/agent_sft_tiny_cpu.yaml), so the demo works from a checkout and an installed wheel.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import deque
from dataclasses import asdict
from pathlib import Path

from agent_obs.integrations.torchtune.checkpoint import TinyQwen2Config, build_tiny_qwen2_checkpoint

from agent_obs.resources import data_dir

DATA_DIR = data_dir()  # the package's own sample trajectories
VOCAB_SIZE = 2048
CONFIG_NAME = "agent_sft_tiny_cpu"
TABLE_STATS = (
    ("entropy", "entropy"),
    ("perplexity", "perplexity"),
    ("top1_prob", "top-1"),
    ("top10_prob", "top-10"),
    ("accuracy", "accuracy"),
    ("tokens", "tokens"),
)
TABLE_GROUPS = (
    ("all", ""),
    ("reasoning", "reasoning_"),
    ("tool_call", "tool_call_"),
    ("tool_syntax", "tool_syntax_"),  # tags, names, delimiters of the tool calls
    ("tool_args", "tool_args_"),  # their argument values
)
HARDEST_SHOWN = 5  # rows of the closing summary's hardest-trajectories table
SHOWN = re.compile(r"step \d+|agent-obs:|Error|error:|Traceback")


def sample_files(data_dir: Path = DATA_DIR) -> list[Path]:
    """The project's sample conversations (train and val JSON Lines)."""
    files = sorted(data_dir.glob("agent_sft_*.jsonl"))
    if not files:
        raise FileNotFoundError(f"no agent_sft_*.jsonl in {data_dir}: run python {data_dir}/make_sample.py")
    return files


def sample_texts(files: list[Path]) -> list[str]:
    """Every message text of the sample, the tokenizer's training corpus."""
    return [m["content"] for f in files for line in f.open(encoding="utf-8") for m in json.loads(line)["messages"]]


def _fingerprint(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    h.update(json.dumps([VOCAB_SIZE, asdict(TinyQwen2Config())]).encode())
    return h.hexdigest()[:16]


def prepare_assets(cache_dir: str | Path, *, rebuild: bool = False) -> Path:
    """Build ``tokenizer/`` and ``model/`` under ``cache_dir`` unless an up-to-date copy is there; return it."""
    from agent_obs.integrations.torchtune.assets import build_bpe_tokenizer

    cache = Path(cache_dir).resolve()
    files = sample_files()
    stamp = cache / "assets.stamp"
    key = _fingerprint(files)
    if not rebuild and stamp.is_file() and stamp.read_text() == key:
        print(f"demo assets cached in {cache}", flush=True)
        return cache
    t0 = time.perf_counter()
    for sub in ("tokenizer", "model"):
        shutil.rmtree(cache / sub, ignore_errors=True)
    build_bpe_tokenizer(sample_texts(files), cache / "tokenizer", vocab_size=VOCAB_SIZE)
    build_tiny_qwen2_checkpoint(cache / "model", TinyQwen2Config(vocab_size=VOCAB_SIZE))
    stamp.write_text(key)
    print(f"built demo tokenizer + tiny Qwen2 checkpoint in {time.perf_counter() - t0:.1f}s -> {cache}", flush=True)
    return cache


def free_port(preferred: int) -> int:
    """``preferred`` when it can be bound on 127.0.0.1, else 0 (the exporter then picks one)."""
    if preferred == 0:
        return 0
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
        except OSError:
            print(f"port {preferred} is busy; the Prometheus exporter will pick a free port", flush=True)
            return 0
    return preferred


def last_records(jsonl: Path) -> dict[str, dict]:
    """The last JSONL record per split."""
    last: dict[str, dict] = {}
    for line in jsonl.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            last[rec["split"]] = rec
    return last


def format_table(records: dict[str, dict]) -> str:
    """Rows split x class (all/reasoning/tool_call and its syntax/args parts), columns entropy, perplexity,
    top-1/top-10 mass, accuracy, tokens."""
    header = f"{'split':<6}{'class':<13}" + "".join(f"{label:>12}" for _, label in TABLE_STATS)
    lines = [header, "-" * len(header)]
    for split in ("train", "val"):
        rec = records.get(split)
        if rec is None:
            continue
        for group, prefix in TABLE_GROUPS:
            cells = []
            for stat, _ in TABLE_STATS:
                value = rec.get(prefix + stat)
                if value is None or not math.isfinite(value):
                    cells.append(f"{'-':>12}")
                elif stat == "tokens":
                    cells.append(f"{int(value):>12d}")
                else:
                    cells.append(f"{value:>12.4f}")
            lines.append(f"{split:<6}{group:<13}" + "".join(cells))
        lines.append(f"{'':<19}(step {rec['step']})")
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    return f"{'-':>14}" if value is None or not math.isfinite(value) else f"{value:>14.4f}"


def format_samples(record: dict, shown: int = HARDEST_SHOWN) -> str:
    """The hardest trajectories of one record (its ``samples``, hardest first): id, tokens, mean NLL overall and
    on tool calls, outlier flag; "" when the record has none."""
    samples = (record.get("samples") or [])[:shown]
    if not samples:
        return ""
    width = max(len("id"), *(len(str(s["id"])) for s in samples))
    header = f"{'id':<{width}}{'tokens':>8}{'mean NLL':>14}{'tool-call NLL':>14}{'outlier':>9}"
    lines = [header, "-" * len(header)]
    for s in samples:
        flag = "yes" if s.get("outlier") else "no"
        lines.append(
            f"{s['id']!s:<{width}}{int(s['tokens']):>8d}{_cell(s.get('nll'))}{_cell(s.get('tool_call_nll'))}{flag:>9}"
        )
    return "\n".join(lines)


class _Prober:
    """Scrapes the live Prometheus endpoint once, from the output reader, when training is under way."""

    def __init__(self) -> None:
        self.url: str | None = None
        self.done = False

    def feed(self, line: str) -> None:
        match = re.search(r"Prometheus metrics on (\S+)", line)
        if match:
            self.url = match.group(1)
        elif self.url and not self.done and re.search(r"step \d+/", line):
            self.done = True
            threading.Thread(target=self._probe, daemon=True).start()

    def _probe(self) -> None:
        try:
            with urllib.request.urlopen(self.url, timeout=5) as resp:
                body = resp.read().decode()
            n = sum(1 for line in body.splitlines() if line.startswith("agent_obs_"))
            print(f"  Prometheus endpoint live: {self.url} serves {n} agent_obs_* samples", flush=True)
        except OSError as exc:
            print(f"  Prometheus endpoint {self.url} did not answer: {exc}", flush=True)


def run_recipe(cache: Path, run_dir: Path, nproc: int, epochs: int, port: int) -> int:
    """Run the tiny CPU config with torchrun, echoing progress lines; the full output goes to run_dir/demo.log."""
    from agent_obs.launch import launch_command

    overrides = [
        f"demo_dir={cache}",
        f"data_dir={DATA_DIR}",
        f"output_dir={run_dir}",
        f"epochs={epochs}",
        f"agent_obs.prometheus_port={port}",
    ]
    cmd = launch_command(nproc, CONFIG_NAME, overrides)
    print(f"running {nproc} gloo ranks on CPU: {' '.join(cmd[2:])}", flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    prober = _Prober()
    tail: deque[str] = deque(maxlen=60)
    with (
        (run_dir / "demo.log").open("w", encoding="utf-8") as log,
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc,
    ):
        for line in proc.stdout:
            log.write(line)
            tail.append(line)
            prober.feed(line)
            if SHOWN.search(line):
                message = line.rstrip()
                if message.startswith("INFO:"):  # torchtune's logger prefix
                    message = message.split(":", 2)[-1]
                print("  " + message, flush=True)
        rc = proc.wait()
    if rc != 0:
        print("".join(tail), file=sys.stderr)
        print(f"the recipe failed (exit {rc}); full output in {run_dir / 'demo.log'}", file=sys.stderr)
    return rc


def write_report(jsonl: Path) -> Path | None:
    """``agent-obs report RUN.jsonl -o report.html`` when the report module is installed."""
    if importlib.util.find_spec("agent_obs.report") is None:
        return None
    html = jsonl.with_name("report.html")
    rc = subprocess.call([sys.executable, "-m", "agent_obs.cli", "report", str(jsonl), "-o", str(html)])
    return html if rc == 0 else None


def main(args) -> int:
    """The demo: assets, a fresh 2-rank run, the Prometheus probe, the table and the HTML report."""
    t0 = time.perf_counter()
    cache = prepare_assets(args.cache_dir, rebuild=args.rebuild)
    if args.prepare_only:
        return 0
    run_dir = cache / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    rc = run_recipe(cache, run_dir, args.nproc_per_node, args.epochs, free_port(args.prometheus_port))
    if rc != 0:
        return rc
    jsonl = run_dir / "agent_obs.jsonl"
    print("\nfinal metrics (train: last step's batch; val: last validation pass)\n")
    records = last_records(jsonl)
    print(format_table(records))
    hardest = format_samples(records.get("val", {}))
    if hardest:
        print(f"\nhardest val trajectories (step {records['val']['step']}, file:line, by mean NLL)\n")
        print(hardest)
    report = write_report(jsonl)
    print(f"\nJSONL log: {jsonl}")
    print(f"metric log: {run_dir / 'logs'}   checkpoints: {run_dir}/epoch_*")
    if report:
        print(f"HTML report: {report}")
    print(f"demo finished in {time.perf_counter() - t0:.0f}s")
    return 0
