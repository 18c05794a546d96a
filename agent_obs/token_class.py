"""The four token classes every metric is split by."""

from enum import IntEnum


class TokenClass(IntEnum):
    """What a token is, for the metrics: IGNORE tokens count nowhere, CONTEXT only overall."""

    IGNORE = 0  # special/template tokens: excluded from every metric
    REASONING = 1  # assistant free text outside tool-call blocks
    TOOL_CALL = 2  # assistant text inside a tool-call block
    CONTEXT = 3  # non-assistant content: overall metrics only (when trained on)
