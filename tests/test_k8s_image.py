"""docker/Dockerfile and its entry point, without building the image (no container runtime here).

The entry point runs under sh. The Dockerfile is checked against what the manifests expect."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from launch import k8s_render

ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
DOCKERFILE = (ROOT / "docker" / "Dockerfile").read_text()


def test_entrypoint_runs_other_commands_as_given():
    result = subprocess.run(["sh", str(ENTRYPOINT), "echo", "two words"], capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stderr
    assert result.stdout == "two words\n"


def test_entrypoint_starts_executor_with_spark_options(tmp_path):
    # A stand-in java on PATH prints the arguments it receives, one per line.
    java = tmp_path / "java"
    java.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    java.chmod(0o755)
    env = {
        "PATH": f"{tmp_path}:/usr/bin:/bin",
        "SPARK_HOME": "/spark",
        "SPARK_EXECUTOR_MEMORY": "2g",
        "SPARK_JAVA_OPT_0": "-Dspark.driver.port=7078",
        "SPARK_JAVA_OPT_1": "-Dspark.app.name=valuerank label join",
        "SPARK_DRIVER_URL": "spark://driver:7078",
        "SPARK_EXECUTOR_ID": "3",
        "SPARK_EXECUTOR_CORES": "2",
        "SPARK_APPLICATION_ID": "spark-app-1",
        "SPARK_EXECUTOR_POD_IP": "10.0.0.9",
        "SPARK_EXECUTOR_POD_NAME": "valuerank-label-join-exec-3",
    }

    result = subprocess.run(["sh", str(ENTRYPOINT), "executor"], capture_output=True, text=True, env=env, timeout=60)
    args = result.stdout.splitlines()

    assert result.returncode == 0, result.stderr
    assert args[:4] == ["-Xms2g", "-Xmx2g", "-Dspark.driver.port=7078", "-Dspark.app.name=valuerank label join"]
    assert args[4:6] == ["-cp", "/opt/spark/conf:/spark/jars/*"]
    assert args[6] == "org.apache.spark.scheduler.cluster.k8s.KubernetesExecutorBackend"
    assert args[args.index("--executor-id") + 1] == "3"
    assert args[args.index("--hostname") + 1] == "10.0.0.9"


def test_dockerfile_runs_as_manifest_user():
    users = re.findall(r"^USER (\S+)$", DOCKERFILE, flags=re.MULTILINE)

    assert users == [f"{k8s_render.RUN_AS}:{k8s_render.RUN_AS}"]


def test_dockerfile_places_sources_where_manifests_expect():
    assert f"WORKDIR {k8s_render.APP_ROOT}" in DOCKERFILE
    assert "COPY spark_jobs/ spark_jobs/" in DOCKERFILE
    assert "COPY launch/ launch/" in DOCKERFILE


def test_dockerfile_has_cpu_and_cuda_variants():
    assert "ARG DEVICE=cpu" in DOCKERFILE
    assert "requirements/gpu.txt" in DOCKERFILE
    assert "requirements/cpu.txt" in DOCKERFILE


def test_entrypoint_is_executable():
    assert os.access(ENTRYPOINT, os.X_OK)
