"""Exact character spans of byte-level BPE tokens, in linear time.

``classify_tokens`` needs each token's ``(start, end)`` in the text. torchtune's Qwen2
tokenizer gives no offsets, so this rebuilds them from the token bytes: every token's bytes
are decoded once and a byte -> character walk assigns each token the characters its bytes
touch (a token holding part of a multi-byte character gets that whole character). Offsets
index ``decode(token_ids)`` with special tokens kept, which is the encoded text itself when
that text is NFC-normalized (both Qwen2 tokenizers normalize to NFC before encoding).
"""

from __future__ import annotations

import codecs
import weakref
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache

Span = tuple[int, int]

# Bytes 0x80-0xBF continue a UTF-8 character; every other byte starts one.
_CONTINUATION = bytes(range(0x80, 0xC0))
_BAD = "\uffff"  # outside latin-1: turns an unmapped character into an encode error
_PIECES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@lru_cache(maxsize=1)
def _unicode_to_byte_table() -> dict[int, str]:
    """``str.translate`` table from GPT-2's byte-level characters to latin-1 characters (one per byte)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table: dict[int, str] = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[256 + n] = chr(b)
            table[b] = _BAD  # raw control/space characters never appear in byte-level tokens
            n += 1
    return table


def _byte_level_bytes(piece: str, token_id: int) -> bytes:
    """The bytes a byte-level BPE token string stands for."""
    try:
        return piece.translate(_unicode_to_byte_table()).encode("latin-1")
    except UnicodeEncodeError:
        raise TypeError(
            f"token {token_id} ({piece!r}) is not a byte-level BPE token: token_offsets supports byte-level BPE "
            "only; for other tokenizers compute offsets with return_offsets_mapping=True and pass them to "
            "classify_tokens"
        ) from None


def _valid_segment_spans(pieces: Sequence[bytes], base: int, out: list[Span]) -> int:
    """Spans of tokens whose concatenated bytes are valid UTF-8; returns the characters consumed."""
    cur = 0  # characters started before the current token
    for data in pieces:
        leads = len(data.translate(None, _CONTINUATION))
        start = cur - 1 if 0x80 <= data[0] < 0xC0 else cur  # continues the previous token's character
        cur += leads
        out.append((base + start, base + cur))
    return cur


def _byte_chars(data: bytes) -> tuple[list[int], int]:
    """Character index of every byte of ``data`` decoded with errors="replace" (one U+FFFD per bad run)."""
    index = [0] * len(data)
    view = memoryview(data)
    pos, chars = 0, 0
    while pos < len(data):
        try:
            codecs.utf_8_decode(view[pos:], "strict", True)
            stop = bad_end = len(data)
        except UnicodeDecodeError as e:
            stop, bad_end = pos + e.start, pos + e.end
        for p in range(pos, stop):
            if not 0x80 <= data[p] < 0xC0:
                chars += 1
            index[p] = chars - 1
        if stop < bad_end:
            index[stop:bad_end] = [chars] * (bad_end - stop)
            chars += 1
        pos = bad_end
    return index, chars


def _segment_spans(pieces: list[bytes], base: int, out: list[Span]) -> int:
    """Append the spans of one run of ordinary tokens decoded together; returns its length in characters."""
    data = b"".join(pieces)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    else:
        return _valid_segment_spans(pieces, base, out)
    index, chars = _byte_chars(data)
    pos = 0
    for piece in pieces:
        out.append((base + index[pos], base + index[pos + len(piece) - 1] + 1))
        pos += len(piece)
    return chars


def _piece_cache(tokenizer) -> dict[int, bytes]:
    """This tokenizer's id -> bytes memo (ordinary vocabulary entries never change), kept while it lives."""
    try:
        return _PIECES.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: memoize for this call only
        return {}


def _no_specials(tid: int) -> None:
    """No id is literal text: every token joins the byte stream."""
    return None


def _spans(
    token_ids: Iterable[int], special: Callable[[int], str | None], piece: Callable[[int], bytes], cache: dict
) -> list[Span]:
    """Walk the ids: ``special(id)`` text is literal and cuts the byte stream into separately decoded runs."""
    out: list[Span] = []
    pos = 0
    run: list[bytes] = []
    for tid in token_ids:
        tid = int(tid)
        text = special(tid)
        if text is None:
            data = cache.get(tid)
            if data is None:
                data = cache[tid] = piece(tid)
            run.append(data)
            continue
        if run:
            pos += _segment_spans(run, pos, out)
            run = []
        out.append((pos, pos + len(text)))
        pos += len(text)
    if run:
        _segment_spans(run, pos, out)
    return out


def _unknown_id(tid: int, size: int) -> ValueError:
    return ValueError(f"token id {tid} is not in the tokenizer's vocabulary (size {size}): pass ids it produced")


def byte_level_spans(
    token_ids: Iterable[int],
    tokenizer,
    special: Callable[[int], str | None],
    token_string: Callable[[int], str | None],
    vocab_size: int,
) -> list[Span]:
    """Spans for a byte-level BPE described by two lookups, memoized per ``tokenizer``: ``special(id)`` is the
    literal text of a special token (it cuts the byte stream into separately decoded runs) or None;
    ``token_string(id)`` is an ordinary token's byte-level string, None for an unknown id."""

    def piece(tid: int) -> bytes:
        s = token_string(tid)
        if s is None:
            raise _unknown_id(tid, vocab_size)
        return _byte_level_bytes(s, tid)

    return _spans(token_ids, special, piece, _piece_cache(tokenizer))


# Tokenizer families taught by integrations: (accepts(tokenizer), spans(token_ids, tokenizer)).
_ADAPTERS: list[tuple[Callable[[object], bool], Callable[[list[int], object], list[Span]]]] = []


def register_offsets_adapter(
    accepts: Callable[[object], bool], spans: Callable[[list[int], object], list[Span]]
) -> None:
    """Teach ``token_offsets`` a tokenizer family; integrations register theirs when imported
    (``agent_obs.integrations.torchtune``: torchtune's Qwen2/Qwen2.5 tokenizers)."""
    if (accepts, spans) not in _ADAPTERS:
        _ADAPTERS.append((accepts, spans))


def _hf_spans(token_ids: Iterable[int], tok) -> list[Span]:
    """``tokenizers`` decodes all ids as one byte stream: an added token's content passes through the
    ByteLevel decoder too (its bytes when every character is a byte-level one, else its UTF-8)."""
    added = {i: t.content for i, t in tok.get_added_tokens_decoder().items()}

    def piece(tid: int) -> bytes:
        content = added.get(tid)
        if content is not None:
            try:
                return content.translate(_unicode_to_byte_table()).encode("latin-1")
            except UnicodeEncodeError:
                return content.encode("utf-8")
        s = tok.id_to_token(tid)
        if s is None:
            raise _unknown_id(tid, tok.get_vocab_size())
        return _byte_level_bytes(s, tid)

    return _spans(token_ids, _no_specials, piece, _piece_cache(tok))


def _hf_backend(tokenizer):
    """The ``tokenizers.Tokenizer`` behind a HF tokenizer object, or None."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend if isinstance(backend, Tokenizer) else None


def token_offsets(token_ids: Iterable[int], tokenizer) -> list[Span]:
    """Character span ``(start, end)`` of each token in ``decode(token_ids)`` (special tokens kept).

    Supports ``tokenizers.Tokenizer`` and transformers fast tokenizers with a byte-level BPE, and the
    families integrations register (torchtune's Qwen2/Qwen2.5 once ``agent_obs.integrations.torchtune``
    is imported); raises TypeError for anything else.
    """
    if hasattr(token_ids, "tolist"):
        token_ids = token_ids.tolist()
    for accepts, spans in _ADAPTERS:
        if accepts(tokenizer):
            return spans(token_ids, tokenizer)
    if type(tokenizer).__module__.partition(".")[0] == "torchtune":
        raise TypeError(
            "token_offsets learns torchtune's tokenizers from its integration: import "
            f"agent_obs.integrations.torchtune before passing a {type(tokenizer).__name__}"
        )
    backend = _hf_backend(tokenizer)
    if backend is not None:
        from tokenizers import decoders

        if not isinstance(backend.decoder, decoders.ByteLevel):
            raise TypeError(
                f"token_offsets supports byte-level BPE tokenizers; {type(tokenizer).__name__} decodes with "
                f"{type(backend.decoder).__name__}: compute offsets with tokenizer(text, return_offsets_mapping=True) "
                "and pass them to classify_tokens"
            )
        return _hf_spans(token_ids, backend)
    raise TypeError(
        f"token_offsets does not support {type(tokenizer).__module__}.{type(tokenizer).__name__}: pass torchtune's "
        "Qwen2/Qwen2.5 tokenizer, a tokenizers.Tokenizer or a transformers fast tokenizer (byte-level BPE), or "
        "compute offsets with return_offsets_mapping=True and pass them to classify_tokens"
    )


def check_offsets_order(offsets: Sequence[Span]) -> None:
    """Raise ValueError unless the non-empty spans run forward through the text, in token order.

    O(tokens), with ``classify_tokens``'s range check it catches offsets computed from another string
    in the common cases: each non-empty span starts no earlier than the previous one and overlaps it by
    at most one character (a multi-byte character split over byte-level tokens). Empty spans (special
    tokens, ``(0, 0)``) are skipped.
    """
    prev: Span | None = None
    for i, (s, e) in enumerate(offsets):
        if e <= s:
            continue
        if prev is not None and (s < prev[0] or s < prev[1] - 1):
            raise ValueError(
                f"offsets[{i}] = ({s}, {e}) goes back over offsets of an earlier token {prev}: token spans must run "
                "forward through the text in token order; were they computed on another string (NFC-normalize the text "
                "before tokenizing and classifying, as the tokenizers do)?"
            )
        prev = (s, e)
