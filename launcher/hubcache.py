"""Whether a Hugging Face hub model or dataset can be loaded offline: is it in the local cache?

Read from the cache's folders as huggingface_hub and datasets lay them out (hub/models--org--name/snapshots/…,
hub/datasets--org--name/…, datasets/org___name/…), found through the same environment variables; nothing is
imported and nothing asked of the network.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

TRUE = ("1", "ON", "YES", "TRUE")
FLAGS = {"model": ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"), "dataset": ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}


def offline_miss(name: str, kind: Literal["model", "dataset"], extra: list[Path] | None = None) -> str | None:
    """Why hub `name` cannot be loaded: offline is set and the name is in none of the caches (`extra`: more
    datasets caches, such as a run's). None when it can (or when downloads are allowed)."""
    flag = next((f for f in FLAGS[kind] if os.environ.get(f, "").upper() in TRUE), None)
    if flag is None:
        return None
    hub = hub_cache()
    repo = hub / f"{kind}s--{name.replace('/', '--')}"
    if _holds(repo / "snapshots"):
        return None
    if kind == "dataset":
        datasets = [Path(os.environ["HF_DATASETS_CACHE"]) if os.environ.get("HF_DATASETS_CACHE")
                    else hf_home() / "datasets", *(extra or [])]
        if any(_holds(folder / name.replace("/", "___")) for folder in datasets):
            return None
    return (f"{name!r}: not in the local Hugging Face cache ({hub}), and {flag}=1 forbids downloading it; "
            "fetch it once without it")


def hf_home() -> Path:
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "huggingface"


def hub_cache() -> Path:
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    return hf_home() / "hub"


def _holds(folder: Path) -> bool:
    try:
        return folder.is_dir() and any(folder.iterdir())
    except OSError:
        return False
