"""The tool-call classifier against independent references: Python's regex engine and brute-force overlap."""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
import subprocess
import sys
import unicodedata
import zlib

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from agent_obs import (
    TokenClass,
    classify_tokens,
    find_tool_calls,
    token_offsets,
    token_tool_ids,
    tool_id,
    tool_name,
)
from agent_obs.classify import UNKNOWN_TOOL, find_arg_spans, find_tool_spans, token_tool_args
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


# ---------------------------------------------------------------- tool-call anatomy: argument values

XML_BODY = re.compile(r"<function=[^>]+>(.*?)</function>", re.DOTALL)
PARAM_VALUE = re.compile(r"<parameter=[^>]*>(.*?)(?:</parameter>|\Z)", re.DOTALL)
VALUE_PIECES = st.sampled_from(
    ["</parameter", "</paramete", "</param", "</parameter >", "<parameter=x>", "</function", "a < b", ">", "<", "\n"]
)
VALUE = st.lists(st.one_of(VALUE_PIECES, FREE_TEXT), max_size=4).map("".join)


@st.composite
def xml_args_block(draw) -> str:
    """A block whose values hold '<', '>', '</parameter' prefixes and openers; maybe an unclosed last parameter."""
    params = draw(st.lists(st.tuples(st.sampled_from(["command", "old_str", "", "a b"]), VALUE), max_size=3))
    body = "".join(f"\n<parameter={k}>{v}</parameter>" for k, v in params)
    if draw(st.booleans()):
        body += f"\n<parameter={draw(st.sampled_from(['message', 'path']))}>{draw(VALUE)}"  # never closed
    body += draw(st.sampled_from(["", "\n<parameter=x", "\n<parameter=", "\n"]))
    close = draw(st.sampled_from(["\n</function>", "</function>", "", "\n</function"]))
    return f"<function={draw(NAMES)}>{body}{close}"


XML_MESSAGES = st.lists(st.one_of(FREE_TEXT, xml_args_block(), xml_block()), max_size=5).map("".join)


def ref_xml_values(text: str, strict: bool) -> list[tuple[int, int]]:
    """Python's regex: each block's body, then each parameter's value up to </parameter> or the body's end."""
    closed = list(XML_BODY.finditer(text))
    bodies = [m.span(1) for m in closed]
    if not strict:
        tail = OPEN_XML.search(text, closed[-1].end() if closed else 0)
        if tail is not None:
            bodies.append((tail.end(), len(text)))
    out = []
    for a, b in bodies:
        out += [(a + m.start(1), a + m.end(1)) for m in PARAM_VALUE.finditer(text[a:b]) if m.end(1) > m.start(1)]
    return out


def ref_args_tokens(offsets, spans, n) -> list[int]:
    """Brute force per character: a token is an argument token when any of its characters lies in a value."""
    inside = [False] * n
    for a, b in spans:
        for c in range(a, b):
            inside[c] = True
    return [int(any(inside[s:e])) for s, e in offsets]


@settings(max_examples=400, deadline=None)
@given(text=XML_MESSAGES, strict=st.booleans())
def test_function_xml_values_match_regex_reference(text, strict):
    spans = find_arg_spans(text, strict=strict)
    assert spans == ref_xml_values(text, strict)
    calls = find_tool_spans(text, strict=strict)
    assert all(any(a <= s and e <= b for a, b in calls) for s, e in spans), "a value outside every block"


@settings(max_examples=300, deadline=None)
@given(case=st.data(), strict=st.booleans())
def test_token_tool_args_match_brute_force_and_are_tool_call_tokens(case, strict):
    text = case.draw(XML_MESSAGES)
    n = len(text)
    cuts = sorted(set(case.draw(st.lists(st.integers(0, n), max_size=40))) | {0, n})
    ordered = list(itertools.pairwise(cuts))  # token order, as classify_tokens requires
    offsets = ordered + case.draw(st.lists(st.tuples(st.integers(0, n), st.integers(0, n))))
    spans = find_arg_spans(text, strict=strict)
    args = token_tool_args(offsets, spans)
    assert args == ref_args_tokens(offsets, ref_xml_values(text, strict), n)
    classes = classify_tokens(text, ordered, strict=strict)
    assert all(c == TokenClass.TOOL_CALL for a, c in zip(args[: len(ordered)], classes, strict=True) if a)


JSON_STRINGS = st.one_of(
    st.text(max_size=8),
    st.sampled_from(['a"b', "c\\d", "</tool_call", "<b>", "{", "}", "[", "]", ",", ":", "\n", "é", "\\u00e9"]),
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | JSON_STRINGS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(JSON_STRINGS, inner, max_size=3),
    max_leaves=8,
)


@st.composite
def hermes_args_message(draw) -> tuple[str, int, list[tuple[int, int]]]:
    """A message with one Hermes call built piece by piece, where each argument value's span is recorded as it is
    written (string values: the contents between the quotes); returns text, block start and the spans."""
    dump = functools.partial(json.dumps, ensure_ascii=draw(st.booleans()))
    colon, sep = draw(st.sampled_from([": ", ":", " : "])), draw(st.sampled_from([", ", ",", ",\n  "]))
    args = draw(st.one_of(st.dictionaries(JSON_STRINGS, JSON_VALUES, max_size=4), JSON_VALUES))
    members = [("name", draw(NAMES)), ("arguments", args)]
    if draw(st.booleans()):
        members.reverse()
    out = [draw(st.sampled_from(["", "Let me look.\n", "a < b\n\n"]))]
    start = len(out[0])
    out += ["<tool_call>", draw(st.sampled_from(["", "\n", " "])), "{"]
    spans: list[tuple[int, int]] = []

    def value(v) -> None:
        at, written = sum(map(len, out)), dump(v)
        out.append(written)
        spans.append((at + 1, at + len(written) - 1) if isinstance(v, str) else (at, at + len(written)))

    for i, (key, v) in enumerate(members):
        out.append((sep if i else "") + dump(key) + colon)
        if key == "name":
            out.append(dump(v))
        elif isinstance(v, dict):
            out.append("{")
            for j, (k, w) in enumerate(v.items()):
                out.append((sep if j else "") + dump(k) + colon)
                value(w)
            out.append("}")
        else:
            value(v)
    out += ["}", draw(st.sampled_from(["\n</tool_call>", "</tool_call>"]))]
    text = "".join(out)
    assume("</tool_call>" not in text[start : -len("</tool_call>")])
    return text, start, [(a, b) for a, b in spans if b > a]


@settings(max_examples=400, deadline=None)
@given(case=hermes_args_message(), cut=st.floats(0, 1))
def test_hermes_values_match_construction_and_truncation_clips_them(case, cut):
    """Whole blocks give exactly the written value spans; a block cut anywhere (generation stopped) gives the
    same spans clipped to the cut: a value in progress runs to the end."""
    text, start, spans = case
    assert find_arg_spans(text, "hermes") == spans
    assert find_arg_spans(text, "hermes", strict=True) == spans
    n = start + round(cut * (len(text) - start))
    clipped = [(a, min(b, n)) for a, b in spans if min(b, n) > a]
    assert find_arg_spans(text[:n], "hermes") == clipped
    assert find_arg_spans(text[:n], "hermes", strict=True) == (clipped if n == len(text) else [])


def test_documented_value_spans():
    xml = "Do.\n<function=str_replace_editor>\n<parameter=old_str>\nif a < b:</parameter>\n<parameter=new_str>x"
    assert [xml[a:b] for a, b in find_arg_spans(xml)] == ["\nif a < b:", "x"]
    assert find_arg_spans("<function=submit>\n</function>") == []
    hermes = '<tool_call>{"name": "bash", "arguments": {"cmd": "ls \\"a\\"", "n": -1.5e3, "f": [true, {}]}}</tool_call>'
    assert [hermes[a:b] for a, b in find_arg_spans(hermes, "hermes")] == ['ls \\"a\\"', "-1.5e3", "[true, {}]"]
    openai = '<tool_call>{"name": "bash", "arguments": "{\\"cmd\\": \\"ls\\"}"}</tool_call>'
    assert [openai[a:b] for a, b in find_arg_spans(openai, "hermes")] == ['{\\"cmd\\": \\"ls\\"}']
    assert find_arg_spans("<tool_call>not json</tool_call>", "hermes") == []
    with pytest.raises(ValueError, match="function_xml, hermes"):
        find_arg_spans("x", re.compile("x"))


def test_real_trajectories_values_match_references(trajectories, tokenizers_bpe):
    """Every assistant message of the real data: value spans equal the regex reference, argument tokens (real BPE
    offsets) equal the brute-force overlap and are TOOL_CALL tokens, and the data's value kinds occur."""
    seen = {"values": 0, "lt_in_value": 0, "unclosed_param": 0, "long_value": 0}
    for convs in trajectories.values():
        for conv in convs:
            for m in conv:
                if m["role"] != "assistant" or not m["content"]:
                    continue
                text = unicodedata.normalize("NFC", m["content"])
                spans = find_arg_spans(text)
                assert spans == ref_xml_values(text, strict=False)
                offsets = token_offsets(tokenizers_bpe.encode(text).ids, tokenizers_bpe)
                args = token_tool_args(offsets, spans)
                assert args == ref_args_tokens(offsets, spans, len(text))
                classes = classify_tokens(text, offsets)
                assert all(c == TokenClass.TOOL_CALL for a, c in zip(args, classes, strict=True) if a)
                seen["values"] += len(spans)
                seen["lt_in_value"] += any("<" in text[a:b] for a, b in spans)
                seen["unclosed_param"] += any(not text.startswith("</parameter>", b) for _, b in spans)
                seen["long_value"] += any(b - a > 2000 for a, b in spans)
    assert seen["values"] > 100 and seen["lt_in_value"] > 0 and seen["long_value"] > 0, seen


@settings(max_examples=200, deadline=None)
@given(first=hermes_args_message(), second=hermes_args_message(), data=st.data())
def test_hermes_values_of_several_blocks_and_their_tokens(first, second, data):
    """Two calls in one message keep their own values; argument tokens equal the brute-force overlap."""
    (a, _, spans_a), (b, _, spans_b) = first, second
    text = a + b
    spans = spans_a + [(s + len(a), e + len(a)) for s, e in spans_b]
    assert find_arg_spans(text, "hermes") == spans
    n = len(text)
    cuts = sorted(set(data.draw(st.lists(st.integers(0, n), max_size=30))) | {0, n})
    offsets = list(itertools.pairwise(cuts))
    assert token_tool_args(offsets, spans) == ref_args_tokens(offsets, spans, n)
