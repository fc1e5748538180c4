"""Real Slurm clusters on this machine for the Slurm back-end's end-to-end tests.

`slurm_cluster` (session scope) starts a one-node cluster, slurmctld + slurmd (+ munged), with
`tests/slurm/cluster/start.sh` in a temp folder and stops it at the end with `stop.sh` (which
cancels the jobs first). `slurm_two_nodes` starts a two-node one (`SLURM_NODES=2`): node2's slurmd
in a network namespace of its own, linked to node1 by a veth pair, each node with its own hostname
and /etc/hosts, so a multi-node stage's rendezvous and gloo traffic really cross a network link.
Both can run in one session (their ports, job ids and network are apart). When Slurm is not
installed and cannot be (not root, apt-get failing), the tests that need it are skipped with the
reason, shown by `pytest -ra`; a cluster that is installed but does not come up is an error.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

CLUSTER = Path(__file__).resolve().parent / "cluster"
NOT_INSTALLABLE = 3  # start.sh: Slurm is missing and cannot be installed here


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory, hf_env: dict[str, str]) -> Iterator[dict]:
    """{"dir": the cluster folder, "env": hf_env + SLURM_CONF, "conf": slurm.conf, "startup_s": seconds, "nodes"}."""
    # SLURM_CPUS: more than the machine has, so a couple of 2-CPU jobs fit side by side
    yield from cluster(tmp_path_factory.mktemp("slurm-cluster"), hf_env, {"SLURM_CPUS": "8"}, first_job_id=1000)


@pytest.fixture(scope="session")
def slurm_two_nodes(tmp_path_factory: pytest.TempPathFactory, hf_env: dict[str, str]) -> Iterator[dict]:
    """Like `slurm_cluster`, with two nodes: "nodes" is {name: {"addr": its address, "ns": its namespaces}}."""
    # 4 CPUs a node: a stage's 2-CPU task per node, with room for a second job's
    yield from cluster(tmp_path_factory.mktemp("slurm-two-nodes"), hf_env, {"SLURM_NODES": "2", "SLURM_CPUS": "4"},
                       first_job_id=10100)


def cluster(folder: Path, hf_env: dict[str, str], knobs: dict[str, str], first_job_id: int) -> Iterator[dict]:
    """Start a cluster with start.sh `knobs` (the environment's own settings win), yield it, stop it."""
    env = dict(hf_env)
    for var, value in knobs.items():
        env.setdefault(var, value)
    # job ids apart from another test cluster on this machine: baton's rendezvous port starts from the id (the
    # first free one from 29500 + id % 3000), so a one-node session (ids from 1000) and a two-node one (from
    # 10100) start apart
    env.setdefault("SLURM_FIRST_JOB_ID", str(first_job_id + os.getpid() % 900 * 10))
    t0 = time.monotonic()
    try:
        proc = subprocess.run(["bash", str(CLUSTER / "start.sh"), str(folder)], env=env, capture_output=True,
                              text=True, timeout=900)
    except subprocess.TimeoutExpired as e:
        subprocess.run(["bash", str(CLUSTER / "stop.sh"), str(folder)], env=env, capture_output=True, timeout=120)
        pytest.fail(f"Slurm test cluster: start.sh timed out after {e.timeout} s", pytrace=False)
    startup_s = time.monotonic() - t0
    if proc.returncode == NOT_INSTALLABLE:
        pytest.skip("Slurm is not installed and could not be installed: "
                    + " | ".join(proc.stderr.strip().splitlines()[-3:]))
    if proc.returncode != 0:
        pytest.fail(f"Slurm test cluster did not start (start.sh {folder} -> {proc.returncode}):\n"
                    f"{proc.stderr[-4000:]}", pytrace=False)
    print(proc.stderr.strip().splitlines()[-1])
    conf = folder / "etc" / "slurm.conf"
    env["SLURM_CONF"] = str(conf)
    for var in [v for v in env if v.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and v != "SLURM_CONF"]:
        env.pop(var)  # running inside a Slurm job ourselves must not leak its settings into the test jobs
    try:
        yield {"dir": folder, "env": env, "conf": conf, "startup_s": startup_s, "nodes": nodes(folder)}
    finally:
        stop = subprocess.run(["bash", str(CLUSTER / "stop.sh"), str(folder)], env=env, capture_output=True,
                              text=True, timeout=180)
        if stop.returncode != 0:
            print(f"stop.sh {folder} -> {stop.returncode}:\n{stop.stderr[-2000:]}")


def nodes(folder: Path) -> dict[str, dict]:
    """{node: {"addr": NodeAddr, "ns": its "uts:[…] mnt:[…]" namespaces, or None when they are this machine's}}."""
    out = {}
    for line in (folder / "etc" / "slurm.conf").read_text().splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if "NodeName" in fields:
            ns = folder / "run" / f"{fields['NodeName']}.ns"  # two nodes: written by start.sh
            out[fields["NodeName"]] = {"addr": fields["NodeAddr"],
                                       "ns": ns.read_text().strip() if ns.exists() else None}
    return out
