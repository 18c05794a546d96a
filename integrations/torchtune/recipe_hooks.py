"""What the agent SFT recipe adds to torchtune's ``full_finetune_distributed``, called from its marked lines.

The recipe file stays torchtune 0.6.1's code plus ``# agent-obs`` lines; the logic lives here: the
observer and its exporters (rank 0, plus the recipe's metric logger through ``TorchtuneMetricLogger``),
the per-step observe/collect, validation over every val row, the collate choice, the CPU guard.
"""

from __future__ import annotations

import gc
import logging
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, NamedTuple

import torch
from agent_obs.integrations.torchtune.collate import EXTRA_FIELDS, NO_SAMPLE, SAMPLE_IDS, default_collate
from agent_obs.integrations.torchtune.metric_logger import TorchtuneMetricLogger
from agent_obs.integrations.torchtune.observer_config import build_exporters, observer_settings
from agent_obs.integrations.torchtune.resume import point_resume_at_last_epoch, truncate_jsonl
from agent_obs.integrations.torchtune.seed_config import forward_dataset_flags, resolve_seed_components
from omegaconf import DictConfig, open_dict

from agent_obs.observer import Observer, shift_left

NO_CLASSES_FIX = (
    "use dataset._component_: agent_obs.integrations.torchtune.dataset.AgentSFTDataset with collate_fn: "
    "agent_obs.integrations.torchtune.collate.padded_collate_agent_sft (or no collate_fn), "
    "or set enable_token_classification: False"
)

_OTHER_RANKS = logging.getLogger(__name__ + ".other_ranks")
_OTHER_RANKS.disabled = True  # ranks > 0 build the same settings; rank 0 says what is wrong with them


def cleanup_before_training(device: torch.device) -> None:
    """torchtune's ``cleanup_before_training``, which calls ``torch.cpu.empty_cache`` (absent) on CPU."""
    from torchtune import training

    if device.type == "cpu":
        gc.collect()
    else:
        training.cleanup_before_training()


class Extras(NamedTuple):
    """A batch's fields that are not model inputs, kept on the host for ``observe()``."""

    token_classes: torch.Tensor | None = None
    tool_ids: torch.Tensor | None = None
    tool_args: torch.Tensor | None = None
    sample_ids: torch.Tensor | list | None = None  # [B] ids, or [B, S] per-token row indices when packed


def pop_extras(batch: dict[str, Any]) -> Extras:
    """Remove the per-token extras and ``sample_ids`` (any unknown key crashes the model) from a batch."""
    return Extras(*(batch.pop(key, None) for key in (*EXTRA_FIELDS, SAMPLE_IDS)))


def observe_block(
    observer: Observer, labels: torch.Tensor, extras: Extras, *, ignore_index: int
) -> AbstractContextManager:
    """``observer.observe`` for one forward of unshifted ``labels``: every per-token field shifted to score token t+1.

    Classes and tool ids are shifted where they are (the host, from the collate): the observer maps
    tool ids to slots there, without a device round trip. ``[B]`` sample ids need no shift.
    """
    classes = None if extras.token_classes is None else shift_left(extras.token_classes, EXTRA_FIELDS["token_classes"])
    tools = args = None
    if classes is not None:
        tools = None if extras.tool_ids is None else shift_left(extras.tool_ids, EXTRA_FIELDS["tool_ids"])
        args = None if extras.tool_args is None else shift_left(extras.tool_args, EXTRA_FIELDS["tool_args"])
    ids = extras.sample_ids
    if isinstance(ids, torch.Tensor) and ids.dim() == 2:
        ids = shift_left(ids, NO_SAMPLE)
    return observer.observe(
        labels=shift_left(labels, ignore_index), token_classes=classes, tool_ids=tools, tool_args=args, sample_ids=ids
    )


class AgentObsRecipe:
    """The recipe's agent-obs state: settings from the config, the observer, the val loader, one-time warnings."""

    def __init__(self, cfg: DictConfig, *, device: torch.device, is_rank_zero: bool, log: logging.Logger) -> None:
        self.settings = observer_settings(cfg, log if is_rank_zero else _OTHER_RANKS)  # config warnings once
        self.classify = bool(cfg.get("enable_token_classification", True))
        self.run_val_every_n_steps = cfg.get("run_val_every_n_steps", None)
        self.max_val_steps = cfg.get("max_val_steps", None)
        self.progress_lines = bool(cfg.get("progress_lines", False))
        self.device, self.is_rank_zero, self.log = device, is_rank_zero, log
        self.observer: Observer | None = None
        self.exporters: list[Any] = []
        self.metric_logger: TorchtuneMetricLogger | None = None
        self.val_loader = None
        self.collate_name: str | None = None
        self.ignore_index = -100
        self._warned_no_classes = False

    # setup

    def point_resume(self, cfg: DictConfig) -> None:
        """On resume, before torchtune's CheckpointClient reads them: the model files of the recipe state's epoch."""
        files = point_resume_at_last_epoch(cfg)
        if files and self.is_rank_zero:
            out = cfg.checkpointer.output_dir
            self.log.info(f"agent-obs: resuming from {out}/recipe_state and the model files {files}")

    def prepare_config(self, cfg: DictConfig) -> None:
        """Before the datasets: the seed's component paths resolved (said once), ``collate_fn`` unset means
        "follow the data", ``enable_token_classification`` and the config key passed to AgentSFTDataset nodes."""
        seed_paths = resolve_seed_components(cfg)
        if seed_paths and self.is_rank_zero:
            self.log.info(
                "agent-obs: the design document's component paths resolve to this project's classes: "
                + "; ".join(f"{seed} -> {ours}" for seed, ours in seed_paths)
            )
        with open_dict(cfg):
            cfg.collate_fn = cfg.get("collate_fn", None)
        forward_dataset_flags(cfg, self.classify)

    def collate_for(self, dataset: Any, packed: bool, collate_fn: str | None) -> str:
        """The configured collate, or without one the agent collate when the samples carry ``token_classes``."""
        if collate_fn is None:
            collate_fn = default_collate(dataset[0] if len(dataset) else {})
            if not packed and self.collate_name is None and self.is_rank_zero:
                self.log.info(f"agent-obs: collate_fn is not set; the dataset's samples use {collate_fn}")
        self.collate_name = self.collate_name or collate_fn
        return collate_fn

    def start_exporters(self, metric_logger: Any) -> None:
        """Rank 0: the recipe's metric logger (``train_*``/``val_*`` keys) and the configured exporters."""
        self.metric_logger = TorchtuneMetricLogger(metric_logger)
        self.exporters = [self.metric_logger]
        if self.settings.enabled:
            self.exporters += build_exporters(self.settings, self.log)

    def reconcile_jsonl(self, resuming: bool, global_step: int) -> None:
        """Rank 0: a resumed run cuts the JSONL log back to the checkpoint's step; a fresh run warns of an old log."""
        path = self.settings.jsonl_path
        if not (self.is_rank_zero and path):
            return
        if resuming:
            removed = truncate_jsonl(path, global_step)
            if removed:
                self.log.info(f"agent-obs: resuming at step {global_step}: {removed} later line(s) cut from {path}")
        elif Path(path).is_file() and Path(path).stat().st_size:
            self.log.warning(
                f"agent-obs: {path} already holds an earlier run's records and this run appends from step 1, "
                "so steps repeat: set the JSONL exporter's path (agent_obs.jsonl_path, or output_dir) to a new "
                "path, or resume_from_checkpoint=True to continue that run"
            )

    def setup_val(self, cfg: DictConfig, setup_data: Any) -> None:
        """The val loader (same collate, batches no larger than ``batch_size``, every row once)."""
        if cfg.get("dataset_val", None) is None:
            return
        batch_size_val = cfg.get("batch_size_val", cfg.batch_size)
        if batch_size_val > cfg.batch_size:
            raise ValueError(
                f"batch_size_val={batch_size_val} is larger than batch_size={cfg.batch_size}; "
                "set batch_size_val <= batch_size"
            )
        self.val_loader = setup_data(
            cfg_dataset=cfg.dataset_val,
            shuffle=False,
            batch_size=batch_size_val,
            collate_fn=cfg.collate_fn,
            exact=True,
        )

    def attach(self, model: torch.nn.Module, process_group: Any, ignore_index: int) -> None:
        """Hook the model's output projection; ``collect`` sums over ``process_group`` (data-parallel ranks)."""
        from agent_obs.observer import attach

        self.ignore_index = ignore_index
        if self.settings.enabled:
            self.observer = attach(
                model,
                topk=self.settings.topk,
                max_tools=self.settings.max_tools,
                exporters=self.exporters,
                process_group=process_group,
                max_in_flight=self.settings.max_in_flight,
                ignore_index=ignore_index,
                binary_entropy=self.settings.binary_entropy,
                top_n=self.settings.top_n,
                outlier_k=self.settings.outlier_k,
            )

    # training

    def observing(self, step: int) -> bool:
        """Whether optimizer step ``step`` gets detailed metrics."""
        return self.observer is not None and step % self.settings.every_n_steps == 0

    def observe(self, step: int, labels: torch.Tensor, extras: Extras) -> AbstractContextManager:
        """The observer block for a forward of optimizer step ``step`` (a no-op on steps not observed)."""
        return self._block(labels, extras) if self.observing(step) else nullcontext()

    def _block(self, labels: torch.Tensor, extras: Extras) -> AbstractContextManager:
        """The observer block for one forward (classes dropped when classification is off; sample ids kept)."""
        if not self.classify:
            extras = Extras(sample_ids=extras.sample_ids)
        elif extras.token_classes is None:
            self._warn_no_classes()
        return observe_block(self.observer, labels, extras, ignore_index=self.ignore_index)

    def _warn_no_classes(self) -> None:
        """One warning when classification is on but batches carry no ``token_classes``."""
        if self._warned_no_classes:
            return
        self._warned_no_classes = True
        if self.is_rank_zero:
            self.log.warning(
                "agent-obs: enable_token_classification is True but a batch arrived without token_classes, so only "
                "the overall metrics are logged (no reasoning_/tool_call_ keys). Cause: "
                f"collate_fn {self.collate_name} drops them, or the dataset does not produce them. Fix: "
                + NO_CLASSES_FIX
            )

    def after_step(self, step: int, epoch: int, loss: float, total_steps: int) -> None:
        """After optimizer step ``step``: collect (collective: every rank) and export; a progress line on rank 0."""
        if self.observing(step):
            self.observer.collect(split="train", step=step)
        if self.progress_lines and self.is_rank_zero:
            self.log.info(f"step {step}/{total_steps} epoch {epoch + 1} loss {float(loss):.4f}")

    def val_due(self, step: int, *, epoch_end: bool = False) -> bool:
        """Validate now: every ``run_val_every_n_steps`` steps, or at each epoch's end when that is unset."""
        if self.val_loader is None:
            return False
        if epoch_end:
            return not self.run_val_every_n_steps
        return bool(self.run_val_every_n_steps) and step % self.run_val_every_n_steps == 0

    def _val_steps(self) -> int:
        """Forwards per rank: the most batches any rank holds, capped by ``max_val_steps``."""
        steps = torch.tensor(len(self.val_loader), device=self.device)
        torch.distributed.all_reduce(steps, op=torch.distributed.ReduceOp.MAX)
        return int(steps) if self.max_val_steps is None else min(int(steps), int(self.max_val_steps))

    @torch.no_grad()
    def validate(self, model: torch.nn.Module, loss_fn: Any, pad_id: int, step: int) -> dict[str, float]:
        """Loss and detailed metrics over ``dataset_val`` (all of it, or ``max_val_steps`` batches per rank).

        Each row counts once; a rank out of rows runs a padding forward, unobserved, since FSDP forwards are collective.
        """
        from torchtune import utils

        model.eval()
        total_loss = torch.zeros((), device=self.device, dtype=torch.float64)
        total_tokens = torch.zeros((), device=self.device, dtype=torch.float64)
        batches = iter(self.val_loader)
        for _ in range(self._val_steps()):
            batch = next(batches, None)
            if batch is None:
                model(tokens=torch.full((1, 8), pad_id, device=self.device))
                continue
            extras = pop_extras(batch)
            utils.batch_to_device(batch, self.device)
            labels = batch.pop("labels")
            with nullcontext() if self.observer is None else self._block(labels, extras):  # every val batch
                logits = model(**batch)
            labels = shift_left(labels, loss_fn.ignore_index)
            n = (labels != loss_fn.ignore_index).sum()
            if not isinstance(logits, list):
                labels = labels.reshape(-1)
                logits = logits.reshape(-1, logits.size(-1))
            total_loss += loss_fn(logits, labels).double() * n
            total_tokens += n
            del logits
        torch.distributed.all_reduce(total_loss)
        torch.distributed.all_reduce(total_tokens)
        result = {"loss": float(total_loss / total_tokens.clamp(min=1))}
        if self.observer is not None:
            result.update({k: float(v) for k, v in self.observer.collect(split="val", step=step).items()})
        if self.is_rank_zero:
            self.metric_logger.export({"loss": result["loss"]}, step=step, split="val")
            if self.progress_lines:
                perplexity = f" val_perplexity {result['perplexity']:.2f}" if "perplexity" in result else ""
                self.log.info(f"step {step} val_loss {result['loss']:.4f}{perplexity}")
        model.train()
        return result

    def close(self) -> None:
        """Detach the observer and close the exporters (the recipe closes its own metric logger after)."""
        from agent_obs.exporters.base import close_all

        if self.observer is not None:
            self.observer.detach()  # also closes the exporters
        else:
            close_all(self.exporters)
