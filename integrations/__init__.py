"""Framework adapters, installed as ``agent_obs.integrations.<name>``."""
