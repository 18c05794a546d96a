"""Find tool-call blocks in one message's text and label its tokens REASONING or TOOL_CALL.

Formats: ``function_xml`` (SWE-agent's ``<function=NAME>...</function>``), ``hermes``
(``<tool_call>{"name": ...}</tool_call>``) or a compiled regex. Apply it to one message at a
time: system prompts quote example blocks, so a pass over a whole conversation goes wrong.
Inside the blocks ``find_arg_spans`` finds the argument values, so ``token_tool_args`` can split
TOOL_CALL tokens into syntax and arguments. Everything runs in time linear in the text plus the tokens.
"""

from __future__ import annotations

import bisect
import itertools
import json
import re
from collections.abc import Iterator, Sequence
from typing import NamedTuple

from agent_obs.offsets import check_offsets_order
from agent_obs.token_class import TokenClass
from agent_obs.tools import NO_TOOL, tool_id

FORMATS = ("function_xml", "hermes")
UNKNOWN_TOOL = "unknown"  # the tool name given to a call whose name cannot be read

_FUNCTION_OPEN, _FUNCTION_CLOSE = "<function=", "</function>"
_HERMES_OPEN, _HERMES_CLOSE = "<tool_call>", "</tool_call>"
_HERMES_NAME = re.compile(r'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')
_PARAM_OPEN, _PARAM_CLOSE = "<parameter=", "</parameter>"
_JSON_WS = " \t\n\r"
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_JSON_SCALAR = re.compile(r'[^\s,:\[\]{}"]+')
_CLOSERS = {"{": "}", "[": "]"}


class ToolCall(NamedTuple):
    """One tool-call block: characters ``[start, end)`` of the message, and the tool's name (None if unknown)."""

    start: int
    end: int
    name: str | None


def _function_xml(text: str, strict: bool) -> list[ToolCall]:
    """``<function=[^>]+>.*?</function>`` (DOTALL) matches; non-strict adds a trailing unclosed block.

    Scans with ``str.find`` instead of the regex: the regex re-scans to the end of the text for
    every unclosed ``<function=``, which is quadratic on long agent messages.
    """
    calls: list[ToolCall] = []
    pos = 0
    unclosed: ToolCall | None = None
    while (start := text.find(_FUNCTION_OPEN, pos)) >= 0:
        gt = text.find(">", start + len(_FUNCTION_OPEN))
        if gt < 0:
            break  # no later opener can have its '>' either
        if gt == start + len(_FUNCTION_OPEN):  # `<function=>`: empty name, no match here
            pos = start + 1
            continue
        name = text[start + len(_FUNCTION_OPEN) : gt].strip() or None
        close = text.find(_FUNCTION_CLOSE, gt + 1)
        if close < 0:
            unclosed = ToolCall(start, len(text), name)
            break  # no later opener can be closed either
        calls.append(ToolCall(start, close + len(_FUNCTION_CLOSE), name))
        pos = close + len(_FUNCTION_CLOSE)
    if unclosed is not None and not strict:
        calls.append(unclosed)
    return calls


def _hermes_name(body: str) -> str | None:
    """The ``name`` of a Hermes call body: from its JSON, else (truncated JSON) the first ``"name": "..."``."""
    try:
        obj = json.loads(body)
    except ValueError:
        obj = None
    if isinstance(obj, dict):
        name = obj.get("name")
        return name if isinstance(name, str) and name.strip() else None
    m = _HERMES_NAME.search(body)
    if m is None:
        return None
    try:
        name = json.loads(f'"{m[1]}"', strict=False)
    except ValueError:
        name = m[1]
    return name if name.strip() else None


def _hermes(text: str, strict: bool) -> list[ToolCall]:
    """``<tool_call>.*?</tool_call>`` (DOTALL) blocks; non-strict adds a trailing unclosed ``<tool_call>``."""
    calls: list[ToolCall] = []
    pos = 0
    while (start := text.find(_HERMES_OPEN, pos)) >= 0:
        body_start = start + len(_HERMES_OPEN)
        close = text.find(_HERMES_CLOSE, body_start)
        if close < 0:
            if not strict:
                calls.append(ToolCall(start, len(text), _hermes_name(text[body_start:])))
            break
        end = close + len(_HERMES_CLOSE)
        calls.append(ToolCall(start, end, _hermes_name(text[body_start:close])))
        pos = end
    return calls


def _regex(text: str, pattern: re.Pattern) -> list[ToolCall]:
    """Non-empty matches of a user pattern; the name from its group ``name`` when it has one."""
    named = "name" in pattern.groupindex
    calls = []
    for m in pattern.finditer(text):
        if m.end() > m.start():
            name = (m["name"] or "").strip() if named else ""
            calls.append(ToolCall(m.start(), m.end(), name or None))
    return calls


def find_tool_calls(text: str, fmt: str | re.Pattern = "function_xml", *, strict: bool = False) -> list[ToolCall]:
    """Tool-call blocks of one message, sorted and non-overlapping, with their tool names.

    ``strict`` keeps only closed blocks; by default a trailing block that is never closed (agent
    frameworks stop generation at ``</function``) runs to the end of the text. A regex ``fmt``
    ignores ``strict``.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be one message's str, got {type(text).__name__}")
    if isinstance(fmt, re.Pattern):
        if not isinstance(fmt.pattern, str):
            raise TypeError("fmt regex must be compiled from a str pattern, not bytes")
        return _regex(text, fmt)
    if fmt == "function_xml":
        return _function_xml(text, strict)
    if fmt == "hermes":
        return _hermes(text, strict)
    raise ValueError(f"unknown tool-call format {fmt!r}: use one of {', '.join(FORMATS)} or a compiled re.Pattern")


def find_tool_spans(
    text: str, fmt: str | re.Pattern = "function_xml", *, strict: bool = False
) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of the tool-call blocks of one message (see ``find_tool_calls``)."""
    return [(c.start, c.end) for c in find_tool_calls(text, fmt, strict=strict)]


def _xml_values(text: str, call: ToolCall) -> list[tuple[int, int]]:
    """Values of one ``<function=...>`` block: from ``<parameter=KEY>`` to its ``</parameter>`` or the block's end."""
    body = text.find(">", call.start + len(_FUNCTION_OPEN)) + 1
    end = call.end
    if end - len(_FUNCTION_CLOSE) >= body and text.startswith(_FUNCTION_CLOSE, end - len(_FUNCTION_CLOSE)):
        end -= len(_FUNCTION_CLOSE)
    values, pos = [], body
    while (opener := text.find(_PARAM_OPEN, pos, end)) >= 0:
        gt = text.find(">", opener + len(_PARAM_OPEN), end)
        if gt < 0:
            break
        close = text.find(_PARAM_CLOSE, gt + 1, end)
        values.append((gt + 1, end if close < 0 else close))
        if close < 0:
            break
        pos = close + len(_PARAM_CLOSE)
    return values


def _skip_ws(s: str, i: int, end: int) -> int:
    while i < end and s[i] in _JSON_WS:
        i += 1
    return i


def _json_value_end(s: str, i: int, end: int) -> tuple[int, bool]:
    """End of the JSON value at ``s[i]``, and whether it is complete; where the text ends or stops being
    JSON first, that position and False. Containers are matched by brackets (strings skipped), not validated."""
    if s[i] == '"':
        m = _JSON_STRING.match(s, i, end)
        return (m.end(), True) if m else (end, False)
    if s[i] in _CLOSERS:
        stack, j = [], i
        while j < end:
            c = s[j]
            if c == '"':
                m = _JSON_STRING.match(s, j, end)
                if m is None:
                    return end, False
                j = m.end()
                continue
            if c in _CLOSERS:
                stack.append(_CLOSERS[c])
            elif c in "]}":
                if c != stack.pop():
                    return j, False
                if not stack:
                    return j + 1, True
            j += 1
        return end, False
    m = _JSON_SCALAR.match(s, i, end)
    return (m.end(), True) if m else (i, False)


def _json_members(s: str, i: int, end: int) -> Iterator[tuple[str, int, int, bool]]:
    """``(key, value start, value end, complete)`` of the members of the object at ``s[i] == "{"``,
    as far as the text is an object (a truncated last value runs to where the text stops)."""
    j = _skip_ws(s, i + 1, end)
    while j < end and s[j] == '"':
        m = _JSON_STRING.match(s, j, end)
        if m is None:
            return
        try:
            key = json.loads(m[0], strict=False)
        except ValueError:
            key = m[0][1:-1]
        j = _skip_ws(s, m.end(), end)
        if j >= end or s[j] != ":":
            return
        j = _skip_ws(s, j + 1, end)
        if j >= end:
            return
        stop, complete = _json_value_end(s, j, end)
        if stop == j:
            return
        yield key, j, stop, complete
        j = _skip_ws(s, stop, end)
        if not complete or j >= end or s[j] != ",":
            return
        j = _skip_ws(s, j + 1, end)


def _hermes_values(text: str, call: ToolCall) -> list[tuple[int, int]]:
    """Values of one ``<tool_call>`` block: each member value of ``"arguments"`` (string contents without quotes;
    an ``arguments`` that is not an object is one value)."""
    end = call.end
    if text.startswith(_HERMES_CLOSE, end - len(_HERMES_CLOSE)) and end - len(_HERMES_CLOSE) >= call.start + len(
        _HERMES_OPEN
    ):
        end -= len(_HERMES_CLOSE)
    i = _skip_ws(text, call.start + len(_HERMES_OPEN), end)
    if i >= end or text[i] != "{":
        return []
    values = []
    for key, vs, ve, complete in _json_members(text, i, end):
        if key != "arguments":
            continue
        members = (
            [(a, b, c) for _, a, b, c in _json_members(text, vs, end)] if text[vs] == "{" else [(vs, ve, complete)]
        )
        for a, b, c in members:
            values.append((a + 1, b - 1 if c else b) if text[a] == '"' else (a, b))
    return values


def find_arg_spans(
    text: str,
    fmt: str = "function_xml",
    *,
    calls: Sequence[ToolCall] | None = None,
    strict: bool = False,
) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of the argument values inside the tool-call blocks of one message.

    ``function_xml``: the text between ``<parameter=KEY>`` and its ``</parameter>`` (an unclosed
    last parameter runs to the end of the block). ``hermes``: the JSON value of each key of
    ``"arguments"`` (string contents without the quotes, numbers, literals, nested values whole); a
    truncated body's last value runs to where the text stops being JSON. ``calls`` defaults to
    ``find_tool_calls(text, fmt, strict=strict)``. Empty values give no span.
    """
    if fmt not in FORMATS:
        raise ValueError(
            f"argument values are known only for the formats {', '.join(FORMATS)}, not {fmt!r}: "
            "pass the value spans yourself to token_tool_args"
        )
    if calls is None:
        calls = find_tool_calls(text, fmt, strict=strict)
    values = _xml_values if fmt == "function_xml" else _hermes_values
    return [(a, b) for call in calls for a, b in values(text, call) if b > a]


def _check_offsets(offsets: Sequence[tuple[int, int]], length: int) -> None:
    for i, (s, e) in enumerate(offsets):
        if s < 0 or e > length:
            raise ValueError(
                f"offsets[{i}] = ({s}, {e}) lies outside the text (length {length}): offsets must be character "
                "spans in this same message text (e.g. from token_offsets or return_offsets_mapping)"
            )


def _merged(spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, disjoint union of the non-empty spans."""
    merged: list[tuple[int, int]] = []
    for a, b in sorted((int(a), int(b)) for a, b in spans if b > a):
        if merged and a <= merged[-1][1]:
            if b > merged[-1][1]:
                merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    return merged


def _overlap_index(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """Per token, the index of the sorted disjoint span it overlaps by >= 1 character; -1 for none or empty tokens.

    A two-pointer sweep (pointer to the first span ending after the token's start), re-seeked by
    bisection only when token starts go backwards.
    """
    ends = [b for _, b in spans]
    n = len(spans)
    out: list[int] = []
    j, prev = 0, 0
    for s, e in offsets:
        if e <= s:
            out.append(-1)
            continue
        if s < prev:
            j = bisect.bisect_right(ends, s)
        prev = s
        while j < n and ends[j] <= s:
            j += 1
        out.append(j if j < n and spans[j][0] < e else -1)
    return out


def classify_tokens(
    text: str,
    offsets: Sequence[tuple[int, int]],
    *,
    spans: Sequence[tuple[int, int]] | None = None,
    fmt: str | re.Pattern = "function_xml",
    strict: bool = False,
) -> list[TokenClass]:
    """Label each token of one assistant message: IGNORE (empty span), TOOL_CALL (overlaps a block), else REASONING.

    ``offsets[i]`` is token i's character span in ``text``; ``spans`` overrides the blocks found with ``fmt``.
    """
    offsets = [(int(s), int(e)) for s, e in offsets]
    _check_offsets(offsets, len(text))
    check_offsets_order(offsets)
    if spans is None:
        spans = find_tool_spans(text, fmt, strict=strict)
    hits = _overlap_index(offsets, _merged(spans))
    empty, inside, outside = TokenClass.IGNORE, TokenClass.TOOL_CALL, TokenClass.REASONING
    return [inside if h >= 0 else (empty if e <= s else outside) for h, (s, e) in zip(hits, offsets, strict=True)]


def token_tool_args(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """Per token, 1 when it overlaps an argument value span (``find_arg_spans``) by >= 1 character, else 0.

    The same overlap rule as TOOL_CALL, so a token marked 1 is always a TOOL_CALL token; the other
    TOOL_CALL tokens are the call's syntax (tags, names, delimiters, whitespace between them).
    """
    offsets = [(int(s), int(e)) for s, e in offsets]
    return [int(h >= 0) for h in _overlap_index(offsets, _merged(spans))]


def token_tool_ids(offsets: Sequence[tuple[int, int]], calls: Sequence[ToolCall]) -> list[int]:
    """Per token, ``tool_id`` of the call it overlaps (``"unknown"`` when nameless), ``NO_TOOL`` (-1) elsewhere.

    ``calls`` must not overlap (``find_tool_calls`` guarantees it); with ``classify_tokens`` on the
    same spans, exactly the TOOL_CALL tokens get an id.
    """
    ordered = sorted(calls, key=lambda c: c.start)
    for a, b in itertools.pairwise(ordered):
        if b.start < a.end:
            raise ValueError(f"tool calls overlap: {a} and {b}; pass non-overlapping calls as find_tool_calls returns")
    kept = [c for c in ordered if c.end > c.start]
    ids = [tool_id(c.name if c.name is not None else UNKNOWN_TOOL) for c in kept]
    hits = _overlap_index([(int(s), int(e)) for s, e in offsets], [(c.start, c.end) for c in kept])
    return [ids[h] if h >= 0 else NO_TOOL for h in hits]
