"""The prunekit model cache: converted aliases and GGUF files live here as plain safetensors folders.

A cache folder is built under a hidden staging name and renamed into place once complete, so a folder
that exists under its final name is whole; `is_complete` also checks the cache format, so a layout
change rebuilds stale folders instead of misreading them.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import platformdirs

#: Bump when the layout of a converted cache folder changes, so stale folders are rebuilt.
CACHE_FORMAT = 1
META = "prunekit.json"


def model_cache_dir() -> Path:
    """The prunekit user cache: ``$PRUNEKIT_CACHE`` if set, else the platform's user cache folder.

    Converted models live under ``<cache>/models/``.
    """
    env = os.environ.get("PRUNEKIT_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_cache_dir("prunekit"))


def models_dir() -> Path:
    return model_cache_dir() / "models"


def sweep_stale(folder: Path, max_age_s: float = 6 * 3600) -> None:
    """Remove work folders that prunekit's own killed conversions left (hundreds of MB each); recent ones may be
    live. Only hidden `.tmp-*` / `.download-*` folders inside the cache are touched."""
    now = time.time()
    for entry in folder.glob(".*"):
        if entry.name.startswith((".tmp-", ".download-")) and entry.is_dir():
            try:
                if now - entry.stat().st_mtime > max_age_s:
                    shutil.rmtree(entry, ignore_errors=True)
            except OSError:
                pass


def make_shareable(folder: Path) -> None:
    """`mkdtemp` makes a private (0700) folder; a cache folder should read like any other."""
    folder.chmod(0o755)
    for child in folder.iterdir():
        child.chmod(0o755 if child.is_dir() else 0o644)


def publish(stage: Path, target: Path) -> None:
    """Move a finished folder into place; if another process got there first, keep theirs."""
    if target.exists() and not is_complete(target) and read_meta(target).get("cache_format") is not None:
        shutil.rmtree(target, ignore_errors=True)  # a cache folder of an older format (prunekit wrote it)
    try:
        os.rename(stage, target)
    except OSError:
        if not is_complete(target):
            raise


def is_complete(folder: Path) -> bool:
    """A cache folder is usable once it was renamed into place, i.e. holds all its files."""
    if not (folder / "config.json").is_file():
        return False
    has_weights = (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()
    return has_weights and read_meta(folder).get("cache_format") == CACHE_FORMAT


def read_meta(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
