"""A stage on two real Slurm nodes (the `slurm_two_nodes` fixture): `launcher: {nnodes: 2, nproc_per_node: 1}`.

`baton submit` queues the stage; inside its job baton starts one torchrun per node with srun,
meeting at a c10d rendezvous on node1. node2 is a network namespace of its own, so the
rendezvous and gloo go across a veth link between the two nodes' addresses. The tests look
at the running ranks themselves (which node's namespaces each rank runs in, what torchrun
gave it, whom it talks to), then at what the run left (ledger, logs, checkpoints), and
compare the weights with a local one-node run of the same stage on two processes.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import TINY_BERT, baton, write_data
from tests.slurm.helpers import (
    SLURM_DEFAULTS,
    assert_same_weights,
    assert_slurm_attempts,
    describe,
    final_weights,
    job_end,
    job_log,
    submit,
    wait_for_checkpoint,
    wait_states,
)

pytestmark = pytest.mark.slurm

STEPS = 150  # about 15 s on the two nodes: long enough to look at the ranks and to requeue mid-run
CKPT = 25


def manifest(tokenizer: Path, nnodes: int, nproc_per_node: int) -> str:
    """The same stage for both layouts; only the launcher differs (world size 2, global batch 2 x 8 x 2)."""
    return f"""version: 1
run: {{name: two-nodes}}
defaults:
  deepspeed: {{config: zero2}}
  seed: 11
{SLURM_DEFAULTS}
stages:
  - name: mlm
    kind: mlm
    launcher: {{nnodes: {nnodes}, nproc_per_node: {nproc_per_node}}}
    init:
{TINY_BERT}
    tokenizer: {{pretrained: {json.dumps(str(tokenizer))}}}
    data: {{train: data/pretrain.txt, max_length: 32}}
    train: {{max_steps: {STEPS}, micro_batch_size: 8, grad_accum: 2, lr: 1.0e-3, warmup_steps: 5, schedule: cosine,
             log_every: 50}}
    checkpoint: {{every_steps: {CKPT}, keep_last: 2}}
    eval: {{at_end: false}}
"""


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, hf_env: dict[str, str]) -> Path:
    """Data, a tokenizer trained locally, and the stage's two manifests: two-nodes.yaml and one-node.yaml."""
    folder = tmp_path_factory.mktemp("slurm-two-nodes-e2e")
    write_data(folder / "data")
    (folder / "tokenizer.yaml").write_text("""version: 1
run: {name: tokenizer}
stages:
  - name: tokenizer
    kind: tokenizer
    data: {train: data/pretrain.txt}
    sentencepiece: {vocab_size: 600}
""")
    baton("run", folder / "tokenizer.yaml", "--run-dir", folder / "tokenizer", env=hf_env)
    tokenizer = folder / "tokenizer" / "stages" / "tokenizer" / "final"
    (folder / "two-nodes.yaml").write_text(manifest(tokenizer, nnodes=2, nproc_per_node=1))
    (folder / "one-node.yaml").write_text(manifest(tokenizer, nnodes=1, nproc_per_node=2))
    return folder


@pytest.fixture(scope="module")
def one_node_weights(root: Path, hf_env: dict[str, str]) -> dict:
    """The final weights of the stage run locally (`baton run`: torchrun, one node, two processes)."""
    run_dir = root / "one-node"
    baton("run", root / "one-node.yaml", "--run-dir", run_dir, env=hf_env)
    return final_weights(run_dir)


# ----------------------------------------------------------------- the running ranks, seen from outside


def stage_ranks(nodes: dict[str, dict], timeout: float = 30) -> dict[int, dict]:
    """{rank: {"node", "pid", "env"}} of the stage's ranks running now, each placed on the node whose (uts, mnt)
    namespaces it runs in: torchrun's children with a RANK. Waits until the ranks of both nodes are seen."""
    by_ns = {v["ns"]: name for name, v in nodes.items()}
    deadline = time.monotonic() + timeout
    while True:
        ranks = {}
        for proc in Path("/proc").iterdir():
            try:
                ns = f"{os.readlink(proc / 'ns' / 'uts')} {os.readlink(proc / 'ns' / 'mnt')}"
                if ns not in by_ns:
                    continue
                environ = (proc / "environ").read_bytes().decode(errors="replace").split("\0")
                env = dict(v.split("=", 1) for v in environ if "=" in v)
                ppid = (proc / "stat").read_text().rsplit(")", 1)[1].split()[1]
                parent = Path("/proc", ppid, "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (OSError, ValueError, IndexError):
                continue  # not a process, gone meanwhile, or a kernel thread
            if "RANK" in env and "torch.distributed.run" in parent:
                ranks[int(env["RANK"])] = {"node": by_ns[ns], "pid": int(proc.name), "env": env}
        if len({r["node"] for r in ranks.values()}) == len(nodes) or time.monotonic() > deadline:
            return ranks
        time.sleep(0.2)


def tcp_peers(pid: int) -> set[tuple[str, str]]:
    """(local address, remote address) of the process's established TCP connections, from its network
    namespace's /proc tables and its own socket descriptors."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    peers = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "01" and fields[9] in inodes:  # 01: ESTABLISHED
                peers.add((_address(fields[1]), _address(fields[2])))
    return peers


def _address(hex_address: str) -> str:
    """An address of /proc/net/tcp{,6}: 32-bit words in host (little-endian) order; IPv4-mapped IPv6 as IPv4."""
    raw = bytes.fromhex(hex_address.split(":")[0])
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    if len(raw) == 4:
        return socket.inet_ntoa(raw)
    ip = ipaddress.IPv6Address(raw)
    return str(ip.ipv4_mapped or ip)


def start_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "stages" / "mlm" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == "start"]


def hostnames(nodelist: str, env: dict[str, str]) -> list[str]:
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], env=env, capture_output=True, text=True,
                         check=True)
    return out.stdout.split()


# ----------------------------------------------------------------- tests


def test_one_rank_on_each_node_and_the_weights_of_one_node_with_two_processes(
        slurm_two_nodes: dict, root: Path, one_node_weights: dict) -> None:
    env, nodes = slurm_two_nodes["env"], slurm_two_nodes["nodes"]
    (node1, addr1), (node2, addr2) = [(name, v["addr"]) for name, v in nodes.items()]
    run_dir = root / "slurm"
    job_id = submit(root / "two-nodes.yaml", run_dir, env, cwd=root)["mlm"]
    wait_for_checkpoint(run_dir, "mlm", env, min_step=CKPT)

    # mid-training: rank 0 runs on node1, rank 1 on node2, each the one rank of its node's torchrun, and both
    # met at the rendezvous on node1 (torchrun gives each the same run id and node1 as the master)
    ranks = stage_ranks(nodes)
    story = describe(run_dir, env)
    assert {rank: r["node"] for rank, r in ranks.items()} == {0: node1, 1: node2}, f"{ranks}\n{story}"
    for rank, r in ranks.items():
        e = r["env"]
        assert (e["WORLD_SIZE"], e["LOCAL_WORLD_SIZE"], e["LOCAL_RANK"], e["GROUP_RANK"]) == ("2", "1", "0", str(rank))
        assert e["MASTER_ADDR"] == node1 and e["TORCHELASTIC_RUN_ID"] == f"baton-{job_id}", e
    # and they talk to each other across the veth, between the nodes' addresses (not over loopback)
    assert (addr2, addr1) in tcp_peers(ranks[1]["pid"]), tcp_peers(ranks[1]["pid"])
    assert (addr1, addr2) in tcp_peers(ranks[0]["pid"]), tcp_peers(ranks[0]["pid"])

    entry = wait_states(run_dir, env, {"mlm": {"done", "failed"}})["mlm"]
    story = describe(run_dir, env)
    assert entry["state"] == "done", story
    assert_slurm_attempts(entry, job_id)
    [attempt] = entry["attempts"]
    assert hostnames(attempt["nodes"], env) == [node1, node2], attempt
    assert attempt["host"] == node1  # `baton job` runs in the batch step, on the job's first node
    assert attempt["command"][:3] == ["srun", "--nodes=2", "--ntasks=2"], attempt["command"]
    assert attempt["stage_environment"]["host"] == node1, attempt  # rank 0's, from the stage's start record
    [start] = start_records(run_dir)
    assert start["world_size"] == 2 and start["environment"]["host"] == node1, start

    # each node's torchrun kept its rank's output in the attempt's log folder: one folder per node, one rank each
    runs = sorted((run_dir / "stages" / "mlm" / "logs" / "attempt-1").glob(f"baton-{job_id}_*"))
    assert len(runs) == 2, runs
    assert [sorted(p.name for p in (run / "attempt_0").iterdir() if p.is_dir()) for run in runs] == [["0"], ["0"]]
    progress = [run for run in runs if f"step {STEPS}/{STEPS}" in (run / "attempt_0/0/stdout.log").read_text()]
    assert len(progress) == 1, "rank 0's progress should be in exactly one node's log"

    # the checkpoints kept (keep_last: 2) are complete and hold both ranks' shards (rank 1's written from node2)
    ckpt = run_dir / "stages" / "mlm" / "ckpt"
    records = [json.loads(p.read_text()) for p in sorted(ckpt.glob("step*/COMPLETE"))]
    assert len(records) == 2 and all(r["step"] % CKPT == 0 and r["world_size"] == 2 for r in records), records
    assert (ckpt / "LATEST").read_text().strip() == f"step{records[-1]['step']:08d}"
    for rank in (0, 1):
        shards = {f"rng-rank{rank}.pt", f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"}
        assert all(shards <= r["files"].keys() for r in records), records

    job = job_end(job_id, env)
    assert (job.get("JobState"), job.get("ExitCode"), job.get("NumNodes")) == ("COMPLETED", "0:0", "2"), job
    assert hostnames(job["NodeList"], env) == [node1, node2], job
    # The same world size, global batch and data order as one node with two processes. Bitwise: a sum over two
    # ranks is the same whichever order gloo adds it in, and every other operation is the same per rank.
    assert_same_weights(one_node_weights, final_weights(run_dir))


@pytest.mark.full  # a requeue resuming bitwise is proven on one node (test_slurm.py); the rendezvous across nodes above
def test_requeue_mid_training_resumes_on_both_nodes_to_the_same_weights(
        slurm_two_nodes: dict, root: Path, one_node_weights: dict) -> None:
    env, nodes = slurm_two_nodes["env"], slurm_two_nodes["nodes"]
    run_dir = root / "slurm-requeue"
    job_id = submit(root / "two-nodes.yaml", run_dir, env, cwd=root)["mlm"]
    step = wait_for_checkpoint(run_dir, "mlm", env, min_step=CKPT)
    subprocess.run(["scontrol", "requeue", job_id], env=env, check=True)

    entry = wait_states(run_dir, env, {"mlm": {"done", "failed"}})["mlm"]
    story = describe(run_dir, env)
    assert entry["state"] == "done", story
    assert_slurm_attempts(entry, job_id)
    last = entry["attempts"][-1]
    assert last["restart"] == 1 and last["outcome"] == "done", story
    assert hostnames(last["nodes"], env) == list(nodes), story
    resumed = int((last["resumed_from"] or "step-1").removeprefix("step"))
    assert step <= resumed < STEPS, story
    assert job_log(run_dir, "mlm", job_id).count("== mlm (mlm):") >= 2, "the requeued run did not append to the log"
    assert [(r["step"], r["world_size"]) for r in start_records(run_dir)] == [(0, 2), (resumed, 2)], story
    # the resumed attempt ran across both nodes again: a torchrun log folder per node
    assert len(list((run_dir / "stages" / "mlm" / "logs" / f"attempt-{last['attempt']}").glob("baton-*"))) == 2
    job = job_end(job_id, env)
    assert (job.get("JobState"), job.get("Restarts"), job.get("NumNodes")) == ("COMPLETED", "1", "2"), job
    assert_same_weights(one_node_weights, final_weights(run_dir))
