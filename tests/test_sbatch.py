"""The sbatch script is a pure function of typed settings: pinned by golden files, quoted so that
no value reaches a shell unquoted. Set BATON_UPDATE_GOLDEN=1 to rewrite the golden files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.slurm.sbatch import render, sbatch_quote

GOLDEN = Path(__file__).parent / "golden"
DEFAULTS = {"signal_before_s": 120, "max_requeues": 3}
WEIRD = """x$(touch PWNED);y `id` 'q' "dq" \\ $HOME %j"""

CASES = {
    "minimal": dict(job_name="baton.quickstart.pretrain", nodes=1, output="/runs/q/stages/pretrain/slurm/job-%j.out",
                    settings=DEFAULTS,
                    command=["/venv/bin/python", "-m", "launcher.cli", "job", "/runs/q", "pretrain"]),
    "full": dict(
        job_name="baton.big.pretrain", nodes=4, output="/scratch/runs/big/stages/pretrain/slurm/job-%j.out",
        settings=DEFAULTS | {"partition": "gpu", "account": "proj-123", "qos": "high", "constraint": "a100&ib",
                             "time": "2-00:00:00", "mem": "480G", "cpus_per_task": 64, "gpus_per_node": 8,
                             "signal_before_s": 600, "extra": {"exclusive": None, "mail-type": "END,FAIL"}},
        command=["/venv/bin/python", "-m", "launcher.cli", "job", "/scratch/runs/big", "pretrain"],
        preamble="module load cuda/12.4\nsource /opt/envs/train/bin/activate\n",
    ),
    "metacharacters": dict(job_name=f"baton.r.{WEIRD}", nodes=1, output=f"/tmp/{WEIRD}/job-%j.out", settings=DEFAULTS,
                           command=["/venv/bin/python", "-m", "launcher.cli", "job", f"/tmp/{WEIRD}", WEIRD]),
}


@pytest.mark.parametrize("name", CASES)
def test_matches_golden_file(name: str) -> None:
    text = render(**CASES[name])
    golden = GOLDEN / f"{name}.sbatch"
    if os.environ.get("BATON_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text()


def test_flags_are_sorted_and_the_contract_flags_always_there() -> None:
    lines = [line for line in render(**CASES["full"]).splitlines() if line.startswith("#SBATCH")]
    assert lines == sorted(lines)
    for flag in ("--requeue", "--open-mode=append", "--signal=B:USR1@600", "--kill-on-invalid-dep=yes",
                 "--ntasks-per-node=1", "--nodes=4", "--gpus-per-node=8", "--exclusive"):
        assert f"#SBATCH {flag}" in lines


@pytest.mark.parametrize("extra, message", [({"requeue": None}, "set by baton"), ({"output": "x"}, "set by baton"),
                                            ({"bad flag; rm -rf /": "x"}, "not an sbatch long option")])
def test_extra_flags_cannot_break_the_contract(extra: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        render(**CASES["minimal"] | {"settings": DEFAULTS | {"extra": extra}})


def test_the_command_reaches_the_program_exactly(tmp_path: Path) -> None:
    """Run the script body with bash: the program gets every argument verbatim, nothing expands."""
    probe = [sys.executable, "-c", "import json, sys; print(json.dumps(sys.argv[1:]))", WEIRD, "$(id)", "a b", "*"]
    script = tmp_path / "job.sbatch"
    script.write_text(render(**CASES["metacharacters"] | {"command": probe, "preamble": "cd " + str(tmp_path)}))
    out = subprocess.run(["bash", str(script)], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert json.loads(out.stdout) == probe[3:]
    assert not list(tmp_path.glob("PWNED")) and not Path("PWNED").exists()


@pytest.mark.parametrize("value, quoted", [("gpu", "gpu"), ("/a/b-%j.out", '"/a/b-%j.out"'), ("a b", '"a b"'),
                                           ('say "hi"', '"say \\"hi\\""'), ("back\\slash", '"back\\\\slash"')])
def test_sbatch_quoting(value: str, quoted: str) -> None:
    assert sbatch_quote(value) == quoted


def test_the_rendezvous_port_is_free_below_the_ephemeral_ports_and_starts_from_the_job_id() -> None:
    """A job's c10d store listens on the first free port from 29500 + job id mod 3000: one a listener holds (another
    job's store, a port-0 listener that landed there) is passed over."""
    import socket

    from launcher.slurm.srun import PORTS, rendezvous_port

    job = 6622
    first = rendezvous_port(job)
    assert first in PORTS and first < 32768
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("", first))
        held.listen()
        second = rendezvous_port(job)
    assert second != first and second in PORTS
    assert (second - first) % len(PORTS) < 50  # the next free one, not anywhere
