"""Hugging Face transformers/TRL integration: a TrainerCallback and a classifying collator."""

from agent_obs.integrations.transformers.callback import AgentObsCallback, fused_head_reasons
from agent_obs.integrations.transformers.collator import (
    AgentChatCollator,
    EncodedConversation,
    add_sample_ids,
    encode_conversation,
    message_content_spans,
)

__all__ = [
    "AgentChatCollator",
    "AgentObsCallback",
    "EncodedConversation",
    "add_sample_ids",
    "encode_conversation",
    "fused_head_reasons",
    "message_content_spans",
]
