"""Save a pruned model as an HF folder (safetensors, config, tokenizer) plus `prunekit.json`.

The folder is written under a temporary name beside the target and renamed into place, so a crash
never leaves a half-written model where a user (or a later `eval`) would find it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from prunekit.errors import PrunekitError

MANIFEST = "prunekit.json"


def check_output_dir(out_dir: str | Path, overwrite: bool) -> Path:
    """Refuse an existing folder unless overwriting was asked for; called before any work starts."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise PrunekitError(f"output folder {out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise PrunekitError(f"output path {out} exists and is not a folder")
    return out


def save_model(model, tokenizer, out_dir: str | Path, manifest: dict[str, Any], *, overwrite: bool = False) -> Path:
    out = check_output_dir(out_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        if out.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, retired / out.name)
            os.replace(staging, out)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None
