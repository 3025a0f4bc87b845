"""Write the Kubernetes manifests of the pipeline from its config: ``valuerank k8s render``.

    valuerank k8s render --config k8s/base/valuerank.toml --out k8s/base

The ``[k8s]`` section of the config (``valuerank.config.K8sConfig``) sets the image, the
training nodes and ranks per node, the resources and the data paths. ``training.device``
chooses CPU or GPU pods. The output folder is a kustomize base:

- ``kustomization.yaml`` lists the files below.
- ``shared.yaml``: service accounts, the Spark driver's Role and RoleBinding, and the
  ConfigMap with the pipeline config itself.
- ``label-join.yaml``, ``downsample.yaml``: SparkApplications for the Spark operator.
- ``train.yaml``: the PyTorchJob (elastic, c10d) and the headless rendezvous service.

Apply the stages in order, because each one reads the previous one's output (docs/clusters.md)::

    kubectl apply -k OUT -l 'app.kubernetes.io/component in (shared,label-join)'

The same config file gives the same bytes: keys keep a fixed order, and nothing depends
on the time, the machine or the environment.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path, PurePosixPath

import yaml

from valuerank.config import K8sConfig, PipelineConfig, load_config
from valuerank.output_paths import OutputPathError

CONFIG_MOUNT = "/etc/valuerank"
"""Folder where every pod mounts the ConfigMap with the pipeline config."""

CONFIG_FILE = "pipeline.toml"
"""Key of the pipeline config in the ConfigMap, and its file name under ``CONFIG_MOUNT``."""

APP_ROOT = "/opt/valuerank"
"""Folder of the repository inside the image (docker/Dockerfile copies it there)."""

RUN_AS = 10001
"""User and group id of every container; docker/Dockerfile creates this user."""

OPERATOR_LABELS = {
    "job": "training.kubeflow.org/job-name",
    "type": "training.kubeflow.org/replica-type",
    "index": "training.kubeflow.org/replica-index",
}
"""Labels that the Kubeflow training operator puts on the pods of a PyTorchJob."""

FILES = ("shared.yaml", "label-join.yaml", "downsample.yaml", "train.yaml")


def labels(k8s: K8sConfig, component: str) -> dict:
    """Return the recommended app.kubernetes.io labels of one object."""
    return {
        "app.kubernetes.io/name": "valuerank",
        "app.kubernetes.io/instance": k8s.name,
        "app.kubernetes.io/component": component,
    }


def metadata(k8s: K8sConfig, name: str, component: str) -> dict:
    return {"name": name, "labels": labels(k8s, component)}


def data_path(k8s: K8sConfig, relative: str) -> str:
    """Return ``relative`` under the data mount, as the pods see it."""
    return str(PurePosixPath(k8s.data_mount) / relative)


def run_path(k8s: K8sConfig, stage: str) -> str:
    return data_path(k8s, f"{k8s.run_dir}/{stage}")


# --- pod pieces shared by Spark and training ------------------------------------


def pod_security_context() -> dict:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS,
        "runAsGroup": RUN_AS,
        "fsGroup": RUN_AS,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict:
    """Non-root, no privilege escalation, no capabilities, read-only root filesystem.

    Writable places are volumes: /tmp (emptyDir), the data claim and, for training, /dev/shm.
    """
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def common_env() -> list[dict]:
    """Point every tool that writes a cache or a home folder at /tmp, since the root filesystem is read-only."""
    return [
        {"name": "HOME", "value": "/tmp"},
        {"name": "TMPDIR", "value": "/tmp"},
        {"name": "MPLCONFIGDIR", "value": "/tmp/matplotlib"},
        {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]


def volumes(k8s: K8sConfig) -> list[dict]:
    return [
        {"name": "data", "persistentVolumeClaim": {"claimName": k8s.data_claim}},
        {"name": "config", "configMap": {"name": f"{k8s.name}-config"}},
        {"name": "tmp", "emptyDir": {}},
    ]


def volume_mounts(k8s: K8sConfig) -> list[dict]:
    return [
        {"name": "data", "mountPath": k8s.data_mount},
        {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]


# --- shared objects ------------------------------------------------------------


def shared_objects(k8s: K8sConfig, config_text: str) -> list[dict]:
    """Service accounts, the Spark driver's permissions and the pipeline config."""
    spark_account = f"{k8s.name}-spark"
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": metadata(k8s, f"{k8s.name}-train", "shared"),
            # Training never calls the Kubernetes API, so its pods get no token.
            "automountServiceAccountToken": False,
        },
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": metadata(k8s, spark_account, "shared"),
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": metadata(k8s, spark_account, "shared"),
            # The Spark driver creates and deletes its executor pods and their service and config.
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["pods", "services", "configmaps", "persistentvolumeclaims"],
                    "verbs": ["create", "get", "list", "watch", "delete", "deletecollection", "patch"],
                }
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": metadata(k8s, spark_account, "shared"),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": spark_account},
            "subjects": [{"kind": "ServiceAccount", "name": spark_account}],
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": metadata(k8s, f"{k8s.name}-config", "shared"),
            "data": {CONFIG_FILE: config_text},
        },
    ]


# --- Spark stages --------------------------------------------------------------


def spark_application(k8s: K8sConfig, component: str, job_file: str, arguments: list[str]) -> dict:
    """A SparkApplication (Spark operator, sparkoperator.k8s.io/v1beta2) that runs one job module.

    The driver runs the module with the image's Python, so ``build_session`` leaves the
    master that the operator set. Driver and executors mount the data claim at the same
    path, because the jobs read Parquet footers and write manifests with the local file API.
    """
    pod = {
        "labels": labels(k8s, component),
        "env": common_env(),
        "volumeMounts": volume_mounts(k8s),
        "podSecurityContext": pod_security_context(),
        "securityContext": container_security_context(),
    }
    return {
        "apiVersion": "sparkoperator.k8s.io/v1beta2",
        "kind": "SparkApplication",
        "metadata": metadata(k8s, f"{k8s.name}-{component}", component),
        "spec": {
            "type": "Python",
            "pythonVersion": "3",
            "mode": "cluster",
            "image": k8s.image,
            "imagePullPolicy": k8s.image_pull_policy,
            "mainApplicationFile": f"local://{APP_ROOT}/spark_jobs/{job_file}",
            "arguments": arguments,
            "sparkVersion": k8s.spark_version,
            "sparkConf": {
                "spark.sql.session.timeZone": "UTC",
                "spark.kubernetes.executor.deleteOnTermination": "true",
            },
            "restartPolicy": {
                "type": "OnFailure",
                "onFailureRetries": 2,
                "onFailureRetryInterval": 30,
                "onSubmissionFailureRetries": 3,
                "onSubmissionFailureRetryInterval": 30,
            },
            "volumes": volumes(k8s),
            "driver": {
                "cores": k8s.spark_driver_cores,
                "coreLimit": str(k8s.spark_driver_cores),
                "memory": k8s.spark_driver_memory,
                "serviceAccount": f"{k8s.name}-spark",
                **pod,
            },
            "executor": {
                "instances": k8s.spark_executors,
                "cores": k8s.spark_executor_cores,
                "coreLimit": str(k8s.spark_executor_cores),
                "memory": k8s.spark_executor_memory,
                **pod,
            },
        },
    }


def label_join_objects(k8s: K8sConfig) -> list[dict]:
    config = f"{CONFIG_MOUNT}/{CONFIG_FILE}"
    arguments = [
        "--config", config,
        "--impressions", data_path(k8s, k8s.impressions),
        "--events", data_path(k8s, k8s.events),
        "--out", run_path(k8s, "labelled"),
    ]
    return [spark_application(k8s, "label-join", "label_join.py", arguments)]


def downsample_objects(k8s: K8sConfig) -> list[dict]:
    config = f"{CONFIG_MOUNT}/{CONFIG_FILE}"
    arguments = ["--config", config, "--labelled", run_path(k8s, "labelled"), "--out", run_path(k8s, "downsampled")]
    return [spark_application(k8s, "downsample", "downsample.py", arguments)]


# --- training ------------------------------------------------------------------


def nnodes(k8s: K8sConfig) -> str:
    """torchrun's ``--nnodes``: a fixed count, or MIN:MAX when the job may shrink."""
    low = k8s.min_nodes or k8s.nodes
    return str(k8s.nodes) if low == k8s.nodes else f"{low}:{k8s.nodes}"


def train_args(k8s: K8sConfig) -> list[str]:
    """The training container's arguments: ``python -m launch node`` with every torchrun setting explicit.

    They are ``args``, not ``command``, so the image's entry point (tini, which reaps the
    ranks that torchrun leaves behind) still starts them. The node index comes from the operator's replica-index label (VALUERANK_NODE_INDEX), so
    node 0 hosts the rendezvous store even before its service name resolves.
    """
    return [
        "python", "-m", "launch", "node",
        "--nnodes", nnodes(k8s),
        "--nproc-per-node", str(k8s.processes_per_node),
        "--rdzv-endpoint", f"{k8s.name}-train-rdzv:{k8s.rdzv_port}",
        "--rdzv-id", f"{k8s.name}-train",
        "--rdzv-timeout", str(k8s.rdzv_timeout_seconds),
        "--max-restarts", str(k8s.max_restarts),
        "--",
        "--config", f"{CONFIG_MOUNT}/{CONFIG_FILE}",
        "--data", run_path(k8s, "downsampled"),
        "--out", run_path(k8s, "model"),
    ]


def train_resources(cfg: PipelineConfig) -> dict:
    """Requests equal to limits (Guaranteed QoS); on cuda one GPU per rank."""
    k8s = cfg.k8s
    amounts = {"cpu": k8s.cpu, "memory": k8s.memory}
    if cfg.training.device == "cuda":
        amounts["nvidia.com/gpu"] = str(k8s.processes_per_node)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def rendezvous_service(k8s: K8sConfig) -> dict:
    """Headless service whose DNS name points at node 0 (the pod with replica index 0).

    ``publishNotReadyAddresses`` publishes the record as soon as the pod has an address, so
    other nodes need not wait for a readiness probe that a training pod does not have.
    """
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(k8s, f"{k8s.name}-train-rdzv", "train"),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {
                OPERATOR_LABELS["job"]: f"{k8s.name}-train",
                OPERATOR_LABELS["type"]: "worker",
                OPERATOR_LABELS["index"]: "0",
            },
            "ports": [{"name": "c10d", "port": k8s.rdzv_port, "targetPort": k8s.rdzv_port, "protocol": "TCP"}],
        },
    }


def pytorch_job(cfg: PipelineConfig) -> dict:
    """A Kubeflow PyTorchJob (kubeflow.org/v1) with an elastic policy and only Worker replicas."""
    k8s = cfg.k8s
    timeout = str(k8s.rdzv_timeout_seconds)
    env = [
        *common_env(),
        {
            "name": "VALUERANK_NODE_INDEX",
            "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{OPERATOR_LABELS['index']}']"}},
        },
        # The CPU limit rounded up to whole cores; threads per rank = cores / ranks.
        {
            "name": "VALUERANK_CORES",
            "valueFrom": {"resourceFieldRef": {"containerName": "pytorch", "resource": "limits.cpu", "divisor": "1"}},
        },
    ]
    pod_volumes = [*volumes(k8s), {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": k8s.shm_size}}]
    mounts = [*volume_mounts(k8s), {"name": "dshm", "mountPath": "/dev/shm"}]
    pod_spec = {
        "serviceAccountName": f"{k8s.name}-train",
        "automountServiceAccountToken": False,
        "securityContext": pod_security_context(),
        "containers": [
            {
                # The operator requires the container name "pytorch".
                "name": "pytorch",
                "image": k8s.image,
                "imagePullPolicy": k8s.image_pull_policy,
                "args": train_args(k8s),
                "env": env,
                "ports": [{"name": "c10d", "containerPort": k8s.rdzv_port, "protocol": "TCP"}],
                "resources": train_resources(cfg),
                "securityContext": container_security_context(),
                "volumeMounts": mounts,
            }
        ],
        "volumes": pod_volumes,
    }
    if cfg.training.device == "cuda":
        pod_spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]

    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": metadata(k8s, f"{k8s.name}-train", "train"),
        "spec": {
            "nprocPerNode": str(k8s.processes_per_node),
            "elasticPolicy": {
                "rdzvBackend": "c10d",
                "rdzvHost": f"{k8s.name}-train-rdzv",
                "rdzvPort": k8s.rdzv_port,
                "rdzvId": f"{k8s.name}-train",
                "rdzvConf": [
                    {"key": "join_timeout", "value": timeout},
                    {"key": "read_timeout", "value": timeout},
                ],
                "minReplicas": k8s.min_nodes or k8s.nodes,
                "maxReplicas": k8s.nodes,
                "maxRestarts": k8s.max_restarts,
            },
            "runPolicy": {"cleanPodPolicy": "Running", "backoffLimit": 3, "ttlSecondsAfterFinished": 86400},
            "pytorchReplicaSpecs": {
                "Worker": {
                    "replicas": k8s.nodes,
                    # A pod whose node lost the rendezvous restarts in place instead of failing the job.
                    "restartPolicy": "OnFailure",
                    "template": {"metadata": {"labels": labels(k8s, "train")}, "spec": pod_spec},
                }
            },
        },
    }


def train_objects(cfg: PipelineConfig) -> list[dict]:
    return [rendezvous_service(cfg.k8s), pytorch_job(cfg)]


# --- output --------------------------------------------------------------------


def render(cfg: PipelineConfig, config_text: str) -> dict[str, list[dict]]:
    """Return the objects of each output file, by file name."""
    return {
        "shared.yaml": shared_objects(cfg.k8s, config_text),
        "label-join.yaml": label_join_objects(cfg.k8s),
        "downsample.yaml": downsample_objects(cfg.k8s),
        "train.yaml": train_objects(cfg),
    }


class _Dumper(yaml.SafeDumper):
    """YAML dumper that writes multi-line strings (the pipeline config) as literal blocks."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def dump(objects: list[dict]) -> str:
    """Serialise objects as a YAML stream, keys in insertion order, long strings unwrapped."""
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=10_000)


def kustomization() -> dict:
    return {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": list(FILES)}


def write(cfg: PipelineConfig, config_text: str, out: Path) -> list[Path]:
    """Write the manifests and ``kustomization.yaml`` into ``out``; return the paths written.

    Only these files are replaced, so other files in ``out`` (an overlay's own config) stay.
    """
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"--out {out} is a file; pass a folder for the manifests")
    header = "# Written by `valuerank k8s render` from a pipeline config; edit the config and render again.\n"
    rendered = render(cfg, config_text)
    # Replace only files that an earlier render wrote, so a hand-written file is never lost.
    for name in [*rendered, "kustomization.yaml"]:
        path = out / name
        if path.exists() and not path.read_text(errors="replace").startswith(header):
            raise OutputPathError(
                f"{path} exists and was not written by valuerank k8s render; move it or pick another --out"
            )
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, objects in rendered.items():
        path = out / name
        path.write_text(header + dump(objects))
        written.append(path)
    path = out / "kustomization.yaml"
    path.write_text(header + dump([kustomization()]))
    written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    """``valuerank k8s render --config C --out DIR``."""
    parser = argparse.ArgumentParser(
        prog="valuerank k8s render",
        description="Write the Kubernetes manifests (a kustomize base) of the pipeline from its config.",
    )
    parser.add_argument("--config", required=True, type=Path, help="pipeline config (TOML) with a [k8s] section")
    parser.add_argument("--out", required=True, type=Path, help="folder for kustomization.yaml and the manifests")
    args = parser.parse_args(argv)

    # The ConfigMap carries the file as written, so the pods read exactly what was rendered from.
    cfg = load_config(args.config)
    written = write(cfg, args.config.read_text(), args.out)
    for path in written:
        print(path)
    return 0


def cli(argv: list[str]) -> int:
    """Dispatch ``valuerank k8s SUBCOMMAND``; only ``render`` exists."""
    if argv[:1] != ["render"]:
        print("usage: valuerank k8s render --config CONFIG --out DIR", file=sys.stderr)
        return 2
    return main(argv[1:])
