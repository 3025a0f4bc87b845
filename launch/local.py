"""Run training under torchrun on this machine, with threads per rank set explicitly.

    python -m launch local --nproc-per-node 2 -- \\
        --config configs/demo.toml --data runs/demo/downsampled --out runs/demo/model

is the same as ``valuerank train`` with the same arguments. It runs::

    OMP_NUM_THREADS=<cores / nproc> torchrun --standalone --nproc-per-node 2 -m trainer.train ...

Every rank of a CPU job computes with ``OMP_NUM_THREADS`` threads; without it each rank
starts one thread per core and the ranks oversubscribe the machine.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys

logger = logging.getLogger(__name__)


def threads_per_rank(nproc_per_node: int, cores: int | None = None) -> int:
    """Split this machine's cores evenly across the ranks on it, at least one each."""
    cores = cores or len(os.sched_getaffinity(0))
    return max(1, cores // nproc_per_node)


def torchrun_command(nproc_per_node: int, trainer_args: list[str]) -> list[str]:
    """Build the standalone torchrun command line for ``trainer.train``."""
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc_per_node}",
        "-m", "trainer.train",
        *trainer_args,
    ]


def preflight(nproc_per_node: int, trainer_args: list[str], prog: str) -> None:
    """Check the trainer's arguments, config, data and output folder before torchrun starts.

    Raises the same errors that each rank would raise (ConfigError, DataError,
    OutputPathError), so that the user sees one message instead of one per rank.
    """
    from trainer.preflight import check_data, check_out_dir
    from trainer.train import DeviceError, parse_args
    from valuerank.config import load_config

    args = parse_args(trainer_args, prog=prog)
    cfg = load_config(args.config, args.override)
    if cfg.training.device == "cuda":
        import torch

        if torch.cuda.device_count() < nproc_per_node:
            raise DeviceError(
                f"training.device = 'cuda' needs {nproc_per_node} GPUs on this machine, "
                f"{torch.cuda.device_count()} visible; set training.device = 'cpu' or lower --nproc-per-node"
            )
    check_data(cfg, args.data)
    check_out_dir(args.out, args.data)


def run_local(nproc_per_node: int, trainer_args: list[str], threads: int | None = None) -> int:
    """Start torchrun and wait; return its exit code."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads or threads_per_rank(nproc_per_node))
    command = torchrun_command(nproc_per_node, trainer_args)
    logger.info("OMP_NUM_THREADS=%s %s", env["OMP_NUM_THREADS"], " ".join(command))
    return subprocess.call(command, env=env)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nproc-per-node", type=positive_int, default=2, help="ranks on this machine (default 2)")
    parser.add_argument(
        "--threads-per-rank", type=positive_int, default=None, help="compute threads per rank (default: cores / ranks)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch local", description="Run trainer.train under torchrun.")
    add_arguments(parser)
    parser.add_argument("trainer_args", nargs=argparse.REMAINDER, help="arguments after -- go to trainer.train")
    args = parser.parse_args(argv)
    trainer_args = args.trainer_args[1:] if args.trainer_args[:1] == ["--"] else args.trainer_args
    from valuerank.cli import user_errors

    try:
        preflight(args.nproc_per_node, trainer_args, prog="python -m launch local --")
    except user_errors() as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return run_local(args.nproc_per_node, trainer_args, args.threads_per_rank)
