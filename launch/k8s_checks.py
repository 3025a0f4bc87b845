"""Offline checks of Kubernetes manifests: schemas, custom resources, pod security and secrets.

    from launch.k8s_checks import check_all
    problems = check_all(yaml.safe_load_all(text))   # [] when everything passes

Core kinds (Service, ConfigMap, ServiceAccount, Role, RoleBinding, ...) are validated
against the Kubernetes OpenAPI schema that the kubernetes-validate package ships, in strict
mode, so an unknown field is an error too.

The two custom resources have no schema there. The checks here are structural and
documented in docs/clusters.md:

- PyTorchJob (kubeflow.org/v1): the fields and rules that the training operator's API
  types and validation define. Name is a DNS-1035 label, the replica types are Master and
  Worker only, every replica has a container named ``pytorch`` with an image, the restart
  policy is one of the operator's, and the elastic policy uses c10d with
  1 <= minReplicas <= maxReplicas. The pod template itself is validated as a core
  ``PodTemplate``.
- SparkApplication (sparkoperator.k8s.io/v1beta2): the fields the Spark operator requires
  (type, mode, image, mainApplicationFile, sparkVersion, driver, executor) with their
  types. The driver and executor pod fields that have core types (env, volume mounts,
  security contexts, volumes) are validated as a core ``Pod``.

Cross-field checks tie the training pieces together. The container's ``--nproc-per-node``
equals ``nprocPerNode`` and, on GPU, the ``nvidia.com/gpu`` request. The rendezvous
endpoint names the headless service, and its selector picks replica 0 of this job.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import kubernetes_validate

KUBERNETES_VERSION = "1.32"
"""Kubernetes version whose schema the manifests are validated against (the kubectl client here)."""

PYTORCH_RESTART_POLICIES = ("Always", "OnFailure", "Never", "ExitCode")
CLEAN_POD_POLICIES = ("All", "Running", "None")
SPARK_TYPES = ("Java", "Scala", "Python", "R")
SPARK_RESTART_TYPES = ("Never", "Always", "OnFailure")

_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_SECRET_NAME = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN|API_?KEY|ACCESS_?KEY|CREDENTIAL|PRIVATE_?KEY)", re.IGNORECASE)
_SECRET_TEXT = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----|\bAKIA[0-9A-Z]{16}\b|\bgh[pousr]_[A-Za-z0-9]{30,}\b")


def check_all(objects: Iterable[dict], kubernetes_version: str = KUBERNETES_VERSION) -> list[str]:
    """Run every check on ``objects``; return one message per problem, empty when all pass."""
    objects = [obj for obj in objects if obj]
    problems = []
    for obj in objects:
        problems += check_schema(obj, kubernetes_version)
        for where, pod in pod_specs(obj):
            problems += check_pod_security(where, pod)
    problems += check_no_inline_secrets(objects)
    problems += check_training_consistency(objects)
    return problems


def describe(obj: dict) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


# --- schemas -------------------------------------------------------------------


def validate_core(obj: dict, where: str, kubernetes_version: str) -> list[str]:
    """Validate one core object strictly against the Kubernetes schema; return the problems."""
    try:
        kubernetes_validate.validate(obj, kubernetes_version, strict=True)
    except kubernetes_validate.ValidationError as error:
        path = ".".join(str(part) for part in error.path)
        return [f"{where}: {path or '(top)'}: {error.message}"]
    except kubernetes_validate.SchemaNotFoundError as error:
        return [f"{where}: no Kubernetes {kubernetes_version} schema for {error.api_version} {error.kind}"]
    return []


def check_schema(obj: dict, kubernetes_version: str = KUBERNETES_VERSION) -> list[str]:
    """Validate a core object against its schema, or a custom resource with its structural check."""
    if obj.get("kind") == "PyTorchJob":
        return check_pytorch_job(obj, kubernetes_version)
    if obj.get("kind") == "SparkApplication":
        return check_spark_application(obj, kubernetes_version)
    return validate_core(obj, describe(obj), kubernetes_version)


def _require(problems: list[str], where: str, table: dict, key: str, kind: type | tuple[type, ...]) -> object:
    """Append a problem unless ``table[key]`` exists with type ``kind``; return the value."""
    value = table.get(key) if isinstance(table, dict) else None
    if value is None:
        problems.append(f"{where}: missing {key}")
    elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        problems.append(f"{where}: {key} has type {type(value).__name__}, expected {kind}")
    return value


def _check_metadata(obj: dict, expected_api: str, problems: list[str]) -> str:
    where = describe(obj)
    if obj.get("apiVersion") != expected_api:
        problems.append(f"{where}: apiVersion {obj.get('apiVersion')!r}, expected {expected_api!r}")
    name = obj.get("metadata", {}).get("name", "")
    if not _DNS_1035.match(name) or len(name) > 63:
        problems.append(f"{where}: name {name!r} is not a DNS-1035 label")
    return where


def check_pytorch_job(obj: dict, kubernetes_version: str = KUBERNETES_VERSION) -> list[str]:
    """Structural check of a Kubeflow PyTorchJob; the pod templates are validated as core PodTemplates."""
    problems: list[str] = []
    where = _check_metadata(obj, "kubeflow.org/v1", problems)
    allowed = {"apiVersion", "kind", "metadata", "spec"}
    problems += [f"{where}: unknown top-level field {key}" for key in sorted(set(obj) - allowed)]
    spec = _require(problems, where, obj, "spec", dict) or {}
    known = {"runPolicy", "elasticPolicy", "pytorchReplicaSpecs", "nprocPerNode"}
    problems += [f"{where}: unknown field spec.{key}" for key in sorted(set(spec) - known)]

    nproc = spec.get("nprocPerNode")
    if nproc is not None and not (isinstance(nproc, str) and (nproc in ("auto", "cpu", "gpu") or nproc.isdigit())):
        problems.append(f"{where}: spec.nprocPerNode {nproc!r} must be a string: auto, cpu, gpu or a number")

    run_policy = spec.get("runPolicy", {})
    known = {"cleanPodPolicy", "ttlSecondsAfterFinished", "activeDeadlineSeconds", "backoffLimit", "schedulingPolicy", "suspend", "managedBy"}
    problems += [f"{where}: unknown field spec.runPolicy.{key}" for key in sorted(set(run_policy) - known)]
    if run_policy.get("cleanPodPolicy", "None") not in CLEAN_POD_POLICIES:
        problems.append(f"{where}: spec.runPolicy.cleanPodPolicy must be one of {CLEAN_POD_POLICIES}")
    for key in ("ttlSecondsAfterFinished", "activeDeadlineSeconds", "backoffLimit"):
        if key in run_policy and (not isinstance(run_policy[key], int) or run_policy[key] < 0):
            problems.append(f"{where}: spec.runPolicy.{key} must be a non-negative integer")

    problems += _check_elastic_policy(where, spec.get("elasticPolicy"))

    replicas = _require(problems, where, spec, "pytorchReplicaSpecs", dict) or {}
    for replica_type, replica in replicas.items():
        at = f"{where}: spec.pytorchReplicaSpecs.{replica_type}"
        if replica_type not in ("Master", "Worker"):
            problems.append(f"{at}: replica type must be Master or Worker")
            continue
        known = {"replicas", "template", "restartPolicy"}
        problems += [f"{at}: unknown field {key}" for key in sorted(set(replica) - known)]
        count = _require(problems, at, replica, "replicas", int)
        if replica_type == "Master" and count not in (None, 1):
            problems.append(f"{at}: there must be exactly 1 Master replica")
        if replica.get("restartPolicy", "OnFailure") not in PYTORCH_RESTART_POLICIES:
            problems.append(f"{at}: restartPolicy must be one of {PYTORCH_RESTART_POLICIES}")
        template = _require(problems, at, replica, "template", dict) or {}
        containers = template.get("spec", {}).get("containers", [])
        if not any(container.get("name") == "pytorch" for container in containers):
            problems.append(f"{at}: the operator needs a container named 'pytorch'")
        problems += [f"{at}: container {c.get('name')} has no image" for c in containers if not c.get("image")]
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template}
        problems += validate_core(pod_template, f"{at}.template", kubernetes_version)
    return problems


def _check_elastic_policy(where: str, policy: dict | None) -> list[str]:
    if policy is None:
        return []
    problems = []
    known = {"minReplicas", "maxReplicas", "rdzvBackend", "rdzvPort", "rdzvHost", "rdzvId", "rdzvConf",
             "standalone", "nProcPerNode", "maxRestarts", "metrics"}
    problems += [f"{where}: unknown field spec.elasticPolicy.{key}" for key in sorted(set(policy) - known)]
    if policy.get("rdzvBackend", "c10d") != "c10d":
        problems.append(f"{where}: spec.elasticPolicy.rdzvBackend must be c10d (etcd needs a separate etcd service)")
    low, high = policy.get("minReplicas"), policy.get("maxReplicas")
    if not (isinstance(low, int) and isinstance(high, int) and 1 <= low <= high):
        problems.append(f"{where}: spec.elasticPolicy needs integers 1 <= minReplicas <= maxReplicas, got {low}, {high}")
    port = policy.get("rdzvPort")
    if port is not None and not (isinstance(port, int) and 0 < port < 65536):
        problems.append(f"{where}: spec.elasticPolicy.rdzvPort {port!r} is not a port number")
    for entry in policy.get("rdzvConf", []):
        if set(entry) != {"key", "value"} or not all(isinstance(v, str) for v in entry.values()):
            problems.append(f"{where}: spec.elasticPolicy.rdzvConf entries need string key and value, got {entry}")
    return problems


def check_spark_application(obj: dict, kubernetes_version: str = KUBERNETES_VERSION) -> list[str]:
    """Structural check of a SparkApplication; its pod fields with core types are validated as a Pod."""
    problems: list[str] = []
    where = _check_metadata(obj, "sparkoperator.k8s.io/v1beta2", problems)
    spec = _require(problems, where, obj, "spec", dict) or {}
    if spec.get("type") not in SPARK_TYPES:
        problems.append(f"{where}: spec.type must be one of {SPARK_TYPES}")
    if spec.get("mode", "cluster") not in ("cluster", "client"):
        problems.append(f"{where}: spec.mode must be cluster or client")
    for key in ("image", "mainApplicationFile", "sparkVersion"):
        _require(problems, f"{where}: spec", spec, key, str)
    if not isinstance(spec.get("arguments", []), list) or not all(isinstance(a, str) for a in spec.get("arguments", [])):
        problems.append(f"{where}: spec.arguments must be a list of strings")
    if not all(isinstance(v, str) for v in spec.get("sparkConf", {}).values()):
        problems.append(f"{where}: spec.sparkConf values must be strings")
    restart = spec.get("restartPolicy", {})
    if restart.get("type", "Never") not in SPARK_RESTART_TYPES:
        problems.append(f"{where}: spec.restartPolicy.type must be one of {SPARK_RESTART_TYPES}")

    for role in ("driver", "executor"):
        pod = _require(problems, f"{where}: spec", spec, role, dict) or {}
        at = f"{where}: spec.{role}"
        _require(problems, at, pod, "cores", int)
        _require(problems, at, pod, "coreLimit", str)
        _require(problems, at, pod, "memory", str)
        if role == "executor":
            _require(problems, at, pod, "instances", int)
        container = {"name": role, "image": spec.get("image", "missing")}
        for key in ("env", "volumeMounts", "securityContext"):
            if key in pod:
                container[key] = pod[key]
        pod_spec = {"containers": [container], "volumes": spec.get("volumes", [])}
        if "podSecurityContext" in pod:
            pod_spec["securityContext"] = pod["podSecurityContext"]
        as_pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"}, "spec": pod_spec}
        problems += validate_core(as_pod, f"{at} (as a Pod)", kubernetes_version)
    return problems


# --- security --------------------------------------------------------------------


def pod_specs(obj: dict) -> list[tuple[str, dict]]:
    """Return (where, pod description) for every pod that ``obj`` starts.

    A pod description has ``securityContext`` (pod level), ``containers`` (each with its
    own ``securityContext`` and ``resources``) and ``volumes``. For Spark pods, whose
    resources are ``cores``, ``coreLimit`` and ``memory``, the resources are translated
    into the requests and limits that Spark sets on the pod.
    """
    kind = obj.get("kind")
    if kind == "PyTorchJob":
        return [
            (f"{describe(obj)} {name}", replica.get("template", {}).get("spec", {}))
            for name, replica in obj.get("spec", {}).get("pytorchReplicaSpecs", {}).items()
        ]
    if kind == "SparkApplication":
        spec = obj.get("spec", {})
        pods = []
        for role in ("driver", "executor"):
            pod = spec.get(role, {})
            resources = {}
            if "cores" in pod and "memory" in pod:
                resources["requests"] = {"cpu": str(pod["cores"]), "memory": pod["memory"]}
            if "coreLimit" in pod and "memory" in pod:
                resources["limits"] = {"cpu": pod["coreLimit"], "memory": pod["memory"]}
            container = {"name": role, "securityContext": pod.get("securityContext", {}), "resources": resources}
            pods.append((f"{describe(obj)} {role}", {
                "securityContext": pod.get("podSecurityContext", {}),
                "containers": [container],
                "volumes": spec.get("volumes", []),
            }))
        return pods
    if kind in ("Pod",):
        return [(describe(obj), obj.get("spec", {}))]
    if kind in ("Job", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"):
        return [(describe(obj), obj.get("spec", {}).get("template", {}).get("spec", {}))]
    return []


def check_pod_security(where: str, pod: dict) -> list[str]:
    """Non-root, no privilege escalation, no added capabilities, read-only root filesystem, requests and limits."""
    problems = []
    pod_context = pod.get("securityContext", {})
    if pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC"):
        problems.append(f"{where}: uses a host namespace")
    problems += [f"{where}: volume {v.get('name')} is a hostPath" for v in pod.get("volumes", []) if "hostPath" in v]

    for container in [*pod.get("initContainers", []), *pod.get("containers", [])]:
        at = f"{where} container {container.get('name')}"
        context = container.get("securityContext", {})
        if not (context.get("runAsNonRoot") or pod_context.get("runAsNonRoot")):
            problems.append(f"{at}: runAsNonRoot is not true")
        if context.get("runAsUser", pod_context.get("runAsUser")) == 0:
            problems.append(f"{at}: runs as user 0")
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{at}: allowPrivilegeEscalation is not false")
        if context.get("privileged"):
            problems.append(f"{at}: privileged")
        if "ALL" not in context.get("capabilities", {}).get("drop", []):
            problems.append(f"{at}: capabilities do not drop ALL")
        if context.get("capabilities", {}).get("add"):
            problems.append(f"{at}: adds capabilities {context['capabilities']['add']}")
        if context.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{at}: readOnlyRootFilesystem is not true")
        resources = container.get("resources", {})
        for bound in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                if resource not in resources.get(bound, {}):
                    problems.append(f"{at}: no {resource} in resources.{bound}")
    return problems


def check_no_inline_secrets(objects: list[dict]) -> list[str]:
    """Find secret values written into the manifests instead of referenced from a Secret.

    A Secret object with data, an environment variable whose name suggests a credential but
    has a literal value, or any string that looks like a private key or a cloud access key.
    """
    problems = []
    for obj in objects:
        where = describe(obj)
        if obj.get("kind") == "Secret" and (obj.get("data") or obj.get("stringData")):
            problems.append(f"{where}: a Secret with inline data; create it outside the manifests and reference it")
        for path, value in _walk(obj):
            if path.endswith(".env") and isinstance(value, list):
                for entry in value:
                    if _SECRET_NAME.search(str(entry.get("name", ""))) and "value" in entry:
                        problems.append(f"{where}: {path} {entry['name']} has an inline value; use valueFrom.secretKeyRef")
            if isinstance(value, str) and _SECRET_TEXT.search(value):
                problems.append(f"{where}: {path} contains what looks like a key or token")
    return problems


def _walk(value, path: str = ""):
    yield path, value
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _walk(child, f"{path}.{key}")
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from _walk(child, f"{path}[{index}]")


# --- training consistency ------------------------------------------------------------


def option_value(command: list[str], option: str) -> str | None:
    """Return the value after ``option`` in ``command`` (before ``--``), or None."""
    head = command[: command.index("--")] if "--" in command else command
    for index, word in enumerate(head):
        if word == option and index + 1 < len(head):
            return head[index + 1]
        if word.startswith(option + "="):
            return word.split("=", 1)[1]
    return None


def check_training_consistency(objects: list[dict]) -> list[str]:
    """Check that a PyTorchJob's command, elastic policy, GPUs and rendezvous service agree."""
    problems = []
    services = {obj["metadata"]["name"]: obj for obj in objects if obj.get("kind") == "Service"}
    for job in (obj for obj in objects if obj.get("kind") == "PyTorchJob"):
        where = describe(job)
        spec = job.get("spec", {})
        worker = spec.get("pytorchReplicaSpecs", {}).get("Worker", {})
        containers = worker.get("template", {}).get("spec", {}).get("containers", [])
        container = next((c for c in containers if c.get("name") == "pytorch"), None)
        if container is None:
            continue
        command = [*container.get("command", []), *container.get("args", [])]

        nproc = option_value(command, "--nproc-per-node")
        if nproc != spec.get("nprocPerNode"):
            problems.append(f"{where}: command --nproc-per-node {nproc} differs from spec.nprocPerNode {spec.get('nprocPerNode')}")
        gpus = container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
        if gpus is not None and str(gpus) != nproc:
            problems.append(f"{where}: {gpus} GPUs per pod but {nproc} processes per node; use one process per GPU")

        policy = spec.get("elasticPolicy", {})
        low, high = policy.get("minReplicas"), policy.get("maxReplicas")
        expected = str(high) if low == high else f"{low}:{high}"
        if option_value(command, "--nnodes") != expected:
            problems.append(f"{where}: command --nnodes {option_value(command, '--nnodes')} differs from the elastic policy {expected}")
        if worker.get("replicas") != high:
            problems.append(f"{where}: Worker replicas {worker.get('replicas')} differ from elasticPolicy.maxReplicas {high}")

        endpoint = option_value(command, "--rdzv-endpoint") or ""
        host, _, port = endpoint.partition(":")
        if host != policy.get("rdzvHost") or port != str(policy.get("rdzvPort")):
            problems.append(f"{where}: command --rdzv-endpoint {endpoint} differs from the elastic policy's rdzvHost:rdzvPort")
        service = services.get(host)
        if service is None:
            problems.append(f"{where}: no Service named {host!r} for the rendezvous endpoint")
            continue
        selector = service.get("spec", {}).get("selector", {})
        if selector.get("training.kubeflow.org/job-name") != job["metadata"]["name"] or selector.get("training.kubeflow.org/replica-index") != "0":
            problems.append(f"{describe(service)}: selector must pick replica 0 of {job['metadata']['name']}, got {selector}")
        if service.get("spec", {}).get("clusterIP") != "None":
            problems.append(f"{describe(service)}: rendezvous service must be headless (clusterIP: None)")
        if str(service.get("spec", {}).get("ports", [{}])[0].get("port")) != port:
            problems.append(f"{describe(service)}: port differs from the rendezvous port {port}")
    return problems
