"""Classifier and token-offset speed, measured side by side in one run.

1. ``find_tool_spans`` vs Python's ``re.finditer`` on messages with many unclosed ``<function=``
   openers (the regex rescans to the end for each: quadratic), at growing sizes.
2. ``token_offsets`` + ``classify_tokens`` on every assistant message of the real trajectories,
   against the tokenizer's own encode time and against slow prefix decoding on a sample.

Run: ``python bench/classify_offsets.py`` (from the repo root).
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from pathlib import Path

from agent_obs.integrations.torchtune.assets import build_bpe_tokenizer

from agent_obs import classify_tokens, token_offsets
from agent_obs.classify import find_tool_spans

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "trajectories"
STRICT = re.compile(r"<function=[^>]+>.*?</function>", re.DOTALL)


def best(fn, repeat: int = 3) -> float:
    """Best wall time of ``repeat`` calls, in seconds."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def adversarial_scaling() -> None:
    print("find_tool_spans(strict=True) vs re.finditer, text = n x 'x <function=a> y ' (never closed)")
    for n in (500, 1_000, 2_000, 4_000):
        text = "x <function=a> y " * n
        ours = best(lambda text=text: find_tool_spans(text, strict=True))
        regex = best(lambda text=text: list(STRICT.finditer(text)), repeat=1)
        print(f"  {len(text):>8} chars: ours {ours * 1e3:7.2f} ms, regex {regex * 1e3:8.1f} ms ({regex / ours:.0f}x)")


def real_data() -> None:
    convs = [json.loads(line)["messages"] for f in sorted(DATA.glob("*.jsonl")) for line in f.open()]
    texts = [m["content"] for c in convs for m in c]
    assistant = [m["content"] for c in convs for m in c if m["role"] == "assistant"]
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        files = build_bpe_tokenizer(texts, tmp)
        print(f"build_bpe_tokenizer on {sum(map(len, texts)) / 1e6:.1f} M chars: {time.perf_counter() - t:.2f} s")
        from tokenizers import Tokenizer
        from torchtune.models.qwen2_5 import qwen2_5_tokenizer

        tok = Tokenizer.from_file(str(files.tokenizer_json))
        tt = qwen2_5_tokenizer(
            str(files.vocab_json), str(files.merges_txt), special_tokens_path=str(files.tokenizer_json)
        )
        encode = best(lambda: [tok.encode(x) for x in assistant])
        ids = [tok.encode(x).ids for x in assistant]
        n_tok = sum(map(len, ids))
        offs = best(lambda: [token_offsets(i, tok) for i in ids])
        offs_tt = best(lambda: [token_offsets(i, tt) for i in ids])
        encode_tt = best(lambda: [tt.encode(x, add_bos=False, add_eos=False) for x in assistant], repeat=1)
        offsets = [token_offsets(i, tok) for i in ids]
        cls = best(lambda: [classify_tokens(x, o) for x, o in zip(assistant, offsets, strict=True)])
        print(f"{len(assistant)} assistant messages, {n_tok} tokens:")
        print(f"  tokenizers encode (Rust, with offsets) {encode * 1e3:7.1f} ms")
        print(f"  torchtune encode (Python)              {encode_tt * 1e3:7.1f} ms")
        print(f"  token_offsets(tokenizers.Tokenizer)    {offs * 1e3:7.1f} ms  ({offs / n_tok * 1e9:.0f} ns/token)")
        print(
            f"  token_offsets(torchtune Qwen2.5)       {offs_tt * 1e3:7.1f} ms  ({offs_tt / n_tok * 1e9:.0f} ns/token)"
        )
        print(f"  classify_tokens                        {cls * 1e3:7.1f} ms  ({cls / n_tok * 1e9:.0f} ns/token)")
        longest = max(ids, key=len)
        fast = best(lambda: token_offsets(longest, tok))
        slow = best(lambda: [tok.decode(longest[:k], skip_special_tokens=False) for k in range(len(longest) + 1)], 1)
        print(
            f"  longest message ({len(longest)} tokens): token_offsets {fast * 1e3:.2f} ms, prefix decoding "
            f"{slow * 1e3:.0f} ms ({slow / fast:.0f}x)"
        )


if __name__ == "__main__":
    adversarial_scaling()
    real_data()
