"""agent-obs: live entropy, perplexity, top-k mass and accuracy per token class for agent SFT."""

from agent_obs.accumulator import Histogram, Metrics, StatsAccumulator
from agent_obs.metrics import compute_metrics
from agent_obs.token_class import TokenClass

__all__ = ["Histogram", "Metrics", "StatsAccumulator", "TokenClass", "compute_metrics"]
__version__ = "0.1.0"
