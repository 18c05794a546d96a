"""The project's own sample agent trajectories (SWE-agent XML tool calls) for the demo."""
