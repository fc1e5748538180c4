"""How a stage process starts and ends: `python -m stages.<kind> --spec spec.json` → exit code."""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

from contract.layout import EXIT_BAD_INPUT, EXIT_FAILED, write_bad_input
from contract.spec import ContractError
from stages.runtime import dist, signals
from stages.runtime import spec as spec_mod
from stages.runtime.dist import Dist
from stages.runtime.spec import Spec, SpecError


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
    except (ContractError, ValidationError) as e:  # ValidationError: spec.options against the kind's model
        if dist.is_main():
            print(f"baton stage error: {e}", file=sys.stderr)
            # torchrun reports any failing rank as its own exit 1; this file tells the launcher it was bad input
            stage_dir = json.loads(Path(args.spec).read_text()).get("stage_dir") if Path(args.spec).is_file() else None
            if stage_dir and Path(stage_dir).is_dir():
                write_bad_input(stage_dir, " ".join(str(e).split()))
        dist.finish(EXIT_BAD_INPUT, sync=False)
    except BaseException:
        traceback.print_exc()
        dist.finish(EXIT_FAILED, sync=False)
    dist.finish(code)
