"""Measure the label join and downsampling at several log sizes in local Spark, and fit how they grow.

For each size the script generates a synthetic log (``valuerank.synthetic``, cached
under ``--work``), then runs both jobs in a fresh child process with its own JVM, so
that each size starts cold and its peak memory is its own. Per job it records:

- wall time, from the job's start to its manifest;
- shuffle bytes written and read, input and output bytes, spill, task run time and CPU
  time, summed over the job's stages, and the largest peak execution memory of one task.
  They come from Spark's status store, the data behind the web UI, which Spark's
  AppStatusListener fills whether the UI runs or not. No REST call is made;
- the peak resident memory of the JVM, read from /proc/<pid>/status (VmHWM) after
  resetting it through /proc/<pid>/clear_refs when the job starts.

It then fits ``value = a * impressions ** b`` to each measure by least squares on the
logarithms, and projects core time, executors, shuffle and executor memory for the
``--daily-impressions`` volumes from the largest run under the assumptions that the other
flags set. The results go to ``<work>/results.json``; ``--project-only`` redoes only the
projection from that file.

Command (what docs/scaling.md reports)::

    .venv/bin/python benchmarks/spark_scaling.py --sizes 1000000 3000000 10000000 \\
        --work runs/spark_scaling --master 'local[2]' --driver-memory 4g
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "demo.toml"
JOBS = ("label_join", "downsample")

STAGE_SUMS = (
    "shuffleWriteBytes",
    "shuffleReadBytes",
    "inputBytes",
    "outputBytes",
    "memoryBytesSpilled",
    "diskBytesSpilled",
    "executorRunTime",
    "executorCpuTime",
    "jvmGcTime",
    "numTasks",
)
"""Stage fields (Spark's v1.StageData) summed over the stages of one job. Times are in
milliseconds except executorCpuTime, which is in nanoseconds."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 3_000_000, 10_000_000], help="impressions per run")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "spark_scaling", help="folder for logs, outputs and results.json")
    parser.add_argument("--master", default="local[2]", help="Spark master (default local[2])")
    parser.add_argument("--driver-memory", default="4g", help="JVM heap of the local driver, which also runs the tasks")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic logs")
    parser.add_argument("--project-only", action="store_true", help="skip the runs; project from <work>/results.json")
    parser.add_argument("--daily-impressions", type=float, nargs="+", default=[1e9, 1e10], help="volumes to project to")
    parser.add_argument("--window-hours", type=float, default=1.0, help="assumed wall time allowed for each job")
    parser.add_argument("--executor-cores", type=int, default=4, help="assumed cores per executor")
    parser.add_argument("--efficiency", type=float, default=0.5, help="assumed share of executor core time doing task work")
    parser.add_argument("--memory-headroom", type=float, default=2.0, help="assumed factor on the measured per-task peak memory")
    parser.add_argument("--measure-one", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# --- one size, in a child process --------------------------------------------------


def _reset_peak_rss(pid: int) -> None:
    # Writing 5 to clear_refs resets the VmHWM peak of a process this user owns (Linux).
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def _peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/{pid}/status has no VmHWM line")


def _stage_metrics(spark, group: str) -> dict:
    """Sum the stage metrics of every job in job group ``group`` from Spark's status store."""
    context = spark.sparkContext
    tracker = context.statusTracker()
    stage_ids: set[int] = set()
    for job_id in tracker.getJobIdsForGroup(group):
        info = tracker.getJobInfo(job_id)
        if info is not None:
            stage_ids.update(info.stageIds)

    store = context._jsc.sc().statusStore()
    jvm = context._jvm
    totals = {name: 0 for name in STAGE_SUMS}
    totals["stages"] = 0
    totals["maxTaskPeakExecutionMemory"] = 0
    quantile_max = context._gateway.new_array(jvm.double, 1)
    quantile_max[0] = 1.0
    no_quantiles = context._gateway.new_array(jvm.double, 0)
    # AppStatusStore.stageList(statuses, details, withSummaries, quantiles, taskStatus) in
    # Spark 4 returns a Scala Seq; null statuses select every stage.
    stages = store.stageList(None, False, False, no_quantiles, jvm.java.util.ArrayList())
    for index in range(stages.size()):
        stage = stages.apply(index)
        if stage.stageId() not in stage_ids:
            continue
        totals["stages"] += 1
        for name in STAGE_SUMS:
            totals[name] += int(getattr(stage, name)())
        summary = store.taskSummary(stage.stageId(), stage.attemptId(), quantile_max)
        if summary.isDefined():
            peak = summary.get().peakExecutionMemory().apply(0)
            totals["maxTaskPeakExecutionMemory"] = max(totals["maxTaskPeakExecutionMemory"], int(peak))
    return totals


def measure_one(args: argparse.Namespace) -> dict:
    """Run both jobs on the log of ``args.measure_one`` impressions and return their measurements."""
    from spark_jobs.common import build_session
    from spark_jobs.downsample import run_downsample
    from spark_jobs.label_join import run_label_join
    from valuerank.config import load_config

    size = args.measure_one
    raw = args.work / f"raw_{size}"
    out = args.work / f"out_{size}"
    cfg = load_config(CONFIG)

    os.environ.setdefault("PYSPARK_SUBMIT_ARGS", f"--driver-memory {args.driver_memory} pyspark-shell")
    spark = build_session(f"spark-scaling-{size}", master=args.master, ui=False)
    spark.sparkContext.setLogLevel("ERROR")
    jvm_pid = int(spark.sparkContext._jvm.ProcessHandle.current().pid())
    result = {
        "impressions": size,
        "master": spark.sparkContext.master,
        "shuffle_partitions": int(spark.conf.get("spark.sql.shuffle.partitions")),
        "driver_memory": args.driver_memory,
        "jobs": {},
    }

    steps = {
        "label_join": lambda: run_label_join(
            spark, cfg, str(raw / "impressions"), str(raw / "events"), str(out / "labelled")
        ),
        "downsample": lambda: run_downsample(spark, cfg, str(out / "labelled"), str(out / "downsampled")),
    }
    for job in JOBS:
        spark.sparkContext.setJobGroup(job, job)
        _reset_peak_rss(jvm_pid)
        start = time.perf_counter()
        manifest = steps[job]()
        seconds = time.perf_counter() - start
        result["jobs"][job] = {
            "seconds": seconds,
            "jvm_peak_rss_bytes": _peak_rss_bytes(jvm_pid),
            **_stage_metrics(spark, job),
            "rows_out": manifest["impressions"]["rows_out"] if job == "label_join" else manifest["train"]["rows_out"],
        }
    result["jobs"]["label_join"]["events_in"] = _events_in(out / "labelled")
    spark.stop()
    return result


def _events_in(labelled: Path) -> int:
    manifest = json.loads((labelled / "_manifest.json").read_text())
    return int(manifest["events"]["rows_in"])


# --- driver -------------------------------------------------------------------------


def ensure_log(work: Path, size: int, seed: int) -> float:
    """Generate the synthetic log of ``size`` impressions unless it exists; return the bytes on disk."""
    from valuerank.synthetic import generate

    raw = work / f"raw_{size}"
    if not (raw / "_done").exists():
        # Users and items grow with the log (100 impressions per user, 200 per item), so
        # the per-user and per-item group sizes stay the same at every size.
        generate(raw, size, seed, num_users=max(size // 100, 1), num_items=max(size // 200, 2))
        (raw / "_done").write_text("")
    return sum(f.stat().st_size for f in raw.rglob("*.parquet"))


def fit_power_law(sizes: list[int], values: list[float]) -> dict:
    """Fit value = a * size ** b by least squares on log-log; return a, b and the largest relative residual."""
    x = np.log(np.asarray(sizes, dtype=float))
    y = np.log(np.maximum(np.asarray(values, dtype=float), 1.0))
    b, log_a = np.polyfit(x, y, 1)
    predicted = np.exp(log_a + b * x)
    residual = float(np.max(np.abs(predicted / np.exp(y) - 1)))
    return {"a": float(math.exp(log_a)), "b": float(b), "max_relative_residual": residual}


def project(results: dict, args: argparse.Namespace) -> list[dict]:
    """Project cluster needs for each daily volume from the largest measured run.

    Core time and shuffle bytes are taken as linear in impressions, at the per-impression
    rate of the largest run. That rate still carries part of the fixed start-up cost, so
    where the fit shows sub-linear growth this overestimates. The shuffle partitions are
    sized to hold as many impressions each as in the largest run, so the per-task peak
    execution memory is taken as measured there.
    """
    largest = max(results["runs"], key=lambda run: run["impressions"])
    size = largest["impressions"]
    rows_per_partition = size / largest["shuffle_partitions"]
    unified_memory_share = 0.6  # spark.memory.fraction default
    reserved_heap_bytes = 300 * 2**20  # Spark's fixed reserved heap
    projections = []
    for volume in args.daily_impressions:
        entry = {"impressions_per_day": volume, "jobs": {}}
        for job in JOBS:
            measured = largest["jobs"][job]
            # Task run time includes waiting for a core on a shared machine, so it bounds the
            # core time from above; CPU time leaves out waiting for disk, so it bounds it from below.
            scale = volume / size
            core_seconds_run = measured["executorRunTime"] / 1000 * scale
            core_seconds_cpu = measured.get("executorCpuTime", 0) / 1e9 * scale
            executor_seconds = args.window_hours * 3600 * args.executor_cores * args.efficiency
            task_memory = measured["maxTaskPeakExecutionMemory"] * args.memory_headroom
            heap = args.executor_cores * task_memory / unified_memory_share + reserved_heap_bytes
            entry["jobs"][job] = {
                "core_hours_task_time": core_seconds_run / 3600,
                "core_hours_cpu_time": core_seconds_cpu / 3600 if "executorCpuTime" in measured else None,
                "executors_task_time": max(1, math.ceil(core_seconds_run / executor_seconds)),
                "executors_cpu_time": max(1, math.ceil(core_seconds_cpu / executor_seconds)) if "executorCpuTime" in measured else None,
                "shuffle_write_bytes": measured["shuffleWriteBytes"] * volume / size,
                "shuffle_partitions": math.ceil(volume / rows_per_partition),
                "executor_heap_bytes": heap,
            }
        projections.append(entry)
    return projections


def print_projections(projections: list[dict], args: argparse.Namespace) -> None:
    print(
        f"projection: {args.executor_cores} cores per executor, {args.window_hours:g} h per job, "
        f"efficiency {args.efficiency:g}, memory headroom {args.memory_headroom:g}x"
    )
    for entry in projections:
        for job, p in entry["jobs"].items():
            cpu = f"{p['executors_cpu_time']:5d}" if p["executors_cpu_time"] is not None else "    -"
            print(
                f"{entry['impressions_per_day']:>10.0e} {job:<11} {p['core_hours_task_time']:8.1f} core-h  "
                f"executors {cpu} (CPU time) to {p['executors_task_time']:5d} (task time)  "
                f"shuffle {p['shuffle_write_bytes'] / 1e9:9.1f} GB  "
                f"{p['shuffle_partitions']:7d} partitions  heap {p['executor_heap_bytes'] / 2**30:5.1f} GiB"
            )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.work = args.work.resolve()
    if args.measure_one is not None:
        print(json.dumps(measure_one(args)))
        return 0

    if args.project_only:
        results = json.loads((args.work / "results.json").read_text())
        results["projections"] = project(results, args)
        print_projections(results["projections"], args)
        (args.work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        return 0

    args.work.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "spark_jobs"], capture_output=True, text=True).stdout.strip())
    runs = []
    for size in args.sizes:
        log_bytes = ensure_log(args.work, size, args.seed)
        command = [sys.executable, __file__, "--measure-one", str(size), "--work", str(args.work),
                   "--master", args.master, "--driver-memory", args.driver_memory]
        child = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
        if child.returncode != 0:
            sys.stderr.write(child.stderr[-4000:])
            raise SystemExit(f"measurement of {size} impressions failed with exit code {child.returncode}")
        run = json.loads(child.stdout.strip().splitlines()[-1])
        run["input_parquet_bytes"] = log_bytes
        runs.append(run)
        for job in JOBS:
            m = run["jobs"][job]
            print(
                f"{size:>11} {job:<11} {m['seconds']:8.1f} s  shuffle write {m['shuffleWriteBytes'] / 1e6:9.1f} MB  "
                f"JVM peak RSS {m['jvm_peak_rss_bytes'] / 2**30:5.2f} GiB  task peak exec {m['maxTaskPeakExecutionMemory'] / 2**20:7.1f} MiB",
                flush=True,
            )

    sizes = [run["impressions"] for run in runs]
    fits = {}
    if len(runs) >= 2:
        for job in JOBS:
            fits[job] = {
                measure: fit_power_law(sizes, [run["jobs"][job][measure] for run in runs])
                for measure in ("seconds", "shuffleWriteBytes", "jvm_peak_rss_bytes", "maxTaskPeakExecutionMemory", "executorRunTime")
            }
            for measure, fit in fits[job].items():
                print(f"fit {job:<11} {measure:<28} a={fit['a']:.4g} b={fit['b']:.3f} max residual {fit['max_relative_residual']:.1%}")

    results = {
        "command": " ".join([Path(sys.executable).name, "benchmarks/spark_scaling.py", *(argv if argv is not None else sys.argv[1:])]),
        "commit": commit,
        "spark_jobs_modified": dirty,
        "cpu_count": os.cpu_count(),
        "runs": runs,
        "fits": fits,
    }
    results["projections"] = project(results, args)
    print_projections(results["projections"], args)
    (args.work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"results written to {args.work / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
