"""The classifier on real SWE-agent trajectories, tokenized with the real byte-level BPE, per assistant message."""

from __future__ import annotations

import re
import unicodedata

import pytest
from conftest import TRAJECTORIES
from tokenizers import Tokenizer

from agent_obs import TokenClass, classify_tokens, find_tool_calls, token_offsets, token_tool_ids, tool_id
from agent_obs.tools import NO_TOOL

README_REGEX = re.compile(r"<function=([^>]+)>.*?</function>", re.DOTALL)  # how the data's README counts blocks
PARAMETER = re.compile(r"<parameter=([^>]+)>(.*?)</parameter>", re.DOTALL)
DECLARED = re.compile(r"---- BEGIN FUNCTION #\d+: (\S+) ----")
FILES = sorted(p.name for p in TRAJECTORIES.glob("*.jsonl"))


def check_assistant_turn(text: str, tok: Tokenizer, tt) -> str:
    """Assert the classification of one assistant message; return its tool's name."""
    ids = tok.encode(text).ids
    decoded = tok.decode(ids, skip_special_tokens=False)
    assert decoded == unicodedata.normalize("NFC", text)
    offsets = token_offsets(ids, tok)
    assert tt.encode(text, add_bos=False, add_eos=False) == ids
    assert token_offsets(ids, tt) == offsets

    (block,) = README_REGEX.finditer(decoded)
    calls = find_tool_calls(decoded)
    assert calls == find_tool_calls(decoded, strict=True)
    assert [(c.start, c.end, c.name) for c in calls] == [(block.start(), block.end(), block[1])]
    a, b = block.span()

    classes = classify_tokens(decoded, offsets)
    tool = [i for i, c in enumerate(classes) if c == TokenClass.TOOL_CALL]
    first, last = tool[0], tool[-1]
    assert tool == list(range(first, last + 1)), "tool-call tokens must be one contiguous run"
    assert all(c == TokenClass.REASONING for i, c in enumerate(classes) if not first <= i <= last)
    # TOOL_CALL tokens decode to text holding the whole block, and no more than their edge tokens add.
    assert block[0] in tok.decode(ids[first : last + 1], skip_special_tokens=False)
    assert offsets[first][1] > a and offsets[last][0] < b
    # REASONING tokens decode to the text before and after the block, never into it.
    before = tok.decode(ids[:first], skip_special_tokens=False)
    after = tok.decode(ids[last + 1 :], skip_special_tokens=False)
    assert decoded.startswith(before) and len(before) <= a
    assert decoded.endswith(after) and len(decoded) - len(after) >= b
    assert README_REGEX.search(before + after) is None

    want = tool_id(block[1])
    assert token_tool_ids(offsets, calls) == [want if c == TokenClass.TOOL_CALL else NO_TOOL for c in classes]
    return calls[0].name


@pytest.mark.parametrize("file", FILES)
def test_every_assistant_turn_has_one_block_classified_exactly(file, trajectories, tokenizers_bpe, torchtune_bpe):
    turns = 0
    for conv in trajectories[file]:
        declared = set(DECLARED.findall(conv[0]["content"])) if conv[0]["role"] == "system" else set()
        for msg in conv:
            if msg["role"] == "assistant":
                tool = check_assistant_turn(msg["content"], tokenizers_bpe, torchtune_bpe)
                assert not declared or tool in declared, f"{tool} is not declared in the system prompt"
                turns += 1
    assert turns > 0


def data_card() -> dict[str, list[int]]:
    """The table of tests/data/trajectories/README.md: file -> conversations, turns, blocks, parameterless,
    blocks with ``<`` in a value, longest block."""
    card = {}
    for line in (TRAJECTORIES / "README.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0].endswith(".jsonl"):
            card[cells[0]] = [int(c) for c in cells[1:7]]
    return card


def test_data_card_matches_the_files_and_the_classifier_finds_every_block(trajectories):
    card = data_card()
    assert sorted(card) == FILES == sorted(trajectories)
    names = set()
    for file, convs in trajectories.items():
        assistant = [m["content"] for conv in convs for m in conv if m["role"] == "assistant"]
        blocks = [b for text in assistant for b in README_REGEX.finditer(text)]
        counts = [
            len(convs),
            len(assistant),
            len(blocks),
            sum("<parameter=" not in b[0] for b in blocks),
            sum(any("<" in p[2] for p in PARAMETER.finditer(b[0])) for b in blocks),
            max(len(b[0]) for b in blocks),
        ]
        assert counts == card[file], f"{file}: README's table says {card[file]}, the file holds {counts}"
        calls = [c for text in assistant for c in find_tool_calls(text)]
        assert [c.name for c in calls] == [b[1] for b in blocks]
        names |= {c.name for c in calls}
    assert {"bash", "str_replace_editor", "submit"} <= names


def test_the_kept_subset_holds_the_hard_cases():
    """Trimming the data must keep parameterless calls, '<' inside values and a block over 10 K characters."""
    card = data_card().values()
    assert sum(row[3] for row in card) >= 3
    assert sum(row[4] for row in card) >= 1
    assert max(row[5] for row in card) > 10_000


def test_whole_conversation_regex_goes_wrong_where_per_message_does_not(trajectories):
    """System prompts quote `<function=`: over a rendered conversation a match runs across messages."""
    conv = trajectories["swesmith_ft_xml_example.jsonl"][0]
    rendered = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in conv)
    assert any("<|im_end|>" in rendered[c.start : c.end] for c in find_tool_calls(rendered, strict=True))
    assistant = [m["content"] for m in conv if m["role"] == "assistant"]
    assert [len(find_tool_calls(t)) for t in assistant] == [1] * len(assistant)
