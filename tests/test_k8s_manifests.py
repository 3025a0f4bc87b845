"""The Kubernetes manifests: kustomize builds, schema validation, custom resource checks, security, rendering."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launch import k8s_render
from launch.k8s_checks import (
    check_all,
    check_no_inline_secrets,
    check_pod_security,
    check_pytorch_job,
    check_schema,
    check_spark_application,
    check_training_consistency,
    pod_specs,
)
from valuerank.config import ConfigError, load_config
from valuerank.output_paths import OutputPathError

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
KUSTOMIZATIONS = ["base", "overlays/cpu-smoke", "overlays/gpu"]

needs_kubectl = pytest.mark.skipif(
    shutil.which("kubectl") is None,
    reason="kubectl is not on PATH; install kubectl 1.27 or newer (it contains kustomize) to build the overlays",
)


def kustomize(folder: Path) -> list[dict]:
    result = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return [obj for obj in yaml.safe_load_all(result.stdout) if obj]


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [obj for obj in objects if obj["kind"] == kind]


def render(config: Path, out: Path) -> list[dict]:
    k8s_render.main(["--config", str(config), "--out", str(out)])
    objects = []
    for name in k8s_render.FILES:
        objects += [obj for obj in yaml.safe_load_all((out / name).read_text()) if obj]
    return objects


def sort_key(obj: dict) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


@pytest.fixture(scope="module", params=KUSTOMIZATIONS)
def built(request) -> tuple[str, list[dict]]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not on PATH; install kubectl 1.27 or newer (it contains kustomize) to build the overlays")
    return request.param, kustomize(K8S / request.param)


# --- every kustomization builds and passes every check ---------------------------------


def test_kustomization_builds_all_kinds(built):
    _, objects = built

    kinds = sorted(obj["kind"] for obj in objects)

    assert kinds == sorted(
        ["ConfigMap", "PyTorchJob", "Role", "RoleBinding", "Service", "ServiceAccount", "ServiceAccount",
         "SparkApplication", "SparkApplication"]
    )


def test_kustomization_passes_all_checks(built):
    _, objects = built

    assert check_all(objects) == []


def test_core_kinds_validate_against_schema(built):
    # check_all covers this too; the test names the schema check on its own.
    _, objects = built
    core = [obj for obj in objects if obj["kind"] not in ("PyTorchJob", "SparkApplication")]

    assert len(core) == 6
    assert [problem for obj in core for problem in check_schema(obj)] == []


def test_overlay_backend_and_gpus(built):
    name, objects = built
    job = by_kind(objects, "PyTorchJob")[0]
    container = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    config = by_kind(objects, "ConfigMap")[0]["data"]["pipeline.toml"]
    limits = container["resources"]["limits"]

    if name == "overlays/gpu":
        assert 'device = "cuda"' in config
        assert 'backend = "nccl"' in config
        assert limits["nvidia.com/gpu"] == job["spec"]["nprocPerNode"] == "8"
        assert container["image"].endswith("-cuda")
    else:
        assert 'device = "cpu"' in config
        assert "nvidia.com/gpu" not in limits
    if name == "overlays/cpu-smoke":
        assert 'backend = "gloo"' in config
        assert limits["cpu"] == "1"


@pytest.mark.parametrize("overlay", ["cpu-smoke", "gpu"])
@needs_kubectl
def test_overlay_equals_render_of_its_config(overlay, tmp_path):
    # Each overlay patches the base; rendering the overlay's own config must give the same objects.
    folder = K8S / "overlays" / overlay
    render(folder / "valuerank.toml", tmp_path / "rendered")

    from_overlay = sorted(kustomize(folder), key=sort_key)
    from_render = sorted(kustomize(tmp_path / "rendered"), key=sort_key)

    assert from_overlay == from_render


# --- rendering -------------------------------------------------------------------------


def test_base_is_current_render_of_its_config(tmp_path):
    render(K8S / "base" / "valuerank.toml", tmp_path)

    for name in [*k8s_render.FILES, "kustomization.yaml"]:
        assert (tmp_path / name).read_text() == (K8S / "base" / name).read_text(), (
            f"k8s/base/{name} is stale; run: valuerank k8s render --config k8s/base/valuerank.toml --out k8s/base"
        )


def test_render_is_deterministic(tmp_path):
    config = tmp_path / "pipeline.toml"
    shutil.copy(K8S / "overlays" / "gpu" / "valuerank.toml", config)

    render(config, tmp_path / "a")
    render(config, tmp_path / "b")

    for name in [*k8s_render.FILES, "kustomization.yaml"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_render_follows_config(tmp_path):
    config = tmp_path / "pipeline.toml"
    text = (K8S / "base" / "valuerank.toml").read_text()
    text = text.replace('name = "valuerank"\nimage', 'name = "ranker"\nimage').replace("nodes = 2\n", "nodes = 4\nmin_nodes = 2\n")
    config.write_text(text.replace('run_dir = "runs/k8s"', 'run_dir = "runs/2026-12-04"'))

    objects = render(config, tmp_path / "out")
    job = by_kind(objects, "PyTorchJob")[0]
    command = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["args"]
    label_join = next(obj for obj in objects if obj["metadata"]["name"] == "ranker-label-join")

    assert job["metadata"]["name"] == "ranker-train"
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 4
    assert job["spec"]["elasticPolicy"]["minReplicas"] == 2
    assert command[command.index("--nnodes") + 1] == "2:4"
    assert command[command.index("--data") + 1] == "/data/runs/2026-12-04/downsampled"
    assert label_join["spec"]["arguments"][-1] == "/data/runs/2026-12-04/labelled"
    assert check_all(objects) == []


def test_configmap_carries_config_file(tmp_path):
    objects = render(K8S / "base" / "valuerank.toml", tmp_path)

    config_map = by_kind(objects, "ConfigMap")[0]

    assert config_map["data"]["pipeline.toml"] == (K8S / "base" / "valuerank.toml").read_text()


def test_render_cli_writes_files(tmp_path):
    command = [sys.executable, "-m", "valuerank.cli", "k8s", "render", "--config", str(K8S / "base" / "valuerank.toml"), "--out", str(tmp_path)]

    result = subprocess.run(command, capture_output=True, text=True, timeout=600)

    assert result.returncode == 0, result.stderr
    assert (tmp_path / "train.yaml").is_file()
    assert (tmp_path / "kustomization.yaml").is_file()


def test_render_cli_reports_bad_k8s_value(tmp_path):
    config = tmp_path / "pipeline.toml"
    config.write_text((K8S / "base" / "valuerank.toml").read_text().replace('memory = "32Gi"', 'memory = "32GB"'))
    command = [sys.executable, "-m", "valuerank.cli", "k8s", "render", "--config", str(config), "--out", str(tmp_path / "out")]

    result = subprocess.run(command, capture_output=True, text=True, timeout=600)

    assert result.returncode == 2
    assert "k8s.memory: '32GB' is not a Kubernetes quantity" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("k8s.name=Ranker", "k8s.name"),
        ("k8s.min_nodes=3", "k8s.min_nodes"),
        ("k8s.run_dir='../x'", "k8s.run_dir"),
        ("k8s.data_mount='data'", "k8s.data_mount"),
        ("k8s.rdzv_timeout='soon'", "k8s.rdzv_timeout"),
        ("k8s.spark_executor_memory='4Gi'", "k8s.spark_executor_memory"),
        ("k8s.processes_per_node=0", "k8s.processes_per_node"),
    ],
)
def test_k8s_config_rejects_invalid(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(K8S / "base" / "valuerank.toml", [override])


# --- the checks catch what they are for ------------------------------------------------


@pytest.fixture
def base_objects(tmp_path) -> list[dict]:
    return render(K8S / "base" / "valuerank.toml", tmp_path)


def _job(objects):
    return copy.deepcopy(by_kind(objects, "PyTorchJob")[0])


def _container(job):
    return job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]


def test_schema_rejects_unknown_service_field(base_objects):
    service = copy.deepcopy(by_kind(base_objects, "Service")[0])
    service["spec"]["clusterIp"] = "None"

    assert any("clusterIp" in problem for problem in check_schema(service))


def test_pod_template_validated_as_core_type(base_objects):
    job = _job(base_objects)
    _container(job)["resources"]["limits"]["cpu"] = ["8"]

    assert any("template" in problem for problem in check_pytorch_job(job))


def test_pytorch_job_needs_container_named_pytorch(base_objects):
    job = _job(base_objects)
    _container(job)["name"] = "trainer"

    assert any("container named 'pytorch'" in problem for problem in check_pytorch_job(job))


def test_pytorch_job_rejects_unknown_replica_type(base_objects):
    job = _job(base_objects)
    job["spec"]["pytorchReplicaSpecs"]["Chief"] = job["spec"]["pytorchReplicaSpecs"]["Worker"]

    assert any("Master or Worker" in problem for problem in check_pytorch_job(job))


def test_pytorch_job_rejects_inverted_elastic_range(base_objects):
    job = _job(base_objects)
    job["spec"]["elasticPolicy"]["minReplicas"] = 3

    assert any("minReplicas <= maxReplicas" in problem for problem in check_pytorch_job(job))


def test_spark_application_needs_driver_memory(base_objects):
    app = copy.deepcopy(by_kind(base_objects, "SparkApplication")[0])
    del app["spec"]["driver"]["memory"]

    assert any("spec.driver: missing memory" in problem for problem in check_spark_application(app))


def test_spark_pod_fields_validated_as_core_types(base_objects):
    app = copy.deepcopy(by_kind(base_objects, "SparkApplication")[0])
    app["spec"]["executor"]["volumeMounts"][0]["mountpath"] = "/x"

    assert any("executor (as a Pod)" in problem for problem in check_spark_application(app))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["securityContext"].pop("allowPrivilegeEscalation"), "allowPrivilegeEscalation"),
        (lambda c: c["securityContext"].update(readOnlyRootFilesystem=False), "readOnlyRootFilesystem"),
        (lambda c: c["securityContext"].update(capabilities={"add": ["NET_ADMIN"], "drop": ["ALL"]}), "adds capabilities"),
        (lambda c: c["securityContext"].update(runAsUser=0), "user 0"),
        (lambda c: c["resources"].pop("limits"), "resources.limits"),
        (lambda c: c["resources"]["requests"].pop("memory"), "memory in resources.requests"),
    ],
)
def test_security_check_catches(base_objects, change, message):
    job = _job(base_objects)
    change(_container(job))

    (where, pod), = pod_specs(job)

    assert any(message in problem for problem in check_pod_security(where, pod))


def test_security_check_needs_non_root(base_objects):
    job = _job(base_objects)
    _container(job)["securityContext"].pop("runAsNonRoot")
    job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["securityContext"].pop("runAsNonRoot")

    (where, pod), = pod_specs(job)

    assert any("runAsNonRoot" in problem for problem in check_pod_security(where, pod))


def test_spark_pods_have_requests_and_limits(base_objects):
    app = by_kind(base_objects, "SparkApplication")[0]

    for where, pod in pod_specs(app):
        resources = pod["containers"][0]["resources"]
        assert set(resources["requests"]) == {"cpu", "memory"}, where
        assert set(resources["limits"]) == {"cpu", "memory"}, where


def test_inline_secret_env_found(base_objects):
    job = _job(base_objects)
    _container(job)["env"].append({"name": "AWS_SECRET_ACCESS_KEY", "value": "abc"})

    assert any("AWS_SECRET_ACCESS_KEY has an inline value" in problem for problem in check_no_inline_secrets([job]))


def test_secret_reference_allowed(base_objects):
    job = _job(base_objects)
    _container(job)["env"].append({"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}})

    assert check_no_inline_secrets([job]) == []


def test_secret_object_with_data_found():
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "stringData": {"token": "x"}}

    assert any("inline data" in problem for problem in check_no_inline_secrets([secret]))


def test_private_key_text_found(base_objects):
    config_map = copy.deepcopy(by_kind(base_objects, "ConfigMap")[0])
    config_map["data"]["key.pem"] = "-----BEGIN RSA PRIVATE KEY-----\nabc\n"

    assert any("looks like a key" in problem for problem in check_no_inline_secrets([config_map]))


def test_gpu_count_must_match_processes(base_objects):
    job = _job(base_objects)
    _container(job)["resources"]["limits"]["nvidia.com/gpu"] = "4"
    service = by_kind(base_objects, "Service")[0]

    assert any("one process per GPU" in problem for problem in check_training_consistency([job, service]))


def test_rendezvous_service_must_select_replica_zero(base_objects):
    job = _job(base_objects)
    service = copy.deepcopy(by_kind(base_objects, "Service")[0])
    service["spec"]["selector"]["training.kubeflow.org/replica-index"] = "1"

    assert any("replica 0" in problem for problem in check_training_consistency([job, service]))


def test_rendezvous_endpoint_needs_service(base_objects):
    job = _job(base_objects)

    assert any("no Service named" in problem for problem in check_training_consistency([job]))


def test_render_keeps_foreign_file(tmp_path):
    (tmp_path / "train.yaml").write_text("kind: Mine\n")

    with pytest.raises(OutputPathError, match="was not written by valuerank k8s render"):
        k8s_render.write(load_config(K8S / "base" / "valuerank.toml"), "", tmp_path)
    assert (tmp_path / "train.yaml").read_text() == "kind: Mine\n"
