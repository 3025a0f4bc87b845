"""Build torchrun command lines for one machine or for several nodes, and size threads per rank.

One machine (``--standalone``: torchrun starts its own rendezvous store on a free port)::

    torchrun --standalone --nproc-per-node=2 -m trainer.train ...

Several nodes meet at a c10d rendezvous. Every node runs the same command. The node whose
``is_host`` is true (node index 0) hosts the store, and the others connect to it::

    torchrun --nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d \\
        --rdzv-endpoint=valuerank-train-rdzv:29400 --rdzv-id=valuerank \\
        --rdzv-conf=join_timeout=900,read_timeout=900,is_host=true \\
        --max-restarts=3 -m trainer.train ...

``join_timeout`` is how long a node waits for the others to join, and ``read_timeout``
how long a node that starts before the store keeps retrying its connection. Both are set
to the rendezvous timeout, so a node that starts minutes before node 0 waits instead of
failing.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

DEFAULT_RDZV_PORT = 29400
"""Port of the c10d rendezvous store (torchrun's own default)."""


@dataclass(frozen=True)
class Rendezvous:
    """Rendezvous settings that all nodes of one multi-node job share."""

    endpoint: str
    """``host:port`` of the c10d store, hosted by node 0; the port defaults to 29400."""

    nnodes: str
    """Number of nodes, ``"2"``, or an elastic range ``"2:4"`` (torchrun's ``--nnodes``)."""

    rdzv_id: str = "valuerank"
    """Job id shared by all nodes; two jobs on one endpoint need two ids."""

    timeout_s: int = 900
    """Seconds a node waits for the store and for the other nodes before it fails."""

    is_host: bool | None = None
    """Whether this node hosts the store. None lets torchrun guess from the host name,
    which fails when the endpoint is a service name that does not resolve yet."""

    @property
    def host(self) -> str:
        """The host part of ``endpoint``."""
        return split_endpoint(self.endpoint)[0]

    @property
    def port(self) -> int:
        """The port part of ``endpoint``."""
        return split_endpoint(self.endpoint)[1]


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """Split ``host:port`` (or a bare host, or ``[v6]:port``) into host and port."""
    text = endpoint.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, ""
    if not host:
        raise ValueError(f"rendezvous endpoint {endpoint!r} has no host; write it as HOST:PORT, e.g. node0:29400")
    if not port:
        return host, DEFAULT_RDZV_PORT
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"rendezvous endpoint {endpoint!r}: port {port!r} is not a number in 1..65535")
    return host, int(port)


def check_nnodes(nnodes: str) -> tuple[int, int]:
    """Return (minimum, maximum) nodes of ``"N"`` or ``"MIN:MAX"``; raise ValueError otherwise."""
    parts = str(nnodes).split(":")
    if len(parts) > 2 or not all(part.isdigit() for part in parts):
        raise ValueError(f"--nnodes {nnodes!r}: write a node count such as 2, or a range MIN:MAX such as 2:4")
    low, high = int(parts[0]), int(parts[-1])
    if low < 1 or high < low:
        raise ValueError(f"--nnodes {nnodes!r}: need 1 <= MIN <= MAX")
    return low, high


def torchrun_args(
    nproc_per_node: int,
    rendezvous: Rendezvous | None = None,
    max_restarts: int = 0,
) -> list[str]:
    """Return torchrun's own options: standalone without ``rendezvous``, c10d with it."""
    args = [f"--nproc-per-node={nproc_per_node}"]
    if rendezvous is None:
        args.insert(0, "--standalone")
    else:
        check_nnodes(rendezvous.nnodes)
        host, port = split_endpoint(rendezvous.endpoint)
        conf = [f"join_timeout={rendezvous.timeout_s}", f"read_timeout={rendezvous.timeout_s}"]
        if rendezvous.is_host is not None:
            conf.append(f"is_host={str(rendezvous.is_host).lower()}")
        endpoint = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        args = [
            f"--nnodes={rendezvous.nnodes}",
            *args,
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={endpoint}",
            f"--rdzv-id={rendezvous.rdzv_id}",
            f"--rdzv-conf={','.join(conf)}",
        ]
    if max_restarts:
        args.append(f"--max-restarts={max_restarts}")
    return args


def build_command(
    nproc_per_node: int,
    trainer_args: list[str],
    rendezvous: Rendezvous | None = None,
    max_restarts: int = 0,
    module: str = "trainer.train",
    python: str | None = None,
) -> list[str]:
    """Return the full command that runs ``module`` under torchrun (as ``python -m torch.distributed.run``).

    ``python -m torch.distributed.run`` is torchrun itself, started with the given Python,
    so the ranks run in the same environment as the caller.
    """
    return [
        python or sys.executable, "-m", "torch.distributed.run",
        *torchrun_args(nproc_per_node, rendezvous, max_restarts),
        "-m", module,
        *trainer_args,
    ]


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """Return the CPU quota of this container in cores (cgroup v2 ``cpu.max`` or v1 quota), or None.

    In a Kubernetes pod the CPU limit is a quota, not a CPU set, so
    ``os.sched_getaffinity`` still reports every core of the node.
    """
    v2 = root / "cpu.max"
    if v2.is_file():
        quota, _, period = v2.read_text().strip().partition(" ")
        if quota != "max" and period:
            return int(quota) / int(period)
        return None
    quota_file, period_file = root / "cpu" / "cpu.cfs_quota_us", root / "cpu" / "cpu.cfs_period_us"
    if quota_file.is_file() and period_file.is_file():
        quota = int(quota_file.read_text().strip())
        if quota > 0:
            return quota / int(period_file.read_text().strip())
    return None


def available_cores(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """Cores this process may use: its CPU set, capped by a container CPU quota (rounded up)."""
    cores = len(os.sched_getaffinity(0))
    limit = cgroup_cpu_limit(cgroup_root)
    if limit is not None:
        cores = min(cores, max(1, math.ceil(limit)))
    return cores


def threads_per_rank(nproc_per_node: int, cores: int | None = None) -> int:
    """Split the node's cores evenly across its ranks, at least one thread each."""
    cores = cores or available_cores()
    return max(1, cores // nproc_per_node)
