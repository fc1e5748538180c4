"""Inside a Slurm job or allocation: `srun` one torchrun per node, meeting at a c10d store on the first node."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

from launcher.backends.local import LocalBackend, torchrun
from launcher.errors import BatonError
from launcher.slurm import calls


def allocation_nodes() -> int | None:
    """Nodes of the Slurm allocation this process runs in, or None outside one."""
    if not os.environ.get("SLURM_JOB_ID"):
        return None
    return int(os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES") or 1)


# Where the c10d store of a job's rendezvous listens: below Linux's ephemeral range (32768-60999), from which any
# outgoing connection or port-0 listener on the node may take a port at any moment.
PORTS = range(29500, 32500)


def rendezvous_port(job: int) -> int:
    """A port free now on this node, which is the head node (a job's batch step runs on its first node): the first
    free one from the port the job id picks, so jobs sharing a node start apart."""
    for k in range(len(PORTS)):
        port = PORTS[(job + k) % len(PORTS)]
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
        return port
    raise BatonError(f"no free port in {PORTS.start}-{PORTS.stop - 1} on this node for the rendezvous")


def head_node() -> str:
    nodelist = os.environ["SLURM_JOB_NODELIST"]
    return calls.run(["scontrol", "show", "hostnames", nodelist]).stdout.split()[0]


class SrunBackend(LocalBackend):
    name = "slurm"
    # srun ends the whole step on TERM (SIGKILL after KillWait, maybe mid-checkpoint) but only forwards USR1,
    # which torchrun passes on to the ranks: they checkpoint and exit 75 in their own time
    stop_signal = signal.SIGUSR1

    def command(self, kind: str, spec_path: Path, nproc_per_node: int, log_dir: Path, nnodes: int = 1) -> list[str]:
        job = int(os.environ["SLURM_JOB_ID"])
        port = rendezvous_port(job)
        rendezvous = ["--nnodes", str(nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{head_node()}:{port}",
                      "--rdzv-id", f"baton-{job}"]
        srun = ["srun", f"--nodes={nnodes}", f"--ntasks={nnodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                "--export=ALL"]
        return srun + torchrun(rendezvous, kind, spec_path, nproc_per_node, log_dir)
