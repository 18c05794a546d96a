"""The recipe's one ``agent_obs:`` config node: observer settings and exporters as torchtune ``_component_`` entries.

```yaml
agent_obs:
  topk: [1, 2, 5, 10]        # unset: from entropy_k
  every_n_steps: 10          # optimizer steps with detailed metrics; unset: log_detailed_metrics_every_n_steps
  max_tools: 16
  max_in_flight: 4
  binary_entropy: false      # true: also the seed's top1_binary_entropy keys
  top_n: 10                  # hardest samples reported per collect (ids from the dataset's sample_id)
  outlier_k: 3.5             # outlier: mean NLL above median + k x 1.4826 x MAD of the window's samples
  exporters:
    - {_component_: agent_obs.exporters.prometheus.PrometheusExporter, port: 9464, run: my_run}
    - {_component_: agent_obs.exporters.jsonl.JsonlExporter, path: "${output_dir}/agent_obs.jsonl"}
```

The design document's top-level keys still work: ``enable_detailed_metrics`` (False: no observer),
``entropy_k`` (topk 1, 2, 5, 10 up to k, and k) and ``log_detailed_metrics_every_n_steps``; a key set
in the node wins over its top-level twin (a warning names both when they disagree). The flat
shorthand keys (``prometheus_port``, ``otlp_endpoint``, ``jsonl_path``, ``prometheus_host``,
``pushgateway_url``, ``on_bind_error``, ``run_name``) set the field of the first exporter of their
class, adding it when the list has none; ``prometheus_port``/``otlp_endpoint``/``jsonl_path: null``
removes that exporter.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from agent_obs.samples import DEFAULT_OUTLIER_K

PROMETHEUS = "agent_obs.exporters.prometheus.PrometheusExporter"
OTEL = "agent_obs.exporters.otel.OTelExporter"
JSONL = "agent_obs.exporters.jsonl.JsonlExporter"

# flat key -> (exporter class path, constructor argument); the first three switch their exporter on or off
SHORTHAND: dict[str, tuple[str, str]] = {
    "prometheus_port": (PROMETHEUS, "port"),
    "otlp_endpoint": (OTEL, "endpoint"),
    "jsonl_path": (JSONL, "path"),
    "prometheus_host": (PROMETHEUS, "host"),
    "pushgateway_url": (PROMETHEUS, "push_gateway"),
    "on_bind_error": (PROMETHEUS, "on_bind_error"),
}
SWITCHES = ("prometheus_port", "otlp_endpoint", "jsonl_path")
SHORTHAND_DEFAULTS = {JSONL: {"histograms": True}}  # an exporter added by shorthand, as the recipe always built it
RUN_NAME_TARGETS = (PROMETHEUS, OTEL)
NODE_KEYS = {
    "topk", "every_n_steps", "max_tools", "max_in_flight", "binary_entropy", "top_n", "outlier_k", "exporters",
    "run_name", *SHORTHAND,
}  # fmt: skip


@dataclass(frozen=True)
class ExporterSpec:
    """One exporter to instantiate: its ``_component_`` entry and, per argument, the config key that set it."""

    entry: dict[str, Any]
    keys: dict[str, str]
    default_key: str  # where an argument the user did not set would go

    def key(self, argument: str) -> str:
        return self.keys.get(argument, f"{self.default_key}.{argument}")


@dataclass(frozen=True)
class ObserverSettings:
    """What the recipe attaches and exports, validated; ``enabled=False`` means no observer at all."""

    enabled: bool = True
    topk: tuple[int, ...] = (1, 2, 5, 10)
    every_n_steps: int = 10
    max_tools: int = 16
    max_in_flight: int = 4
    binary_entropy: bool = False
    top_n: int = 10
    outlier_k: float = DEFAULT_OUTLIER_K
    exporters: tuple[ExporterSpec, ...] = field(default_factory=tuple)

    @property
    def jsonl_path(self) -> str | None:
        """The JSONL log's path (the first JSONL exporter), for resume truncation; None without one."""
        paths = [spec.entry.get("path") for spec in self.exporters if is_component(spec.entry, JSONL)]
        return str(paths[0]) if paths and paths[0] else None


def topk_from_entropy_k(entropy_k: int) -> tuple[int, ...]:
    """The seed's ``entropy_k`` as top-k masses: 1, 2, 5, 10 up to ``entropy_k``, and ``entropy_k`` itself."""
    if int(entropy_k) < 1:
        raise ValueError(f"entropy_k must be >= 1, got {entropy_k}; e.g. entropy_k: 10")
    return tuple(sorted({k for k in (1, 2, 5, 10) if k <= int(entropy_k)} | {int(entropy_k)}))


def is_component(entry: Mapping[str, Any], path: str) -> bool:
    """Whether an exporter entry names ``path``'s class (by the class it resolves to, so re-exports match)."""
    name = entry.get("_component_")
    if name == path:
        return True
    from torchtune.config._utils import _get_component_from_path

    try:
        return _get_component_from_path(name) is _get_component_from_path(path)
    except Exception:  # an unresolvable path is reported when it is instantiated
        return False


def _pick(node: Mapping[str, Any], cfg: Mapping[str, Any], key: str, seed_key: str, seed_value: Any, log) -> Any:
    """The node's ``key`` when set, else the seed's top-level value; warn when both are set and disagree."""
    if node.get(key) is None:
        return seed_value
    value = tuple(node[key]) if isinstance(node[key], list) else node[key]
    if seed_key in cfg and cfg.get(seed_key) is not None and value != seed_value:
        log.warning(
            f"agent-obs: agent_obs.{key}={node[key]} wins over {seed_key}={cfg.get(seed_key)}: "
            f"remove one of them to silence this warning"
        )
    return node[key]


def _exporter_specs(node: Mapping[str, Any]) -> list[ExporterSpec]:
    """The ``exporters`` list with the shorthand keys applied (see the module docstring)."""
    entries = node.get("exporters") or []
    if not isinstance(entries, list) or not all(isinstance(e, Mapping) and "_component_" in e for e in entries):
        raise ValueError(
            "agent_obs.exporters must be a list of entries with a _component_, e.g. "
            f"[{{_component_: {PROMETHEUS}, port: 9464}}], got {entries!r}"
        )
    specs = [
        ExporterSpec(dict(e), {k: f"agent_obs.exporters[{i}].{k}" for k in e}, f"agent_obs.exporters[{i}]")
        for i, e in enumerate(entries)
    ]

    def first(path: str) -> ExporterSpec | None:
        return next((s for s in specs if is_component(s.entry, path)), None)

    for key in SWITCHES:
        if key not in node:
            continue
        path, argument = SHORTHAND[key]
        if node[key] is None or node[key] == "":
            specs = [s for s in specs if not is_component(s.entry, path)]
        elif first(path) is None:
            specs.append(ExporterSpec({"_component_": path, **SHORTHAND_DEFAULTS.get(path, {})}, {}, "agent_obs"))
    for key, (path, argument) in SHORTHAND.items():
        spec = first(path)
        if key in node and node[key] is not None and spec is not None:
            spec.entry[argument] = node[key]
            spec.keys[argument] = f"agent_obs.{key}"
    if node.get("run_name") is not None:
        for spec in specs:
            if any(is_component(spec.entry, path) for path in RUN_NAME_TARGETS):
                spec.entry["run"] = node["run_name"]
                spec.keys["run"] = "agent_obs.run_name"
    return specs


def observer_settings(cfg: DictConfig, log: logging.Logger | None = None) -> ObserverSettings:
    """The ``agent_obs:`` node (interpolations resolved) merged with the seed's four top-level keys."""
    log = log or logging.getLogger(__name__)
    raw = cfg.get("agent_obs", None)
    node = OmegaConf.to_container(raw, resolve=True) if isinstance(raw, DictConfig) else dict(raw or {})
    unknown = sorted(set(node) - NODE_KEYS)
    if unknown:
        raise ValueError(f"agent_obs: unknown key(s) {unknown}; known: {sorted(NODE_KEYS)}")
    topk = _pick(node, cfg, "topk", "entropy_k", topk_from_entropy_k(cfg.get("entropy_k", 10)), log)
    every = _pick(node, cfg, "every_n_steps", "log_detailed_metrics_every_n_steps",
                  cfg.get("log_detailed_metrics_every_n_steps", 10), log)  # fmt: skip
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"log_detailed_metrics_every_n_steps (agent_obs.every_n_steps) must be >= 1, got {every!r}")
    topk = tuple(int(k) for k in topk)
    if not topk or min(topk) < 1:
        raise ValueError(f"agent_obs.topk must be positive integers, e.g. [1, 2, 5, 10], got {list(topk)}")
    return ObserverSettings(
        enabled=bool(cfg.get("enable_detailed_metrics", True)),
        topk=topk,
        every_n_steps=every,
        max_tools=int(node.get("max_tools", 16)),
        max_in_flight=int(node.get("max_in_flight", 4)),
        binary_entropy=_flag(node, "binary_entropy"),
        top_n=_top_n(node),
        outlier_k=_outlier_k(node),
        exporters=tuple(_exporter_specs(node)),
    )


def _flag(node: Mapping[str, Any], key: str) -> bool:
    """A boolean node key (default False); anything but true/false is refused (``"false"`` would read as True)."""
    value = node.get(key, False)
    if not isinstance(value, bool):
        raise ValueError(f"agent_obs.{key} must be true or false, got {value!r}")
    return value


def _top_n(node: Mapping[str, Any]) -> int:
    """``top_n``: how many hardest samples a collect reports (>= 0; 0: none)."""
    value = node.get("top_n", 10)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"agent_obs.top_n must be an integer >= 0 (hardest samples per collect), got {value!r}")
    return value


def _outlier_k(node: Mapping[str, Any]) -> float:
    """``outlier_k``: the outlier cut-off in robust standard deviations (> 0, finite)."""
    value = node.get("outlier_k", DEFAULT_OUTLIER_K)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ValueError(f"agent_obs.outlier_k must be a positive number, e.g. {DEFAULT_OUTLIER_K}, got {value!r}")
    return float(value)


def build_exporter(spec: ExporterSpec) -> Any:
    """Instantiate one entry with torchtune's ``config.instantiate``; a taken port names the key to change."""
    from torchtune import config

    from agent_obs.exporters.prometheus import PortInUseError

    try:
        return config.instantiate(OmegaConf.create(spec.entry))
    except PortInUseError as error:
        port, host = spec.entry.get("port", "9464 (the default)"), spec.entry.get("host", "127.0.0.1")
        port_key, bind_key = spec.key("port"), spec.key("on_bind_error")
        if port_key == "agent_obs.prometheus_port":
            bind_key = "agent_obs.on_bind_error"
        raise PortInUseError(
            error.errno,
            f"{port_key}={port}: port {port} on {host} is already in use. Set {port_key} to a free port, "
            f"0 (any free port, printed at start) or null (off), or {bind_key}=warn to train on without serving "
            "/metrics",
        ) from error


def _describe(spec: ExporterSpec, exporter: Any) -> str:
    """A log line for a started exporter (``agent-obs demo`` reads the Prometheus one for its URL)."""
    if is_component(spec.entry, PROMETHEUS):
        return f"Prometheus metrics on {exporter.url}"
    if is_component(spec.entry, JSONL):
        return f"JSONL metrics log at {spec.entry.get('path')}"
    endpoint = spec.entry.get("endpoint")
    return f"{type(exporter).__name__} exporting" + (f" to {endpoint}" if endpoint else "")


def build_exporters(settings: ObserverSettings, log: logging.Logger | None = None) -> list[Any]:
    """Every exporter of ``settings`` (call on rank 0 only); those built are closed if a later one fails."""
    from agent_obs.exporters.base import close_all

    log = log or logging.getLogger(__name__)
    exporters: list[Any] = []
    try:
        for spec in settings.exporters:
            exporter = build_exporter(spec)
            exporters.append(exporter)
            log.info(f"agent-obs: {_describe(spec, exporter)}")
    except BaseException:
        close_all(exporters)
        raise
    return exporters
