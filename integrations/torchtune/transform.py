"""``AgentSFTTransform``: torchtune's own tokenization plus a token class and tool id per token.

Tokens and mask come from the model tokenizer itself (so they are identical to what
``SFTDataset`` produces); the classes are found afterwards, one message at a time: each text
item is encoded alone (as ``tokenize_messages`` does) and located in the token list. Template and
special tokens around it are IGNORE, non-assistant content CONTEXT, assistant content REASONING
or TOOL_CALL by ``classify_tokens``, and ``tool_args`` marks the TOOL_CALL tokens inside argument
values (``token_tool_args``). Classification never runs over a whole rendered conversation
because system prompts quote example tool calls. A ``sample_id`` in the sample is passed through.
"""

from __future__ import annotations

import logging
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

from agent_obs.classify import FORMATS
from agent_obs.token_class import TokenClass

log = logging.getLogger(__name__)
NO_TOOL = -1


def find_run(tokens: Sequence[int], ids: Sequence[int], start: int) -> tuple[int, int]:
    """First ``p >= start`` where ``ids`` occurs in ``tokens``, or where a prefix of ``ids`` runs to the end.

    Returns ``(p, matched_length)``; ``(len(tokens), 0)`` when absent. The prefix case covers a
    conversation truncated at ``max_seq_len`` (whose last token may also have been replaced by eos).
    """
    n, m = len(tokens), len(ids)
    first = ids[0]
    for p in range(start, n):
        if tokens[p] != first:
            continue
        length = min(m, n - p)
        if list(tokens[p : p + length]) == list(ids[:length]):
            return p, length
        if p + length == n and list(tokens[p : n - 1]) == list(ids[: length - 1]):
            return p, length - 1
    return n, 0


class AgentSFTTransform:
    """Model transform: the tokenizer's ``tokens``/``mask`` plus ``token_classes``, ``tool_ids`` and ``tool_args``.

    Pass it as ``SFTDataset``'s ``model_transform`` (``AgentSFTDataset`` does). With classification
    off the sample is exactly the tokenizer's; when it fails for a sample (logged once) the
    assistant content is CONTEXT, so the sample trains normally and only the overall metrics cover it.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        enable_token_classification: bool = True,
        tool_call_format: str = "function_xml",
        strict: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.enable_token_classification = enable_token_classification
        self.tool_call_format = tool_call_format
        self.strict = strict
        self._warned = False

    def __call__(self, sample: Mapping[str, Any], inference: bool = False) -> dict[str, Any]:
        messages = list(sample["messages"])
        out = dict(self.tokenizer(dict(sample), inference=inference))
        if "sample_id" in sample:  # the row's id, for the hardest samples (observe(sample_ids=...))
            out["sample_id"] = sample["sample_id"]
        if not self.enable_token_classification:
            return out
        out["token_classes"], out["tool_ids"], tool_args = self.classify_parts(messages, out["tokens"])
        if self.tool_call_format in FORMATS:  # argument values are known only for these: no fake split otherwise
            out["tool_args"] = tool_args
        return out

    def classify(self, messages: Sequence[Any], tokens: Sequence[int]) -> tuple[list[int], list[int]]:
        """Per-token class and tool id for the tokens of ``messages`` as the tokenizer rendered them."""
        return self.classify_parts(messages, tokens)[:2]

    def classify_parts(self, messages: Sequence[Any], tokens: Sequence[int]) -> tuple[list[int], list[int], list[int]]:
        """Per-token class, tool id and argument flag (1 inside a tool-call argument value)."""
        classes = [int(TokenClass.IGNORE)] * len(tokens)
        tool_ids = [NO_TOOL] * len(tokens)
        tool_args = [0] * len(tokens)
        template = getattr(self.tokenizer, "prompt_template", None)
        templated = template(messages) if template is not None else messages
        cursor = 0
        for message in templated:
            for item in message.content:
                if item["type"] != "text" or not item["content"]:
                    continue
                ids = self.tokenizer.encode(item["content"], add_bos=False, add_eos=False)
                if not ids:
                    continue
                pos, length = find_run(tokens, ids, cursor)
                if length == 0:
                    continue
                item_classes, item_tools, item_args = self._classify_item(message.role, item["content"], ids)
                classes[pos : pos + length] = item_classes[:length]
                tool_ids[pos : pos + length] = item_tools[:length]
                tool_args[pos : pos + length] = item_args[:length]
                cursor = pos + length
        return classes, tool_ids, tool_args

    def _classify_item(self, role: str, text: str, ids: list[int]) -> tuple[list[int], list[int], list[int]]:
        context = ([int(TokenClass.CONTEXT)] * len(ids), [NO_TOOL] * len(ids), [0] * len(ids))
        if role != "assistant":
            return context
        try:
            from agent_obs.classify import (
                classify_tokens,
                find_arg_spans,
                find_tool_calls,
                token_tool_args,
                token_tool_ids,
            )
            from agent_obs.offsets import token_offsets

            text = unicodedata.normalize("NFC", text)
            offsets = token_offsets(ids, self.tokenizer)
            calls = find_tool_calls(text, self.tool_call_format, strict=self.strict)
            spans = [(c.start, c.end) for c in calls]
            classes = [int(c) for c in classify_tokens(text, offsets, spans=spans)]
            args = [0] * len(ids)
            if self.tool_call_format in FORMATS:
                args = token_tool_args(offsets, find_arg_spans(text, self.tool_call_format, calls=calls))
            return classes, list(token_tool_ids(offsets, calls)), args
        except Exception as exc:  # one bad sample must not stop training: it falls back to overall metrics
            if not self._warned:
                self._warned = True
                log.warning(
                    "token classification failed (%s: %s); such samples count in the overall metrics only. "
                    "Set enable_token_classification=False to silence this.",
                    type(exc).__name__,
                    exc,
                )
            return context
