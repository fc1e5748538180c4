"""How a stage process starts and ends: `python -m stages.<kind> --spec spec.json` → exit code."""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from launcher.files import write_json
from stages.runtime import dist, signals
from stages.runtime import spec as spec_mod
from stages.runtime.dist import Dist
from stages.runtime.spec import Spec, SpecError

EXIT_DONE, EXIT_BAD_INPUT, EXIT_FAILED, EXIT_STOPPED = 0, 2, 1, 75


def run(main: Callable[[Spec, Dist], int]) -> None:
    """Parse --spec, start distributed state, call `main`, and exit with the contract's code. Never returns."""
    signals.install()
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", required=True, help="path to the stage's spec.json")
    args = parser.parse_args()
    try:
        spec = spec_mod.load(args.spec)
        d = dist.init()
        if d.world_size != spec.world_size:
            raise SpecError(f"{args.spec}: world_size {spec.world_size} but torchrun started {d.world_size} processes")
        code = main(spec, d)
    except SpecError as e:
        if dist.is_main():
            print(f"baton stage error: {e}", file=sys.stderr)
            # torchrun reports any failing rank as its own exit 1; this file tells the launcher it was bad input
            stage_dir = json.loads(Path(args.spec).read_text()).get("stage_dir") if Path(args.spec).is_file() else None
            if stage_dir and Path(stage_dir).is_dir():
                write_json(Path(stage_dir) / "error.json", {"exit_code": EXIT_BAD_INPUT, "message": str(e)})
        dist.finish(EXIT_BAD_INPUT, sync=False)
    except BaseException:
        traceback.print_exc()
        dist.finish(EXIT_FAILED, sync=False)
    dist.finish(code)


def write_result(spec: Spec, *, steps: int, samples: int, output: str, digest: str | None,
                 metrics: dict[str, float]) -> None:
    """result.json, last of all (rank 0): what the launcher records in the ledger."""
    if not dist.is_main():
        return
    write_json(f"{spec.stage_dir}/result.json", {
        "status": "done", "stage": spec.stage, "kind": spec.kind, "fingerprint": spec.fingerprint,
        "steps": steps, "samples": samples, "output": {"path": output, "digest": digest},
        "metrics": metrics, "time": time.time(),
    })
