"""The Spark jobs under spark-submit keep the master and the --conf pairs that spark-submit passes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPARK_SUBMIT = Path(sys.executable).parent / "spark-submit"


@pytest.fixture(scope="module")
def raw_log(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("raw")
    command = [sys.executable, "-m", "valuerank.cli", "generate", "--out", str(out), "--impressions", "3000",
               "--users", "60", "--items", "40", "--days", "14"]
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    return out


PROBE = """
import sys
from spark_jobs.common import build_session

session = build_session("valuerank-probe")
conf = session.sparkContext.getConf()
print("master=" + session.sparkContext.master)
print("shuffle_partitions=" + session.conf.get("spark.sql.shuffle.partitions"))
print("time_zone=" + session.conf.get("spark.sql.session.timeZone"))
print("executor_memory=" + conf.get("spark.executor.memory"))
session.stop()
"""


def _submit(script: str, args: list[str]) -> subprocess.CompletedProcess:
    if not SPARK_SUBMIT.is_file():
        pytest.skip(f"spark-submit not found next to {sys.executable}; install pyspark into this environment")
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        pytest.fail("spark-submit needs Java 17 or newer on PATH or in JAVA_HOME", pytrace=False)
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable)
    command = [
        str(SPARK_SUBMIT), "--master", "local[1]",
        "--conf", "spark.sql.shuffle.partitions=3", "--conf", "spark.executor.memory=700m",
        "--conf", "spark.ui.enabled=false",
        script, *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1200)


def test_session_keeps_spark_submit_master_and_conf(tmp_path):
    # build_session is what every job calls; under spark-submit it must not replace the master or the --conf pairs.
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)

    result = _submit(str(probe), [])
    lines = result.stdout.splitlines()

    assert result.returncode == 0, result.stderr[-3000:]
    assert "master=local[1]" in lines
    assert "shuffle_partitions=3" in lines
    assert "executor_memory=700m" in lines
    assert "time_zone=UTC" in lines


def test_label_join_runs_under_spark_submit(raw_log, tmp_path):
    args = ["--config", str(ROOT / "configs" / "demo.toml"), "--impressions", str(raw_log / "impressions"),
            "--events", str(raw_log / "events"), "--out", str(tmp_path / "labelled")]

    result = _submit(str(ROOT / "spark_jobs" / "label_join.py"), args)

    assert result.returncode == 0, result.stderr[-3000:]
    # spark-submit passes the driver's Python output, logging included, to its own stdout.
    assert "master local[1], shuffle partitions 3" in result.stdout
    manifest = json.loads((tmp_path / "labelled" / "_manifest.json").read_text())
    assert manifest["impressions"]["rows_out"] > 0
