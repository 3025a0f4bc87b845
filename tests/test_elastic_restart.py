"""Elastic restart: torchrun restarts the job after one rank is killed, and training resumes.

How twice-trained batches are measured: every rank appends one JSON line per trained step
to ``steps/rank-<r>.jsonl`` with torchrun's restart count (``attempt``) and the data
position (epoch, batch index in the epoch). A batch trained twice is an (epoch, batch)
pair that appears under both attempts of one rank.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

from checkpoint_runs import REPO, TORCHRUN, write_config, write_data

EVERY = 20
BATCH_SIZE = 32
TRAIN_ROWS = 20_000
STEPS_PER_EPOCH = TRAIN_ROWS // 2 // BATCH_SIZE + 1  # 10,000 rows per rank in batches of 32


def _wait_for(path: Path, process: subprocess.Popen) -> None:
    """Poll until ``path`` exists; fail if the job ends first."""
    while not path.exists():
        assert process.poll() is None, f"torchrun ended with {process.returncode} before {path} appeared"
        time.sleep(0.02)


def _steps(out: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (out / "steps" / f"rank-{rank}.jsonl").read_text().splitlines()]


def _run_and_kill_rank_1(tmp_path: Path) -> tuple[int, str, Path, int]:
    data = write_data(tmp_path / "data", train_rows=TRAIN_ROWS)
    config = write_config(tmp_path / "config.toml", batch_size=BATCH_SIZE, epochs=1, every=EVERY, keep=2)
    out = tmp_path / "out"
    log = tmp_path / "torchrun.log"
    command = [
        str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "--max-restarts", "1",
        "-m", "trainer.train", "--config", str(config), "--data", str(data), "--out", str(out),
    ]
    # torch 2.13's torchrun shares its rendezvous TCPStore with the workers by default, and
    # restarted workers then read the first attempt's keys and hang in init_process_group
    # (pytorch/pytorch#135712). A store per attempt avoids that.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    with open(log, "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        try:
            # The first periodic checkpoint is the trigger: kill rank 1 right after it appears.
            _wait_for(out / "checkpoints" / f"step-{EVERY:08d}", process)
            victim = _steps(out, 1)[-1]["pid"]
            os.kill(victim, signal.SIGKILL)
            returncode = process.wait(timeout=900)
        finally:
            if process.poll() is None:
                process.kill()
    return returncode, log.read_text(), out, victim


def test_elastic_restart_resumes_and_finishes(tmp_path):
    returncode, output, out, victim = _run_and_kill_rank_1(tmp_path)

    assert returncode == 0, output[-4000:]

    # The job restarted once: a second attempt trained steps on both ranks.
    rank0 = _steps(out, 0)
    rank1 = _steps(out, 1)
    assert {line["attempt"] for line in rank0} == {0, 1}
    assert {line["attempt"] for line in rank1} == {0, 1}
    assert victim not in {line["pid"] for line in rank1 if line["attempt"] == 1}

    # It resumed from the newest checkpoint that the first attempt completed.
    saved = [int(step) for step in re.findall(r"saved checkpoint \S+step-(\d+)", output.split("resumed from")[0])]
    resumed = re.search(r"resumed from \S+step-(\d+)", output)
    assert resumed is not None, output[-4000:]
    assert int(resumed.group(1)) == max(saved)
    first_after_restart = next(line for line in rank0 if line["attempt"] == 1)
    assert first_after_restart["step"] == max(saved) + 1

    # It finished: every batch of the epoch was trained, and the metrics were written once.
    assert {line["batch"] for line in rank0} == set(range(STEPS_PER_EPOCH))
    assert (out / "metrics.json").is_file()
    assert output.count("wrote " + str(out / "metrics.json")) == 1

    # Batches trained twice: at most one checkpoint interval per rank.
    for lines in (rank0, rank1):
        attempts = Counter((line["epoch"], line["batch"]) for line in lines)
        twice = sum(1 for count in attempts.values() if count > 1)
        assert twice <= EVERY, f"{twice} batches were trained twice"
