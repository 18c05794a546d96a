"""The core knows no integration's internals: torchtune's tokenizers reach token_offsets through an adapter
that agent_obs.integrations.torchtune registers when imported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "agent_obs"

SCRIPT = """
import sys
from torchtune.models.qwen2_5 import qwen2_5_tokenizer
from agent_obs import token_offsets
vocab, merges, tokenizer_json = sys.argv[1:4]
tok = qwen2_5_tokenizer(path=vocab, merges_file=merges, special_tokens_path=tokenizer_json)
ids = tok.encode("<function=bash>ls</function>", add_bos=False, add_eos=False)
try:
    token_offsets(ids, tok)
except TypeError as exc:
    print("refused:", exc)
import agent_obs.integrations.torchtune
print("spans:", token_offsets(ids, tok)[-1])
"""


def test_core_modules_read_no_torchtune_private_attribute():
    offenders = [p.name for p in CORE.glob("*.py") if "_special_tokens_reversed" in p.read_text(encoding="utf-8")]
    assert offenders == []


def test_torchtune_tokenizer_offsets_come_from_the_integration(bpe_tokenizer_files):
    files = [str(p) for p in bpe_tokenizer_files]
    proc = subprocess.run([sys.executable, "-c", SCRIPT, *files], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "refused: token_offsets learns torchtune's tokenizers from its integration: import " in proc.stdout
    assert "spans: (" in proc.stdout and proc.stdout.rstrip().endswith(f", {len('<function=bash>ls</function>')})")
