"""Run training under torchrun on this machine, with threads per rank set explicitly.

    python -m launch local --nproc-per-node 2 -- \\
        --config configs/demo.toml --data runs/demo/downsampled --out runs/demo/model

is the same as ``valuerank train`` with the same arguments. It runs::

    OMP_NUM_THREADS=<cores / nproc> torchrun --standalone --nproc-per-node 2 -m trainer.train ...

Every rank of a CPU job computes with ``OMP_NUM_THREADS`` threads; without it each rank
starts one thread per core and the ranks oversubscribe the machine.

With ``--rdzv-endpoint`` (or ``python -m launch node``) the same command runs one node of a
multi-node job: torchrun joins a c10d rendezvous instead of starting a standalone one.
Every node runs it with the same ``--nnodes`` and endpoint, for example on two machines::

    python -m launch node --nnodes 2 --nproc-per-node 8 --rdzv-endpoint node0:29400 \\
        --node-index 0 --max-restarts 3 -- --config C --data SHARED/downsampled --out SHARED/model

Pass ``--node-index 0`` on node0 and ``--node-index 1`` on the other machine. launch/torchrun.py
describes the torchrun options that this produces.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys

from launch import torchrun
from launch.rendezvous import wait_for_host

logger = logging.getLogger(__name__)


def threads_per_rank(nproc_per_node: int, cores: int | None = None) -> int:
    """Split this machine's cores evenly across the ranks on it, at least one each."""
    return torchrun.threads_per_rank(nproc_per_node, cores)


def torchrun_command(
    nproc_per_node: int,
    trainer_args: list[str],
    rendezvous: torchrun.Rendezvous | None = None,
    max_restarts: int = 0,
) -> list[str]:
    """Build the torchrun command line for ``trainer.train``: standalone, or one node of a c10d rendezvous."""
    return torchrun.build_command(nproc_per_node, trainer_args, rendezvous, max_restarts)


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


def run_local(
    nproc_per_node: int,
    trainer_args: list[str],
    threads: int | None = None,
    rendezvous: torchrun.Rendezvous | None = None,
    max_restarts: int = 0,
) -> int:
    """Start torchrun and wait; return its exit code.

    With ``rendezvous``, first wait until its host name resolves (a Kubernetes service
    gets its DNS record only after the pod behind it is scheduled), then join it.
    Returns 2 when the host still does not resolve after the rendezvous timeout.
    """
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads or threads_per_rank(nproc_per_node))
    if max_restarts > 0:
        # NOTE: with torch 2.13, workers that torchrun restarts hang in init_process_group when
        # they reuse the agent's rendezvous TCP store (pytorch/pytorch#135712). A separate
        # store per restart round avoids the hang.
        env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")

    if rendezvous is not None:
        try:
            wait_for_host(rendezvous.host, rendezvous.timeout_s)
        except TimeoutError as error:
            logger.error("%s", error)
            return 2

    command = torchrun_command(nproc_per_node, trainer_args, rendezvous, max_restarts)
    logger.info("OMP_NUM_THREADS=%s %s", env["OMP_NUM_THREADS"], " ".join(command))
    return subprocess.call(command, env=env)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def endpoint_arg(text: str) -> str:
    try:
        torchrun.split_endpoint(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error
    return text


def nnodes_arg(text: str) -> str:
    try:
        torchrun.check_nnodes(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nproc-per-node", type=positive_int, default=2, help="ranks on this machine (default 2)")
    parser.add_argument(
        "--threads-per-rank", type=positive_int, default=None, help="compute threads per rank (default: cores / ranks)"
    )
    parser.add_argument(
        "--cores", type=positive_int, default=None,
        help="cores of this node to split across its ranks (default: the CPU set, capped by a container CPU limit)",
    )
    group = parser.add_argument_group("multi-node (c10d rendezvous; without --rdzv-endpoint torchrun runs --standalone)")
    group.add_argument("--nnodes", type=nnodes_arg, default=None, help="nodes in the job: N, or MIN:MAX for an elastic job")
    group.add_argument(
        "--rdzv-endpoint", type=endpoint_arg, default=None, help="HOST:PORT of the rendezvous store on node 0 (port default 29400)"
    )
    group.add_argument("--rdzv-id", default=None, help="job id that all nodes share (default valuerank)")
    group.add_argument(
        "--rdzv-timeout", type=positive_int, default=None,
        help="seconds a node waits for node 0 and for the other nodes before it fails (default 900)",
    )
    group.add_argument(
        "--node-index", type=non_negative_int, default=None,
        help="index of this node; node 0 hosts the rendezvous store (default: torchrun guesses from the host name)",
    )
    group.add_argument(
        "--max-restarts", type=non_negative_int, default=None,
        help="times torchrun restarts all ranks after a failure before it gives up (default 0)",
    )


ENV_DEFAULTS = {
    "nnodes": "PET_NNODES",
    "rdzv_endpoint": "PET_RDZV_ENDPOINT",
    "rdzv_id": "PET_RDZV_ID",
    "max_restarts": "PET_MAX_RESTARTS",
    "nproc_per_node": "PET_NPROC_PER_NODE",
    "node_index": "VALUERANK_NODE_INDEX",
    "cores": "VALUERANK_CORES",
}
"""Environment variables that ``python -m launch node`` reads for options not given on its
command line. The PET_ names are the ones torchrun itself reads, and the Kubeflow training
operator sets them from a PyTorchJob's elastic policy."""


def apply_env_defaults(args: argparse.Namespace, explicit: set[str], environ: dict[str, str]) -> None:
    """Fill options that were not on the command line from ``ENV_DEFAULTS`` in ``environ``."""
    converters = {
        "nnodes": nnodes_arg, "rdzv_endpoint": endpoint_arg, "rdzv_id": str,
        "max_restarts": non_negative_int, "nproc_per_node": positive_int,
        "node_index": non_negative_int, "cores": positive_int,
    }
    for name, variable in ENV_DEFAULTS.items():
        if name in explicit or not environ.get(variable):
            continue
        try:
            setattr(args, name, converters[name](environ[variable]))
        except (argparse.ArgumentTypeError, ValueError) as error:
            raise SystemExit(f"error: environment variable {variable}={environ[variable]!r}: {error}") from error


def rendezvous_from_args(args: argparse.Namespace) -> torchrun.Rendezvous | None:
    """Return the c10d rendezvous that the options describe, or None for a standalone run."""
    if args.rdzv_endpoint is None:
        if args.nnodes not in (None, "1", "1:1"):
            raise SystemExit(f"error: --nnodes {args.nnodes} needs --rdzv-endpoint HOST:PORT of node 0")
        return None
    return torchrun.Rendezvous(
        endpoint=args.rdzv_endpoint,
        nnodes=args.nnodes or "1",
        rdzv_id=args.rdzv_id or "valuerank",
        timeout_s=args.rdzv_timeout or 900,
        is_host=None if args.node_index is None else args.node_index == 0,
    )


def run_from_args(args: argparse.Namespace, trainer_args: list[str]) -> int:
    """Start torchrun for options added by ``add_arguments``; return its exit code."""
    rendezvous = rendezvous_from_args(args)
    threads = args.threads_per_rank or threads_per_rank(args.nproc_per_node, args.cores)
    return run_local(args.nproc_per_node, trainer_args, threads, rendezvous, args.max_restarts or 0)


def main(argv: list[str] | None = None, mode: str = "local") -> int:
    """Run ``python -m launch local`` (flags only) or ``python -m launch node`` (flags, then environment)."""
    parser = argparse.ArgumentParser(prog=f"python -m launch {mode}", description="Run trainer.train under torchrun.")
    add_arguments(parser)
    parser.add_argument("trainer_args", nargs=argparse.REMAINDER, help="arguments after -- go to trainer.train")
    args = parser.parse_args(argv)
    trainer_args = args.trainer_args[1:] if args.trainer_args[:1] == ["--"] else args.trainer_args
    if mode == "node":
        apply_env_defaults(args, _explicit_options(parser, argv), dict(os.environ))
        if args.rdzv_endpoint is None:
            parser.error("node mode needs --rdzv-endpoint HOST:PORT (or PET_RDZV_ENDPOINT) and --nnodes (or PET_NNODES)")
    from valuerank.cli import user_errors

    try:
        preflight(args.nproc_per_node, trainer_args, prog=f"python -m launch {mode} --")
    except user_errors() as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return run_from_args(args, trainer_args)


def _explicit_options(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """Return the destinations of options given on the command line before ``--``."""
    argv = sys.argv[1:] if argv is None else argv
    head = argv[: argv.index("--")] if "--" in argv else argv
    explicit = set()
    for action in parser._actions:
        if any(word == option or word.startswith(option + "=") for word in head for option in action.option_strings):
            explicit.add(action.dest)
    return explicit
