"""Keeping a library out of an import that would load it for a feature baton does not use.

`import deepspeed` loads mlflow where it is installed (DeepSpeed's autotuner logs to it): 1.2–1.5 s of a CPU core,
paid by every rank of every stage and by the driver's check of the DeepSpeed config. baton does not autotune; its
own mlflow tracker (stages/runtime/trackers.py) imports mlflow when a manifest asks for it, as usual.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

DEEPSPEED_UNUSED = ("mlflow",)  # what `import deepspeed` loads for features baton does not use


@contextmanager
def hidden(*modules: str) -> Iterator[None]:
    """Within: importing one of `modules` that is not imported yet fails as if it were not installed (a None in
    sys.modules makes `import` raise ModuleNotFoundError); after, it imports as usual."""
    hide = [name for name in modules if name not in sys.modules]
    for name in hide:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        for name in hide:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]
