"""token_offsets against slow prefix decoding with a real byte-level BPE, and the offline tokenizer assets."""

from __future__ import annotations

import itertools
import json
import unicodedata

import pytest
import torch
from agent_obs.integrations.torchtune.assets import QWEN2_5_SPECIAL_TOKENS, build_bpe_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Tokenizer, decoders, models
from torchtune.models.qwen2_5._tokenizer import QWEN2_5_SPECIAL_TOKENS as TORCHTUNE_QWEN2_5_SPECIALS
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from agent_obs import classify_tokens, token_offsets


@pytest.fixture(scope="module")
def hf_fast(bpe_tokenizer_files) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_file=str(bpe_tokenizer_files.tokenizer_json))


def prefix_decode_offsets(ids: list[int], decode) -> list[tuple[int, int]]:
    """Slow reference: decode every prefix; a prefix ending inside a character decodes with a trailing U+FFFD."""
    full = decode(ids)
    bounds = []  # per boundary: (characters fully before it, whether it cuts a character)
    for k in range(len(ids) + 1):
        prefix = decode(ids[:k])
        if full.startswith(prefix):
            bounds.append((len(prefix), False))
        else:
            assert prefix.endswith("\ufffd") and full.startswith(prefix[:-1]), (prefix, full)
            bounds.append((len(prefix) - 1, True))
    return [(c0, c1 + 1 if cut else c1) for (c0, _), (c1, cut) in itertools.pairwise(bounds)]


PIECES = st.sampled_from(
    [
        "<|im_start|>",
        "<|im_end|>",
        "<tool_call>",
        "</tool_call>",
        "<|endoftext|>",
        "😀",
        "👩‍💻",
        "🇯🇵",
        "中文字",
        "é",
        "e\u0301",
        "\r\n",
        "   ",
        "<function=bash>",
        "\u0939\u093f",
    ]
)
CHARS = st.characters(exclude_categories=("Cs",), exclude_characters="\ufffd")
TEXTS = st.lists(st.one_of(st.text(CHARS, max_size=8), PIECES), max_size=8).map("".join)


@settings(max_examples=150, deadline=None)
@given(text=TEXTS)
def test_offsets_equal_prefix_decoding_for_all_three_tokenizer_types(text, tokenizers_bpe, torchtune_bpe, hf_fast):
    ids = tokenizers_bpe.encode(text).ids
    assert torchtune_bpe.encode(text, add_bos=False, add_eos=False) == ids
    assert tokenizers_bpe.decode(ids, skip_special_tokens=False) == unicodedata.normalize("NFC", text)

    want = prefix_decode_offsets(ids, lambda x: tokenizers_bpe.decode(x, skip_special_tokens=False))
    assert token_offsets(ids, tokenizers_bpe) == want
    assert token_offsets(ids, hf_fast) == prefix_decode_offsets(ids, lambda x: hf_fast.decode(x))
    assert token_offsets(torch.tensor(ids, dtype=torch.long), torchtune_bpe) == prefix_decode_offsets(
        ids, torchtune_bpe.decode
    )
    if text == unicodedata.normalize("NFC", text):  # HF's own alignment indexes the input text
        assert token_offsets(ids, tokenizers_bpe) == tokenizers_bpe.encode(text).offsets


@st.composite
def raw_ids(draw, vocab_size: int):
    """Arbitrary id sequences: single-byte tokens (bytes of split characters), special tokens and others."""
    specials = st.integers(0, len(QWEN2_5_SPECIAL_TOKENS) - 1)
    return draw(st.lists(st.one_of(st.integers(22, 22 + 255), specials, st.integers(0, vocab_size - 1)), max_size=30))


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_offsets_of_invalid_utf8_streams_follow_replacement_decoding(data, tokenizers_bpe, torchtune_bpe):
    ids = data.draw(raw_ids(tokenizers_bpe.get_vocab_size()))
    text = tokenizers_bpe.decode(ids, skip_special_tokens=False)
    assert torchtune_bpe.decode(ids) == text
    spans = token_offsets(ids, tokenizers_bpe)
    assert token_offsets(ids, torchtune_bpe) == spans
    assert len(spans) == len(ids)
    prev_end = 0
    for tid, (s, e) in zip(ids, spans, strict=True):
        assert s < e and s in (prev_end, prev_end - 1)  # contiguous; a token may share the previous one's char
        if tid < len(QWEN2_5_SPECIAL_TOKENS):
            assert text[s:e] == QWEN2_5_SPECIAL_TOKENS[tid] and s == prev_end
        piece = tokenizers_bpe.decode([tid], skip_special_tokens=False)
        if "\ufffd" not in piece and piece.isascii():
            assert text[s:e] == piece
        prev_end = e
    assert prev_end == len(text)


def test_partial_characters_cut_by_a_special_token_get_one_replacement_each(tokenizers_bpe, torchtune_bpe):
    vocab = tokenizers_bpe.get_vocab()
    euro = [vocab[_byte_char(b)] for b in "€".encode()]  # its 3 single-byte tokens
    ids = [euro[0], vocab["<|im_end|>"], euro[1], euro[2], *tokenizers_bpe.encode("A€").ids]
    text = torchtune_bpe.decode(ids)
    spans = token_offsets(ids, torchtune_bpe)
    assert [text[s:e] for s, e in spans[:4]] == ["\ufffd", "<|im_end|>", "\ufffd", "\ufffd"]
    assert text[spans[4][0] : spans[-1][1]] == "A€" and spans[-1] == (len(text) - 1, len(text))
    assert token_offsets(ids, tokenizers_bpe) == spans


def test_added_tokens_pass_through_the_byte_stream_as_tokenizers_decodes_them(bpe_tokenizer_files):
    tok = Tokenizer.from_file(str(bpe_tokenizer_files.tokenizer_json))  # a copy: this test adds tokens
    completes_euro = _byte_char(0x82) + _byte_char(0xAC) + "Q"  # byte-level text of b"\x82\xacQ"
    tok.add_tokens([completes_euro, "é€ x"])
    tok.add_special_tokens([AddedToken(_byte_char(0xAC) + "S", special=True)])
    vocab = tok.get_vocab()
    e2, x82 = vocab[_byte_char(0xE2)], vocab[_byte_char(0x82)]
    for ids in ([e2, vocab[completes_euro], 3], [e2, x82, vocab[_byte_char(0xAC) + "S"]], [vocab["é€ x"], e2, x82, 7]):
        decode = lambda x: tok.decode(x, skip_special_tokens=False)  # noqa: E731
        if "\ufffd" not in decode(ids):
            assert token_offsets(ids, tok) == prefix_decode_offsets(ids, decode)
        assert token_offsets(ids, tok)[-1][1] == len(decode(ids))


def _byte_char(b: int) -> str:
    """GPT-2's printable stand-in for byte ``b``, derived as torchtune derives it."""
    from torchtune.models.qwen2._tokenizer import bytes_to_unicode

    return bytes_to_unicode()[b]


def test_unsupported_tokenizers_and_ids_raise_clear_errors(tokenizers_bpe):
    with pytest.raises(TypeError, match=r"builtins\.object.*return_offsets_mapping"):
        token_offsets([1, 2], object())
    word_level = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    word_level.decoder = decoders.WordPiece()
    with pytest.raises(TypeError, match=r"byte-level BPE.*WordPiece.*return_offsets_mapping"):
        token_offsets([0], word_level)
    with pytest.raises(ValueError, match=r"token id 999999 is not in the tokenizer's vocabulary"):
        token_offsets([5, 999999], tokenizers_bpe)


# ---------------------------------------------------------------- the offline tokenizer assets


def test_special_tokens_are_qwen2_5s_in_torchtunes_order():
    by_id = sorted(TORCHTUNE_QWEN2_5_SPECIALS, key=TORCHTUNE_QWEN2_5_SPECIALS.get)
    assert list(QWEN2_5_SPECIAL_TOKENS) == by_id and len(by_id) == 22


def test_tokenizer_loads_in_torchtune_and_transformers(bpe_tokenizer_files, torchtune_bpe, hf_fast):
    assert torchtune_bpe.special_tokens == {t: i for i, t in enumerate(QWEN2_5_SPECIAL_TOKENS)}
    assert (torchtune_bpe.eos_id, torchtune_bpe.pad_id) == (2, 0)
    assert (torchtune_bpe.tool_call_start_id, torchtune_bpe.tool_call_end_id) == (14, 15)
    assert len(torchtune_bpe.encoder) == len(hf_fast) == 2048
    auto = AutoTokenizer.from_pretrained(bpe_tokenizer_files.tokenizer_json.parent)
    assert (auto.eos_token, auto.pad_token) == ("<|im_end|>", "<|endoftext|>")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<function=submit>\n</function>"}]
    rendered = auto.apply_chat_template(messages, tokenize=False)
    assert rendered == "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    assert auto(rendered)["input_ids"].count(1) == 2  # <|im_start|> is one special token


def test_build_is_deterministic_and_validates_vocab_size(tmp_path, trajectories):
    texts = [m["content"] for conv in trajectories["swesmith_traj_converted.jsonl"] for m in conv]
    a = build_bpe_tokenizer(texts, tmp_path / "a", vocab_size=600)
    b = build_bpe_tokenizer(iter(texts), tmp_path / "b", vocab_size=600)
    for x, y in zip(a, b, strict=True):
        assert x.read_bytes() == y.read_bytes()
    assert len(json.loads(a.vocab_json.read_text())) == 600
    with pytest.raises(ValueError, match=r"vocab_size >= 278"):
        build_bpe_tokenizer(texts, tmp_path / "c", vocab_size=100)


@settings(max_examples=100, deadline=None)
@given(text=TEXTS)
def test_classify_tokens_accepts_real_offsets_split_characters_and_special_tokens(text, tokenizers_bpe, hf_fast):
    text = unicodedata.normalize("NFC", text)  # the tokenizers normalize; offsets index the normalized text
    ids = tokenizers_bpe.encode(text).ids
    assert len(classify_tokens(text, token_offsets(ids, tokenizers_bpe))) == len(ids)
    enc = hf_fast(text, return_offsets_mapping=True)  # HF alignment: overlaps on split characters, (0, 0) specials
    offsets = [(0, 0), *enc["offset_mapping"], (0, 0)]
    assert len(classify_tokens(text, offsets)) == len(ids) + 2


def test_offsets_of_another_string_are_rejected_with_the_fix(trajectories, tokenizers_bpe):
    """Offsets of several messages passed with one message's text: all in range, so accepted before."""
    contents = [m["content"] for conv in next(iter(trajectories.values())) for m in conv if m["role"] == "assistant"]
    first, second = sorted(contents[:2], key=len, reverse=True)
    offsets = [*token_offsets(tokenizers_bpe.encode(first).ids, tokenizers_bpe)]
    offsets += token_offsets(tokenizers_bpe.encode(second).ids, tokenizers_bpe)
    assert max(e for _, e in offsets) <= len(first)  # the range check alone cannot tell
    with pytest.raises(ValueError, match=r"goes back over .*NFC-normalize"):
        classify_tokens(first, offsets)
    with pytest.raises(ValueError, match="goes back over"):
        classify_tokens("abcdef", [(0, 2), (2, 4), (1, 3)])  # overlaps 1 character into a previous token
    assert classify_tokens("abcdef", [(0, 2), (1, 4), (4, 4), (4, 6)])  # one shared character is a split char
