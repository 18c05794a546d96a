"""``AgentSFTDataset``: torchtune's ``SFTDataset`` samples plus ``token_classes``, ``tool_ids``, ``tool_args``
and a ``sample_id`` naming the row's source (``"train.jsonl:12"``: file name and 1-based line for local
JSON Lines, the row index otherwise), which the recipe passes to ``observe(sample_ids=...)``.

Same arguments as ``SFTDataset`` builders (the recipe passes the tokenizer first), same
``tokens``/``labels``; local JSON Lines files are checked line by line first so that a bad
row is reported with its file, line and fix instead of deep inside a data loader worker.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from agent_obs.integrations.torchtune.messages import MessageFormatError
from agent_obs.integrations.torchtune.seed_config import resolve_seed_components
from agent_obs.integrations.torchtune.transform import NO_TOOL, AgentSFTTransform
from torch.utils.data import Dataset
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX
from torchtune.datasets import PackedDataset, SFTDataset

from agent_obs.token_class import TokenClass

JSON_TO_MESSAGES = "agent_obs.integrations.torchtune.messages.JSONToMessages"
SAMPLE_ID = "sample_id"
_LOG = logging.getLogger(__name__)


class DataFormatError(ValueError):
    """Bad training data; the message names the file, the line and the fix."""


def check_conversation(messages: Sequence[Any]) -> None:
    """torchtune's ``validate_messages`` rules, with ``ipython`` tool results counting as the user's turn."""
    if len(messages) < 2:
        raise MessageFormatError(f"a conversation needs at least 2 messages, got {len(messages)}")
    last = "assistant"
    for i, m in enumerate(messages):
        role = "user" if m.role == "ipython" else m.role
        if role == "assistant" and last != "user":
            raise MessageFormatError(f"message {i}: assistant message without a user/tool message before it")
        if role == "user" and last == "user" and m.role != "ipython":
            raise MessageFormatError(f"messages {i - 1} and {i}: two consecutive user messages; merge them")
        if m.role == "system" and i > 0:
            raise MessageFormatError(f"message {i}: a system message must come first")
        last = role


def _lines(path: Path, where: str) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of the non-blank lines; ``DataFormatError`` names the line of bad UTF-8."""
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataFormatError(
                    f"{where}: {path}:{lineno}: not valid UTF-8 (byte {exc.start + 1} of the line: "
                    f"{raw[exc.start : exc.start + 4]!r}); re-encode the file as UTF-8 or delete that line"
                ) from exc
            if line.strip():
                yield lineno, line


def source_names(files: Sequence[str | Path]) -> list[str]:
    """How sample ids name each file: its file name, or the path as given when two files share a name."""
    names = [Path(f).name for f in files]
    return names if len(set(names)) == len(names) else [str(f) for f in files]


def check_jsonl_files(
    data_files: str | Sequence[str], message_transform: Callable, *, config_key: str = "dataset"
) -> list[str]:
    """Parse each line of local JSON Lines files and build its messages; ``DataFormatError`` at the first bad one.

    Errors start with ``config_key`` (the config section, e.g. ``dataset_val``), then file and line.
    Returns each row's id, ``"{file name}:{line}"`` (1-based), in the order the rows are loaded.
    """
    files = [data_files] if isinstance(data_files, str | Path) else list(data_files)
    ids: list[str] = []
    for name, source in zip(files, source_names(files), strict=True):
        path = Path(name)
        if not path.is_file():
            raise DataFormatError(
                f"{config_key}.data_files: {path}: no such data file (relative paths start at {Path.cwd()}); "
                f"set {config_key}.data_files to an existing JSON Lines file"
            )
        rows = 0
        for lineno, line in _lines(path, config_key):
            rows += 1
            ids.append(f"{source}:{lineno}")
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFormatError(
                    f"{config_key}: {path}:{lineno}: malformed JSON ({exc.msg}, column {exc.colno}); "
                    "each line must be one complete JSON object: fix or delete that line"
                ) from exc
            if not isinstance(row, dict):
                raise DataFormatError(
                    f"{config_key}: {path}:{lineno}: expected a JSON object per line, got {type(row).__name__}"
                )
            try:
                check_conversation(message_transform(row)["messages"])
            except MessageFormatError as exc:
                raise DataFormatError(f"{config_key}: {path}:{lineno}: {exc}") from exc
        if not rows:
            state = "is empty" if path.stat().st_size == 0 else "has only blank lines"
            raise DataFormatError(
                f"{config_key}.data_files: {path} {state}: it needs one conversation per line "
                f'({{"messages": [...]}}); fill it or point {config_key}.data_files at your data'
            )
    return ids


def instantiate_component(node: Mapping[str, Any]) -> Any:
    """Build a ``{_component_: dotted.path, **kwargs}`` mapping (torchtune does not instantiate nested nodes).

    The design document's path ``torchtune.data.JSONToMessages`` resolves to this project's class.
    """
    from omegaconf import OmegaConf
    from torchtune import config

    if "_component_" not in node:
        raise ValueError(f"message_transform needs a _component_ (e.g. {JSON_TO_MESSAGES}), got keys {sorted(node)}")
    node = OmegaConf.create(OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node))
    resolve_seed_components(node)
    return config.instantiate(node)


class _AgentSampleTransform:
    """``SFTTransform`` with the relaxed conversation check: messages -> tokens, labels, classes."""

    def __init__(self, message_transform: Callable, model_transform: AgentSFTTransform) -> None:
        self.message_transform = message_transform
        self.model_transform = model_transform

    def __call__(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        messages = self.message_transform(sample)
        check_conversation(messages["messages"])
        if SAMPLE_ID in sample:
            messages = {**messages, SAMPLE_ID: sample[SAMPLE_ID]}  # the model transform passes it through
        out = self.model_transform(messages)
        out["labels"] = list(np.where(out["mask"], CROSS_ENTROPY_IGNORE_IDX, out["tokens"]))
        return out


class _Field(Dataset):
    """Samples re-keyed so that ``PackedDataset`` packs two per-token fields exactly as it packs tokens/labels."""

    def __init__(self, samples: list[dict[str, Any]], first: str | Callable, second: str | Callable) -> None:
        self.samples, self.first, self.second = samples, first, second

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"tokens": self._get(i, self.first), "labels": self._get(i, self.second)}

    def _get(self, i: int, key: str | Callable[[int], list[int]]) -> list[int]:
        return key(i) if callable(key) else self.samples[i][key]


class AgentPackedDataset(Dataset):
    """``PackedDataset`` that also packs ``token_classes`` (padded IGNORE), ``tool_ids`` (padded -1),
    ``tool_args`` (padded 0) and ``sample_ids``: per token, the index of its row in ``ds`` (padded -1).

    Packing depends only on sample lengths, so packing the per-token fields through more
    ``PackedDataset``s gives packs aligned position by position with the tokens. Packed ids are
    row indices (ints, the same in every batch); ``AgentSFTDataset.sample_id(i)`` names row ``i``.
    """

    def __init__(self, ds: Dataset, *, max_seq_len: int, padding_idx: int = 0, **pack_kwargs: Any) -> None:
        samples = [ds[i] for i in range(len(ds))]
        self.packed = PackedDataset(samples, max_seq_len=max_seq_len, padding_idx=padding_idx, **pack_kwargs)
        self.extra = self.args = None
        if samples and "token_classes" in samples[0]:
            fields = _Field(samples, "token_classes", "tool_ids")
            self.extra = PackedDataset(
                fields, max_seq_len=max_seq_len, padding_idx=int(TokenClass.IGNORE), **pack_kwargs
            )
        self.has_args = bool(samples) and "tool_args" in samples[0]
        if self.has_args or (samples and SAMPLE_ID in samples[0]):
            rows = _Field(
                samples,
                "tool_args" if self.has_args else (lambda i: [0] * len(samples[i]["tokens"])),
                lambda i: [i] * len(samples[i]["tokens"]),
            )
            self.args = PackedDataset(rows, max_seq_len=max_seq_len, padding_idx=0, **pack_kwargs)

    def __len__(self) -> int:
        return len(self.packed)

    def __getitem__(self, i: int) -> dict[str, Any]:
        pack = dict(self.packed[i])
        if self.extra is not None:
            extra = self.extra[i]
            pack["token_classes"] = extra["tokens"]
            tools = extra["labels"].clone()
            tools[tools == CROSS_ENTROPY_IGNORE_IDX] = NO_TOOL
            pack["tool_ids"] = tools
        if self.args is not None:
            args = self.args[i]
            if self.has_args:
                pack["tool_args"] = args["tokens"]
            rows = args["labels"].clone()
            rows[rows == CROSS_ENTROPY_IGNORE_IDX] = -1
            pack["sample_ids"] = rows
        return pack


class AgentSFTDataset(Dataset):
    """Agent SFT data for torchtune recipes: ``SFTDataset``'s samples plus per-token classes and tool ids.

    ``AgentSFTDataset(tokenizer, source="json", data_files="train.jsonl",
    message_transform=JSONToMessages(...))``; ``packed=True`` packs to ``tokenizer.max_seq_len``;
    ``config_key`` is the config section named in data errors (the recipe passes ``dataset_val``).
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        source: str,
        message_transform: Callable | Mapping[str, Any],
        data_files: str | Sequence[str] | None = None,
        split: str = "train",
        enable_token_classification: bool = True,
        tool_call_format: str = "function_xml",
        packed: bool = False,
        split_across_pack: bool = False,
        filter_fn: Callable | None = None,
        config_key: str = "dataset",
        **load_dataset_kwargs: Any,
    ) -> None:
        if isinstance(message_transform, Mapping):  # a nested {_component_: ...} from YAML
            message_transform = instantiate_component(message_transform)
        ids = None
        if source == "json" and data_files is not None:
            ids = check_jsonl_files(data_files, message_transform, config_key=config_key)
        model_transform = AgentSFTTransform(
            tokenizer, enable_token_classification=enable_token_classification, tool_call_format=tool_call_format
        )
        self._sft = SFTDataset(
            source=source,
            message_transform=message_transform,
            model_transform=model_transform,
            data_files=data_files,
            split=split,
            **load_dataset_kwargs,
        )
        self._sft._data = _with_ids(self._sft._data, ids, config_key)
        if filter_fn is not None:  # after the ids, so that a filtered row keeps its line
            self._sft._data = self._sft._data.filter(filter_fn)
        self._sft._prepare_sample = _AgentSampleTransform(message_transform, model_transform)
        self._where = f"{source} {data_files}" if data_files else source
        self._config_key = config_key
        self.packed = packed
        self._packs = None
        if packed:
            if tokenizer.max_seq_len is None:
                raise ValueError("packed=True needs tokenizer.max_seq_len; set tokenizer.max_seq_len in the config")
            self._packs = AgentPackedDataset(
                _Rows(self),
                max_seq_len=tokenizer.max_seq_len,
                padding_idx=tokenizer.pad_id,
                split_across_pack=split_across_pack,
            )

    def __len__(self) -> int:
        return len(self._packs) if self._packs is not None else len(self._sft)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self._packs is not None:
            return self._packs[index]
        return self.row(index)

    def sample_id(self, index: int) -> int | str:
        """The id of unpacked row ``index`` (``"file:line"`` for JSON Lines); packed batches carry ``index`` itself."""
        return self._sft._data[index][SAMPLE_ID]

    def row(self, index: int) -> dict[str, Any]:
        """One unpacked sample; a malformed row raises an error naming it."""
        try:
            return self._sft[index]
        except MessageFormatError as exc:
            raise DataFormatError(f"{self._config_key}: row {index} of {self._where}: {exc}") from exc


def _with_ids(data: Any, ids: list[str] | None, config_key: str) -> Any:
    """The loaded rows with a ``sample_id`` column: ``ids`` (file:line), else the row index; one already there stays."""
    if not hasattr(data, "add_column") or SAMPLE_ID in (data.column_names or ()):
        return data  # a streamed dataset, or ids the data already carries
    if ids is not None and len(ids) != len(data):  # e.g. a sliced split: which lines were kept is unknown
        _LOG.warning(
            f"agent-obs: {config_key}: the JSON Lines files hold {len(ids)} non-blank lines but {len(data)} rows "
            f"were loaded (a sliced split?), so sample ids are row indices, not file:line; load whole files or "
            f"give each row a {SAMPLE_ID!r} field to name it"
        )
        ids = None
    return data.add_column(SAMPLE_ID, ids if ids is not None else list(range(len(data))))


class _Rows(Dataset):
    """The unpacked rows of an ``AgentSFTDataset`` (the input of packing)."""

    def __init__(self, ds: AgentSFTDataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds._sft)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.ds.row(i)
