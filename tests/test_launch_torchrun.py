"""The torchrun command builder, threads per rank, and the wait for the rendezvous host."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys

import pytest

from launch import local, torchrun
from launch.rendezvous import wait_for_host


def test_standalone_command():
    command = local.torchrun_command(2, ["--config", "c.toml"])

    assert command[1:3] == ["-m", "torch.distributed.run"]
    assert "--standalone" in command
    assert "--nproc-per-node=2" in command
    assert command[-4:] == ["-m", "trainer.train", "--config", "c.toml"]
    assert not any(word.startswith("--rdzv") for word in command)


def test_c10d_command_has_rendezvous_options():
    rendezvous = torchrun.Rendezvous(endpoint="node0:29500", nnodes="2:4", rdzv_id="job7", timeout_s=600, is_host=False)

    args = torchrun.torchrun_args(8, rendezvous, max_restarts=3)

    assert "--standalone" not in args
    assert "--nnodes=2:4" in args
    assert "--nproc-per-node=8" in args
    assert "--rdzv-backend=c10d" in args
    assert "--rdzv-endpoint=node0:29500" in args
    assert "--rdzv-id=job7" in args
    assert "--rdzv-conf=join_timeout=600,read_timeout=600,is_host=false" in args
    assert "--max-restarts=3" in args


def test_c10d_command_is_accepted_by_torchrun():
    # torchrun's own parser must accept every option the builder writes.
    from torch.distributed.run import get_args_parser

    rendezvous = torchrun.Rendezvous(endpoint="[::1]:29400", nnodes="2", timeout_s=30, is_host=True)
    command = torchrun.build_command(1, ["--out", "x"], rendezvous, max_restarts=2)

    parsed = get_args_parser().parse_args(command[3:])

    assert parsed.nnodes == "2"
    assert parsed.rdzv_endpoint == "[::1]:29400"
    assert parsed.rdzv_conf == "join_timeout=30,read_timeout=30,is_host=true"
    assert parsed.max_restarts == 2
    assert parsed.training_script == "trainer.train"
    assert parsed.training_script_args == ["--out", "x"]


def test_no_max_restarts_option_by_default():
    assert not any(word.startswith("--max-restarts") for word in torchrun.torchrun_args(1))


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [("node0:29500", ("node0", 29500)), ("node0", ("node0", 29400)), ("[fd00::1]:123", ("fd00::1", 123)), ("10.0.0.1:1", ("10.0.0.1", 1))],
)
def test_split_endpoint(endpoint, expected):
    assert torchrun.split_endpoint(endpoint) == expected


@pytest.mark.parametrize("endpoint", [":29400", "node0:http", "node0:70000", "[::1]:x"])
def test_split_endpoint_rejects_invalid(endpoint):
    with pytest.raises(ValueError, match="rendezvous endpoint"):
        torchrun.split_endpoint(endpoint)


@pytest.mark.parametrize("nnodes", ["0", "3:2", "a", "1:2:3", ""])
def test_nnodes_rejects_invalid(nnodes):
    with pytest.raises(ValueError, match="--nnodes"):
        torchrun.check_nnodes(nnodes)


def test_threads_split_cores_across_ranks():
    assert torchrun.threads_per_rank(4, cores=16) == 4
    assert torchrun.threads_per_rank(3, cores=16) == 5
    assert torchrun.threads_per_rank(8, cores=2) == 1


def test_cgroup_v2_quota_caps_cores(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")

    assert torchrun.cgroup_cpu_limit(tmp_path) == 1.5
    assert torchrun.available_cores(tmp_path) == min(2, len(os.sched_getaffinity(0)))


def test_cgroup_v2_without_quota(tmp_path):
    (tmp_path / "cpu.max").write_text("max 100000\n")

    assert torchrun.cgroup_cpu_limit(tmp_path) is None


def test_cgroup_v1_quota(tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("400000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")

    assert torchrun.cgroup_cpu_limit(tmp_path) == 4.0


def test_wait_for_host_retries_until_resolved():
    answers = [socket.gaierror(-2, "Name or service not known")] * 2 + [["10.0.0.7"]]
    calls = []

    def resolver(host):
        calls.append(host)
        answer = answers[len(calls) - 1]
        if isinstance(answer, Exception):
            raise answer
        return answer

    addresses = wait_for_host("node0", timeout_s=30, resolver=resolver, first_delay_s=0.01)

    assert addresses == ["10.0.0.7"]
    assert calls == ["node0"] * 3


def test_wait_for_host_times_out_naming_host():
    def resolver(host):
        raise socket.gaierror(-2, "Name or service not known")

    with pytest.raises(TimeoutError, match="'valuerank-train-rdzv' did not resolve"):
        wait_for_host("valuerank-train-rdzv", timeout_s=0.05, resolver=resolver, first_delay_s=0.01)


def test_wait_for_loopback_resolves_at_once():
    assert "127.0.0.1" in wait_for_host("127.0.0.1", timeout_s=1)


def _parse(argv):
    parser = argparse.ArgumentParser()
    local.add_arguments(parser)
    return parser, parser.parse_args(argv)


def test_env_defaults_fill_missing_options():
    parser, args = _parse(["--nproc-per-node", "4"])
    environ = {"PET_NNODES": "1:3", "PET_RDZV_ENDPOINT": "svc:29400", "PET_NPROC_PER_NODE": "8",
               "PET_MAX_RESTARTS": "5", "VALUERANK_NODE_INDEX": "0", "VALUERANK_CORES": "16"}

    local.apply_env_defaults(args, local._explicit_options(parser, ["--nproc-per-node", "4"]), environ)
    rendezvous = local.rendezvous_from_args(args)

    assert args.nproc_per_node == 4
    assert args.max_restarts == 5
    assert args.cores == 16
    assert rendezvous.nnodes == "1:3"
    assert rendezvous.endpoint == "svc:29400"
    assert rendezvous.is_host is True


def test_no_endpoint_means_standalone():
    _, args = _parse([])

    assert local.rendezvous_from_args(args) is None


def test_several_nodes_without_endpoint_rejected():
    _, args = _parse(["--nnodes", "2"])

    with pytest.raises(SystemExit, match="needs --rdzv-endpoint"):
        local.rendezvous_from_args(args)


def test_cli_train_rejects_bad_endpoint(tmp_path):
    command = [sys.executable, "-m", "valuerank.cli", "train", "--rdzv-endpoint", "node0:http", "--config", "x", "--data", "y", "--out", "z"]

    result = subprocess.run(command, capture_output=True, text=True, timeout=600)

    assert result.returncode == 2
    assert "port 'http' is not a number" in result.stderr
