"""Turn a sharded training checkpoint into one file that serves without a process group.

    valuerank export --model runs/demo/model --out runs/demo/model.pt

The file is a ``torch.save`` of plain data: unsharded weights (the state_dict of a
``MultiTaskModel`` on the CPU), the pipeline config, the per-action keep rates, the dense
feature statistics and the training step. Everything in it loads with
``torch.load(path, weights_only=True)``, and ``load_exported`` rebuilds the model.
"""

from __future__ import annotations

import copy
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from trainer.checkpoint import read_metadata, resolve_checkpoint
from trainer.model import MultiTaskModel
from valuerank.config import PipelineConfig, config_from_dict

logger = logging.getLogger(__name__)

EXPORT_FORMAT = "valuerank-export/1"


class ExportError(ValueError):
    """The file is not a valuerank export; the message names the file and the fix."""


@dataclass
class ExportedModel:
    """A model rebuilt from an export, in eval mode on the CPU, with what scoring needs."""

    cfg: PipelineConfig
    model: MultiTaskModel
    action_keep_rates: dict
    dense_stats: dict
    step: int


def export_checkpoint(source: Path, out: Path) -> Path:
    """Load the newest checkpoint under ``source`` unsharded and write the export to ``out``.

    DCP reads each table's shards from every rank's file and assembles the full tensors,
    so this runs in one process without torch.distributed being initialised.
    """
    checkpoint = resolve_checkpoint(source)
    metadata = read_metadata(checkpoint)
    cfg = config_from_dict(copy.deepcopy(metadata["config"]))

    model = MultiTaskModel(cfg, device=torch.device("cpu"))
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)
    model.load_state_dict(state["model"])

    artifact = {
        "format": EXPORT_FORMAT,
        "config": metadata["config"],
        "state_dict": {key: value.detach().clone() for key, value in model.state_dict().items()},
        "action_keep_rates": metadata.get("action_keep_rates", {}),
        "dense_stats": metadata.get("dense_stats", {"mean": {}, "std": {}}),
        "step": int(metadata["position"]["step"]),
        "trained_world_size": int(metadata["world_size"]),
    }

    # Write beside the target and rename, so a reader never sees a half-written file.
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(f".{out.name}.tmp")
    torch.save(artifact, temporary)
    os.replace(temporary, out)
    logger.info("exported %s (step %d) to %s", checkpoint, artifact["step"], out)
    return out


def load_exported(path: Path) -> ExportedModel:
    """Read an export written by ``export_checkpoint`` and rebuild the model in eval mode."""
    if not path.is_file():
        raise ExportError(f"exported model not found: {path}; create it with valuerank export")
    try:
        artifact = torch.load(path, weights_only=True)
    except (EOFError, KeyError, RuntimeError, pickle.UnpicklingError) as error:
        raise ExportError(f"{path} is not a valuerank export ({error}); create it with valuerank export") from error
    if not isinstance(artifact, dict) or artifact.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{path} is not a valuerank export (expected format {EXPORT_FORMAT!r}); create it with valuerank export")

    cfg = config_from_dict(copy.deepcopy(artifact["config"]))
    model = MultiTaskModel(cfg, device=torch.device("cpu"))
    model.load_state_dict(artifact["state_dict"])
    model.eval()
    return ExportedModel(cfg, model, artifact["action_keep_rates"], artifact["dense_stats"], artifact["step"])


def main(argv: list[str] | None = None) -> int:
    """Run ``valuerank export``."""
    import argparse

    parser = argparse.ArgumentParser(prog="valuerank export", description="Write a trained model as one file for scoring.")
    parser.add_argument("--model", required=True, type=Path, help="training output folder, its checkpoints/ folder or one step-<N> checkpoint")
    parser.add_argument("--out", required=True, type=Path, help="file to write, e.g. model.pt")
    args = parser.parse_args(argv)
    path = export_checkpoint(args.model, args.out)
    print(f"exported model: {path}")
    return 0
