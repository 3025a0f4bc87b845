"""The ``valuerank`` command: one entry point for every stage.

    valuerank demo --out runs/demo
    valuerank pipeline --config C --impressions I --events E --out DIR
    valuerank label-join --config C --impressions I --events E --out DIR   (Spark)
    valuerank downsample --config C --labelled DIR --out DIR             (Spark)
    valuerank train --nproc-per-node 2 --config C --data DIR --out DIR     (torchrun)
    valuerank generate --out DIR                     (synthetic log)
    valuerank adapt kuairand|open-bandit --src S --out DIR
    valuerank k8s render --config C --out DIR         (Kubernetes manifests)
    valuerank export --model TRAIN_OUT_DIR --out model.pt   (one file, no process group)
    valuerank score --model model.pt --impressions PARQUET --out scores.parquet
    valuerank baselines --config C --data DIR --out DIR      (logistic regression, xgboost)
    valuerank compare --run NAME=DIR ... --out DIR           (comparison table and plots)
    valuerank sweep --config C --data DIR --out DIR          (learning rate, embedding, towers)
    valuerank plan --config C --nodes N --gpus-per-node G   (dry-run sharding plan for a CUDA cluster)
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from launch.k8s_render import cli as k8s_command
from launch.local import positive_int
from valuerank.config import ConfigError, load_config, parse_utc


def _setup_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("valuerank", "spark_jobs", "launch", "trainer"):
        logging.getLogger(name).setLevel(logging.INFO)


def _train(argv: list[str]) -> int:
    from launch.local import add_arguments, preflight, run_from_args

    parser = argparse.ArgumentParser(
        prog="valuerank train",
        description="Train and evaluate under torchrun on this machine. The other arguments go to "
        "trainer.train: --config CONFIG --data DOWNSAMPLED_DIR --out OUT_DIR [--override SECTION.KEY=VALUE].",
    )
    add_arguments(parser)
    args, trainer_args = parser.parse_known_args(argv)

    # Check everything here once, before torchrun starts ranks that would each report it.
    preflight(args.nproc_per_node, trainer_args, prog="valuerank train")
    return run_from_args(args, trainer_args)


def _pipeline(argv: list[str]) -> int:
    from trainer.preflight import check_out_dir
    from valuerank.pipeline import PipelinePaths, run_spark_stages, run_training

    parser = argparse.ArgumentParser(prog="valuerank pipeline", description="Label join, downsampling and training on one machine.")
    parser.add_argument("--config", required=True, type=Path, help="pipeline config (TOML)")
    parser.add_argument("--impressions", required=True, type=Path, help="impression log (Parquet file or folder)")
    parser.add_argument("--events", required=True, type=Path, help="action event log (Parquet file or folder)")
    parser.add_argument("--out", required=True, type=Path, help="run folder; gets labelled/, downsampled/ and model/")
    parser.add_argument("--as-of", default=None, help="UTC time that closes attribution windows (default: latest event)")
    parser.add_argument(
        "--allow-absent-actions", action="store_true",
        help="label a configured action that never occurs in the event log as 0 instead of failing",
    )
    parser.add_argument("--nproc-per-node", type=positive_int, default=2, help="training ranks on this machine")
    parser.add_argument("--override", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override one config value")
    args = parser.parse_args(argv)

    cfg = load_config(args.config, args.override)
    as_of = parse_utc(args.as_of, "--as-of") if args.as_of else None
    paths = PipelinePaths(args.out)
    check_out_dir(paths.model, paths.downsampled)
    run_spark_stages(cfg, args.impressions, args.events, paths, as_of=as_of, allow_absent_actions=args.allow_absent_actions)
    run_training(args.config, paths, args.nproc_per_node, args.override)
    print(f"metrics: {paths.model / 'metrics.json'}")
    return 0


def _demo(argv: list[str]) -> int:
    from valuerank.demo import DEMO_CONFIG, run_demo

    parser = argparse.ArgumentParser(prog="valuerank demo", description="Run the whole pipeline on a synthetic log with known truth.")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="run folder (default runs/demo)")
    parser.add_argument("--impressions", type=positive_int, default=300_000, help="synthetic impressions to generate (default 300,000)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed")
    parser.add_argument("--nproc-per-node", type=positive_int, default=2, help="training ranks")
    parser.add_argument("--config", type=Path, default=DEMO_CONFIG, help="pipeline config (default configs/demo.toml)")
    parser.add_argument("--override", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override one config value")
    args = parser.parse_args(argv)
    run_demo(args.out, args.impressions, args.seed, args.nproc_per_node, args.config, args.override)
    return 0


def _adapt(argv: list[str]) -> int:
    if not argv or argv[0] not in ("kuairand", "open-bandit"):
        print("usage: valuerank adapt kuairand|open-bandit --src PATH --out DIR", file=sys.stderr)
        return 2
    if argv[0] == "kuairand":
        from valuerank.adapters.kuairand import main as adapter_main
    else:
        from valuerank.adapters.open_bandit import main as adapter_main
    return adapter_main(argv[1:]) or 0


def _spark_job(module: str):
    def run(argv: list[str]) -> int:
        if module == "label_join":
            from spark_jobs.label_join import main as job_main
        else:
            from spark_jobs.downsample import main as job_main
        return job_main(argv)

    return run


def _generate(argv: list[str]) -> int:
    from valuerank.synthetic import main as generate_main

    return generate_main(argv) or 0


def _export(argv: list[str]) -> int:
    from trainer.export import main as export_main

    return export_main(argv)


def _score(argv: list[str]) -> int:
    from trainer.score import main as score_main

    return score_main(argv)


def _baselines(argv: list[str]) -> int:
    from trainer.baselines.run import main as baselines_main

    return baselines_main(argv)


def _compare(argv: list[str]) -> int:
    from trainer.comparison import main as compare_main

    return compare_main(argv)


def _sweep(argv: list[str]) -> int:
    from trainer.sweep import main as sweep_main

    return sweep_main(argv)


def _plan(argv: list[str]) -> int:
    from valuerank.plan import main as plan_main

    return plan_main(argv)


COMMANDS = {
    "demo": _demo,
    "pipeline": _pipeline,
    "label-join": _spark_job("label_join"),
    "downsample": _spark_job("downsample"),
    "train": _train,
    "generate": _generate,
    "adapt": _adapt,
    "k8s": k8s_command,
    "export": _export,
    "score": _score,
    "baselines": _baselines,
    "compare": _compare,
    "sweep": _sweep,
    "plan": _plan,
}


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that describe bad input, not a bug: reported without a traceback."""
    from spark_jobs.common import AccountingError, EmptyOutputError, InputSchemaError, OutputPathError
    from trainer.data import DataError
    from trainer.sharding import ShardingConfigError
    from trainer.checkpoint import CheckpointError
    from trainer.export import ExportError
    from trainer.train import DeviceError

    errors = [
        ConfigError, InputSchemaError, OutputPathError, EmptyOutputError, AccountingError,
        DataError, ShardingConfigError, DeviceError, FileNotFoundError, FileExistsError,
        CheckpointError, ExportError,
    ]
    from trainer.comparison import ComparisonError
    from trainer.ranking import RankingDataError
    from trainer.sweep import SweepError

    errors += [ComparisonError, RankingDataError, SweepError]
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}; valid commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2

    _setup_logging()
    # Sub-commands build their own argparse parsers, which take the program name for their
    # usage line from sys.argv[0].
    sys.argv[0] = f"valuerank {argv[0]}"
    try:
        return COMMANDS[argv[0]](argv[1:])
    except user_errors() as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
