"""Run the three stages in order on one machine: label join, downsampling, training.

The Spark jobs run in this process on one local Spark session; training runs under
torchrun as a child process. On a cluster, run the stages separately with spark-submit
and torchrun instead (each module's docstring shows the command).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from launch.local import preflight, run_local
from valuerank.config import PipelineConfig

logger = logging.getLogger(__name__)


@dataclass
class PipelinePaths:
    """Folders of one pipeline run under ``root``."""

    root: Path

    @property
    def labelled(self) -> Path:
        return self.root / "labelled"

    @property
    def downsampled(self) -> Path:
        return self.root / "downsampled"

    @property
    def model(self) -> Path:
        return self.root / "model"


def run_spark_stages(
    cfg: PipelineConfig,
    impressions: Path,
    events: Path,
    paths: PipelinePaths,
    as_of: datetime | None = None,
    master: str | None = None,
    allow_absent_actions: bool = False,
) -> tuple[dict, dict]:
    """Run the label join and the downsampling; return both manifests."""
    from spark_jobs.common import get_or_create_session
    from spark_jobs.downsample import run_downsample
    from spark_jobs.label_join import run_label_join

    spark, created = get_or_create_session("valuerank-pipeline", master)
    try:
        join_manifest = run_label_join(
            spark, cfg, str(impressions), str(events), str(paths.labelled), as_of=as_of,
            allow_absent_actions=allow_absent_actions,
        )
        down_manifest = run_downsample(spark, cfg, str(paths.labelled), str(paths.downsampled))
    finally:
        if created:
            spark.stop()
    return join_manifest, down_manifest


def run_training(config_path: Path, paths: PipelinePaths, nproc_per_node: int, overrides: list[str]) -> None:
    """Train and evaluate under torchrun; raise if any rank fails."""
    args = ["--config", str(config_path), "--data", str(paths.downsampled), "--out", str(paths.model)]
    for override in overrides:
        args += ["--override", override]
    preflight(nproc_per_node, args, prog="valuerank pipeline")
    code = run_local(nproc_per_node, args)
    if code != 0:
        raise RuntimeError(f"training failed with exit code {code}; the rank logs above show the error")
