"""Reload a structurally pruned folder: stock transformers classes, shrunk per layer, then the weights.

Stock transformers configs hold one head count and one intermediate size for all layers, so they
cannot describe a model whose layers were pruned differently. The saved config.json therefore keeps
the original sizes plus a `prunekit_structure` entry (per layer: heads, KV heads, intermediate size,
which linears carry a bias; also in prunekit.json). The loader builds the stock model from the config
(no remote code), replaces each block's linears with ones of the recorded shapes, and loads the
safetensors state dict strictly (no pickle). Plain `AutoModelForCausalLM.from_pretrained` refuses such
a folder (size mismatch): use `prunekit.load(DIR)`.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.structured.shrink import SPEC_KEY


def structured_spec(folder: str | Path) -> dict[str, Any] | None:
    """The recorded per-layer sizes if `folder` holds a structurally pruned prunekit model, else None."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text()).get(SPEC_KEY)
    except (OSError, ValueError, AttributeError):
        return None


def _shaped(hidden: int, layer: dict[str, Any], head_dim: int) -> dict[str, tuple[int, int]]:
    q = layer["num_attention_heads"] * head_dim
    kv = layer["num_key_value_heads"] * head_dim
    inter = layer["intermediate_size"]
    return {"self_attn.q_proj": (hidden, q), "self_attn.k_proj": (hidden, kv), "self_attn.v_proj": (hidden, kv),
            "self_attn.o_proj": (q, hidden), "mlp.gate_proj": (hidden, inter), "mlp.up_proj": (hidden, inter),
            "mlp.down_proj": (inter, hidden)}


def _shrink_to_spec(model: nn.Module, spec: dict[str, Any]) -> None:
    from prunekit.structured.layout import get_structure

    if spec.get("kind") == "ssm":
        from prunekit.structured.ssm import shrink_to_spec

        shrink_to_spec(model, spec)
        return

    structure = get_structure(model)
    blocks = structure.blocks()
    layers = spec.get("layers", [])
    if len(layers) != len(blocks):
        raise PrunekitError(f"{SPEC_KEY} lists {len(layers)} layers but the config builds {len(blocks)}")
    hidden = model.config.hidden_size
    for block, layer in zip(blocks, layers, strict=True):
        for name, (fan_in, fan_out) in _shaped(hidden, layer, spec["head_dim"]).items():
            parent_name, _, child = name.rpartition(".")
            parent = block.get_submodule(parent_name)
            setattr(parent, child, nn.Linear(fan_in, fan_out, bias=name in layer["bias"], dtype=torch.float32))
        attn, mlp = structure.attention(block), structure.mlp_module(block)
        attn.num_key_value_groups = layer["num_attention_heads"] // layer["num_key_value_heads"]
        for name, value in (("num_heads", layer["num_attention_heads"]),
                            ("num_attention_heads", layer["num_attention_heads"]),
                            ("num_key_value_heads", layer["num_key_value_heads"])):
            if hasattr(attn, name):
                setattr(attn, name, value)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = layer["intermediate_size"]


def load_structured(folder: str | Path, *, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None):
    """Rebuild a structurally pruned model from `folder` (see the module docstring); returns a LoadedModel."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from prunekit.models import LoadedModel

    path = Path(folder).expanduser().resolve()
    spec = structured_spec(path)
    if spec is None:
        raise PrunekitError(f"{path} is not a structurally pruned prunekit folder (no {SPEC_KEY} in config.json)")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise PrunekitError(f"{path} has no *.safetensors weights")
    manifest_path = path / "prunekit.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    if attn_implementation is None:
        attn_implementation = (manifest.get("structured") or {}).get("attn_implementation") or "sdpa"
    try:  # every weight is overwritten by the state dict: skip the random initialisation
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        no_init_weights = contextlib.nullcontext
    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
        with no_init_weights():
            try:
                model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation,
                                                         trust_remote_code=False)
            except ValueError as error:  # attention-free models (Mamba) take no SDPA
                from prunekit.models.folder import is_attention_error

                if not is_attention_error(error):
                    raise
                attn_implementation = "eager"
                model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", trust_remote_code=False)
            _shrink_to_spec(model, spec)
    except (OSError, ValueError, KeyError) as error:
        raise PrunekitError(f"cannot rebuild the model of {path}: {' '.join(str(error).split())[:300]}") from error
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise PrunekitError(f"weights of {path} do not match the recorded structure: missing "
                            f"{sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]}")
    if tied:
        model.tie_weights()
    model.to(dtype).eval()
    setattr(model.config, SPEC_KEY, spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError, TypeError):  # saved without one (API users may skip it)
        tokenizer = None
    provenance = {"spec": str(folder), "kind": "prunekit-structured", "resolved": str(path),
                  "attn_implementation": attn_implementation,
                  "parameters": sum(p.numel() for p in model.parameters())}
    return LoadedModel(model, tokenizer, provenance)


def load(spec: str | Path, **kwargs: Any):
    """Load any model prunekit can: a structurally pruned output folder, or whatever `load_model` takes."""
    text = str(spec)
    if Path(text).expanduser().is_dir() and structured_spec(Path(text).expanduser()) is not None:
        return load_structured(text)
    from prunekit.models import load_model

    return load_model(spec, **kwargs)
