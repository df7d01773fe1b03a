"""Save a pruned model as an HF folder (safetensors, config, tokenizer) plus `prunekit.json`.

The folder is written under a temporary name beside the target and renamed into place (`prunekit.files`),
so a crash never leaves a half-written model where a user (or a later `eval`) would find it, and
`--overwrite` never replaces a folder prunekit did not write.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from prunekit.files import MANIFEST, atomic_write_json, check_output_dir, new_staging_dir, publish_dir

__all__ = ["MANIFEST", "check_output_dir", "read_manifest", "save_model"]


def save_model(model, tokenizer, out_dir: str | Path, manifest: dict[str, Any], *, overwrite: bool = False) -> Path:
    out = check_output_dir(out_dir, overwrite)
    staging = new_staging_dir(out)
    try:
        model.save_pretrained(staging, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        atomic_write_json(staging / MANIFEST, manifest)
        publish_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None
