"""The design document's component paths (``torchtune.datasets.AgentSFTDataset``, ...) mapped to this project's classes.

The seed's "Basic Configuration" names its classes as if they lived inside torchtune; torchtune
0.6.1 has no such modules, so the recipe rewrites those ``_component_`` values before building
anything (and says so once in the log).
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from typing import Any

SEED_COMPONENTS = {
    "torchtune.datasets.AgentSFTDataset": "agent_obs.integrations.torchtune.dataset.AgentSFTDataset",
    "torchtune.data.JSONToMessages": "agent_obs.integrations.torchtune.messages.JSONToMessages",
}


def project_component(path: str) -> str:
    """The project's dotted path for a seed path; any other path unchanged."""
    return SEED_COMPONENTS.get(path, path)


def resolve_seed_components(node: Any) -> list[tuple[str, str]]:
    """Rewrite, in place, every ``_component_`` of an OmegaConf/dict tree that names a seed path.

    Returns the distinct ``(seed path, project path)`` pairs replaced, in first-seen order.
    """
    replaced: dict[str, str] = {}

    def walk(item: Any) -> None:
        if isinstance(item, MutableMapping):  # dict or DictConfig
            path = item.get("_component_", None)
            if isinstance(path, str) and path in SEED_COMPONENTS:
                item["_component_"] = replaced.setdefault(path, SEED_COMPONENTS[path])
            for _, value in item.items():
                walk(value)
        elif isinstance(item, Sequence) and not isinstance(item, str):  # list or ListConfig
            for value in item:
                walk(value)

    walk(node)
    return list(replaced.items())


def forward_dataset_flags(cfg: Any, classify: bool) -> None:
    """Give every AgentSFTDataset node under ``dataset``/``dataset_val`` the recipe's ``enable_token_classification``
    and the config key its data errors name (``dataset``, ``dataset_val[1]``, ...), unless the node sets them."""
    from omegaconf import ListConfig, open_dict

    for key in ("dataset", "dataset_val"):
        nodes = cfg.get(key, None)
        many = isinstance(nodes, ListConfig)
        for i, node in enumerate(nodes if many else [nodes]):
            if node is not None and str(node.get("_component_", "")).endswith("AgentSFTDataset"):
                with open_dict(node):
                    node.setdefault("enable_token_classification", classify)
                    node.setdefault("config_key", f"{key}[{i}]" if many else key)
