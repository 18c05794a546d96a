"""agent-obs: live entropy, perplexity, top-k mass and accuracy per token class for agent SFT."""

from agent_obs.accumulator import Metrics
from agent_obs.classify import classify_tokens, find_tool_calls, token_tool_ids
from agent_obs.metrics import compute_metrics
from agent_obs.observer import Observer, attach
from agent_obs.offsets import token_offsets
from agent_obs.token_class import TokenClass
from agent_obs.tools import tool_id, tool_name

__all__ = [
    "Metrics",
    "Observer",
    "TokenClass",
    "attach",
    "classify_tokens",
    "compute_metrics",
    "find_tool_calls",
    "token_offsets",
    "token_tool_ids",
    "tool_id",
    "tool_name",
]
__version__ = "0.1.0"
