"""torchtune's Qwen2/Qwen2.5 tokenizers for ``agent_obs.token_offsets`` (registered when this package is imported).

torchtune decodes each run of ordinary tokens on its own and inserts special tokens' text between runs;
its private ``_special_tokens_reversed`` is read here, in the integration, not in the core.
"""

from __future__ import annotations

from agent_obs.offsets import Span, byte_level_spans, register_offsets_adapter


def is_torchtune_qwen2(tokenizer) -> bool:
    """A torchtune Qwen2-family tokenizer (byte-level BPE with ``decoder`` and a special-token table)."""
    return all(hasattr(tokenizer, a) for a in ("_special_tokens_reversed", "decoder", "byte_decoder", "encoder"))


def torchtune_spans(token_ids: list[int], tokenizer) -> list[Span]:
    """Character spans of ``token_ids`` in torchtune's ``decode(token_ids)`` with special tokens kept."""
    decoder: dict[int, str] = tokenizer.decoder
    return byte_level_spans(token_ids, tokenizer, tokenizer._special_tokens_reversed.get, decoder.get, len(decoder))


register_offsets_adapter(is_torchtune_qwen2, torchtune_spans)
