"""torchtune integration: agent SFT dataset/transform, metric-logger bridge, tokenizer offsets."""

from agent_obs.integrations.torchtune import offsets as _offsets  # noqa: F401  registers torchtune's tokenizers
