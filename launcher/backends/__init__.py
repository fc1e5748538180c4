"""How a stage's processes start: one interface, a back-end per place.

`local.LocalBackend` runs torchrun on this machine; `launcher.slurm.srun.SrunBackend`
runs one torchrun per node of a Slurm job or allocation. The driver (`launcher.attempts`)
sees only this protocol.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Protocol


class Backend(Protocol):
    name: str
    stop_signal: signal.Signals  # what the driver sends its child to ask for checkpoint-and-exit

    def command(self, kind: str, spec_path: Path, nproc_per_node: int, log_dir: Path, nnodes: int = 1) -> list[str]:
        """The exact command that starts the stage (printed by --dry-run, recorded in the ledger)."""
        ...

    def launch(self, argv: list[str]) -> tuple[int, bool]:
        """Run `argv` to the end; return (exit code, whether a signal asked it to stop)."""
        ...
