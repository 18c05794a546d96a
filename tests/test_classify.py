"""The tool-call classifier against independent references: Python's regex engine and brute-force overlap."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent_obs import TokenClass, classify_tokens, find_tool_calls, find_tool_spans, token_tool_ids, tool_id, tool_name
from agent_obs.classify import UNKNOWN_TOOL
from agent_obs.keys import sanitize_tool_name
from agent_obs.tools import NO_TOOL

STRICT_XML = re.compile(r"<function=([^>]+)>.*?</function>", re.DOTALL)
OPEN_XML = re.compile(r"<function=([^>]+)>")
STRICT_HERMES = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)

# ---------------------------------------------------------------- generated agent messages

WORDS = st.sampled_from(
    [
        "Let me look",
        " at the file",
        "\n\n",
        "héllo",
        "naïve café",
        "日本語のテキスト",
        "😀🚀",
        "👩‍💻",
        "e\u0301",
        "a < b > c",
        "x->y",
        "<div>",
        "</p>",
        "```python\nprint('<hi>')\n```",
        "```\n</function>\n```",
        "<function",
        "function=",
        "<tool_call",
        "</tool_call>",
        "{",
        '"name"',
        "<",
        ">",
        "",
    ]
)
FREE_TEXT = st.lists(st.one_of(WORDS, st.text(max_size=6)), max_size=6).map("".join)
NAMES = st.sampled_from(["bash", "str_replace_editor", "submit", "find_file", "Weird Tool-1", " pad ", "a<b", "é"])


@st.composite
def xml_block(draw) -> str:
    """One SWE-agent block: maybe parameterless, values with '<'/'>', nested openers, or left unclosed."""
    params = draw(
        st.lists(
            st.tuples(st.sampled_from(["command", "path", "old_str", "new_str"]), FREE_TEXT),
            max_size=3,
        )
    )
    body = "".join(f"\n<parameter={k}>{v}</parameter>" for k, v in params)
    if draw(st.booleans()):
        body += draw(st.sampled_from(["<function=inner>", "<function=>", "<function= >", "\n"]))
    close = draw(st.sampled_from(["\n</function>", "</function>", "", "\n</function", "</function>\n"]))
    return f"<function={draw(NAMES)}>{body}{close}"


@st.composite
def hermes_block(draw) -> str:
    """One Hermes call: valid JSON, truncated JSON, or garbage; maybe unclosed."""
    name = draw(NAMES)
    body = draw(
        st.sampled_from(
            [
                json.dumps({"name": name, "arguments": {"cmd": "a<b>"}}),
                json.dumps({"arguments": {}, "name": name}, ensure_ascii=False),
                '{"name": "' + name.replace('"', "") + '", "arguments": {"x": ',
                "not json",
                json.dumps({"name": 3}),
            ]
        )
    )
    close = draw(st.sampled_from(["</tool_call>", "", "</tool_call>\n"]))
    return f"<tool_call>\n{body}\n{close}"


MESSAGES = st.lists(st.one_of(FREE_TEXT, xml_block(), hermes_block()), max_size=6).map("".join)


@st.composite
def message_and_offsets(draw):
    """A message and token spans in token order (as tokenizers give them): a partition at random cut points,
    empty spans anywhere, and tokens that share their first character with the previous one (a split character)."""
    text = draw(MESSAGES)
    n = len(text)
    cuts = sorted(set(draw(st.lists(st.integers(0, n), max_size=40))) | {0, n})
    offsets = [(s - 1 if s > 0 and draw(st.booleans()) else s, e) for s, e in itertools.pairwise(cuts)]
    for i in draw(st.lists(st.integers(0, n), max_size=3)):
        offsets.insert(draw(st.integers(0, len(offsets))), (i, i))
    return text, offsets


# ---------------------------------------------------------------- brute-force references


def ref_xml(text: str, strict: bool) -> list[tuple[int, int, str | None]]:
    """Python's regex for closed blocks; then (non-strict) the first opener after them runs to the end."""
    calls = [(m.start(), m.end(), m[1].strip() or None) for m in STRICT_XML.finditer(text)]
    if not strict:
        tail = OPEN_XML.search(text, calls[-1][1] if calls else 0)
        if tail is not None:
            calls.append((tail.start(), len(text), tail[1].strip() or None))
    return calls


def ref_overlaps(tok: tuple[int, int], span: tuple[int, int]) -> bool:
    (s, e), (a, b) = tok, span
    return e > s and b > a and any(a <= c < b for c in range(s, e))


def ref_classes(offsets, spans) -> list[TokenClass]:
    out = []
    for s, e in offsets:
        if e <= s:
            out.append(TokenClass.IGNORE)
        elif any(ref_overlaps((s, e), sp) for sp in spans):
            out.append(TokenClass.TOOL_CALL)
        else:
            out.append(TokenClass.REASONING)
    return out


# ---------------------------------------------------------------- properties


@settings(max_examples=400, deadline=None)
@given(text=MESSAGES, strict=st.booleans())
def test_function_xml_matches_regex_reference(text, strict):
    calls = find_tool_calls(text, strict=strict)
    assert [tuple(c) for c in calls] == ref_xml(text, strict)
    assert find_tool_spans(text, strict=strict) == [(s, e) for s, e, _ in ref_xml(text, strict)]


@settings(max_examples=400, deadline=None)
@given(case=message_and_offsets(), strict=st.booleans())
def test_classify_tokens_matches_brute_force_overlap(case, strict):
    text, offsets = case
    spans = [(s, e) for s, e, _ in ref_xml(text, strict)]
    assert classify_tokens(text, offsets, strict=strict) == ref_classes(offsets, spans)


@settings(max_examples=300, deadline=None)
@given(case=message_and_offsets(), extra=st.lists(st.tuples(st.integers(0, 50), st.integers(0, 50)), max_size=6))
def test_classify_tokens_with_given_spans_overlapping_or_empty(case, extra):
    text, offsets = case
    spans = [(min(a, len(text)), min(b, len(text))) for a, b in extra]  # may overlap, be empty or reversed
    assert classify_tokens(text, offsets, spans=spans) == ref_classes(offsets, spans)


@settings(max_examples=300, deadline=None)
@given(case=message_and_offsets(), strict=st.booleans())
def test_token_tool_ids_match_brute_force_and_classes(case, strict):
    text, offsets = case
    calls = find_tool_calls(text, strict=strict)
    ids = token_tool_ids(offsets, calls)
    classes = classify_tokens(text, offsets, strict=strict)
    for (s, e), tid, cls in zip(offsets, ids, classes, strict=True):
        hit = [c for c in calls if ref_overlaps((s, e), (c.start, c.end))]
        want = NO_TOOL if not hit else zlib.crc32(sanitize_tool_name(hit[0].name or UNKNOWN_TOOL).encode()) & 0x7FFFFFFF
        assert tid == want
        assert (tid != NO_TOOL) == (cls == TokenClass.TOOL_CALL)


@settings(max_examples=300, deadline=None)
@given(text=MESSAGES, strict=st.booleans())
def test_hermes_matches_regex_reference(text, strict):
    want = [(m.start(), m.end()) for m in STRICT_HERMES.finditer(text)]
    if not strict:
        tail = text.find("<tool_call>", want[-1][1] if want else 0)
        if tail >= 0:
            want.append((tail, len(text)))
    calls = find_tool_calls(text, "hermes", strict=strict)
    assert [(c.start, c.end) for c in calls] == want
    for c in calls:
        body = text[c.start + len("<tool_call>") : c.end].removesuffix("</tool_call>")
        try:
            obj = json.loads(body)
        except ValueError:
            m = re.search(r'"name"\s*:\s*"((?:[^"\\]|\\.)*)"', body)  # truncated JSON: the first "name" string
            try:
                name = json.loads(f'"{m[1]}"', strict=False) if m else None
            except ValueError:  # a bad escape: the raw text
                name = m[1]
            assert c.name == (name if name and name.strip() else None)
        else:
            name = obj.get("name") if isinstance(obj, dict) else None
            assert c.name == (name if isinstance(name, str) and name.strip() else None)


@settings(max_examples=200, deadline=None)
@given(case=message_and_offsets())
def test_custom_regex_spans_and_names(case):
    text, offsets = case
    pattern = re.compile(r"<parameter=(?P<name>[^>]*)>.*?</parameter>", re.DOTALL)
    want = [(m.start(), m.end(), m["name"].strip() or None) for m in pattern.finditer(text)]
    assert [tuple(c) for c in find_tool_calls(text, pattern)] == want
    spans = [(s, e) for s, e, _ in want]
    assert classify_tokens(text, offsets, fmt=pattern) == ref_classes(offsets, spans)
    unnamed = find_tool_calls(text, re.compile(r"<[a-z]+>"))
    assert all(c.name is None for c in unnamed)
    assert [(c.start, c.end) for c in unnamed] == [m.span() for m in re.finditer(r"<[a-z]+>", text)]


# ---------------------------------------------------------------- documented cases


def test_strict_versus_trailing_unclosed_block():
    text = "Run it.\n\n<function=bash>\n<parameter=command>ls -la</parameter>\n"
    assert find_tool_calls(text, strict=True) == []
    (call,) = find_tool_calls(text)
    assert (call.start, call.end, call.name) == (text.index("<function="), len(text), "bash")


def test_angle_brackets_inside_parameter_values_stay_in_the_block():
    value = "if a < b and c > d:\n    print('<html>')\n"
    text = f"Fix.\n<function=str_replace_editor>\n<parameter=new_str>\n{value}\n</parameter>\n</function>\nDone."
    (call,) = find_tool_calls(text)
    assert text[call.start : call.end].startswith("<function=str_replace_editor>")
    assert text[call.start : call.end].endswith("</function>") and value in text[call.start : call.end]
    assert text[call.end :] == "\nDone."


def test_empty_thought_and_adjacent_blocks():
    text = "<function=submit>\n</function><function=bash>\n<parameter=command>x</parameter>\n</function>"
    calls = find_tool_calls(text)
    assert [c.name for c in calls] == ["submit", "bash"]
    assert calls[0].start == 0 and calls[0].end == calls[1].start and calls[1].end == len(text)
    offsets = [(i, i + 1) for i in range(len(text))]
    assert set(classify_tokens(text, offsets)) == {TokenClass.TOOL_CALL}


def test_token_straddling_block_edge_is_tool_call():
    text = "ab<function=x>y</function>cd"
    start, end = find_tool_spans(text)[0]
    offsets = [(0, start), (start - 1, start + 1), (end - 1, end + 1), (end, len(text)), (3, 3)]
    assert classify_tokens(text, offsets) == [
        TokenClass.REASONING,
        TokenClass.TOOL_CALL,
        TokenClass.TOOL_CALL,
        TokenClass.REASONING,
        TokenClass.IGNORE,
    ]


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match=r"function_xml, hermes"):
        find_tool_calls("x", "json")
    with pytest.raises(ValueError, match=r"outside the text \(length 3\)"):
        classify_tokens("abc", [(0, 1), (2, 5)])
    with pytest.raises(ValueError, match="overlap"):
        token_tool_ids([(0, 1)], find_tool_calls("<function=a>x</function>") * 2)
    with pytest.raises(TypeError, match="str"):
        find_tool_calls(b"<function=a></function>")


def test_tool_ids_are_stable_sanitized_crc32_and_registered():
    assert tool_id("Bash ") == tool_id("bash") == zlib.crc32(b"bash") & 0x7FFFFFFF
    assert tool_id("str-replace editor") == zlib.crc32(b"str_replace_editor") & 0x7FFFFFFF
    assert tool_name(tool_id("Str-Replace Editor")) == "str_replace_editor"
    assert tool_name(0x12AB) == "tool_000012ab"
    code = "from agent_obs.tools import tool_id; print(tool_id('find_file'))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    other = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(other.stdout.split()[-1]) == tool_id("find_file")
