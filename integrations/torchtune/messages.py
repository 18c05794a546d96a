"""``JSONToMessages``: ``{"messages": [...]}`` rows (OpenAI/SWE-smith style) to torchtune Messages.

torchtune 0.6.1 has no transform for this layout that keeps tool calls: ``OpenAIToMessages``
drops ``tool_calls``. Here they are rendered inline in the SWE-agent XML format, the way
SWE-smith writes its training data, so the classifier sees them as tool-call blocks.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from torchtune.data import Message

ROLES = ("system", "user", "assistant", "tool", "ipython")
TOOL_ROLES = ("ipython", "user")


class MessageFormatError(ValueError):
    """A row that cannot become a conversation; the message names the row and the fix."""


def render_tool_call(name: str, arguments: Any) -> str:
    """One OpenAI-style call as ``<function=NAME>\\n<parameter=K>V</parameter>\\n...</function>``."""
    if isinstance(arguments, str):
        arguments = json.loads(arguments) if arguments.strip() else {}
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, Mapping):
        raise MessageFormatError(f"tool call {name!r} has arguments {arguments!r}; expected a JSON object")
    params = "".join(
        f"<parameter={key}>{value if isinstance(value, str) else json.dumps(value)}</parameter>\n"
        for key, value in arguments.items()
    )
    return f"<function={name}>\n{params}</function>"


def _text(content: Any, where: str) -> str:
    """Message content as one string: a string, None, or a list of OpenAI text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text":
                raise MessageFormatError(
                    f"{where}: content part {part!r} is not a text part; only "
                    '{"type": "text", "text": ...} parts are supported in agent SFT data'
                )
            parts.append(part.get("text") or part.get("content") or "")
        return "".join(parts)
    raise MessageFormatError(f"{where}: content must be a string or a list of text parts, got {type(content).__name__}")


class JSONToMessages:
    """Turn a row's list of ``{"role", "content", ["tool_calls"]}`` dicts into torchtune Messages.

    ``column_map={"messages": "conversations"}`` renames the column; ``tool_role`` says how tool
    results (role ``tool``) are presented: ``"user"`` (SWE-agent/SWE-smith observations) or
    ``"ipython"`` (Qwen2.5 wraps them in ``<tool_response>``). Non-assistant messages are masked
    unless ``train_on_input``.
    """

    def __init__(
        self,
        column_map: Mapping[str, str] | None = None,
        train_on_input: bool = False,
        tool_role: str = "user",
        new_system_prompt: str | None = None,
    ) -> None:
        if column_map and "messages" not in column_map:
            raise ValueError(
                f"column_map must map 'messages' to your column, got {dict(column_map)!r}; "
                "e.g. column_map={'messages': 'conversations'}"
            )
        if tool_role not in TOOL_ROLES:
            raise ValueError(f"tool_role must be one of {TOOL_ROLES}, got {tool_role!r}")
        self.column = (column_map or {}).get("messages", "messages")
        self.train_on_input = train_on_input
        self.tool_role = tool_role
        self.new_system_prompt = new_system_prompt

    def __call__(self, sample: Mapping[str, Any]) -> dict[str, list[Message]]:
        if self.column not in sample:
            raise MessageFormatError(
                f"row has no column {self.column!r} (columns: {sorted(sample)}); set "
                f"message_transform.column_map.messages to the column that holds the conversation"
            )
        rows = sample[self.column]
        if not isinstance(rows, list):
            raise MessageFormatError(f"column {self.column!r} must be a list of messages, got {type(rows).__name__}")
        messages = []
        if self.new_system_prompt is not None:
            messages.append(Message(role="system", content=self.new_system_prompt, masked=True))
        for i, row in enumerate(rows):
            messages.append(self._message(row, f"message {i}"))
        return {"messages": [m for m in messages if m is not None]}

    def _message(self, row: Any, where: str) -> Message | None:
        if not isinstance(row, Mapping) or "role" not in row:
            raise MessageFormatError(f"{where}: expected an object with 'role' and 'content', got {row!r:.80}")
        role = row["role"]
        if role not in ROLES:
            raise MessageFormatError(
                f"{where}: unknown role {role!r}; use one of {ROLES} "
                "(tool results: 'tool', shown to the model as tool_role)"
            )
        if role == "system" and self.new_system_prompt is not None:
            return None
        text = _text(row.get("content"), where)
        calls = row.get("tool_calls") or []
        if calls:
            rendered = [self._call(call, f"{where} tool_calls") for call in calls]
            text = "\n\n".join([text, *rendered]) if text else "\n\n".join(rendered)
        if role == "tool":
            role = self.tool_role
        masked = role != "assistant" and not self.train_on_input
        return Message(role=role, content=text, masked=masked)

    @staticmethod
    def _call(call: Any, where: str) -> str:
        fn = call.get("function", call) if isinstance(call, Mapping) else None
        if not isinstance(fn, Mapping) or not fn.get("name"):
            raise MessageFormatError(f"{where}: expected {{'function': {{'name', 'arguments'}}}}, got {call!r:.80}")
        try:
            return render_tool_call(fn["name"], fn.get("arguments"))
        except json.JSONDecodeError as exc:
            raise MessageFormatError(f"{where}: arguments of {fn['name']!r} are not valid JSON ({exc})") from exc
