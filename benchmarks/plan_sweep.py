"""Run ``valuerank plan`` for the reference models at several cluster sizes and print a Markdown table.

Each row comes from one ``valuerank plan ... --json`` run (written under ``--out``), so
any row can be reproduced with the command printed above the table. Nothing is
measured: every figure is the torchrec planner's estimate.

Command (what docs/scaling.md reports)::

    .venv/bin/python benchmarks/plan_sweep.py --out runs/plans
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from valuerank.plan import main as plan_main

REPO = Path(__file__).resolve().parents[1]
MODELS = ("production_10x10m", "production_40_tables")
GPUS = (8, 16, 64, 256)
GIB = 1024**3


def run_plan(args: list[str], json_path: Path) -> dict | None:
    """Run ``valuerank plan`` with ``args``; return its JSON report, or None when it does not fit."""
    print("valuerank plan " + " ".join(args), file=sys.stderr, flush=True)
    # The plan's text goes to stderr, so that stdout holds only the table.
    with contextlib.redirect_stdout(sys.stderr):
        code = plan_main([*args, "--json", str(json_path)])
    if code != 0:
        return None
    return json.loads(json_path.read_text())


def row(model: str, label: str, report: dict | None) -> str:
    if report is None:
        return f"| {model} | {label} | does not fit | | | | |"
    ranks = report["ranks"]
    hbm = [r["hbm_bytes"] for r in ranks]
    host = max(r["ddr_bytes"] for r in ranks)
    estimate = report["estimate"]
    bottleneck = ranks[estimate["bottleneck_rank"]]
    return (
        f"| {model} | {label} | {max(hbm) / GIB:.1f} / {sum(hbm) / len(hbm) / GIB:.1f} | {host / GIB:.1f} "
        f"| {estimate['step_time_ms']:.2f} | {estimate['records_per_second'] / 1e6:.1f} "
        f"| {bottleneck['comms_ms'] / max(estimate['step_time_ms'], 1e-9):.0%} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "plans", help="folder for the JSON reports")
    parser.add_argument("--hbm-only", action="store_true", help="pass --hbm-only to every plan")
    parser.add_argument(
        "--plan-arg", action="append", default=[], metavar="ARG",
        help="pass ARG to every plan, e.g. --plan-arg=--inter-node-bandwidth=46.6 (repeatable)",
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    extra = (["--hbm-only"] if args.hbm_only else []) + args.plan_arg

    lines = [
        "| model | GPUs | HBM per rank GiB (max / mean) | host GiB (max) | step ms | records/s (M) | comms share |",
        "|---|---|---|---|---|---|---|",
    ]
    for model in MODELS:
        config = f"configs/{model}.toml"
        for gpus in GPUS:
            nodes = gpus // 8
            report = run_plan(["--config", config, "--nodes", str(nodes), "--gpus-per-node", "8", *extra],
                              args.out / f"{model}-{gpus}.json")
            lines.append(row(model, str(gpus), report))

        # The fewest 80 GiB GPUs that fit: one GPU per "node" makes the search step one GPU.
        report = run_plan(["--config", config, "--nodes", "64", "--gpus-per-node", "1", "--find-smallest", *extra],
                          args.out / f"{model}-smallest.json")
        smallest = report.get("smallest_fitting_nodes") if report is not None else None
        if smallest is None:
            lines.append(f"| {model} | fewest that fit: more than 64 | | | | | |")
            continue
        report = run_plan(["--config", config, "--nodes", str(smallest), "--gpus-per-node", "1", *extra],
                          args.out / f"{model}-{smallest}-single.json")
        lines.append(row(model, f"{smallest} (fewest that fit, 1 GPU per node)", report))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
