"""``reward_by_tool_call``: a TRL reward function that also logs its mean over completions with and without a tool call.

It goes through TRL's own ``log_metric`` hook for reward functions, so the two means land in the
trainer's logs beside ``rewards/{name}/mean`` (averaged over the batches of each logging step, as
TRL averages every ``log_metric`` value).
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable
from typing import Any

from agent_obs.classify import find_tool_calls


def completion_text(completion: Any) -> str:
    """A completion's text: the string itself, or the assistant contents of a conversational completion."""
    if isinstance(completion, str):
        return completion
    return "\n".join(str(m.get("content") or "") for m in completion if m.get("role", "assistant") == "assistant")


def reward_by_tool_call(
    reward_func: Callable[..., list], *, fmt: str | re.Pattern = "function_xml", strict: bool = False
) -> Callable[..., list]:
    """Wrap ``reward_func``: same rewards, plus ``rewards/{name}/with_tool_call`` and ``.../without_tool_call``.

    A side with no (scorable) completion in a batch logs nothing for that batch.
    """
    if inspect.iscoroutinefunction(reward_func) or not callable(reward_func):
        raise TypeError(
            f"reward_by_tool_call wraps a plain (synchronous) reward function, got {reward_func!r}; log the split "
            "inside an async reward function with its log_metric argument instead"
        )
    name = getattr(reward_func, "__name__", type(reward_func).__name__)

    @functools.wraps(reward_func)
    def wrapped(*args: Any, completions: list, log_metric: Callable[[str, float], None] | None = None, **kwargs):
        rewards = reward_func(*args, completions=completions, log_metric=log_metric, **kwargs)
        if log_metric is not None:
            sides: dict[bool, list[float]] = {True: [], False: []}
            for completion, reward in zip(completions, rewards, strict=True):
                if reward is not None:
                    sides[bool(find_tool_calls(completion_text(completion), fmt, strict=strict))].append(reward)
            for has_call, values in sides.items():
                if values:
                    side = "with_tool_call" if has_call else "without_tool_call"
                    log_metric(f"rewards/{name}/{side}", sum(values) / len(values))
        return rewards

    return wrapped
