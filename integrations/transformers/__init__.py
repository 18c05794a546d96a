"""Hugging Face transformers/TRL integration: TrainerCallbacks for SFT and GRPO, and a classifying collator."""

from agent_obs.integrations.transformers.callback import AgentObsCallback, fused_head_reasons
from agent_obs.integrations.transformers.collator import (
    AgentChatCollator,
    EncodedConversation,
    add_sample_ids,
    encode_conversation,
    message_content_spans,
)
from agent_obs.integrations.transformers.grpo import GRPOObsCallback, classify_completion
from agent_obs.integrations.transformers.grpo_rewards import reward_by_tool_call

__all__ = [
    "AgentChatCollator",
    "AgentObsCallback",
    "EncodedConversation",
    "GRPOObsCallback",
    "add_sample_ids",
    "classify_completion",
    "encode_conversation",
    "fused_head_reasons",
    "message_content_spans",
    "reward_by_tool_call",
]
