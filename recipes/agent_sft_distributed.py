# ruff: noqa: E501, B028, SIM401, SIM118  (upstream torchtune code kept as it was)
# Copyright (c) Meta Platforms, Inc. and affiliates.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
#
# agent-obs: derived from torchtune 0.6.1's recipes/full_finetune_distributed.py (all of its
# features kept) with CPU guards, a validation loop and per-token-class metrics (entropy,
# perplexity, top-k mass, accuracy for reasoning vs tool-call tokens) for train and val.
# Changes are marked "agent-obs". Launch it as a file (the installed torchtune owns the
# module name ``recipes``):
#   torchrun --standalone --nproc_per_node 2 recipes/agent_sft_distributed.py --config CFG
# or `agent-obs run --nproc-per-node 2 --config CFG [key=value ...]`.

import gc
import sys
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any
from warnings import warn

import torch
from agent_obs.integrations.torchtune.collate import default_collate, padded_collate_agent_packed
from agent_obs.integrations.torchtune.resume import configured_files, resume_checkpoint_files, truncate_jsonl
from agent_obs.integrations.torchtune.sampler import ShardSampler
from agent_obs.integrations.torchtune.seed_config import resolve_seed_components
from omegaconf import DictConfig, ListConfig, open_dict
from torch import nn
from torch.distributed import (
    destroy_process_group,
    init_device_mesh,
    init_process_group,
)
from torch.distributed._tensor import DTensor
from torch.distributed.tensor.parallel import parallelize_module
from torch.optim import Optimizer
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler
from torchtune import config, modules, training, utils
from torchtune.config._utils import _get_component_from_path
from torchtune.datasets import ConcatDataset
from torchtune.recipe_interfaces import FTRecipeInterface
from torchtune.training import PROFILER_KEY, DummyProfiler
from torchtune.training.activations import apply_selective_activation_checkpointing
from torchtune.training.checkpointing._checkpoint_client import (
    CheckpointClient,
    TrainingProgress,
)
from torchtune.training.lr_schedulers import get_lr
from tqdm import tqdm

from agent_obs.token_class import TokenClass

log = utils.get_logger("DEBUG")


def _observer_topk(entropy_k: int) -> tuple:
    """agent-obs: the top-k masses reported: 1, 2, 5, 10 up to ``entropy_k``, and ``entropy_k`` itself."""
    if int(entropy_k) < 1:
        raise ValueError(f"entropy_k must be >= 1, got {entropy_k}; e.g. entropy_k: 10")
    return tuple(sorted({k for k in (1, 2, 5, 10) if k <= int(entropy_k)} | {int(entropy_k)}))


def _build_exporters(cfg_obs: DictConfig) -> list:
    """agent-obs: exporters from the ``agent_obs:`` config section (rank 0 only); unset keys are off."""
    run = cfg_obs.get("run_name", "default")
    exporters = []
    if cfg_obs.get("prometheus_port", None) is not None:
        from agent_obs.exporters.prometheus import PortInUseError, PrometheusExporter

        port, host = int(cfg_obs.prometheus_port), cfg_obs.get("prometheus_host", "127.0.0.1")
        try:
            prom = PrometheusExporter(
                port=port,
                host=host,
                run=run,
                push_gateway=cfg_obs.get("pushgateway_url", None),
                on_bind_error=cfg_obs.get("on_bind_error", "raise"),
            )
        except PortInUseError as error:
            raise PortInUseError(
                error.errno,
                f"agent_obs.prometheus_port={port}: port {port} on {host} is already in use. Set "
                "agent_obs.prometheus_port to a free port, 0 (any free port, printed at start) or null (off), "
                "or agent_obs.on_bind_error=warn to train on without serving /metrics",
            ) from error
        log.info(f"agent-obs: Prometheus metrics on {prom.url}")
        exporters.append(prom)
    if cfg_obs.get("otlp_endpoint", None):
        from agent_obs.exporters.otel import OTelExporter

        exporters.append(OTelExporter(endpoint=cfg_obs.otlp_endpoint, run=run))
    if cfg_obs.get("jsonl_path", None):
        from agent_obs.exporters.jsonl import JsonlExporter

        exporters.append(JsonlExporter(cfg_obs.jsonl_path, histograms=True))
        log.info(f"agent-obs: JSONL metrics log at {cfg_obs.jsonl_path}")
    return exporters


def _forward_classification_flag(cfg: DictConfig, enabled: bool) -> None:
    """agent-obs: pass ``enable_token_classification`` (and the config key named in data errors) to
    AgentSFTDataset nodes that do not set them."""
    for key in ("dataset", "dataset_val"):
        nodes = cfg.get(key, None)
        many = isinstance(nodes, ListConfig)
        for i, node in enumerate(nodes if many else [nodes]):
            if node is not None and str(node.get("_component_", "")).endswith("AgentSFTDataset"):
                with open_dict(node):
                    node.setdefault("enable_token_classification", enabled)
                    node.setdefault("config_key", f"{key}[{i}]" if many else key)


def _point_resume_at_last_epoch(cfg: DictConfig) -> None:
    """agent-obs: on resume, read the model from the epoch the recipe state belongs to (``epoch_N/model-*``)
    unless ``checkpointer.checkpoint_files`` already names files that exist under ``output_dir``."""
    ckpt = cfg.checkpointer
    out = Path(ckpt.output_dir)
    if "checkpoint_files" not in ckpt or all((out / f).is_file() for f in configured_files(ckpt.checkpoint_files)):
        return
    files = resume_checkpoint_files(out, ckpt.get("recipe_checkpoint", None))
    with open_dict(ckpt):
        ckpt.checkpoint_files = files
    utils.log_rank_zero(log, f"agent-obs: resuming from {out}/recipe_state and the model files {files}")


def _shift(t: torch.Tensor, fill: int) -> torch.Tensor:
    """agent-obs: align a per-token field with the shifted labels (position t scores token t+1)."""
    return torch.hstack((t[..., 1:], torch.full_like(t[..., :1], fill)))


class AgentSFTRecipeDistributed(FTRecipeInterface):
    """
    Full finetuning recipe for dense transformer-based LLMs such as Llama2. This recipe supports
    distributed training and can be run on a single node (1 to 8 GPUs).

    Features:
        - FSDP. Supported using PyTorch's FSDP APIs. CPU offload of parameters, gradients, and optimizer states
            is supported via ``fsdp_cpu_offload``. Resharding of parameters after the forward pass is
            done by default (corresponding to FULL_SHARD sharding strategy), but can be disabled by setting the config
            ``fsdp_reshard_after_forward`` to False (this corresponds to SHARD_GRAD_OP sharding strategy).
            DDP is currently not supported. Training on CPU is not supported.

        - Activation Checkpointing. This can be controlled using the ``enable_activation_checkpointing``
            flag. Activation checkpointing helps reduce the memory footprint since we no longer keep
            activations in memory and instead recompute them during the backward pass. This is especially
            helpful for larger batch sizes when you're memory constrained. But these savings in memory
            come at the cost of training performance. In most cases training can slow-down quite a bit as
            a result of this activation recomputation.

        - Activation Offloading. This can be controlled using the ``enable_activation_offloading``
            flag. Activation offloading is a technique similar to activations checkpointing that helps
            reduce the memory footprint to prevent OOMs on CUDA and enable bigger batches. Where activations
            checkpointing drops the activation in the forward to recompute it later in the backward,
            activations offloading will drop the activation in the forward to the CPU and bring it
            back during the backward pass. As always, there is a tradeoff--these savings in memory can
            come at the cost of training performance and CPU resources. To recover some runtime cost,
            we've added an option to enable offloading on a different stream to permit overlapping with
            the computation. This option is currently only available on PyTorch 2.5 or later and will
            be enabled by default if an acceptable torch version is found. Activation offloading can be
            used in conjunction with activation checkpointing.

        - Precision. Full fp32 and bf16 training are supported. Precision is controlled using the ``dtype``
            flag. When ``dtype=bf16``, all activations, gradients and optimizer states are in bfloat16. In
            most cases this should halve the memory footprint of full precision (fp32) training, without
            loss in model quality (will depend on the model, training data and other settings). For
            GPUs which do not support bfloat16, we fall back to fp32. Mixed precision training and fp16
            precision are currently not supported.

        - Gradient Accumulation. You can simulate larger batch sizes by accumulating gradients. This is
            controlled using the ``gradient_accumulation_steps`` flag.

                Total Batch Size = batch_size * number of GPUs * gradient accumulation steps.

            For example: with batch_size=1, nproc_per_node=2 and gradient_accumulation_steps=32 we get a
            total batch size of 64.

            Gradient accumulation is especially useful when you are memory constrained. In this case,
            accumulating gradients might give you better training speed than enabling activation
            checkpointing.

        - Checkpointing. Model weights are checkpointed both at the end of each epoch and at the end of
            training. Optimizer state and recipe state (seed, total_epochs, number of epochs run etc) are
            only saved at the end of a given epoch and used in case of resuming training.

            Resuming training is controlled by the ``resume_from_checkpoint`` flag. Mid-epoch checkpointing is
            currently not supported.

            For more details on the checkpointer, please take a look at
            our checkpointer deepdive (https://pytorch.org/torchtune/main/deep_dives/checkpointer.html).

        - Logging. Terminal, Disk, WandB and TensorBoard are all supported.

        - Gradient Clipping. Gradient clipping is supported using the ``clip_grad_norm`` flag. By default,
            ``clip_grad_norm`` is set to ``None``. If you only want to log the grad norm, you can set
            ``clip_grad_norm='inf'``.

    For a full list of example configs for this recipe, run ``tune ls`` on the command line. Each config
    has example commands for how to kick-off training.

    Args:
        cfg (DictConfig): OmegaConf object parsed from yaml file

    Raises:
        ValueError: If ``dtype`` is set to fp16.
        RuntimeError: If ``dtype`` is set to bf16 and the hardware does not support bf16.
        RuntimeError: If ``left_pad_sequence`` is set as the data collator.
        RuntimeError: If ``enable_activation_offloading`` is True and device is not CUDA.
        RuntimeError: If ``enable_activation_offloading`` is True and ``enable_activation_checkpointing`` is False.
    """

    def __init__(self, cfg: DictConfig) -> None:
        device_type = cfg.device
        self._device = utils.get_device(device=device_type)
        self._dtype = training.get_dtype(cfg.dtype, device=self._device)

        if self._dtype == torch.float16:
            raise ValueError("full fp16 training is not supported with this recipe. Please use bf16 or fp32 instead.")

        # Set up the backend for distributed training (NCCL, GLOO, etc.)
        self._enable_async_checkpointing = cfg.get("enable_async_checkpointing", False)
        self.fsdp_cpu_offload = cfg.get("fsdp_cpu_offload", False)
        self.distributed_backend = training.get_distributed_backend(
            device_type,
            offload_ops_to_cpu=self.fsdp_cpu_offload or self._enable_async_checkpointing,
        )
        init_process_group(self.distributed_backend)

        # Initialize distributed variables
        self.world_size, self.rank = utils.get_world_size_and_rank()
        self._is_rank_zero = self.rank == 0
        self.tensor_parallel_plan = config.instantiate(cfg.get("tensor_parallel_plan", None))
        self.tensor_parallel_dim = cfg.get("tensor_parallel_dim", 1)
        if self.tensor_parallel_dim > 1 and self.tensor_parallel_plan is None:
            raise ValueError("Tensor Parallel plan needs to be provided when tensor parallel is enabled.")
        if self.world_size % self.tensor_parallel_dim != 0:
            raise ValueError(
                f"world_size {self.world_size} must be divisible by tensor_parallel_dim {self.tensor_parallel_dim}"
            )
        if self.tensor_parallel_dim > 1 and cfg.optimizer.get("fused", False):
            raise ValueError("Tensor parallelism is currently incompatible with fused optimizer.")

        self.data_parallel_dim = self.world_size // self.tensor_parallel_dim

        # Logging attributes
        self._output_dir = cfg.output_dir
        self._log_every_n_steps = cfg.get("log_every_n_steps", 1)
        self._log_peak_memory_stats = cfg.get("log_peak_memory_stats", False)
        if self._log_peak_memory_stats and device_type != "cuda":
            log.info(
                "log_peak_memory_stats was set to True, however, training does not use cuda. Setting log_peak_memory_stats=False."
            )
            self._log_peak_memory_stats = False

        # Training cfg
        self._resume_from_checkpoint = cfg.resume_from_checkpoint
        self._gradient_accumulation_steps = cfg.gradient_accumulation_steps
        self._optimizer_in_bwd = cfg.get("optimizer_in_bwd", False)
        self._clip_grad_norm = cfg.get("clip_grad_norm", None)
        if self._resume_from_checkpoint:  # agent-obs: no checkpointer.checkpoint_files override needed
            _point_resume_at_last_epoch(cfg)
        self._checkpoint_client = CheckpointClient(cfg)

        # Optimizer in backward is not compatible with gradient accumulation or gradient clipping
        if self._optimizer_in_bwd:
            if self._clip_grad_norm is not None:
                raise RuntimeError(
                    "Gradient clipping is not supported with optimizer in bwd."
                    "Please set clip_grad_norm=None, or optimizer_in_bwd=False."
                )
            if self._gradient_accumulation_steps > 1:
                raise RuntimeError(
                    "Gradient accumulation is not supported with optimizer in bwd."
                    "Please set gradient_accumulation_steps=1, or optimizer_in_bwd=False."
                )

        # activation checkpointing/offloading
        self._enable_activation_checkpointing = cfg.get("enable_activation_checkpointing", False)
        self._enable_activation_offloading = cfg.get("enable_activation_offloading", False)
        if self._enable_activation_offloading:
            if device_type != "cuda":
                raise RuntimeError("enable_activation_offloading should only be True when training on CUDA")
            if not self._enable_activation_checkpointing:
                raise RuntimeError(
                    "enable_activation_offloading should only be True when enable_activation_checkpointing is True"
                )
        elif self._enable_activation_checkpointing and cfg.checkpointer.model_type != "LLAMA3_VISION":
            utils.log_rank_zero(
                log,
                "Hint: enable_activation_checkpointing is True, but enable_activation_offloading isn't. "
                "Enabling activation offloading should reduce memory further.",
            )

        # These are public properties which are updated by the checkpoint loader
        # when ``resume_from_checkpoint`` is `True` or validated in tests
        self.seed = training.set_seed(seed=cfg.seed, debug_mode=cfg.get("cudnn_deterministic_mode", None))
        self.epochs_run = 0
        self.total_epochs = cfg.epochs
        self.max_steps_per_epoch = cfg.max_steps_per_epoch
        self.global_step = 0

        # agent-obs: validation and detailed metrics
        self._run_val_every_n_steps = cfg.get("run_val_every_n_steps", None)
        self._max_val_steps = cfg.get("max_val_steps", None)
        self._enable_detailed_metrics = cfg.get("enable_detailed_metrics", True)
        self._enable_token_classification = cfg.get("enable_token_classification", True)
        self._entropy_k = cfg.get("entropy_k", 10)
        self._detailed_every = int(cfg.get("log_detailed_metrics_every_n_steps", 10))
        if self._detailed_every < 1:
            raise ValueError("log_detailed_metrics_every_n_steps must be >= 1")
        self._progress_lines = cfg.get("progress_lines", False)
        self._observer = None
        self._exporters = []
        self._collate_name = None
        self._warned_no_classes = False

    def _update_recipe_state(self, ckpt_dict: dict[str, Any]) -> None:
        """
        Updates the recipe state from checkpoint.
        """
        try:
            self.epochs_run = ckpt_dict[training.EPOCHS_KEY]

            # on mismatch, warn the user and prevent the override
            if self.seed != ckpt_dict[training.SEED_KEY]:
                warn(
                    message=(
                        "Config value for seed does not match the checkpoint value, "
                        f"using the checkpoint value: {ckpt_dict[training.SEED_KEY]}"
                    )
                )
                self.seed = ckpt_dict[training.SEED_KEY]
            if self.max_steps_per_epoch != ckpt_dict[training.MAX_STEPS_KEY]:
                warn(
                    message=(
                        "Config value for max_steps_per_epoch does not match the checkpoint value, "
                        f"using the checkpoint value: {ckpt_dict[training.MAX_STEPS_KEY]}"
                    )
                )
                self.max_steps_per_epoch = ckpt_dict[training.MAX_STEPS_KEY]

            # on mismatch, warn the user but allow the override
            if self.total_epochs != ckpt_dict[training.TOTAL_EPOCHS_KEY]:
                warn(
                    message=(
                        "Config value for total_epochs does not match the checkpoint value, "
                        f"using the config value: {self.total_epochs}"
                    )
                )

        except KeyError as e:
            raise KeyError(
                "Checkpoint does not contain the required keys needed for updating recipe state. "
                "Are you sure you passed in the right recipe checkpoint?"
            ) from e

    def setup(self, cfg: DictConfig) -> None:
        """
        Setup the recipe. This includes training state (if resume_from_checkpoint is True),
        model, tokenizer, loss, optimizer, lr scheduler, sampler, and dataloader.
        """
        if self.fsdp_cpu_offload:
            # Utilize all available CPU cores for intra-op parallelism. This provides ~2x
            # speed up when benchmarking fused AdamW on CPU
            training.set_torch_num_threads()

        if self._is_rank_zero:
            self._metric_logger = config.instantiate(cfg.metric_logger)
            # log config with parameter override
            self._metric_logger.log_config(cfg)
            # agent-obs: Prometheus / OTLP / JSONL exporters live on rank 0
            self._exporters = _build_exporters(cfg.get("agent_obs", None) or DictConfig({}))

        # Load the base model
        checkpoint_dict = self._checkpoint_client.load_base_checkpoint()

        self._compile = cfg.get("compile", False)
        self._model = self._setup_model(
            cfg_model=cfg.model,
            enable_activation_checkpointing=self._enable_activation_checkpointing,
            enable_activation_offloading=self._enable_activation_offloading,
            custom_sharded_layers=cfg.get("custom_sharded_layers", None),
            fsdp_cpu_offload=self.fsdp_cpu_offload,
            reshard_after_forward=cfg.get("fsdp_reshard_after_forward", True),
            model_state_dict=checkpoint_dict[training.MODEL_KEY],
            ac_mode=cfg.get("ac_mode", None),
            ac_option=cfg.get("ac_option", None),
        )
        self._tokenizer = config.instantiate(cfg.tokenizer)

        self._optimizer = self._setup_optimizer(
            cfg_optimizer=cfg.optimizer,
            optimizer_in_bwd=self._optimizer_in_bwd,
            opt_state_dict=(checkpoint_dict[training.OPT_KEY] if training.OPT_KEY in checkpoint_dict else None),
        )

        if self._resume_from_checkpoint:
            # If async checkpointing is enabled, intermediate checkpoints are saved asynchronously
            # using the DistributedCheckpointer.
            # Therefore the recipe needs to load the distributed checkpoint to restore the training
            # progress.
            if self._enable_async_checkpointing:
                try:
                    checkpoint_dict = self._checkpoint_client.load_distributed_checkpoint(
                        self._model,
                        (self._optim_ckpt_wrapper if self._optimizer_in_bwd else self._optimizer),
                    )
                except Exception as e:
                    log.warning(
                        f"Failed to load distributed checkpoint: {e}. Training will start from the base checkpoint."
                    )

            # Update the recipe state from the checkpoint state dict.
            self._update_recipe_state(checkpoint_dict)

        # initialize loss
        self._loss_fn = config.instantiate(cfg.loss)

        if self._compile:
            training.compile_loss(self._loss_fn, verbose=self._is_rank_zero)

        if self._loss_fn.__class__.__name__ == "CEWithChunkedOutputLoss":
            # set num_output_chunks for model
            self._model.set_num_output_chunks(self._loss_fn.num_output_chunks)

        utils.log_rank_zero(log, "Loss is initialized.")

        # sampler and dataloader depend on the tokenizer and loss_fn and should be
        # setup after both of these are initialized
        # agent-obs: the design document's component paths (torchtune.datasets.AgentSFTDataset, ...) resolve
        # to this project's classes; without collate_fn the collate follows the dataset (see _setup_data)
        seed_paths = resolve_seed_components(cfg)
        if seed_paths:
            utils.log_rank_zero(
                log,
                "agent-obs: the design document's component paths resolve to this project's classes: "
                + "; ".join(f"{seed} -> {ours}" for seed, ours in seed_paths),
            )
        collate_name = cfg.get("collate_fn", None)
        _forward_classification_flag(cfg, self._enable_token_classification)
        self._dataloader = self._setup_data(
            cfg_dataset=cfg.dataset,
            shuffle=cfg.shuffle,
            batch_size=cfg.batch_size,
            collate_fn=collate_name,
        )

        # Finally update the recipe state which can only be correctly set after all of the
        # other components have been initialized and updated.
        #
        # Number of training steps in each epoch depends on the number of batches produced
        # by the dataloader, the max_steps_per_epoch param set by the user and the
        # gradient_accumulation_steps param. This value is used for logging and tracking
        # training state. The computation should happen after the dataloader has been setup
        self._steps_per_epoch = len(self._dataloader) // self._gradient_accumulation_steps
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < self._steps_per_epoch:
            self._steps_per_epoch = self.max_steps_per_epoch
        self.global_step = self.epochs_run * self._steps_per_epoch

        # agent-obs: a resumed run writes the steps after the checkpoint again: drop them from the JSONL log
        jsonl_path = (cfg.get("agent_obs", None) or {}).get("jsonl_path", None)
        if self._resume_from_checkpoint and self._is_rank_zero and jsonl_path:
            removed = truncate_jsonl(jsonl_path, self.global_step)
            if removed:
                log.info(
                    f"agent-obs: resuming at step {self.global_step}: {removed} later line(s) cut from {jsonl_path}"
                )
        elif self._is_rank_zero and jsonl_path and Path(jsonl_path).is_file() and Path(jsonl_path).stat().st_size:
            log.warning(
                f"agent-obs: {jsonl_path} already holds an earlier run's records and this run appends from step 1, "
                "so steps repeat: set agent_obs.jsonl_path (or output_dir) to a new path, or resume_from_checkpoint=True "
                "to continue that run"
            )

        # Setup lr scheduler
        self._lr_scheduler = self._setup_lr_scheduler(
            cfg_lr_scheduler=cfg.get("lr_scheduler", None),
            num_training_steps=self.total_epochs * self._steps_per_epoch,
            last_epoch=self.global_step - 1,
        )

        # Set up profiler, returns DummyProfiler (nullcontext object with no-op `step` method)
        # if cfg is missing profiler key or if `cfg.profiler.enabled = False`
        self._profiler = self._setup_profiler(cfg.get(PROFILER_KEY, None))

        # Used to ignore labels for loss computation
        self.ignore_labels_cache = torch.full((cfg.batch_size, 1), self._loss_fn.ignore_index, device=self._device)

        # agent-obs: validation data (same collate; batches no larger than batch_size) and the observer
        self._val_dataloader = None
        if cfg.get("dataset_val", None) is not None:
            batch_size_val = cfg.get("batch_size_val", cfg.batch_size)
            if batch_size_val > cfg.batch_size:
                raise ValueError(
                    f"batch_size_val={batch_size_val} is larger than batch_size={cfg.batch_size}; "
                    "set batch_size_val <= batch_size"
                )
            self._val_dataloader = self._setup_data(
                cfg_dataset=cfg.dataset_val,
                shuffle=False,
                batch_size=batch_size_val,
                collate_fn=collate_name,
                exact=True,
            )
        if self._enable_detailed_metrics:
            from agent_obs.observer import attach

            self._observer = attach(
                self._model,
                topk=_observer_topk(self._entropy_k),
                exporters=self._exporters,
                process_group=self._dp_group,
                max_in_flight=(cfg.get("agent_obs", None) or {}).get("max_in_flight", 4),
            )

    def _setup_lr_scheduler(
        self,
        cfg_lr_scheduler: DictConfig | None,
        num_training_steps: int,
        last_epoch: int,
    ) -> Optimizer | None:
        """
        Set up the learning rate scheduler based on the provided configuration.
        It supports both standard optimization and optimizer-in-backward cases.

        Args:
            cfg_lr_scheduler (Optional[DictConfig]): The learning rate scheduler configuration.
            num_training_steps (int): The total number of training steps.
            last_epoch (int): The index of the last epoch.

        Returns:
            lr_scheduler (Optional[Optimizer]): The learning rate scheduler.
        """
        if cfg_lr_scheduler is None:
            if self._is_rank_zero:
                log.info("No learning rate scheduler configured. Using constant learning rate.")
            return None

        if self._optimizer_in_bwd:
            # Use the first optimizer from the wrapper to represent the learning rate
            optimizer = next(iter(self._optim_ckpt_wrapper.optim_map.values()))
        else:
            # Standard case: use the single optimizer
            optimizer = self._optimizer

        # Instantiate the learning rate scheduler
        lr_scheduler = config.instantiate(
            cfg_lr_scheduler,
            optimizer,
            num_training_steps=num_training_steps,
            last_epoch=last_epoch,
        )

        if self._optimizer_in_bwd:
            # Modify the scheduler for optimizer_in_bwd case
            self._optim_ckpt_wrapper.set_lr_scheduler(lr_scheduler)

        if self._is_rank_zero:
            log.info("Learning rate scheduler is initialized.")

        return lr_scheduler

    def _setup_profiler(self, cfg_profiler: DictConfig | None = None) -> torch.profiler.profile | DummyProfiler:
        """
        Parses the `profiler` section of top-level `cfg` and sets up profiler

        Args:
            cfg_profiler (Optional[DictConfig]): ``profiler`` section of the top-level ``cfg`` (the main config passed to
                `recipe.main`). Default None.

        Returns:
            profiler: Union[torch.profiler.profile, DummyProfiler] - DummyProfiler is a nullcontext with no-op methods
            for `start`, `stop`, and `step` that can be used in place of `torch.profiler.profile` if profiler is not enabled such
            that the instrumented training loop does not need to be changed profiling is disabled.

        The profiler config can be provided in configs under the `profiler` key with the following layout:

        .. code-block:: yaml
            profiler:
                enabled: bool

                #Output directory of trace artifacts
                output_dir: str

            #`torch.profiler.ProfilerActivity` types to trace
            cpu: bool
            cuda: bool

                #Trace options
                profile_memory: bool
                with_stack: bool
                record_shapes: bool
                with_flops: bool

            # `torch.profiler.schedule` options:
            # wait_steps -> wait, warmup_steps -> warmup, active_steps -> active, num_cycles -> repeat
            wait_steps: int
            warmup_steps: int
            active_steps: int
            num_cycles: int
        """
        # Missing profiler section in config, assume disabled
        if cfg_profiler is None:
            cfg_profiler = DictConfig({"enabled": False})

        # Check that component is included and set correctly
        if cfg_profiler.get("_component_", None) is None:
            cfg_profiler["_component_"] = "torchtune.training.setup_torch_profiler"
        else:
            assert cfg_profiler.get("_component_") == "torchtune.training.setup_torch_profiler", (
                "Only torch profiler supported currently: component must be `torchtune.training.setup_torch_profiler`"
            )

        profiler, profiler_cfg = config.instantiate(cfg_profiler)

        utils.log_rank_zero(log, f" Profiler config after instantiation: {profiler_cfg}")
        if self._is_rank_zero:
            self.profiler_profile_memory = profiler_cfg.get("profile_memory", False)
            if profiler_cfg["enabled"]:
                self.profiler_wait_steps = profiler_cfg["wait_steps"]
                self.profiler_warmup_steps = profiler_cfg["warmup_steps"]
                self.profiler_active_steps = profiler_cfg["active_steps"]

        return profiler

    def _setup_model(
        self,
        cfg_model: DictConfig,
        enable_activation_checkpointing: bool,
        enable_activation_offloading: bool,
        fsdp_cpu_offload: bool,
        reshard_after_forward: bool,
        model_state_dict: dict[str, Any],
        custom_sharded_layers: list[str] | None = None,
        ac_mode: str | None = None,
        ac_option: int | None = None,
    ) -> nn.Module:
        """
        Model initialization has some important considerations:
           a. To minimize GPU peak memory, we initialize the model on meta device with
              the right dtype
           b. All ranks calls ``load_state_dict`` without peaking CPU RAMs since
              full state dicts are loaded with ``torch.load(mmap=True)``
        """

        utils.log_rank_zero(
            log,
            "Distributed training is enabled. Instantiating model and loading checkpoint on Rank 0 ...",
        )
        init_start = time.perf_counter()

        with training.set_default_dtype(self._dtype), torch.device("meta"):
            model = config.instantiate(cfg_model)

        if self._compile:
            training.compile_model(model, verbose=self._is_rank_zero)

        device_mesh = init_device_mesh(
            self._device.type,
            mesh_shape=(self.data_parallel_dim, self.tensor_parallel_dim),
            mesh_dim_names=("dp", "tp"),
        )
        self.dp_size = device_mesh["dp"].size()
        self.dp_rank = device_mesh["dp"].get_local_rank()
        self._dp_group = device_mesh["dp"].get_group()  # agent-obs: TP ranks see the same tokens: sum over dp only

        # Apply tensor parallelism to the model
        if self.tensor_parallel_dim > 1:
            # Use the local number (num_heads, num_kv_heads, embed_dim) to account for tensor parallel
            model = training.prepare_mha_for_tp(model, device_mesh["tp"])
            parallelize_module(
                model,
                device_mesh["tp"],
                parallelize_plan=self.tensor_parallel_plan,
            )

        # We currently have two versions of activation checkpointing in this recipe
        # for testing and BC purposes. ``enable_activation_checkpointing`` controls
        # the older version of AC and this behavior is unchanged
        # ac_mode and ac_option together control selective AC. This is only enabled
        # when these are set AND ``enable_activation_checkpointing`` is set to False
        # We'll clean this up as soon as testing of AC is complete
        if (not enable_activation_checkpointing) and (ac_mode is not None):
            apply_selective_activation_checkpointing(
                model,
                ac_mode,
                ac_option,
            )

        # original activation checkpointing (full) - flip the condition above
        if enable_activation_checkpointing and ac_mode is None:
            training.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})

        # Apply Fully Sharded Data Parallelism to the model
        if self.data_parallel_dim > 1:
            fsdp_shard_conditions = [
                partial(
                    training.get_shard_conditions,
                    names_to_match=custom_sharded_layers,
                )
            ]
            training.shard_model(
                model=model,
                shard_conditions=fsdp_shard_conditions,
                cpu_offload=fsdp_cpu_offload,
                reshard_after_forward=reshard_after_forward,
                dp_mesh=device_mesh["dp"],
            )

        with training.set_default_dtype(self._dtype), self._device:
            for m in model.modules():
                # RoPE is not covered in state dict
                if hasattr(m, "rope_init"):
                    m.rope_init()

        # This method will convert the full model state dict into a sharded state
        # dict and load into the model
        training.load_from_full_model_state_dict(
            model,
            model_state_dict,
            self._device,
            strict=True,
            cpu_offload=fsdp_cpu_offload,
        )

        # activation offloading
        self.activations_handling_ctx = training.get_act_offloading_ctx_manager(model, enable_activation_offloading)

        # Ensure no params and buffers are on meta device
        training.validate_no_params_on_meta_device(model)

        utils.log_rank_zero(
            log,
            f"Instantiating model and loading checkpoint took {time.perf_counter() - init_start:.2f} secs",
        )

        if self._is_rank_zero and self._device.type != "cpu":  # agent-obs: no memory stats on CPU
            memory_stats = training.get_memory_stats(device=self._device)
            training.log_memory_stats(memory_stats)

        # synchronize before training begins
        torch.distributed.barrier()

        return model

    def _setup_optimizer(
        self,
        cfg_optimizer: DictConfig,
        optimizer_in_bwd: bool = False,
        opt_state_dict: dict[str, Any] | None = None,
    ) -> Optimizer | None:
        if optimizer_in_bwd:
            # Maintain a dict of optims for every parameter.
            optim_dict = {param: config.instantiate(cfg_optimizer, [param]) for param in self._model.parameters()}

            # Register optimizer step hooks on the model to run optimizer in backward.
            training.register_optim_in_bwd_hooks(model=self._model, optim_dict=optim_dict)
            # Create a wrapper for checkpoint save/load of optimizer states when running in backward.
            self._optim_ckpt_wrapper = training.create_optim_in_bwd_wrapper(model=self._model, optim_dict=optim_dict)
            # Load optimizer states for each param. If optimizer states are being restored in an optimizer in
            # backward run, these need to have been saved with the same setting. Cannot restore from runs that
            # did not use optimizer in backward.
            if opt_state_dict is not None:
                for param in opt_state_dict.keys():
                    try:
                        training.load_from_full_optimizer_state_dict(
                            self._model,
                            self._optim_ckpt_wrapper.optim_map[param],
                            opt_state_dict[param],
                            self._device,
                        )
                    except BaseException as e:
                        raise RuntimeError(
                            "Failed loading in-backward optimizer checkpoints."
                            "Please make sure run being restored from was using in-backward optimizer."
                        ) from e
            utils.log_rank_zero(log, "In-backward optimizers are set up.")
            return None
        else:
            optimizer = config.instantiate(cfg_optimizer, self._model.parameters())
            if opt_state_dict:
                training.load_from_full_optimizer_state_dict(
                    self._model,
                    optimizer,
                    opt_state_dict,
                    self._device,
                )

            utils.log_rank_zero(log, "Optimizer is initialized.")
            return optimizer

    def _setup_data(
        self,
        cfg_dataset: DictConfig,
        shuffle: bool,
        batch_size: int,
        collate_fn: str | None,
        dataloader_state_dict: dict[str, Any] | None = None,
        exact: bool = False,
    ) -> StatefulDataLoader:
        """
        All data related setup happens here. This recipe currently supports only
        map-style datasets. If a state_dict is provided (meaning we are resuming a training run),
        it is loaded into the dataloader.
        """
        if isinstance(cfg_dataset, ListConfig):
            datasets = [config.instantiate(single_cfg_dataset, self._tokenizer) for single_cfg_dataset in cfg_dataset]
            ds = ConcatDataset(datasets=datasets)
            packed = getattr(ds, "packed", False)
        else:
            ds = config.instantiate(cfg_dataset, self._tokenizer)
            packed = cfg_dataset.get("packed", False)

        # agent-obs: without collate_fn, samples with token_classes get the agent collate (torchtune's drops them)
        if collate_fn is None:
            collate_fn = default_collate(ds[0] if len(ds) else {})
            if not packed and self._collate_name is None:
                utils.log_rank_zero(log, f"agent-obs: collate_fn is not set; the dataset's samples use {collate_fn}")
        self._collate_name = self._collate_name or collate_fn

        # Instantiate collate_fn
        if "left_pad_sequence" in collate_fn:
            raise RuntimeError("left_pad_sequence collator is only for inference.")
        collate_fn = _get_component_from_path(collate_fn)

        # agent-obs: exact=True (validation): every row once over the data-parallel ranks, no padding rows
        if exact:
            sampler = ShardSampler(len(ds), num_replicas=self.dp_size, rank=self.dp_rank)
        else:
            sampler = StatefulDistributedSampler(ds, num_replicas=self.dp_size, rank=self.dp_rank, shuffle=shuffle)
        dataloader = StatefulDataLoader(
            dataset=ds,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=(
                partial(
                    collate_fn,
                    padding_idx=self._tokenizer.pad_id,
                    ignore_idx=self._loss_fn.ignore_index,
                )
                if not packed
                else padded_collate_agent_packed  # agent-obs: keeps token_classes/tool_ids
            ),
            # dropping last avoids shape issues with compile + flex attention (agent-obs: not for validation)
            drop_last=not exact,
        )

        return dataloader

    def train(self) -> None:
        """
        The core training loop.
        """
        # clean up before training begins (agent-obs: torch.cpu has no empty_cache)
        if self._device.type == "cpu":
            gc.collect()
        else:
            training.cleanup_before_training()

        # zero out the gradients before starting training
        if not self._optimizer_in_bwd:
            self._optimizer.zero_grad()
        else:
            for opt in self._optim_ckpt_wrapper.optim_map.values():
                opt.zero_grad()

        # Initialize tokens count and running loss (for grad accumulation)
        t0 = time.perf_counter()
        running_loss = 0
        num_tokens = 0

        self._profiler.start()
        # self.epochs_run should be non-zero when we're resuming from a checkpoint
        for curr_epoch in range(self.epochs_run, self.total_epochs):
            pbar = tqdm(
                total=self._steps_per_epoch,
                disable=not self._is_rank_zero or self._progress_lines,
            )
            self._dataloader.sampler.set_epoch(curr_epoch)
            for idx, batch in enumerate(self._dataloader):
                # Start tracking CUDA memory for active steps for just the first epoch
                if (
                    self._is_rank_zero
                    and curr_epoch == 0
                    and self.profiler_profile_memory
                    and idx == self.profiler_wait_steps + self.profiler_warmup_steps
                    and self._device.type == "cuda"
                ):
                    torch.cuda.memory._record_memory_history()
                # agent-obs: per-token extras are not model inputs
                token_classes = batch.pop("token_classes", None)
                tool_ids = batch.pop("tool_ids", None)
                utils.batch_to_device(batch, self._device)

                # Calculate the number of unmasked tokens in the current batch
                # and increment the total number of tokens seen in the step
                current_num_tokens = (batch["labels"] != self._loss_fn.ignore_index).sum()
                num_tokens += current_num_tokens

                # Shape [b, s], needed for the loss not the model
                labels = batch.pop("labels")

                # Shift labels to compute loss
                # equivalent to doing labels[..., 1:] and logits[..., :-1, :]
                # But this way we dont need to slice the logits. We just add an ignore index to labels.
                # (agent-obs: shifted before the forward so the observer sees aligned labels)
                labels = torch.hstack((labels[..., 1:], self.ignore_labels_cache[: labels.shape[0]]))

                observing = self._observe_step(self.global_step + 1)
                with self.activations_handling_ctx, self._observe(observing, labels, token_classes, tool_ids):
                    logits = self._model(**batch)

                if not isinstance(logits, list):
                    labels = labels.reshape(-1)
                    logits = logits.reshape(-1, logits.size(-1))

                # Compute loss
                # Loss is normalized by default so we multiply by the number of tokens
                # This way we can normalize by the total number of tokens if we're accumulating gradients
                current_loss = self._loss_fn(logits, labels) * current_num_tokens

                # free logits otherwise it peaks backward memory
                del logits

                running_loss += current_loss

                # For optimizer in backward, we need to normalize before calling backward
                # This case and gradient accumulation are mutually exclusive
                if self._optimizer_in_bwd:
                    torch.distributed.all_reduce(num_tokens)
                    torch.distributed.all_reduce(running_loss)

                    # We multiply by world_size to undo FSDP2 gradient normalization.
                    current_loss = current_loss * (self.world_size / num_tokens)

                current_loss.backward()

                # Step with optimizer
                if (idx + 1) % self._gradient_accumulation_steps == 0:
                    if not self._optimizer_in_bwd:
                        # Get total number of tokens across all ranks to normalize gradients
                        torch.distributed.all_reduce(num_tokens)
                        # This will ensure that the logged loss matches what we're optimizing
                        torch.distributed.all_reduce(running_loss)
                        # Manually scale the gradients from unnormalized loss by total # of tokens
                        # We multiply by world_size to undo FSDP2 gradient normalization.
                        training.scale_grads(self._model, self.world_size / num_tokens)
                        if self._clip_grad_norm is not None:
                            grad_norm = torch.nn.utils.clip_grad_norm_(
                                self._model.parameters(),
                                max_norm=float(self._clip_grad_norm),
                            )
                            # If sharded, collect the DTensor here
                            if isinstance(grad_norm, DTensor):
                                grad_norm = grad_norm.full_tensor()
                        self._optimizer.step()
                        self._optimizer.zero_grad(set_to_none=True)

                    # Update the number of steps when the weights are updated
                    self.global_step += 1

                    # Step the learning rate scheduler
                    if self._lr_scheduler is not None:
                        self._lr_scheduler.step()

                    loss_to_log = running_loss.item() / num_tokens
                    pbar.update(1)
                    pbar.set_description(f"{curr_epoch + 1}|{self.global_step}|Loss: {loss_to_log}")

                    # agent-obs: detailed train metrics (collect is collective: every rank calls it)
                    if self._observer is not None and observing:
                        detailed = self._observer.collect(split="train", step=self.global_step)
                        if self._is_rank_zero:
                            self._metric_logger.log_dict(
                                {f"train_{k}": float(v) for k, v in detailed.items()},
                                step=self.global_step,
                            )
                    if self._progress_lines and self._is_rank_zero:
                        log.info(
                            f"step {self.global_step}/{self.total_epochs * self._steps_per_epoch} "
                            f"epoch {curr_epoch + 1} loss {float(loss_to_log):.4f}"
                        )

                    # Log per-step metrics
                    if self.global_step % self._log_every_n_steps == 0 and self._is_rank_zero:
                        time_per_step = time.perf_counter() - t0
                        log_dict = {
                            "loss": loss_to_log,
                            "lr": get_lr(
                                (self._optimizer if not self._optimizer_in_bwd else self._optim_ckpt_wrapper),
                            ),
                            "tokens_per_second_per_gpu": num_tokens / (time_per_step * self.world_size),
                        }
                        if self._log_peak_memory_stats:
                            log_dict.update(training.get_memory_stats(device=self._device))
                        if self._clip_grad_norm is not None:
                            log_dict.update({"grad_norm": grad_norm})
                        self._metric_logger.log_dict(
                            log_dict,
                            step=self.global_step,
                        )

                    # Reset running stats for the next step
                    running_loss = 0
                    num_tokens = 0
                    t0 = time.perf_counter()

                    # agent-obs: validation (every rank takes part: FSDP forwards are collective)
                    if (
                        self._val_dataloader is not None
                        and self._run_val_every_n_steps
                        and self.global_step % self._run_val_every_n_steps == 0
                    ):
                        self.validate()
                        t0 = time.perf_counter()

                    # Stop tracking CUDA memory now that active steps are complete
                    if (
                        self._is_rank_zero
                        and curr_epoch == 0
                        and self.profiler_profile_memory
                        and idx == self.profiler_wait_steps + self.profiler_warmup_steps + self.profiler_active_steps
                        and self._device.type == "cuda"
                    ):
                        torch.cuda.memory._record_memory_history(enabled=None)

                    # Step profiler
                    # Note that this is called within gradient accumulation block, hence
                    # will include multiple forward / backward passes if gradient accumulation > 1
                    self._profiler.step()

                if ((idx + 1) // self._gradient_accumulation_steps) == self.max_steps_per_epoch:
                    break

            # agent-obs: without run_val_every_n_steps, validate at the end of each epoch
            if self._val_dataloader is not None and not self._run_val_every_n_steps:
                self.validate()

            self.epochs_run += 1
            self._checkpoint_client.save_checkpoint(
                model=self._model,
                optimizer=(self._optimizer if not self._optimizer_in_bwd else self._optim_ckpt_wrapper),
                training_progress=TrainingProgress(
                    seed=self.seed,
                    epochs_run=self.epochs_run,
                    total_epochs=self.total_epochs,
                    max_steps_per_epoch=self.max_steps_per_epoch,
                    dataloader_state_dict=self._dataloader.state_dict(),
                ),
                epoch=curr_epoch,
            )

        self._profiler.stop()

    def _observe_step(self, step: int) -> bool:
        """agent-obs: whether the optimizer step ``step`` gets detailed metrics."""
        return self._observer is not None and step % self._detailed_every == 0

    def _observe(self, observing, labels, token_classes, tool_ids):
        """agent-obs: the observer context for one forward (a no-op when not observing)."""
        if not observing:
            return nullcontext()
        if self._enable_token_classification and token_classes is None:
            self._warn_no_classes()
        classes = tools = None
        if self._enable_token_classification and token_classes is not None:
            classes = _shift(token_classes, int(TokenClass.IGNORE))  # host: the observer maps tool slots first
            if tool_ids is not None:
                tools = _shift(tool_ids, -1)
        return self._observer.observe(labels=labels, token_classes=classes, tool_ids=tools)

    def _warn_no_classes(self) -> None:
        """agent-obs: one warning when classification is on but batches carry no ``token_classes``."""
        if self._warned_no_classes:
            return
        self._warned_no_classes = True
        if self._is_rank_zero:
            log.warning(
                "agent-obs: enable_token_classification is True but a batch arrived without token_classes, so only "
                "the overall metrics are logged (no reasoning_/tool_call_ keys). Cause: "
                f"collate_fn {self._collate_name} drops them, or the dataset does not produce them. Fix: use "
                "dataset._component_: agent_obs.integrations.torchtune.dataset.AgentSFTDataset with collate_fn: "
                "agent_obs.integrations.torchtune.collate.padded_collate_agent_sft (or no collate_fn), "
                "or set enable_token_classification: False"
            )

    def _val_steps(self) -> int:
        """agent-obs: forwards per rank in one validation: the most batches any rank holds, capped by max_val_steps."""
        steps = torch.tensor(len(self._val_dataloader), device=self._device)
        torch.distributed.all_reduce(steps, op=torch.distributed.ReduceOp.MAX)
        return int(steps) if self._max_val_steps is None else min(int(steps), int(self._max_val_steps))

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """agent-obs: loss and detailed metrics over ``dataset_val`` (all of it, or ``max_val_steps`` batches per rank).

        Each row counts once; a rank out of rows runs a padding forward, unobserved, since FSDP forwards are collective.
        """
        self._model.eval()
        total_loss = torch.zeros((), device=self._device, dtype=torch.float64)
        total_tokens = torch.zeros((), device=self._device, dtype=torch.float64)
        batches = iter(self._val_dataloader)
        for _ in range(self._val_steps()):
            batch = next(batches, None)
            if batch is None:
                self._model(tokens=torch.full((1, 8), self._tokenizer.pad_id, device=self._device))
                continue
            token_classes = batch.pop("token_classes", None)
            tool_ids = batch.pop("tool_ids", None)
            utils.batch_to_device(batch, self._device)
            labels = batch.pop("labels")
            labels = _shift(labels, self._loss_fn.ignore_index)
            n = (labels != self._loss_fn.ignore_index).sum()
            with self._observe(self._observer is not None, labels, token_classes, tool_ids):
                logits = self._model(**batch)
            if not isinstance(logits, list):
                labels = labels.reshape(-1)
                logits = logits.reshape(-1, logits.size(-1))
            total_loss += self._loss_fn(logits, labels).double() * n
            total_tokens += n
            del logits
        torch.distributed.all_reduce(total_loss)
        torch.distributed.all_reduce(total_tokens)
        result = {"loss": float(total_loss / total_tokens.clamp(min=1))}
        if self._observer is not None:
            result.update({k: float(v) for k, v in self._observer.collect(split="val", step=self.global_step).items()})
        if self._is_rank_zero:
            self._metric_logger.log_dict({f"val_{k}": v for k, v in result.items()}, step=self.global_step)
            if self._progress_lines:
                log.info(
                    f"step {self.global_step} val_loss {result['loss']:.4f}"
                    + (f" val_perplexity {result['perplexity']:.2f}" if "perplexity" in result else "")
                )
        self._model.train()
        return result

    def cleanup(self) -> None:
        if self._observer is not None:
            self._observer.detach()  # also closes the exporters
        if self._is_rank_zero:
            if self._observer is None:
                from agent_obs.exporters.base import close_all

                close_all(self._exporters)
            self._metric_logger.close()
        destroy_process_group()


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """
    Entry point for the recipe.

    Configurable parameters are read in the following order:
        - Parameters specified in config (see available configs through ``tune ls``)
        - Overwritten by arguments from the command-line
    """
    config.log_config(recipe_name="AgentSFTRecipeDistributed", cfg=cfg)
    recipe = AgentSFTRecipeDistributed(cfg=cfg)
    recipe.setup(cfg=cfg)
    recipe.train()
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
