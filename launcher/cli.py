"""`baton`: parse arguments, call into launcher/, turn a BatonError into one line and its exit code."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from launcher.errors import BatonError, ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="baton", description="Multi-stage DeepSpeed training from a YAML manifest.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a manifest (schema, files, DeepSpeed configs); launches nothing")
    p.add_argument("manifest", type=Path)

    p = sub.add_parser("run", help="run (or resume) the stages a manifest asks for")
    p.add_argument("manifest", type=Path)
    p.add_argument("--run-dir", type=Path, help="run folder (default: run.dir, or runs/<run.name>)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the exact commands; launch nothing")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--only", metavar="STAGE", help="consider this stage alone (its inputs must be done)")
    group.add_argument("--from", dest="start", metavar="STAGE", help="consider this stage and the ones after it")

    p = sub.add_parser("submit", help="queue the stages the plan needs as Slurm jobs (afterok chain) and return")
    p.add_argument("manifest", type=Path)
    p.add_argument("--run-dir", type=Path, help="run folder (default: run.dir, or runs/<run.name>)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--only", metavar="STAGE", help="submit this stage alone (its inputs must be done)")
    group.add_argument("--from", dest="start", metavar="STAGE", help="submit this stage and the ones after it")

    p = sub.add_parser("cancel", help="cancel a run's queued and running Slurm jobs")
    p.add_argument("run_dir", type=Path)

    p = sub.add_parser("job")  # the body of a stage's sbatch job; not for people
    p.add_argument("run_dir", type=Path)
    p.add_argument("stage")

    p = sub.add_parser("resume", help="run again the manifest a run folder was made from")
    p.add_argument("run_dir", type=Path)

    p = sub.add_parser("status", help="table of stages: state, progress, metrics, digests (works while a run runs)")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--json", action="store_true", help="the same as one JSON object, for scripts")
    p.add_argument("--wide", action="store_true",
                   help="every column (input -> output digests, start-up time), nothing cut to fit 80 columns")

    p = sub.add_parser("lineage", help="which checkpoint fed which stage: text, JSON, Mermaid or a picture")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--format", choices=("text", "json", "mermaid", "svg", "png"), default="text",
                   help="text (default); json: the graph as data; mermaid: a Markdown flowchart; svg, png: a picture")
    p.add_argument("--json", dest="format", action="store_const", const="json", help="the same as --format json")
    p.add_argument("-o", "--output", type=Path, help="write to this file (atomically) instead of stdout; png needs it")
    sub.add_parser("verify", help="hash each done stage's final/ again and compare with the ledger (exit 1: damaged)"
                   ).add_argument("run_dir", type=Path)

    p = sub.add_parser("schema", help="the manifest's JSON Schema, every kind's options in it (for editors)")
    p.add_argument("-o", "--output", type=Path, help="write it to this file instead of stdout")

    p = sub.add_parser("report", help="one self-contained HTML page: lineage, curves, evals, attempts, settings")
    p.add_argument("run_dir", type=Path)
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


def _dispatch(args: argparse.Namespace) -> int:
    from launcher import pipeline, report

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
        print(json.dumps(report.status_data(args.run_dir), indent=2) if args.json
              else report.status(args.run_dir, args.wide))
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
    if args.command == "schema":
        _output(json.dumps(schema(), indent=2) + "\n", args.output)
        return 0
    raise AssertionError(args.command)


def _output(data: str | bytes, path: Path | None) -> None:
    """A command's output on stdout, or written atomically to `path` (-o)."""
    if path is None:
        sys.stdout.write(data if isinstance(data, str) else data.decode("utf-8"))
        return
    from contract.files import write_atomic

    try:
        write_atomic(path, data)
    except OSError as e:
        raise ConfigError(f"{path}: cannot write: {e.strerror or e}") from None


def schema() -> dict[str, object]:
    """The manifest's JSON Schema (draft 2020-12, as pydantic writes it): what editors check a manifest against."""
    from launcher.manifest import Manifest

    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "baton manifest",
            **{k: v for k, v in Manifest.model_json_schema(by_alias=True).items() if k != "title"}}


if __name__ == "__main__":
    sys.exit(main())
