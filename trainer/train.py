"""Train and evaluate the multi-task model on the output of the downsample job.

Launch with torchrun (``valuerank train`` wraps it and sets threads per rank)::

    torchrun --standalone --nproc-per-node 2 -m trainer.train \\
        --config configs/demo.toml --data runs/demo/downsampled --out runs/demo/model

Without torchrun it runs as a single rank. Outputs under ``--out``: ``metrics.json``,
``predictions/`` (Parquet), ``plots/*.png``, ``tensorboard/``, ``checkpoints/step-<N>/``
(torch.distributed.checkpoint, sharded as trained; see trainer.checkpoint) and
``steps/rank-<r>.jsonl`` (one line per trained step). With ``training.resume`` on, a
restarted job continues from the newest checkpoint in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from trainer.checkpoint import (
    CheckpointError, CheckpointManager, StepLog, TrainingPosition, check_compatible, convert_position,
    find_resume_checkpoint, read_metadata,
)
from trainer.data import DataError, open_split
from trainer.evaluate import evaluate, predict, score_predictions
from trainer.metrics import load_action_keep_rates
from trainer.preflight import check_out_dir, reset_out_dir
from trainer.reporting import make_writer, metric_line, plot_training_curves, setup_logging
from trainer.sharding import ShardingConfigError, format_plan, shard_model
from trainer.train_step import TrainingModel
from valuerank.config import ConfigError, PipelineConfig, load_config, to_dict
from valuerank.output_paths import OutputPathError

logger = logging.getLogger("valuerank.train")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(cfg: PipelineConfig) -> tuple[int, int, int, torch.device]:
    """Join the torchrun process group, or form a one-rank group when run directly."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    if cfg.training.device == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("training.device = 'cuda' but no CUDA device is visible; set training.device = 'cpu'")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend=cfg.training.resolved_backend)
    return rank, world_size, int(os.environ.get("LOCAL_WORLD_SIZE", world_size)), device


class DeviceError(RuntimeError):
    """The configured device is not available on this machine."""


class Trainer:
    """Set up, train, evaluate and checkpoint one run. Phases: setup, train, evaluate, save."""

    def __init__(self, cfg: PipelineConfig, data_dir: Path, out_dir: Path):
        self.cfg = cfg
        self.data_dir = data_dir
        self.out_dir = out_dir
        self.rank, self.world_size, self.local_world_size, self.device = init_distributed(cfg)
        setup_logging(self.rank)
        if "OMP_NUM_THREADS" in os.environ:
            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        torch.manual_seed(cfg.training.seed)
        np.random.seed(cfg.training.seed)
        # Every rank checks the output folder; rank 0 clears an earlier run's outputs.
        check_out_dir(out_dir, data_dir)
        resume_from = find_resume_checkpoint(out_dir, cfg.training.resume, self.rank)
        if self.rank == 0 and resume_from is None:
            reset_out_dir(out_dir)
        dist.barrier()
        if resume_from is not None:
            check_compatible(resume_from, read_metadata(resume_from), to_dict(cfg))

        # Data first: the dense statistics of the training split normalise both splits.
        self.train_data = open_split(data_dir / "train", cfg)
        self.eval_data = open_split(data_dir / "eval", cfg, dense_stats=self.train_data.dense_stats)
        self.action_keep_rates = load_action_keep_rates(data_dir / "_manifest.json")
        logger.info("data: %d training rows, %d evaluation rows from %s", self.train_data.num_rows, self.eval_data.num_rows, data_dir)
        positives = self.train_data.labels.sum(axis=0)
        for action, count in zip(cfg.actions, positives):
            if count == 0:
                logger.warning(
                    "action %r has no positive in the training split; its tower learns only negatives and its "
                    "metrics are not meaningful", action.name,
                )

        # Model: tables on the meta device, materialised shard by shard by DMP.
        model = TrainingModel(cfg, device=torch.device("meta"))
        self.model, self.optimizer, self.plan = shard_model(model, cfg, self.device, self.world_size, self.local_world_size)
        logger.info("sharding plan:\n%s", format_plan(self.plan))

        self.writer = make_writer(self.rank, out_dir / "tensorboard")
        self.steps_per_epoch = self.train_data.num_train_batches(self.world_size, cfg.training.batch_size)
        logger.info(
            "run: world_size=%d backend=%s device=%s batch_size=%d per rank, %d steps per epoch, %d epochs, threads=%d",
            self.world_size, cfg.training.resolved_backend, self.device, cfg.training.batch_size,
            self.steps_per_epoch, cfg.training.epochs, torch.get_num_threads(),
        )

        # Checkpoints: resume after the model and optimizer exist, because DCP loads in place.
        self.checkpoints = CheckpointManager(out_dir, cfg.training.keep_last_checkpoints, self.rank, self.world_size)
        self.step_log = StepLog(out_dir, self.rank)
        self.position = TrainingPosition()
        self.history: list[dict] = []
        self.eval_history: list[dict] = []
        self.last_saved_step: int | None = None
        if resume_from is not None:
            self._resume(resume_from)

    def _resume(self, checkpoint: Path) -> None:
        metadata = self.checkpoints.load(checkpoint, self.model, self.optimizer)
        saved = TrainingPosition(**metadata["position"])
        self.position = convert_position(saved, int(metadata["world_size"]), self.world_size, self.steps_per_epoch)
        self.history = metadata.get("history", [])
        self.eval_history = metadata.get("eval_history", [])
        self.last_saved_step = saved.step
        logger.info(
            "resumed from %s: step %d, epoch %d, batch %d of the epoch (saved by %d rank(s))",
            checkpoint, self.position.step, self.position.epoch, self.position.batch_in_epoch, metadata["world_size"],
        )

    def checkpoint_metadata(self) -> dict:
        """Run facts stored with every checkpoint; the export reads them."""
        return {
            "config": to_dict(self.cfg),
            "dense_stats": self.train_data.dense_stats.to_dict(),
            "action_keep_rates": self.action_keep_rates,
            "plan": self.plan,
            "history": self.history,
            "eval_history": self.eval_history,
        }

    def maybe_save_checkpoint(self, force: bool = False) -> None:
        """Save every ``checkpoint_every_steps`` steps, and when ``force`` is set unless this step is saved."""
        every = self.cfg.training.checkpoint_every_steps
        step = self.position.step
        due = force or (every > 0 and step % every == 0)
        if not due or step == self.last_saved_step:
            return
        self.checkpoints.save(self.model, self.optimizer, self.position, self.checkpoint_metadata())
        self.last_saved_step = step

    def train(self) -> dict:
        """Run every epoch; return a summary with the loss history."""
        cfg = self.cfg.training
        names = [a.name for a in self.cfg.actions]
        history = self.history
        step = self.position.step
        total_steps = self.steps_per_epoch * cfg.epochs
        progress = tqdm(total=total_steps, initial=step, disable=self.rank != 0, desc="train", unit="step", mininterval=2.0)
        interval_loss = torch.zeros(len(names) + 1, device=self.device)
        interval_steps = 0
        interval_start = time.perf_counter()
        interval_examples = 0
        start = time.perf_counter()

        # TrainPipelineSparseDist runs zero_grad, forward, backward (the embedding optimizer
        # runs inside backward) and the optimizer step, overlapping the next batch's input
        # distribution and device copy with this batch's compute.
        pipeline = TrainPipelineSparseDist(self.model, self.optimizer, self.device, execute_all_batches=True)
        first_epoch = self.position.epoch
        for epoch in range(first_epoch, cfg.epochs):
            start_batch = self.position.batch_in_epoch if epoch == first_epoch else 0
            batches = iter(
                self.train_data.train_batches(
                    epoch, self.rank, self.world_size, cfg.batch_size, cfg.seed, start_batch=start_batch
                )
            )

            # The pipeline reads ahead of the step it trains, so the batch index counts
            # finished steps, not batches taken from the iterator.
            batch_index = start_batch
            while True:
                try:
                    output = pipeline.progress(batches)
                except StopIteration:
                    break
                loss, per_action = output.loss, output.per_action

                step += 1
                progress.update(1)
                self.step_log.write(step, epoch, batch_index, loss.item())
                batch_index += 1
                self.position = self.position.advanced(self.steps_per_epoch)
                self.maybe_save_checkpoint()
                interval_loss += torch.cat([loss.detach().reshape(1), per_action])
                interval_steps += 1
                interval_examples += output.logits.shape[0]
                if step % cfg.log_every != 0 and step != total_steps:
                    continue

                # Log the interval mean over all ranks.
                dist.all_reduce(interval_loss)
                mean = (interval_loss / (interval_steps * self.world_size)).tolist()
                throughput = interval_examples * self.world_size / (time.perf_counter() - interval_start)
                per_action_mean = dict(zip(names, mean[1:]))
                history.append({"step": step, "epoch": epoch, "loss": mean[0], "per_action": per_action_mean})
                logger.info(metric_line(step, epoch, mean[0], per_action_mean, throughput))
                self.writer.add_scalar("loss/total", mean[0], step)
                for name, value in per_action_mean.items():
                    self.writer.add_scalar(f"loss/{name}", value, step)
                self.writer.add_scalar("throughput/examples_per_second", throughput, step)
                interval_loss.zero_()
                interval_steps = 0
                interval_examples = 0
                interval_start = time.perf_counter()
            if self.epoch_evaluation_due(epoch):
                pipeline.detach()
                self.evaluate_epoch(epoch, step)
        progress.close()
        # Restore the model's own forward, which evaluation calls directly.
        pipeline.detach()

        elapsed = time.perf_counter() - start
        examples = self.train_data.num_rows // self.world_size * self.world_size * cfg.epochs
        # NOTE: after a resume, elapsed covers only this attempt while examples counts every epoch.
        return {
            "steps": step,
            "epochs": cfg.epochs,
            "seconds": elapsed,
            "examples_per_second": examples / elapsed if elapsed > 0 else 0.0,
            "final_loss": history[-1]["loss"] if history else float("nan"),
            "history": history,
        }

    def epoch_evaluation_due(self, epoch: int) -> bool:
        """True after every ``eval_every_epochs``-th epoch except the last, which ``run`` evaluates."""
        every = self.cfg.training.eval_every_epochs
        return every > 0 and (epoch + 1) % every == 0 and epoch + 1 < self.cfg.training.epochs

    def evaluate_epoch(self, epoch: int, step: int) -> None:
        """Score the evaluation split after ``epoch`` for the evaluation curve; no files are written.

        Every rank takes part, because the sharded embedding lookup is a collective. The next
        ``pipeline.progress`` call attaches the training pipeline again.
        """
        q = predict(self.model, self.eval_data, self.cfg, self.device)
        if q is None:
            return
        metrics, _, _ = score_predictions(q, self.eval_data, self.cfg, self.action_keep_rates)
        for name, values in metrics.items():
            logger.info(
                "eval step=%d epoch=%d action=%s auc=%.4f log_loss=%.4f",
                step, epoch, name, values["auc"], values["log_loss"],
            )
        self.record_evaluation(step, epoch, metrics)

    def record_evaluation(self, step: int, epoch: int, action_metrics: dict) -> None:
        """Keep one evaluation point (rank 0) for the evaluation curve and write its TensorBoard scalars."""
        point = {
            "step": step,
            "epoch": epoch,
            "log_loss": {name: values["log_loss"] for name, values in action_metrics.items()},
            "auc": {name: values["auc"] for name, values in action_metrics.items()},
        }
        self.eval_history.append(point)
        for name, values in action_metrics.items():
            self.writer.add_scalar(f"eval/log_loss/{name}", values["log_loss"], step)
            self.writer.add_scalar(f"eval/auc/{name}", values["auc"], step)

    def evaluate(self, step: int) -> dict | None:
        metrics = evaluate(self.model, self.eval_data, self.cfg, self.device, self.action_keep_rates, self.out_dir)
        if metrics is None:
            return None
        self.record_evaluation(step, self.cfg.training.epochs - 1, metrics["actions"])
        for name, values in metrics["actions"].items():
            logger.info(
                "eval action=%s auc=%.4f log_loss=%.4f ne=%.4f calibration=%.3f calibration_uncorrected=%.3f rate=%.5f",
                name, values["auc"], values["log_loss"], values["normalized_entropy"],
                values["calibration"], values["calibration_uncorrected"], values["observed_rate"],
            )
            self.writer.add_scalar(f"eval/normalized_entropy/{name}", values["normalized_entropy"], step)
            self.writer.add_scalar(f"eval/calibration/{name}", values["calibration"], step)
        for key, value in metrics["value_score"]["ranking"].items():
            if key.startswith("ndcg") and value is not None:
                self.writer.add_scalar(f"eval/value_{key}", value, step)
        return metrics

    def save_checkpoint(self) -> Path:
        """Save the final checkpoint (unless the last step is saved already); return its folder."""
        self.maybe_save_checkpoint(force=True)
        return self.checkpoints.root / f"step-{self.position.step:08d}"

    def run(self) -> None:
        training = self.train()
        # Save before evaluating, so that an error in metrics or plots keeps the trained model.
        checkpoint = self.save_checkpoint()
        metrics = self.evaluate(step=training["steps"])
        if self.rank == 0:
            plot_training_curves(self.out_dir / "plots" / "training_curve.png", training["history"], self.eval_history)
            metrics["eval_history"] = self.eval_history
            metrics.update(
                training=training,
                world_size=self.world_size,
                sharding_plan=self.plan,
                checkpoint=str(checkpoint),
            )
            (self.out_dir / "metrics.json").write_text(json.dumps(json_safe(metrics), indent=2, allow_nan=False))
            logger.info("wrote %s", self.out_dir / "metrics.json")

    def cleanup(self, failed: bool = False) -> None:
        """Close the writer and leave the process group.

        After a failure the barrier is skipped, because the other ranks may never reach it
        and the job would hang instead of exiting.
        """
        self.writer.close()
        self.step_log.close()
        if not failed:
            dist.barrier()
        dist.destroy_process_group()


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="pipeline config (TOML)")
    parser.add_argument("--data", required=True, type=Path, help="output folder of the downsample job (train/, eval/)")
    parser.add_argument("--out", required=True, type=Path, help="folder for metrics, predictions, plots and checkpoint")
    parser.add_argument("--override", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override one config value, e.g. training.epochs=3; repeatable")
    return parser.parse_args(argv)


def json_safe(value):
    """Replace NaN and infinities (undefined metrics) by None, so the JSON is strict."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


USER_ERRORS = (ConfigError, DataError, ShardingConfigError, DeviceError, OutputPathError, CheckpointError)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.override)
        trainer = Trainer(cfg, args.data, args.out)
    except USER_ERRORS as error:
        # Every rank hits the same input error; rank 0 reports it once.
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {error}", file=sys.stderr)
        return 2

    try:
        trainer.run()
    except BaseException:
        trainer.cleanup(failed=True)
        raise
    trainer.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
