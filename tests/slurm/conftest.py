"""A real one-node Slurm cluster for the Slurm back-end's end-to-end tests.

`slurm_cluster` (session scope) starts slurmctld + slurmd (+ munged) with
`tests/slurm/cluster/start.sh` in a temp folder and stops them at the end with
`stop.sh` (which cancels the jobs first). When Slurm is not installed and cannot be
(not root, apt-get failing), every Slurm test is skipped with the reason, shown by
`pytest -ra`; a cluster that is installed but does not come up is an error.
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
    """{"dir": the cluster folder, "env": hf_env + SLURM_CONF, "conf": slurm.conf, "startup_s": seconds}."""
    folder = tmp_path_factory.mktemp("slurm-cluster")
    env = dict(hf_env)
    env.setdefault("SLURM_CPUS", "8")  # more than the machine has, so a couple of 2-CPU jobs fit side by side
    # job ids apart from another test cluster on this machine (baton derives rendezvous ports from them)
    env.setdefault("SLURM_FIRST_JOB_ID", str(1000 + os.getpid() % 900 * 10))
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
        yield {"dir": folder, "env": env, "conf": conf, "startup_s": startup_s}
    finally:
        stop = subprocess.run(["bash", str(CLUSTER / "stop.sh"), str(folder)], env=env, capture_output=True,
                              text=True, timeout=180)
        if stop.returncode != 0:
            print(f"stop.sh {folder} -> {stop.returncode}:\n{stop.stderr[-2000:]}")
