"""Rank-0 logging, TensorBoard scalars and PNG plots.

Only rank 0 writes: other ranks get a ``NullWriter`` so that the training loop never
branches on the rank to log.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from trainer.metrics import reliability_curve  # noqa: E402


def setup_logging(rank: int) -> None:
    """Log this project's INFO lines on rank 0 only, and warnings from every rank.

    Third-party libraries (torchrec, fbgemm) log at WARNING and above, because their INFO
    output repeats every kernel argument on each start.
    """
    logging.basicConfig(
        level=logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    for name in ("valuerank", "trainer"):
        logging.getLogger(name).setLevel(logging.INFO if rank == 0 else logging.WARNING)
    # torchrec 1.8 warns on every start that the topology was not built by its factory. The
    # planner here gets an explicit Topology on purpose, to carry the configured memory budget.
    logging.getLogger("torchrec.distributed.planner.types").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torchrec\..*")


def metric_line(step: int, epoch: int, loss: float, per_action: dict[str, float], examples_per_second: float) -> str:
    """Format the fixed metric line: step, epoch, total loss, loss per action, throughput."""
    actions = " ".join(f"loss/{name}={value:.4f}" for name, value in per_action.items())
    return f"step={step} epoch={epoch} loss={loss:.4f} {actions} throughput(examples/s)={examples_per_second:.0f}"


class NullWriter:
    """Stands in for a SummaryWriter on ranks that do not log."""

    def add_scalar(self, *args, **kwargs) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def make_writer(rank: int, log_dir: Path):
    """Return a TensorBoard SummaryWriter on rank 0 and a NullWriter elsewhere."""
    if rank != 0:
        return NullWriter()
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(log_dir))


def plot_calibration(path: Path, labels: dict[str, np.ndarray], predictions: dict[str, np.ndarray]) -> None:
    """Write one reliability diagram per action (corrected predictions) as a PNG grid."""
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(labels)
    columns = min(4, len(names))
    rows = -(-len(names) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 4 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        finite = np.isfinite(predictions[name])
        mean_p, rate, _ = reliability_curve(labels[name][finite], predictions[name][finite])
        top = max(float(mean_p.max(initial=0)), float(rate.max(initial=0)), 1e-3) * 1.1
        ax.plot([0, top], [0, top], color="grey", linestyle="--", linewidth=1, label="perfect")
        ax.plot(mean_p, rate, marker="o", label="model")
        ax.set_title(name)
        ax.set_xlabel("mean predicted probability")
        ax.set_ylabel("observed rate")
        ax.set_xlim(0, top)
        ax.set_ylim(0, top)
        ax.legend(loc="upper left")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle("Calibration on the evaluation split (after keep-rate correction)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_training_curves(path: Path, history: list[dict], eval_history: list[dict] | None = None) -> None:
    """Write the training loss and, when given, the evaluation log loss against the step as a PNG.

    The training panel shows the loss on downsampled rows. The evaluation panel shows the log
    loss of the keep-rate-corrected probabilities on the full evaluation split, so its scale
    differs from the training panel's.
    """
    if not history:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    panels = 2 if eval_history else 1
    fig, axes = plt.subplots(1, panels, figsize=(8 * panels, 5), squeeze=False)

    ax = axes[0][0]
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["loss"] for h in history], label="total", linewidth=2)
    for name in history[0]["per_action"]:
        ax.plot(steps, [h["per_action"][name] for h in history], label=name, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean over the logging interval)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("Training loss")

    if eval_history:
        ax = axes[0][1]
        steps = [h["step"] for h in eval_history]
        for name in eval_history[0]["log_loss"]:
            ax.plot(steps, [h["log_loss"][name] for h in eval_history], marker="o", label=name)
        ax.set_xlabel("step")
        ax.set_ylabel("evaluation log loss (corrected probabilities)")
        ax.set_yscale("log")
        ax.legend()
        ax.set_title("Evaluation loss")

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
