"""`baton --help`, each command's --help and `--version`: what a person reads before the README."""

from __future__ import annotations

import subprocess
import sys

import pytest

from launcher.cli import main

COMMANDS = ("validate", "run", "submit", "cancel", "resume", "status", "lineage", "verify", "schema", "report")


def helped(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    with pytest.raises(SystemExit) as exit:
        main([*args, "--help"])
    assert exit.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_says_what_it_does_with_an_example_and_exit_codes(command: str,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    text = helped(capsys, command)
    usage, description, *_ = text.split("\n\n")
    assert len(description.split()) >= 5, description
    assert f"Example:\n  baton {command} " in text
    codes = text.split("Exit codes:\n")[1]
    assert codes.startswith("  0 ") and "\n  2 " in codes
    positionals = text.split("positional arguments:\n")[1].split("\n\n")[0] if "positional" in text else ""
    assert all(len(line.split()) > 1 for line in positionals.splitlines()), positionals  # each one explained
    assert max(len(line) for line in text.splitlines()) <= 80


def test_the_listing_hides_the_internal_job_command(capsys: pytest.CaptureFixture[str]) -> None:
    text = helped(capsys)
    assert "job" not in text.replace("jobs", "")
    assert all(command in text for command in COMMANDS) and "Exit codes:" in text and "--version" in text


def test_version_names_baton_and_its_libraries_without_importing_torch() -> None:
    code = ("import sys\nfrom launcher.cli import main\ntry:\n    main(['--version'])\nexcept SystemExit as e:\n"
            "    assert e.code == 0, e.code\nassert 'torch' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    names = [line.split()[0] for line in proc.stdout.splitlines()]
    assert names[:2] == ["python", "baton"] and {"torch", "deepspeed", "transformers", "datasets"} <= set(names)
    assert all(len(line.split(maxsplit=1)) == 2 for line in proc.stdout.splitlines())
