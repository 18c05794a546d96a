"""Resuming a run from what the recipe wrote: the last epoch's model files and a JSONL log without repeated steps.

torchtune's checkpointers write ``epoch_N/model-*-of-*`` and (after every epoch but the last)
``recipe_state/recipe_state.pt``; on resume they read ``checkpoint_files`` relative to
``output_dir``, which a config written for the base model does not name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

RECIPE_STATE = "recipe_state/recipe_state.pt"
MODEL_SUFFIXES = (".safetensors", ".bin", ".pt")


def configured_files(checkpoint_files: Sequence[str] | Mapping[str, Any]) -> list[str]:
    """``checkpoint_files`` as a list (the ``{filename_format, max_filename}`` form expanded)."""
    if isinstance(checkpoint_files, Mapping):
        from torchtune.training.checkpointing._utils import FormattedCheckpointFiles

        return FormattedCheckpointFiles.from_dict(dict(checkpoint_files)).build_checkpoint_filenames()
    return [str(f) for f in checkpoint_files]


def epochs_run(output_dir: str | Path, recipe_checkpoint: str | None = None) -> int:
    """The number of finished epochs recorded in the recipe state (memory-mapped: cheap for large optimizers)."""
    from torchtune import training
    from torchtune.training.checkpointing._utils import safe_torch_load

    path = Path(output_dir) / (recipe_checkpoint or RECIPE_STATE)
    if not path.is_file():
        raise FileNotFoundError(
            f"resume_from_checkpoint=True but {path} does not exist: torchtune writes it at the end of every epoch "
            "except the last, into the run's output_dir; point output_dir at that run, or resume_from_checkpoint=False"
        )
    return int(safe_torch_load(path, mmap=True)[training.EPOCHS_KEY])


def resume_checkpoint_files(output_dir: str | Path, recipe_checkpoint: str | None = None) -> list[str]:
    """The model files of the epoch the recipe state belongs to, relative to ``output_dir`` (``epoch_N/...``)."""
    folder = f"epoch_{epochs_run(output_dir, recipe_checkpoint) - 1}"
    files = sorted(p.name for p in (Path(output_dir) / folder).glob("model-*-of-*") if p.suffix in MODEL_SUFFIXES)
    if not files:
        raise FileNotFoundError(
            f"resume_from_checkpoint=True: no model-*-of-* files in {Path(output_dir) / folder}, the epoch "
            f"{RECIPE_STATE} belongs to; set checkpointer.checkpoint_files to the files to resume from"
        )
    return [f"{folder}/{name}" for name in files]


def truncate_jsonl(path: str | Path, last_step: int) -> int:
    """Cut a JSONL metrics log before its first record past ``last_step`` (or a torn line); return lines removed.

    In place (same inode, ``os.truncate``): an exporter that already holds the file open for
    appending keeps writing at the new end.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    keep = kept = total = 0
    cut = False
    with path.open("rb") as fh:
        for line in fh:
            total += 1
            if cut:
                continue
            try:
                step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):
                step = None
            if not line.endswith(b"\n") or not isinstance(step, int) or step > last_step:
                cut = True
                continue
            keep += len(line)
            kept += 1
    if cut:
        os.truncate(path, keep)
    return total - kept


def point_resume_at_last_epoch(cfg: Any) -> list[str] | None:
    """On resume, set ``checkpointer.checkpoint_files`` to the model files of the epoch the recipe state belongs to,
    unless it already names files that exist under ``output_dir``; return the files set (None if unchanged)."""
    from omegaconf import open_dict

    ckpt = cfg.checkpointer
    out = Path(ckpt.output_dir)
    if "checkpoint_files" not in ckpt or all((out / f).is_file() for f in configured_files(ckpt.checkpoint_files)):
        return None
    files = resume_checkpoint_files(out, ckpt.get("recipe_checkpoint", None))
    with open_dict(ckpt):
        ckpt.checkpoint_files = files
    return files
