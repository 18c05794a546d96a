"""Offline tokenizer assets: a small byte-level BPE with Qwen2.5's special tokens.

Tests and the demo need a real Qwen2-style tokenizer without downloading one: this trains a
``tokenizers`` ByteLevel BPE (Qwen2 pre-tokenizer regex, NFC, the 22 Qwen2.5 special tokens
at ids 0-21) and saves it in the files both torchtune and Hugging Face load.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

# Qwen2.5's special tokens in torchtune's order (torchtune.models.qwen2_5._tokenizer), re-numbered 0-21.
QWEN2_5_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)

# Qwen2's pre-tokenizer split (the same regex as torchtune's PRETOKENIZE_REGEX and Qwen2.5's tokenizer.json).
QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|"
    r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ChatML, as Qwen2.5 renders plain messages (no tools block), for AutoTokenizer.apply_chat_template.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class TokenizerFiles(NamedTuple):
    """Paths of a saved tokenizer: torchtune needs all three, Hugging Face only ``tokenizer_json``."""

    vocab_json: Path
    merges_txt: Path
    tokenizer_json: Path


def build_bpe_tokenizer(texts: Iterable[str], out_dir: str | Path, *, vocab_size: int = 2048) -> TokenizerFiles:
    """Train a deterministic Qwen2-style byte-level BPE on ``texts`` and save it in ``out_dir``.

    Loads with ``qwen2_5_tokenizer(path=vocab_json, merges_file=merges_txt, special_tokens_path=tokenizer_json)``,
    ``PreTrainedTokenizerFast(tokenizer_file=tokenizer_json)`` and ``AutoTokenizer.from_pretrained(out_dir)``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    n_special = len(QWEN2_5_SPECIAL_TOKENS)
    min_size = n_special + 256
    if vocab_size < min_size:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: a byte-level BPE needs {n_special} special tokens + 256 bytes; "
            f"pass vocab_size >= {min_size}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(QWEN2_5_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    for i, token in enumerate(QWEN2_5_SPECIAL_TOKENS):
        if tok.token_to_id(token) != i:
            raise RuntimeError(f"special token {token!r} got id {tok.token_to_id(token)}, expected {i}")

    tokenizer_json = out / "tokenizer.json"
    tok.save(str(tokenizer_json))
    vocab_path, merges_path = tok.model.save(str(out))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 32768,
        "chat_template": CHATML_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return TokenizerFiles(Path(vocab_path), Path(merges_path), tokenizer_json)
