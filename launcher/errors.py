"""baton's exceptions. The CLI turns a BatonError into one clean line and an exit code."""

from __future__ import annotations


class BatonError(Exception):
    """Something the user can fix; printed without a traceback."""

    exit_code = 1


class ConfigError(BatonError):
    """Bad manifest, DeepSpeed config or input file: exit 2, nothing launched."""

    exit_code = 2

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class GateStopped(BatonError):
    """A stage failed its gate (on_fail stop, or its retries spent without a fallback): the run ends there."""

    exit_code = 3  # contract.layout.EXIT_GATE_STOPPED


class LedgerError(BatonError):
    """The run folder is locked by another driver, or its ledger is unreadable."""

    exit_code = 2
