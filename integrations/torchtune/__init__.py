"""torchtune integration: agent SFT dataset/transform, metric-logger bridge."""
