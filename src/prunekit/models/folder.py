"""Loading a Hugging Face model folder into memory: safetensors only, corrupt files caught by name, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from prunekit.errors import PrunekitError
from prunekit.models.loaded import LoadedModel
from prunekit.models.messages import one_line

PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"})


def check_folder(path: Path, label: str) -> None:
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
            raise PrunekitError(f"{config} is not valid JSON ({one_line(error)})") from error
        weights = sorted(path.glob("*.safetensors"))
        if not weights:
            pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
            if pickles:
                raise PrunekitError(
                    f"{label} {path} has only pickle weights ({', '.join(pickles[:3])}); prunekit loads "
                    f"*.safetensors only (pickle can run code) - convert the checkpoint to safetensors first"
                )
            raise PrunekitError(f"{label} {path} has no *.safetensors weights")
    except PermissionError as error:
        raise PrunekitError(f"cannot read {label} {path} ({one_line(error)})") from error
    from prunekit.models.tensors import SafetensorsFolder

    SafetensorsFolder(path)  # every header parses, every indexed shard exists


def load_folder(path: Path, *, spec: str, kind: str, dtype: torch.dtype, trust_remote_code: bool = False,
                label: str = "model folder", extra: dict[str, Any] | None = None) -> LoadedModel:
    """Load a Hugging Face model folder in memory in `dtype`."""
    path = path.resolve()
    check_folder(path, label)
    what = f"{label} {path}"
    model = _from_pretrained(str(path), what=what, dtype=dtype, trust_remote_code=trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        raise PrunekitError(f"could not load the tokenizer of {what}: {one_line(error)}") from error
    provenance: dict[str, Any] = {"spec": spec, "kind": kind, "resolved": str(path)}
    provenance.update(extra or {})
    return _finish(model, tokenizer, provenance, what=what, dtype=dtype)


def _from_pretrained(source: str, *, what: str, dtype: torch.dtype, trust_remote_code: bool) -> PreTrainedModel:
    """`from_pretrained` with SDPA attention where the architecture supports it, and one-line errors."""
    from safetensors import SafetensorError

    kwargs: dict[str, Any] = {"dtype": dtype, "use_safetensors": True, "trust_remote_code": trust_remote_code}
    try:
        try:
            return AutoModelForCausalLM.from_pretrained(source, attn_implementation="sdpa", **kwargs)
        except (ValueError, ImportError) as error:
            if not is_attention_error(error):
                raise
            return AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except SafetensorError as error:
        raise PrunekitError(f"corrupt safetensors weights in {what} ({one_line(error)})") from error
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, ImportError) as error:
        raise PrunekitError(f"could not load {what} as a causal LM: {one_line(error)}") from error


def is_attention_error(error: Exception) -> bool:
    message = str(error)
    return any(key in message for key in ("sdpa", "scaled_dot_product_attention", "attn_implementation"))


def _finish(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, provenance: dict[str, Any], *, what: str,
            dtype: torch.dtype) -> LoadedModel:
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
