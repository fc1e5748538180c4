"""`baton`: parse arguments, call into launcher/, turn a BatonError into one line and its exit code."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from launcher.errors import BatonError


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

    for name, text in (("status", "table of stages: state, steps, metrics, digests"),
                       ("lineage", "which checkpoint fed which stage"),
                       ("verify", "hash each done stage's final/ again and compare with the ledger (exit 1: damaged)")):
        sub.add_parser(name, help=text).add_argument("run_dir", type=Path)

    sub.add_parser("schema", help="print the manifest's JSON Schema")

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
        from launcher import slurm

        if args.command == "submit":
            return slurm.submit(args.manifest, args.run_dir, args.only, args.start)
        if args.command == "cancel":
            return slurm.cancel(args.run_dir)
        return slurm.run_job(args.run_dir, args.stage)
    if args.command == "resume":
        return pipeline.resume(args.run_dir)
    if args.command == "status":
        print(report.status(args.run_dir))
        return 0
    if args.command == "lineage":
        print(report.lineage(args.run_dir))
        return 0
    if args.command == "verify":
        text, intact = report.verify(args.run_dir)
        print(text)
        return 0 if intact else 1
    if args.command == "schema":
        from launcher.manifest import Manifest

        print(json.dumps(Manifest.model_json_schema(by_alias=True), indent=2))
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
