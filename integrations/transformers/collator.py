"""A data collator for chat conversations that adds per-token classes and tool ids.

Each conversation is rendered with the tokenizer's chat template; every message's content is
located in the rendered text and classified on its own (system prompts quote example tool
calls, so a regex over the whole text goes wrong): template tokens are IGNORE, content of
non-assistant messages CONTEXT, assistant content REASONING or TOOL_CALL, and TOOL_CALL tokens
inside an argument value are marked in ``tool_args``. Labels are the input ids on assistant tokens
(and the end-of-turn token after them), -100 elsewhere.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from agent_obs.classify import (
    FORMATS,
    classify_tokens,
    find_arg_spans,
    find_tool_calls,
    token_tool_args,
    token_tool_ids,
)
from agent_obs.token_class import TokenClass
from agent_obs.tools import NO_TOOL

IGNORE_INDEX = -100
SAMPLE_ID = "sample_id"  # the column ``add_sample_ids`` writes and the collator reads
_SENTINEL = "\x02agent_obs_message_{}\x03"


class EncodedConversation(NamedTuple):
    """One tokenized conversation: lists of equal length, one entry per token."""

    input_ids: list[int]
    labels: list[int]
    token_classes: list[int]
    tool_ids: list[int]
    tool_args: list[int]  # 1 on TOOL_CALL tokens inside an argument value (all 0 for a regex format)


def message_content_spans(tokenizer: Any, messages: Sequence[Mapping[str, Any]], text: str) -> list[tuple[int, int]]:
    """Character span ``[start, end)`` of each message's content inside ``text`` (the rendered chat).

    Renders the conversation once more with each content replaced by a unique marker: when the
    template copies contents verbatim this gives exact positions (even for contents that also
    appear in headers, like ``"user"``); otherwise each content is searched for in order.
    """
    contents = [_content(m, i) for i, m in enumerate(messages)]
    marked = [{**m, "content": _SENTINEL.format(i)} for i, m in enumerate(messages)]
    template = tokenizer.apply_chat_template(marked, tokenize=False)
    spans: list[tuple[int, int]] = []
    rebuilt: list[str] = []
    shift, cursor = 0, 0
    for i, content in enumerate(contents):
        pos = template.find(_SENTINEL.format(i), cursor)
        if pos < 0:
            break
        rebuilt.append(template[cursor:pos] + content)
        spans.append((pos + shift, pos + shift + len(content)))
        cursor = pos + len(_SENTINEL.format(i))
        shift += len(content) - len(_SENTINEL.format(i))
    if len(spans) == len(contents) and "".join(rebuilt) + template[cursor:] == text:
        return spans
    return _search_spans(messages, contents, text)


def _search_spans(messages: Sequence[Mapping[str, Any]], contents: list[str], text: str) -> list[tuple[int, int]]:
    """Fallback for templates that alter around contents: find each content after the previous one."""
    spans, cursor = [], 0
    for i, content in enumerate(contents):
        start = text.find(content, cursor)
        if start < 0:
            role = messages[i].get("role")
            raise ValueError(
                f"message {i} (role {role!r}) does not appear verbatim in the chat-template output: the template "
                "rewrites its content (e.g. strips whitespace or drops reasoning), so its tokens cannot be located; "
                "pass a tokenizer whose chat_template inserts message['content'] unchanged"
            )
        spans.append((start, start + len(content)))
        cursor = start + len(content)
    return spans


def _content(message: Mapping[str, Any], index: int) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if not isinstance(content, str):
        raise ValueError(
            f"message {index} has content of type {type(content).__name__}; only text messages are supported: "
            "join multi-part content into one string"
        )
    return content


def encode_conversation(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    *,
    fmt: str | re.Pattern = "function_xml",
    strict: bool = False,
    assistant_roles: tuple[str, ...] = ("assistant",),
    train_on_eos: bool = True,
) -> EncodedConversation:
    """Tokenize one chat-templated conversation with labels, token classes and tool ids per token."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{type(tokenizer).__name__} is not a fast tokenizer: character offsets need one; "
            "load it with AutoTokenizer.from_pretrained(..., use_fast=True) or PreTrainedTokenizerFast"
        )
    for i, message in enumerate(messages):
        _content(message, i)  # validate before the template sees it
    text = tokenizer.apply_chat_template(list(messages), tokenize=False)
    spans = message_content_spans(tokenizer, messages, text)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    offsets: list[tuple[int, int]] = [tuple(o) for o in enc["offset_mapping"]]
    classes = [int(TokenClass.IGNORE)] * len(ids)
    tools = [NO_TOOL] * len(ids)
    args = [0] * len(ids)
    labels = [IGNORE_INDEX] * len(ids)
    by_message: dict[int, list[int]] = {}
    for t, m in enumerate(_token_owners(offsets, spans)):
        by_message.setdefault(m, []).append(t)
    for m, (ms, me) in enumerate(spans):
        idx = by_message.get(m)
        if not idx:
            continue
        if messages[m].get("role") not in assistant_roles:
            for t in idx:
                classes[t] = int(TokenClass.CONTEXT)
            continue
        content = text[ms:me]
        rel = [(max(offsets[t][0], ms) - ms, min(offsets[t][1], me) - ms) for t in idx]
        calls = find_tool_calls(content, fmt, strict=strict)
        cls = classify_tokens(content, rel, spans=[(c.start, c.end) for c in calls])
        tids = token_tool_ids(rel, calls)
        inside = token_tool_args(rel, find_arg_spans(content, fmt, calls=calls)) if fmt in FORMATS else [0] * len(idx)
        for t, c, tid, a in zip(idx, cls, tids, inside, strict=True):
            classes[t] = int(c)
            tools[t] = int(tid)
            args[t] = a
            labels[t] = ids[t]
        after = idx[-1] + 1
        if train_on_eos and after < len(ids) and ids[after] == tokenizer.eos_token_id:
            labels[after] = ids[after]
    return EncodedConversation(ids, labels, classes, tools, args)


def _token_owners(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """Index of the message span each token overlaps by at least one character, -1 for none."""
    owner, m = [], 0
    for start, end in offsets:
        while m < len(spans) and spans[m][1] <= start:
            m += 1
        hit = m < len(spans) and end > start and start < spans[m][1] and end > spans[m][0]
        owner.append(m if hit else -1)
    return owner


def add_sample_ids(dataset: Any, column: str = SAMPLE_ID) -> Any:
    """A ``datasets.Dataset`` with its row index as ``column``, so the collator can name each sample."""
    return dataset.map(lambda _, i: {column: i}, with_indices=True)


@dataclass
class AgentChatCollator:
    """Collate ``{"messages": [...]}`` examples into padded ``input_ids``, ``attention_mask``,
    ``labels``, ``token_classes`` and ``tool_ids`` tensors for a Trainer with ``AgentObsCallback``.

    Use with ``remove_unused_columns=False`` so the ``messages`` column reaches the collator.
    ``with_tool_args`` adds the ``tool_args`` tensor (observe()'s syntax/arguments split; needs the
    function_xml or hermes format); when every example has a ``sample_id_key`` column (e.g. the row
    index from ``add_sample_ids``, or str ids) the batch also gets ``sample_ids``, a plain list (``[B]``)
    for the hardest samples: a list stays on the host when the Trainer moves tensors to the GPU, so
    observe() maps it without a device sync. Both are opt-in: the model must not receive them, so the
    callback has to pop them.
    """

    tokenizer: Any
    fmt: str | re.Pattern = "function_xml"
    strict: bool = False
    max_length: int | None = None
    pad_to_multiple_of: int | None = None
    messages_key: str = "messages"
    assistant_roles: tuple[str, ...] = ("assistant",)
    train_on_eos: bool = True
    with_tool_args: bool = False
    sample_id_key: str = SAMPLE_ID

    def __post_init__(self) -> None:
        if self.tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token: set tokenizer.pad_token (e.g. to its eos token)")
        if self.with_tool_args and self.fmt not in FORMATS:
            raise ValueError(
                f"with_tool_args needs a format whose argument values are known ({', '.join(FORMATS)}), not a regex"
            )

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        encoded = [self.encode(f) for f in features]
        batch = self.pad(encoded)
        if features and all(self.sample_id_key in f for f in features):
            ids = [f[self.sample_id_key] for f in features]
            if not all(isinstance(i, str) or (isinstance(i, int) and not isinstance(i, bool) and i >= 0) for i in ids):
                raise ValueError(
                    f"{self.sample_id_key!r} must hold str ids or non-negative int ids (row indices), got {ids[:3]}"
                )
            batch["sample_ids"] = list(ids)
        return batch

    def encode(self, feature: Mapping[str, Any]) -> EncodedConversation:
        """Tokenize and classify one example (truncated to ``max_length``)."""
        if self.messages_key not in feature:
            raise ValueError(
                f"example has no {self.messages_key!r} column (keys: {sorted(feature)}); pass "
                "remove_unused_columns=False in the TrainingArguments so the column reaches the collator, or set "
                "messages_key"
            )
        enc = encode_conversation(
            self.tokenizer,
            feature[self.messages_key],
            fmt=self.fmt,
            strict=self.strict,
            assistant_roles=self.assistant_roles,
            train_on_eos=self.train_on_eos,
        )
        if self.max_length is not None:
            enc = EncodedConversation(*(field[: self.max_length] for field in enc))
        return enc

    def pad(self, encoded: Sequence[EncodedConversation]) -> dict[str, torch.Tensor]:
        """Pad a list of encoded conversations on the tokenizer's padding side."""
        length = max(len(e.input_ids) for e in encoded)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        fills = {
            "input_ids": self.tokenizer.pad_token_id,
            "labels": IGNORE_INDEX,
            "token_classes": int(TokenClass.IGNORE),
            "tool_ids": NO_TOOL,
            **({"tool_args": 0} if self.with_tool_args else {}),
        }
        out: dict[str, list[list[int]]] = {name: [] for name in (*fills, "attention_mask")}
        for e in encoded:
            n = length - len(e.input_ids)
            for name, fill in fills.items():
                row = list(getattr(e, name))
                out[name].append([fill] * n + row if left else row + [fill] * n)
            mask = [1] * len(e.input_ids)
            out["attention_mask"].append([0] * n + mask if left else mask + [0] * n)
        return {name: torch.tensor(rows, dtype=torch.long) for name, rows in out.items()}
