"""A pruning recipe: the fields of `prunekit prune`, from YAML, with command-line flags on top."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from prunekit.errors import PrunekitError


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    method: str = "wanda"
    #: A mask refiner run after the method (e.g. "dsnot"); its options are prefixed "dsnot.".
    refine: str | None = None
    #: Per-block sparsities around the target (OWL); its options are prefixed "owl." (owl.m, owl.lam).
    sparsity_allocation: str | None = None
    sparsity: float = 0.5
    pattern: str = "unstructured"
    calib: str = "self"
    nsamples: int = 128
    seqlen: int | None = None
    seed: int = 0
    out: str | None = None
    overwrite: bool = False
    propagate: Literal["pruned", "dense"] = "pruned"
    batch_size: int = 8
    device: str = "cpu"
    prune_head: bool = False
    #: Streamed (block by block from disk; the default for models on disk) or loaded whole in memory.
    stream: bool | None = None
    #: Output dtype (default: the checkpoint's), compute dtype (default float32), activations dtype (default: the
    #: model's), memory limit ("3GB").
    dtype: str | None = None
    compute_dtype: str | None = None
    activations_dtype: str | None = None
    max_memory: str | None = None
    #: Options of the method's typed config, e.g. {"percdamp": 0.01} for sparsegpt.
    options: dict[str, Any] = {}
    #: Per-layer targets by glob on the full linear name: a sparsity or an "N:M" pattern.
    overrides: dict[str, float | str] = {}
    skip: list[str] = []


def _one_line(exc: ValidationError, where: str) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()) + f" ({where})"


def load_recipe(path: str | Path | None, flags: dict[str, Any]) -> Recipe:
    """Recipe file fields, then every flag the user actually gave (None = not given)."""
    fields: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            loaded = yaml.safe_load(p.read_text())
        except OSError as exc:
            raise PrunekitError(f"cannot read recipe {p}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise PrunekitError(f"recipe {p} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise PrunekitError(f"recipe {p} must be a YAML mapping of prune fields")
        fields.update(loaded)
    fields.update({k: v for k, v in flags.items() if v is not None})
    try:
        return Recipe(**fields)
    except ValidationError as exc:
        raise PrunekitError(f"bad recipe: {_one_line(exc, str(path) if path else 'command line')}") from None
