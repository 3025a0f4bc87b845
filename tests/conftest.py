"""Fixtures shared by all tests: one local Spark session for the whole run, and a Parquet writer."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyspark.sql import SparkSession

from spark_jobs.common import build_session


@pytest.fixture(scope="session")
def spark() -> Iterator[SparkSession]:
    """Local Spark session (2 cores, 4 shuffle partitions, no UI), started once and stopped at the end."""
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        pytest.fail(
            "Spark tests need Java 17 or newer, but java is not on PATH and JAVA_HOME is not set; "
            "install a JDK (scripts/check-java checks it)",
            pytrace=False,
        )
    session = build_session("valuerank-tests", master="local[2]", shuffle_partitions=4, ui=False)
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.fixture
def write_parquet_file(tmp_path: Path) -> Callable[[str, pa.Table | dict], Path]:
    """Return a function that writes a pyarrow table (or a dict of columns) to ``tmp_path / relative``.

    Parent folders are created, so ``write("impressions/part-0.parquet", table)`` builds
    a folder input one file at a time.
    """

    def write(relative: str, table: pa.Table | dict) -> Path:
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(table, dict):
            table = pa.table(table)
        pq.write_table(table, path)
        return path

    return write
