"""Shared pytest fixtures: the real agent trajectories, a tokenizer trained on them, a tiny decoder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

TRAJECTORIES = Path(__file__).resolve().parent / "data" / "trajectories"  # real data kept in the repository


def pytest_configure(config) -> None:
    """Dynamo's recompile limit for a process that is many training runs at once; the kernel's fallback fails the test.

    A training run compiles the metric kernel for one or two dtypes and one set of targets. This process compiles it
    for every combination the suite covers (labels/classes/tool ids given or not, five top-k tuples, several tool-slot
    counts, several dtypes), more than dynamo's default of 8 (measured: hit by test_observer.py without this).
    The kernel's fallback (every later test eager: compiled-kernel tests would pass without compiling) is an error.
    """
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    config.addinivalue_line("filterwarnings", "error:agent_obs.*reached dynamo's recompile limit:RuntimeWarning")


@pytest.fixture
def eager_kernel(monkeypatch) -> None:
    """The metric kernel uncompiled: for tests of the observer's bookkeeping, not of the kernel."""
    monkeypatch.setenv("AGENT_OBS_COMPILE", "0")


@pytest.fixture
def model():
    """``test_observer.TinyDecoder`` with seed 0: the shape of any causal LM, small enough for every test."""
    import torch
    from test_observer import TinyDecoder

    torch.manual_seed(0)
    return TinyDecoder()


def load_conversations(path: Path = TRAJECTORIES) -> dict[str, list[list[dict]]]:
    """Every ``*.jsonl`` file under ``path`` -> its conversations (lists of messages)."""
    files = sorted(path.glob("*.jsonl"))
    if not files:
        raise FileNotFoundError(
            f"no trajectories under {path}: the tests need the repository's tests/data/trajectories"
        )
    return {f.name: [json.loads(line)["messages"] for line in f.open(encoding="utf-8")] for f in files}


@pytest.fixture(scope="session")
def trajectories() -> dict[str, list[list[dict]]]:
    """The real SWE-agent trajectories of tests/data/trajectories, by file name."""
    return load_conversations()


@pytest.fixture(scope="session")
def bpe_tokenizer_files(tmp_path_factory, trajectories):
    """A Qwen2.5-style byte-level BPE (vocab 2048) trained on the real trajectories (TokenizerFiles)."""
    from agent_obs.integrations.torchtune.assets import build_bpe_tokenizer

    texts = (m["content"] for convs in trajectories.values() for conv in convs for m in conv)
    return build_bpe_tokenizer(texts, tmp_path_factory.mktemp("bpe_tokenizer"))


@pytest.fixture(scope="session")
def tokenizers_bpe(bpe_tokenizer_files):
    """The demo-style BPE as a Hugging Face ``tokenizers.Tokenizer``."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(bpe_tokenizer_files.tokenizer_json))


@pytest.fixture(scope="session")
def torchtune_bpe(bpe_tokenizer_files):
    """The same BPE loaded by torchtune's Qwen2.5 tokenizer."""
    from torchtune.models.qwen2_5 import qwen2_5_tokenizer

    f = bpe_tokenizer_files
    return qwen2_5_tokenizer(
        path=str(f.vocab_json), merges_file=str(f.merges_txt), special_tokens_path=str(f.tokenizer_json)
    )
