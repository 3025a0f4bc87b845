"""Periodic sharded checkpoints, written atomically, and resume from the newest one.

Layout under the training output folder::

    checkpoints/
        step-00000040/          a complete checkpoint (torch.distributed.checkpoint)
            .metadata           written by DCP once every rank's shard is on disk
            __0_0.distcp ...    one file per rank: model and optimizer shards
            rng-rank0.pt ...    torch, NumPy and Python RNG states of each rank
            hyperparameters.pt  optimizer param_groups values (lr, eps, ...) by parameter key
            valuerank.json      step, data position, world size, config, keep rates
        .tmp-step-00000060/     a save in progress; never read, removed at the next start

A checkpoint is complete once rank 0 has renamed its temporary folder to ``step-<step>``
(``os.replace``, atomic on POSIX file systems). A job killed during a save leaves only a
``.tmp-`` folder, which ``latest_checkpoint`` ignores.

The checkpoint holds the sharded embedding weights, the fused embedding optimizer state
with its hyperparameters (learning rate and the other param_groups values), the dense
optimizer, the step, the data position ``(epoch, batch index in the epoch)`` and the RNG
states. DCP reshards on load, so a checkpoint written by 2 ranks loads on 1 rank and the
other way round. The batch index is then converted so that the same share of the epoch
counts as done.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
METADATA_NAME = "valuerank.json"
HYPERPARAMETERS_NAME = "hyperparameters.pt"
_COMPLETE = re.compile(r"^step-(\d+)$")
_TEMPORARY_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"
# Config sections that fix the shape of the model; a checkpoint only loads into the same ones.
_MODEL_SECTIONS = ("actions", "sparse_features", "dense_features", "model")


class CheckpointError(ValueError):
    """A checkpoint cannot be used to resume this run; the message names the folder and the fix."""


@dataclass
class TrainingPosition:
    """Where training stands: steps done, and the next batch of the epoch to train."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0

    def advanced(self, steps_per_epoch: int) -> "TrainingPosition":
        """Return the position after training one more batch."""
        batch = self.batch_in_epoch + 1
        if batch >= steps_per_epoch:
            return TrainingPosition(self.step + 1, self.epoch + 1, 0)
        return TrainingPosition(self.step + 1, self.epoch, batch)


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Return the complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _COMPLETE.match(path.name)
        if match and (path / ".metadata").is_file() and (path / METADATA_NAME).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    """Return the newest complete checkpoint under ``root``, or None."""
    checkpoints = list_checkpoints(root)
    return checkpoints[-1] if checkpoints else None


def resolve_checkpoint(path: Path) -> Path:
    """Accept a checkpoint folder, a ``checkpoints/`` folder or a training output folder."""
    if (path / METADATA_NAME).is_file() and (path / ".metadata").is_file():
        return path
    for root in (path, path / CHECKPOINTS_DIR):
        latest = latest_checkpoint(root)
        if latest is not None:
            return latest
    raise CheckpointError(
        f"no complete checkpoint found in {path}; pass a training output folder, its {CHECKPOINTS_DIR}/ "
        "folder or one step-<N> folder in it"
    )


def read_metadata(checkpoint: Path) -> dict:
    """Read ``valuerank.json`` of a checkpoint: position, world size, config, keep rates, dense stats."""
    return json.loads((checkpoint / METADATA_NAME).read_text())


def remove_incomplete(root: Path) -> None:
    """Delete temporary and half-deleted folders left by a job that was killed (rank 0 only)."""
    if not root.is_dir():
        return
    for path in root.iterdir():
        if path.name.startswith((_TEMPORARY_PREFIX, _TRASH_PREFIX)):
            logger.info("removing incomplete checkpoint folder %s", path)
            shutil.rmtree(path)


def check_compatible(checkpoint: Path, metadata: dict, config: dict) -> None:
    """Raise CheckpointError if the checkpoint was trained with another model shape."""
    for section in _MODEL_SECTIONS:
        if metadata["config"].get(section) != config.get(section):
            raise CheckpointError(
                f"checkpoint {checkpoint} was written with a different {section!r} section of the config, so "
                "its tables and layers do not match this model; restore that config, set training.resume=false "
                "to start over, or use another --out folder"
            )


def _model_and_optimizer_state(model: torch.nn.Module, optimizer) -> dict:
    # Hyperparameters travel separately (see _gather_hyperparameters), because param_groups
    # differ between ranks and DCP keeps rank 0's copy of non-tensor values.
    optimizer.save_param_groups(False)
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}


def _local_hyperparameters(optimizer) -> dict[str, dict]:
    """Return {parameter key: param_group values other than params} for this rank's parameters."""
    optimizer.save_param_groups(True)
    groups = optimizer.state_dict()["param_groups"]
    optimizer.save_param_groups(False)
    return {key: {k: v for k, v in group.items() if k != "params"} for group in groups for key in group["params"]}


def _gather_hyperparameters(optimizer) -> dict[str, dict]:
    """Merge every rank's hyperparameters by parameter key, so that any world size can restore them."""
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, _local_hyperparameters(optimizer))
    merged: dict[str, dict] = {}
    for part in gathered:
        merged.update(part)
    return merged


def _restore_hyperparameters(optimizer, saved: dict[str, dict], loaded_state: dict) -> None:
    """Load the optimizer state together with the saved hyperparameters of each param group."""
    optimizer.save_param_groups(True)
    current = optimizer.state_dict()
    for group in current["param_groups"]:
        for key in group["params"]:
            if key in saved:
                group.update({k: v for k, v in saved[key].items() if k in group})
                break
    optimizer.load_state_dict({"state": loaded_state, "param_groups": current["param_groups"]})
    optimizer.save_param_groups(False)


def _rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def convert_position(position: TrainingPosition, saved_world_size: int, world_size: int, steps_per_epoch: int) -> TrainingPosition:
    """Map a data position to another world size, keeping the number of examples done in the epoch.

    Each rank takes every ``world_size``-th row of the epoch's permutation, so batches of
    another world size hold other rows: the new run trains the epoch's remaining share on
    a different split of rows. The step count goes on from the saved step, so checkpoint
    names keep increasing; it then no longer equals epoch * steps_per_epoch + batch.
    """
    if saved_world_size == world_size:
        return position
    epoch = position.epoch
    batch = position.batch_in_epoch * saved_world_size // world_size
    if batch >= steps_per_epoch:
        epoch, batch = epoch + 1, 0
    return TrainingPosition(position.step, epoch, batch)


class CheckpointManager:
    """Save and load the run's checkpoints under ``<out>/checkpoints``; every rank calls each method."""

    def __init__(self, out_dir: Path, keep_last: int, rank: int, world_size: int):
        self.root = out_dir / CHECKPOINTS_DIR
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size

    def save(self, model: torch.nn.Module, optimizer, position: TrainingPosition, metadata: dict) -> Path:
        """Write one checkpoint of the sharded state; return its folder once every rank is done."""
        final = self.root / checkpoint_name(position.step)
        temporary = self.root / f"{_TEMPORARY_PREFIX}{final.name}"
        if self.rank == 0:
            if temporary.exists():
                shutil.rmtree(temporary)
            temporary.mkdir(parents=True)
        dist.barrier()

        dcp.save(_model_and_optimizer_state(model, optimizer), checkpoint_id=str(temporary))
        torch.save(_rng_state(), temporary / f"rng-rank{self.rank}.pt")
        hyperparameters = _gather_hyperparameters(optimizer)
        if self.rank == 0:
            torch.save(hyperparameters, temporary / HYPERPARAMETERS_NAME)
        dist.barrier()

        # Rank 0 commits: the rename makes the checkpoint visible in one step.
        if self.rank == 0:
            record = {**metadata, "position": asdict(position), "world_size": self.world_size}
            (temporary / METADATA_NAME).write_text(json.dumps(record, indent=2, default=str))
            if final.exists():
                # Same step saved twice (a periodic save on the last step): drop the older copy.
                self._discard(final)
            os.replace(temporary, final)
            _fsync_folder(self.root)
            self._prune()
            logger.info("saved checkpoint %s", final)
        dist.barrier()
        return final

    def load(self, checkpoint: Path, model: torch.nn.Module, optimizer) -> dict:
        """Load model, optimizer and this rank's RNG states in place; return the checkpoint's metadata.

        Raises CheckpointError naming both world sizes when DCP cannot reshard the state.
        """
        metadata = read_metadata(checkpoint)
        saved_world_size = int(metadata["world_size"])

        # Optimizer state is created lazily by the first step; DCP loads into existing tensors.
        optimizer.init_state()
        state = _model_and_optimizer_state(model, optimizer)
        try:
            dcp.load(state, checkpoint_id=str(checkpoint))
        except (CheckpointException, RuntimeError, ValueError, KeyError) as error:
            raise CheckpointError(
                f"checkpoint {checkpoint} was written by {saved_world_size} rank(s) and could not be loaded on "
                f"{self.world_size} rank(s): {error}. Resume with {saved_world_size} rank(s), or set "
                "training.resume=false to start over"
            ) from error
        model.load_state_dict(state["model"])
        # Written by this project; betas are tuples, which the weights-only loader accepts,
        # but a custom optimizer may store other Python values.
        hyperparameters = torch.load(checkpoint / HYPERPARAMETERS_NAME, weights_only=False)
        _restore_hyperparameters(optimizer, hyperparameters, state["optimizer"]["state"])

        rng_file = checkpoint / f"rng-rank{self.rank}.pt"
        if saved_world_size == self.world_size and rng_file.is_file():
            # The file was written by this project; it holds NumPy and Python RNG tuples, which
            # the weights-only loader rejects.
            _set_rng_state(torch.load(rng_file, weights_only=False))
        else:
            logger.warning(
                "checkpoint %s was written by %d rank(s) and this run has %d: RNG states are not restored, "
                "and the data position is converted by examples done, so the losses differ from an "
                "uninterrupted run",
                checkpoint, saved_world_size, self.world_size,
            )
        return metadata

    def _prune(self) -> None:
        for old in list_checkpoints(self.root)[: -self.keep_last]:
            self._discard(old)
            logger.info("deleted old checkpoint %s (keeping the last %d)", old, self.keep_last)

    def _discard(self, path: Path) -> None:
        # Rename first so that a job killed during rmtree leaves no folder that looks complete.
        trash = path.with_name(f"{_TRASH_PREFIX}{path.name}")
        os.replace(path, trash)
        shutil.rmtree(trash)


def _fsync_folder(path: Path) -> None:
    """Flush the folder entry so that the rename survives a machine crash."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def find_resume_checkpoint(out_dir: Path, resume: bool, rank: int) -> Path | None:
    """Pick the checkpoint to resume from on rank 0 and share the choice with every rank.

    A finished run (``metrics.json`` present) is started over, like a run with
    ``training.resume = false``. Rank 0 also removes folders of interrupted saves.
    """
    choice: list = [None]
    if rank == 0:
        root = out_dir / CHECKPOINTS_DIR
        remove_incomplete(root)
        latest = latest_checkpoint(root)
        if latest is not None and resume and not (out_dir / "metrics.json").exists():
            choice[0] = str(latest)
        elif latest is not None:
            reason = "training.resume is false" if not resume else "the run in that folder finished"
            logger.info("starting over in %s because %s", out_dir, reason)
    dist.broadcast_object_list(choice, src=0)
    return Path(choice[0]) if choice[0] is not None else None


class StepLog:
    """Per-rank JSON lines of every trained step: attempt, step, epoch, batch, loss, process id.

    The attempt is torchrun's restart count, so after an elastic restart the lines show
    which batches were trained twice. Lines are flushed one by one because the process
    may be killed at any time.
    """

    def __init__(self, out_dir: Path, rank: int):
        folder = out_dir / "steps"
        folder.mkdir(parents=True, exist_ok=True)
        self.attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        self.file = open(folder / f"rank-{rank}.jsonl", "a", encoding="utf-8")

    def write(self, step: int, epoch: int, batch: int, loss: float) -> None:
        line = {"attempt": self.attempt, "step": step, "epoch": epoch, "batch": batch, "loss": loss, "pid": os.getpid()}
        self.file.write(json.dumps(line) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()
