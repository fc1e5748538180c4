"""`baton`: parse arguments, call into launcher/, turn a BatonError into one line and its exit code."""

from __future__ import annotations

import argparse
import errno
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

from launcher.errors import BatonError, ConfigError

RUN_EXITS = ("0 every stage asked for is done; 2 bad input (manifest, data, DeepSpeed config), nothing launched; "
             "3 a gate stopped the run; 75 a stage stopped on a signal after a checkpoint: run again to resume; "
             "others: a stage failed (the message names its rank-0 log)")
READ_EXITS = "0 shown; 2 not a run folder (no ledger.json) or a bad option"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="baton", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill("Multi-stage DeepSpeed training from a YAML manifest: each stage runs under torchrun "
                                  "(one node) or Slurm, hands its checkpoint to the next, and resumes where it "
                                  "stopped.", 79),
        epilog="Example:\n  baton run examples/quickstart.yaml && baton status runs/quickstart\n\n"
               "Exit codes:\n  0 done\n  2 bad input\n  3 a gate stopped the run\n  75 stopped: run again to resume\n"
               "  others: failed\n\n"
               "`baton COMMAND --help` says more about each command.")
    parser.add_argument("--version", action=_Version, help="print baton's version and its main libraries' and exit")
    # job is the body of a stage's sbatch job, not for people: hidden from the listing
    commands = ("validate", "run", "submit", "cancel", "resume", "status", "lineage", "verify", "schema", "report")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(commands) + "}")

    p = _command(sub, "validate", "check a manifest (schema, files, DeepSpeed configs); launches nothing",
                 "baton validate examples/quickstart.yaml",
                 "0 valid; 2 invalid (each problem with its file:line and key path)")
    p.add_argument("manifest", type=Path, metavar="MANIFEST", help="the YAML manifest to check")

    p = _command(sub, "run", "run (or resume) the stages a manifest asks for",
                 "baton run examples/quickstart.yaml --dry-run", RUN_EXITS,
                 "Stages whose fingerprint matches a done one are skipped, a stopped one resumes from its newest "
                 "complete checkpoint, and a changed one reruns with everything after it.")
    p.add_argument("manifest", type=Path, metavar="MANIFEST", help="the YAML manifest naming the stages")
    p.add_argument("--run-dir", type=Path, help="run folder (default: run.dir, or runs/<run.name>)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the exact commands; launch nothing")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--only", metavar="STAGE", help="consider this stage alone (its inputs must be done)")
    group.add_argument("--from", dest="start", metavar="STAGE", help="consider this stage and the ones after it")

    p = _command(sub, "submit", "queue the stages the plan needs as Slurm jobs (afterok chain) and return",
                 "baton submit examples/quickstart.yaml --from finetune",
                 "0 queued (or nothing to do); 2 bad input, nothing queued; others: sbatch failed")
    p.add_argument("manifest", type=Path, metavar="MANIFEST", help="the YAML manifest naming the stages")
    p.add_argument("--run-dir", type=Path, help="run folder (default: run.dir, or runs/<run.name>)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--only", metavar="STAGE", help="submit this stage alone (its inputs must be done)")
    group.add_argument("--from", dest="start", metavar="STAGE", help="submit this stage and the ones after it")

    p = _command(sub, "cancel", "cancel a run's queued and running Slurm jobs", "baton cancel runs/quickstart",
                 "0 cancelled (or none left); 2 not a run folder; others: scancel failed")
    p.add_argument("run_dir", type=Path, metavar="RUN", help="the run folder whose jobs to cancel")

    p = sub.add_parser("job")  # no help=: argparse then lists it nowhere
    p.add_argument("run_dir", type=Path)
    p.add_argument("stage")

    p = _command(sub, "resume", "run again the manifest a run folder was made from", "baton resume runs/quickstart",
                 RUN_EXITS, "The same as `baton run` with the copy of the manifest kept in the run folder.")
    p.add_argument("run_dir", type=Path, metavar="RUN", help="the run folder to go on with")

    p = _command(sub, "status", "table of stages: state, progress, metrics, digests (works while a run runs)",
                 "baton status runs/quickstart --wide", READ_EXITS,
                 "Fits 80 columns; a running stage shows step/max steps, its loss and ETA. Reads the run folder only.")
    p.add_argument("run_dir", type=Path, metavar="RUN",
                   help="the run folder, or a manifest: the folder it runs in (run.dir, or runs/<run.name>)")
    p.add_argument("--json", action="store_true", help="the same as one JSON object, for scripts")
    p.add_argument("--wide", action="store_true",
                   help="every column (input -> output digests, start-up time), nothing cut to fit 80 columns")

    p = _command(sub, "lineage", "which checkpoint fed which stage: text, JSON, Mermaid or a picture",
                 "baton lineage runs/quickstart --format svg -o lineage.svg", READ_EXITS)
    p.add_argument("run_dir", type=Path, metavar="RUN", help="the run folder")
    p.add_argument("--format", choices=("text", "json", "mermaid", "svg", "png"), default="text",
                   help="text (default); json: the graph as data; mermaid: a Markdown flowchart; svg, png: a picture")
    p.add_argument("--json", dest="format", action="store_const", const="json", help="the same as --format json")
    p.add_argument("-o", "--output", type=Path, help="write to this file (atomically) instead of stdout; png needs it")

    p = _command(sub, "verify", "hash each done stage's final/ again and compare with the ledger",
                 "baton verify runs/quickstart", "0 every output intact; 1 one damaged or missing; 2 not a run folder")
    p.add_argument("run_dir", type=Path, metavar="RUN", help="the run folder")

    p = _command(sub, "restore-ledger", "put back the ledger's previous generation (ledger.json.1) when the ledger "
                 "is unreadable", "baton restore-ledger runs/quickstart",
                 "0 restored; 2 the ledger reads, or no readable ledger.json.1")
    p.add_argument("run_dir", type=Path, metavar="RUN", help="the run folder")

    p = _command(sub, "schema", "the manifest's JSON Schema, every kind's options in it (for editors), or the "
                 "same as the reference page of docs/", "baton schema -o manifest.schema.json",
                 "0 written; 2 the file cannot be written")
    p.add_argument("-o", "--output", type=Path, help="write it to this file instead of stdout")
    p.add_argument("--format", choices=("json", "markdown"), default="json",
                   help="json: the JSON Schema; markdown: docs/reference/manifest.md, every key with its type, "
                   "default and description")

    p = _command(sub, "report", "one self-contained HTML page: lineage, curves, evals, attempts, settings",
                 "baton report runs/quickstart -o quickstart.html", READ_EXITS)
    p.add_argument("run_dir", type=Path, metavar="RUN", help="the run folder")
    p.add_argument("-o", "--output", type=Path, help="where to write it (default: <run>/report.html)")

    args = parser.parse_args(argv)
    try:
        return _dispatch(args)
    except BatonError as e:
        for line in str(e).splitlines():
            print(f"baton: {line}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except OSError as e:  # the driver's own writes (spec, logs, the manifest's copy) on a full disk
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"baton: no space left on device writing {e.filename or 'a file'}; free space and run again",
              file=sys.stderr)
        return ConfigError.exit_code


def _dispatch(args: argparse.Namespace) -> int:
    from launcher import ledger, pipeline, report

    if getattr(args, "output", None) is not None:
        _refuse_kept(args.output)  # before any work

    if args.command == "validate":
        stages = pipeline.validate(args.manifest)
        print(f"{args.manifest}: ok, {len(stages)} stage(s): " + ", ".join(f"{s.name} [{s.kind}]" for s in stages))
        return 0
    if args.command == "run":
        return pipeline.run(args.manifest, args.run_dir, args.dry_run, args.only, args.start)
    if args.command in ("submit", "cancel", "job"):
        from launcher.slurm import driver

        if args.command == "submit":
            return driver.submit(args.manifest, args.run_dir, args.only, args.start)
        if args.command == "cancel":
            return driver.cancel(args.run_dir)
        return driver.run_job(args.run_dir, args.stage)
    if args.command == "resume":
        return pipeline.resume(args.run_dir)
    if args.command == "status":
        run_dir = report.run_folder(args.run_dir)
        print(json.dumps(report.status_data(run_dir), indent=2) if args.json else report.status(run_dir, args.wide))
        return 0
    if args.command == "lineage":
        from launcher import lineage

        if args.format == "png" and args.output is None:
            raise ConfigError("lineage --format png: a picture is not for a terminal; give -o FILE.png")
        _output(lineage.render(args.run_dir, args.format), args.output)
        return 0
    if args.command == "verify":
        text, intact = report.verify(args.run_dir)
        print(text)
        return 0 if intact else 1
    if args.command == "report":
        from launcher import htmlreport

        out = args.output or args.run_dir / "report.html"
        _output(htmlreport.build(args.run_dir), out)
        print(out)
        return 0
    if args.command == "restore-ledger":
        print(ledger.restore(args.run_dir))
        return 0
    if args.command == "schema":
        from launcher import reference

        text = reference.markdown(schema()) if args.format == "markdown" else json.dumps(schema(), indent=2) + "\n"
        _output(text, args.output)
        return 0
    raise AssertionError(args.command)


def _output(data: str | bytes, path: Path | None) -> None:
    """A command's output on stdout, or written atomically to `path` (-o)."""
    if path is None:
        sys.stdout.write(data if isinstance(data, str) else data.decode("utf-8"))
        return
    from contract.files import write_atomic

    _refuse_kept(path)
    try:
        write_atomic(path, data)
    except OSError as e:
        raise ConfigError(f"{path}: cannot write: {e.strerror or e}") from None


def _command(sub: Any, name: str, summary: str, example: str, exits: str, more: str = "") -> argparse.ArgumentParser:
    """A subcommand whose --help says what it does, one example and its exit codes."""
    description = textwrap.fill(f"{summary[0].upper()}{summary[1:]}. {more}".strip(), 79)
    epilog = f"Example:\n  {example}\n\nExit codes:\n  " + exits.replace("; ", "\n  ")
    return sub.add_parser(name, help=summary, description=description, epilog=epilog,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


class _Version(argparse.Action):
    """--version: baton's and its main libraries' versions, read from their metadata (no torch import)."""

    def __init__(self, option_strings: list[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        from launcher.attempts import versions

        print("".join(f"{name} {v or 'not installed'}\n" for name, v in versions().items()), end="")
        parser.exit()


def _refuse_kept(path: Path) -> None:
    from launcher.ledger import owner

    why = owner(path)
    if why:
        raise ConfigError(f"-o {path}: {why}; write the output elsewhere")


def schema() -> dict[str, object]:
    """The manifest's JSON Schema: what editors check a manifest against."""
    from launcher.manifest import json_schema

    return json_schema()


if __name__ == "__main__":
    sys.exit(main())
