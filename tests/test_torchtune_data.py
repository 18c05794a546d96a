"""torchtune data path: JSONToMessages, AgentSFTDataset vs torchtune's SFTDataset, collate, packing."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from agent_obs.integrations.torchtune.collate import padded_collate_agent_packed, padded_collate_agent_sft
from agent_obs.integrations.torchtune.dataset import AgentSFTDataset, DataFormatError
from agent_obs.integrations.torchtune.demo import DATA_DIR, prepare_assets
from agent_obs.integrations.torchtune.messages import JSONToMessages, MessageFormatError
from tokenizers import Tokenizer
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, OpenAIToMessages
from torchtune.datasets import SFTDataset
from torchtune.models.qwen2_5 import qwen2_5_tokenizer

from agent_obs.token_class import TokenClass
from agent_obs.tools import tool_id

TRAJECTORIES = Path(__file__).resolve().parent / "data" / "trajectories"
BLOCK = re.compile(r"<function=([^>]+)>.*?</function>", re.DOTALL)
IGNORE, REASONING, TOOL_CALL, CONTEXT = (int(c) for c in TokenClass)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    return prepare_assets(tmp_path_factory.mktemp("demo_assets"))


def _tokenizer(assets: Path, max_seq_len: int | None = None):
    d = assets / "tokenizer"
    return qwen2_5_tokenizer(
        path=str(d / "vocab.json"),
        merges_file=str(d / "merges.txt"),
        special_tokens_path=str(d / "tokenizer.json"),
        max_seq_len=max_seq_len,
    )


def reference_layout(messages: list[dict], tok, hf: Tokenizer) -> tuple[list[int], list[int], list[int]]:
    """Tokens, classes and tool ids built independently: Qwen2.5 ChatML by hand, HF offsets, a strict regex."""
    tokens, classes, tools = [], [], []

    def add(ids, cls, tid=-1):
        tokens.extend(ids)
        classes.extend([cls] * len(ids))
        tools.extend([tid] * len(ids))

    for i, m in enumerate(messages):
        add([tok.im_start_id, *tok.encode(f"{m['role']}\n", add_bos=False, add_eos=False)], IGNORE)
        enc = hf.encode(m["content"], add_special_tokens=False)
        if m["role"] == "assistant":
            blocks = [(b.start(), b.end(), b.group(1)) for b in BLOCK.finditer(m["content"])]
            for tid, (s, e) in zip(enc.ids, enc.offsets, strict=True):
                hit = [b for b in blocks if s < b[1] and b[0] < e]
                cls = TOOL_CALL if hit else (REASONING if e > s else IGNORE)
                add([tid], cls, tool_id(hit[0][2]) if hit else -1)
        else:
            add(enc.ids, CONTEXT)
        if not (m["role"] == "assistant" and i == len(messages) - 1):
            add([tok.im_end_id, *tok.encode("\n", add_bos=False, add_eos=False)], IGNORE)
    add([tok.eos_id], IGNORE)
    return tokens, classes, tools


@pytest.mark.parametrize("path", sorted(TRAJECTORIES.glob("*.jsonl")), ids=lambda p: p.name)
def test_tokens_labels_identical_to_sftdataset_and_classes_match_reference(assets, path):
    tok = _tokenizer(assets)
    hf = Tokenizer.from_file(str(assets / "tokenizer" / "tokenizer.json"))
    ours = AgentSFTDataset(tok, source="json", data_files=str(path), message_transform=JSONToMessages())
    ref = SFTDataset(
        source="json", data_files=str(path), split="train", message_transform=OpenAIToMessages(), model_transform=tok
    )
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(ours) == len(ref) == len(rows)
    n_tool = 0
    for i, row in enumerate(rows):
        a, b = ours[i], ref[i]
        assert a["tokens"] == b["tokens"], f"{path.name} row {i}: tokens differ from SFTDataset"
        assert list(a["labels"]) == list(b["labels"]), f"{path.name} row {i}: labels differ"
        tokens, classes, tools = reference_layout(row["messages"], tok, hf)
        assert tokens == a["tokens"], f"{path.name} row {i}: the hand-built reference layout is wrong"
        assert a["token_classes"] == classes, f"{path.name} row {i}: classes differ from the reference"
        assert a["tool_ids"] == tools, f"{path.name} row {i}: tool ids differ from the reference"
        n_tool += sum(c == TOOL_CALL for c in classes)
    assert n_tool > 0


def test_json_to_messages_renders_openai_tool_calls_inline():
    row = {
        "conversation": [
            {"role": "user", "content": "list files"},
            {
                "role": "assistant",
                "content": "Let me look.",
                "tool_calls": [{"function": {"name": "bash", "arguments": '{"command": "ls -la"}'}}],
            },
            {"role": "tool", "content": "a.py"},
            {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "submit", "arguments": {}}}]},
        ]
    }
    msgs = JSONToMessages(column_map={"messages": "conversation"})(row)["messages"]
    assert [m.role for m in msgs] == ["user", "assistant", "user", "assistant"]
    assert msgs[1].text_content == "Let me look.\n\n<function=bash>\n<parameter=command>ls -la</parameter>\n</function>"
    assert msgs[3].text_content == "<function=submit>\n</function>"
    assert [m.masked for m in msgs] == [True, False, True, False]
    ipython = JSONToMessages(column_map={"messages": "conversation"}, tool_role="ipython")(row)["messages"]
    assert ipython[2].role == "ipython"


def test_tool_role_ipython_dataset_trains(assets, tmp_path):
    f = tmp_path / "tool.jsonl"
    conv = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": "<function=bash>\n<parameter=command>ls</parameter>\n</function>"},
        {"role": "tool", "content": "a.py"},
        {"role": "assistant", "content": "done\n\n<function=submit>\n</function>"},
    ]
    f.write_text(json.dumps({"messages": conv}) + "\n", encoding="utf-8")
    tok = _tokenizer(assets)
    ds = AgentSFTDataset(tok, source="json", data_files=str(f), message_transform=JSONToMessages(tool_role="ipython"))
    sample = ds[0]
    assert "<tool_response>" in tok.decode(sample["tokens"], skip_special_tokens=False)
    assert sample["token_classes"].count(TOOL_CALL) > 0 and sample["token_classes"].count(REASONING) > 0


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ('{"messages": [{"role": "user", "content": "hi"}', "malformed JSON"),
        ('{"conversations": []}', "no column 'messages'"),
        ('{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}', "unknown role"),
    ],
    ids=["malformed", "missing-column", "unknown-role"],
)
def test_bad_data_names_file_line_and_fix(assets, tmp_path, line, needle):
    good = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    f = tmp_path / "bad.jsonl"
    f.write_text(f"{good}\n{good}\n{line}\n", encoding="utf-8")
    with pytest.raises(DataFormatError) as err:
        AgentSFTDataset(_tokenizer(assets), source="json", data_files=str(f), message_transform=JSONToMessages())
    message = str(err.value)
    assert f"{f}:3:" in message and needle in message
    fixes = {"malformed JSON": "fix or delete", "no column": "column_map", "unknown role": "use one of"}
    assert next(fix for key, fix in fixes.items() if key in needle) in message


def test_unknown_role_in_a_row_names_the_message():
    with pytest.raises(MessageFormatError, match=r"message 1: unknown role 'robot'"):
        JSONToMessages()({"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]})


def test_collate_pads_classes_ignore_tools_minus_one_args_zero_and_lists_sample_ids(assets):
    tok = _tokenizer(assets)
    ds = AgentSFTDataset(
        tok, source="json", data_files=str(DATA_DIR / "agent_sft_val.jsonl"), message_transform=JSONToMessages()
    )
    a, b = ds[0], ds[1]
    batch = padded_collate_agent_sft([a, b], padding_idx=tok.pad_id, ignore_idx=CROSS_ENTROPY_IGNORE_IDX)
    seq = batch["tokens"].shape[1]
    assert batch["token_classes"].shape == batch["tool_ids"].shape == batch["tool_args"].shape == (2, seq)
    assert batch["sample_ids"] == ["agent_sft_val.jsonl:1", "agent_sft_val.jsonl:2"]
    assert any(sample["tool_args"].count(1) for sample in (a, b))  # argument values are marked
    for row, sample in enumerate((a, b)):
        n = len(sample["tokens"])
        assert batch["token_classes"][row, :n].tolist() == sample["token_classes"]
        assert batch["tool_ids"][row, :n].tolist() == sample["tool_ids"]
        assert batch["tool_args"][row, :n].tolist() == sample["tool_args"]
        assert (batch["token_classes"][row, n:] == IGNORE).all() and (batch["tool_ids"][row, n:] == -1).all()
        assert (batch["tool_args"][row, n:] == 0).all()
        assert (batch["labels"][row, n:] == CROSS_ENTROPY_IGNORE_IDX).all()


def test_packing_keeps_classes_tools_args_and_row_ids_aligned(assets):
    max_len = 2048
    tok = _tokenizer(assets, max_seq_len=max_len)
    kw = {"source": "json", "data_files": str(DATA_DIR / "agent_sft_val.jsonl"), "message_transform": JSONToMessages()}
    rows = [AgentSFTDataset(tok, **kw)[j] for j in range(8)]
    for j, row in enumerate(rows):
        row["sample_ids"] = [j] * len(row["tokens"])  # packed: the row index of every token
    packed = AgentSFTDataset(tok, packed=True, **kw)
    keys = ("tokens", "labels", "token_classes", "tool_ids", "tool_args", "sample_ids")
    expected, current = [], {k: [] for k in keys}  # greedy packing by length, as torchtune packs
    for row in rows:
        if len(current["tokens"]) + len(row["tokens"]) > max_len:
            expected.append(current)
            current = {k: [] for k in keys}
        for k in keys:
            current[k].extend(row[k])
    expected.append(current)
    assert packed.packed and len(packed) == len(expected) < len(rows)
    for pack, want in zip((packed[i] for i in range(len(packed))), expected, strict=True):
        n = len(want["tokens"])
        for k in keys:
            assert pack[k][:n].tolist() == want[k], k
        assert (pack["token_classes"][n:] == IGNORE).all() and (pack["tool_ids"][n:] == -1).all()
        assert (pack["tool_args"][n:] == 0).all() and (pack["sample_ids"][n:] == -1).all()
    batch = padded_collate_agent_packed([packed[0], packed[1]])
    assert batch["token_classes"].shape == batch["tokens"].shape == batch["sample_ids"].shape == (2, max_len)
    for key in ("tool_ids", "tool_args", "sample_ids"):
        assert torch.equal(batch[key][1], packed[1][key])
    assert packed.sample_id(3) == "agent_sft_val.jsonl:4"


def test_sample_ids_name_file_and_line_through_blank_lines_filters_and_files(assets, tmp_path):
    lines = (DATA_DIR / "agent_sft_val.jsonl").read_text().splitlines()[:3]
    first, second = tmp_path / "a" / "part.jsonl", tmp_path / "b" / "part.jsonl"
    first.parent.mkdir(), second.parent.mkdir()
    first.write_text(f"{lines[0]}\n\n{lines[1]}\n")
    second.write_text(f"\n{lines[2]}\n")
    tok = _tokenizer(assets)
    kw = {"source": "json", "message_transform": JSONToMessages()}
    ds = AgentSFTDataset(tok, data_files=[str(first), str(second)], **kw)
    assert [ds[i]["sample_id"] for i in range(len(ds))] == [f"{first}:1", f"{first}:3", f"{second}:2"]
    for i, line in enumerate(lines):  # each id names the line its sample came from
        alone = tmp_path / f"alone{i}.jsonl"
        alone.write_text(line + "\n")
        assert ds[i]["tokens"] == AgentSFTDataset(tok, data_files=str(alone), **kw)[0]["tokens"]
    kept = AgentSFTDataset(tok, data_files=str(first), filter_fn=lambda row: row["sample_id"] != "part.jsonl:1", **kw)
    assert [kept[i]["sample_id"] for i in range(len(kept))] == ["part.jsonl:3"]


def test_classification_off_or_failing_still_trains(assets, caplog):
    tok = _tokenizer(assets)
    kw = {"source": "json", "data_files": str(DATA_DIR / "agent_sft_val.jsonl"), "message_transform": JSONToMessages()}
    plain = AgentSFTDataset(tok, enable_token_classification=False, **kw)
    assert "token_classes" not in plain[0] and "tool_ids" not in plain[0]
    broken = AgentSFTDataset(tok, tool_call_format="no-such-format", **kw)
    with caplog.at_level("WARNING"):
        samples = [broken[0], broken[1]]
    warnings = [r for r in caplog.records if "token classification failed" in r.getMessage()]
    assert len(warnings) == 1  # once, not per sample
    for sample, ref in zip(samples, (plain[0], plain[1]), strict=True):
        assert sample["tokens"] == ref["tokens"] and list(sample["labels"]) == list(ref["labels"])
        assert set(sample["token_classes"]) == {IGNORE, CONTEXT} and set(sample["tool_ids"]) == {-1}


def test_truncated_sample_keeps_the_untruncated_classes_prefix(assets):
    kw = {"source": "json", "data_files": str(DATA_DIR / "agent_sft_val.jsonl"), "message_transform": JSONToMessages()}
    full = AgentSFTDataset(_tokenizer(assets), **kw)[0]
    for max_len in (300, 517, len(full["tokens"]) - 3):
        cut = AgentSFTDataset(_tokenizer(assets, max_seq_len=max_len), **kw)[0]
        assert len(cut["tokens"]) == len(cut["token_classes"]) == len(cut["tool_ids"]) == max_len
        assert cut["token_classes"][:-1] == full["token_classes"][: max_len - 1]
        assert cut["tool_ids"][:-1] == full["tool_ids"][: max_len - 1]
        assert cut["token_classes"][-1] == IGNORE  # the eos that truncation writes last


GOOD_ROW = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}).encode()


@pytest.mark.parametrize(
    ("content", "key", "needle", "line"),
    [
        (b"", "dataset", "is empty", None),
        (b"\n  \n\t\n", "dataset_val", "has only blank lines", None),
        (GOOD_ROW + b'\n{"messages": [{"role": "user", "content": "caf\xe9"}]}\n', "dataset_val", "UTF-8", 2),
    ],
    ids=["empty", "blank-only", "invalid-utf8"],
)
def test_data_file_errors_name_config_key_file_and_line(assets, tmp_path, content, key, needle, line):
    f = tmp_path / "data.jsonl"
    f.write_bytes(content)
    with pytest.raises(DataFormatError) as err:
        AgentSFTDataset(
            _tokenizer(assets), source="json", data_files=str(f), message_transform=JSONToMessages(), config_key=key
        )
    message = str(err.value)
    assert message.startswith(f"{key}") and str(f) in message and needle in message, message
    if line is not None:
        byte = content.split(b"\n")[line - 1].index(b"\xe9") + 1
        assert f"{f}:{line}:" in message and f"byte {byte} of the line" in message
    else:
        assert f"{key}.data_files" in message  # the fix: what to point where


def test_missing_data_file_names_the_config_key_data_files(assets, tmp_path):
    missing = tmp_path / "val.jsonl"
    with pytest.raises(DataFormatError, match=rf"^dataset_val\.data_files: {missing}: no such data file"):
        AgentSFTDataset(
            _tokenizer(assets),
            source="json",
            data_files=[str(DATA_DIR / "agent_sft_val.jsonl"), str(missing)],
            message_transform=JSONToMessages(),
            config_key="dataset_val",
        )


def test_seed_component_path_for_the_message_transform_resolves_to_json_to_messages(assets):
    kw = {"source": "json", "data_files": str(DATA_DIR / "agent_sft_val.jsonl")}
    seed = AgentSFTDataset(
        _tokenizer(assets),
        message_transform={"_component_": "torchtune.data.JSONToMessages", "column_map": {"messages": "messages"}},
        **kw,
    )
    ours = AgentSFTDataset(_tokenizer(assets), message_transform=JSONToMessages(), **kw)
    assert isinstance(seed._sft._message_transform, JSONToMessages)
    assert seed[3]["tokens"] == ours[3]["tokens"] and seed[3]["token_classes"] == ours[3]["token_classes"]


def test_rows_of_a_non_jsonl_source_are_named_by_their_row_index(assets, tmp_path):
    import datasets

    rows = [json.loads(line) for line in (DATA_DIR / "agent_sft_val.jsonl").read_text().splitlines()[:3]]
    path = tmp_path / "val.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    tok = _tokenizer(assets)
    ds = AgentSFTDataset(tok, source="parquet", data_files=str(path), message_transform=JSONToMessages())
    assert [ds[i]["sample_id"] for i in range(len(ds))] == [0, 1, 2]
    batch = padded_collate_agent_sft([ds[0], ds[2]], padding_idx=tok.pad_id)
    assert batch["sample_ids"] == [0, 2]


def test_a_sliced_jsonl_split_names_rows_by_index_and_says_why(assets, caplog):
    tok = _tokenizer(assets)
    path = DATA_DIR / "agent_sft_val.jsonl"
    with caplog.at_level(logging.WARNING):
        ds = AgentSFTDataset(
            tok, source="json", data_files=str(path), split="train[:2]", message_transform=JSONToMessages()
        )
    assert [ds[i]["sample_id"] for i in range(len(ds))] == [0, 1]
    assert "sample ids are row indices, not file:line" in caplog.text and "dataset:" in caplog.text
