"""Stable integer ids for tool names, so per-token tool labels fit in an int tensor.

``tool_id`` is a CRC32 of the sanitized name: the same on every process and rank, so ids can
be reduced across ranks and mapped back to names with ``tool_name``. ``NO_TOOL`` (-1) marks
tokens outside any tool call.
"""

from __future__ import annotations

import threading
import zlib

from agent_obs.keys import sanitize_tool_name

NO_TOOL = -1

_registry: dict[int, str] = {}
_lock = threading.Lock()


def tool_id(name: str) -> int:
    """Non-negative 31-bit id of a tool name (CRC32 of its sanitized form); records id -> name."""
    clean = sanitize_tool_name(name)
    tid = zlib.crc32(clean.encode()) & 0x7FFFFFFF
    if tid not in _registry:
        with _lock:
            _registry.setdefault(tid, clean)
    return tid


def tool_name(tid: int) -> str:
    """The sanitized name behind an id seen by ``tool_id`` in this process, else ``tool_{id:08x}``."""
    name = _registry.get(tid)
    return name if name is not None else f"tool_{tid:08x}"


def known_tools() -> dict[int, str]:
    """A snapshot of the id -> sanitized name registry of this process."""
    with _lock:
        return dict(_registry)
