"""A model opened for streaming: its config, a weightless skeleton, and its tensors read one at a time.

The skeleton is the stock transformers model built under accelerate's `init_empty_weights`: parameters on
the meta device (no memory), buffers real (rotary tables). The engine fills one block at a time from the
`TensorReader` and empties it again, so a model far larger than memory can be pruned.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.models.messages import one_line
from prunekit.models.spec import ResolvedModel, resolve
from prunekit.models.tensors import SafetensorsFolder, TensorReader, TensorSpec

#: Files copied from a source folder into a pruned output (everything but weights and the old manifest).
AUX_SUFFIXES = (".json", ".model", ".txt", ".jinja", ".tiktoken")
_NOT_COPIED = {"config.json", "model.safetensors.index.json", "prunekit.json"}


@dataclass
class Checkpoint:
    """Everything the streamed engine needs to know about a model without loading its weights."""

    resolved: ResolvedModel
    config: Any
    tensors: TensorReader
    dtype: torch.dtype
    trust_remote_code: bool = False
    _skeleton: nn.Module | None = field(default=None, repr=False)
    #: model parameter name → checkpoint tensor name (they differ when a checkpoint omits the base prefix)
    names: dict[str, str] = field(default_factory=dict)

    # -- the weightless model ---------------------------------------------------------------------------
    def skeleton(self) -> nn.Module:
        if self._skeleton is None:
            self._skeleton = build_skeleton(self.config, self.trust_remote_code)
            self.names = self._match_names(self._skeleton)
        return self._skeleton

    def _match_names(self, model: nn.Module) -> dict[str, str]:
        """Map every parameter to its checkpoint tensor; a missing tensor or a wrong shape is one line, now."""
        specs = self.tensors.specs()
        prefix = getattr(model, "base_model_prefix", "") or ""
        tied = tied_parameters(model)
        names: dict[str, str] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            if name in tied:
                continue
            candidates = [name]
            if prefix and name.startswith(prefix + "."):
                candidates.append(name[len(prefix) + 1 :])
            found = next((c for c in candidates if c in specs), None)
            if found is None:
                raise PrunekitError(f"the checkpoint {self.where} has no tensor {name}, which its config needs")
            if tuple(specs[found].shape) != tuple(param.shape):
                raise PrunekitError(f"tensor {found} has shape {list(specs[found].shape)} in {self.where}, but the "
                                    f"config gives {list(param.shape)}")
            names[name] = found
        return names

    @property
    def where(self) -> str:
        return str(self.resolved.gguf or self.resolved.folder)

    def spec(self, name: str) -> TensorSpec:
        return self.tensors.specs()[self.names[name]]

    def read(self, name: str) -> torch.Tensor:
        return self.tensors.read(self.names[name])

    # -- sizes and identity -----------------------------------------------------------------------------
    def parameter_count(self) -> int:
        self.skeleton()
        specs = self.tensors.specs()
        return sum(_numel(specs[n].shape) for n in self.names.values())

    def stored_bytes(self) -> int:
        self.skeleton()
        specs = self.tensors.specs()
        return sum(specs[n].nbytes for n in self.names.values())

    def fingerprint(self) -> str:
        """Identity of the weights for resume: config, tensor table, and each file's size and mtime."""
        digest = hashlib.sha256(json.dumps(self.config.to_dict(), sort_keys=True, default=str).encode())
        for name, spec in sorted(self.tensors.specs().items()):
            digest.update(f"{name}:{spec.shape}:{spec.dtype}".encode())
        for path in self.files():
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        return digest.hexdigest()

    def files(self) -> list[Path]:
        if self.resolved.gguf is not None:
            return [self.resolved.gguf]
        assert isinstance(self.tensors, SafetensorsFolder)
        return self.tensors.files()

    # -- everything but the weights ---------------------------------------------------------------------
    def tokenizer(self):
        from transformers import AutoTokenizer

        from prunekit.models.gguf import gguf_tokenizer

        if self.resolved.gguf is not None:
            return gguf_tokenizer(self.resolved.gguf)
        try:
            return AutoTokenizer.from_pretrained(str(self.resolved.folder), trust_remote_code=self.trust_remote_code)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
            raise PrunekitError(f"could not load the tokenizer of {self.where}: {one_line(error)}") from error

    def copy_aux_files(self, dest: Path, tokenizer: Any = None) -> None:
        """Tokenizer, generation config and templates of the source, beside the new weights."""
        if self.resolved.folder is not None:
            for path in sorted(self.resolved.folder.iterdir()):
                if path.is_file() and path.suffix in AUX_SUFFIXES and path.name not in _NOT_COPIED:
                    shutil.copyfile(path, dest / path.name)
        else:
            from transformers import GenerationConfig

            (tokenizer or self.tokenizer()).save_pretrained(dest)
            GenerationConfig.from_model_config(self.config).save_pretrained(dest)

    def provenance(self) -> dict[str, Any]:
        import transformers

        return {"spec": self.resolved.spec, "kind": self.resolved.kind, "resolved": self.where,
                **self.resolved.extra, "architecture": type(self.skeleton()).__name__,
                "model_type": getattr(self.config, "model_type", None), "num_parameters": self.parameter_count(),
                "num_layers": getattr(self.config, "num_hidden_layers", None),
                "stored_dtype": str(self.dtype).removeprefix("torch."), "streamed": True,
                "transformers_version": transformers.__version__}


def open_checkpoint(spec: str | Path, *, trust_remote_code: bool = False, revision: str | None = None) -> Checkpoint:
    """Open `spec` for streaming (nothing but headers and config is read); one line for anything wrong."""
    from transformers import AutoConfig

    from prunekit.models.folder import check_folder
    from prunekit.models.gguf import GGUFTensors, gguf_config, natural_dtype

    resolved = resolve(spec, revision=revision, trust_remote_code=trust_remote_code)
    if resolved.gguf is not None:
        config = gguf_config(resolved.gguf)
        skeleton = build_skeleton(config, trust_remote_code)
        checkpoint = Checkpoint(resolved, config, GGUFTensors(resolved.gguf, skeleton), natural_dtype(resolved.extra),
                                trust_remote_code, _skeleton=skeleton)
        checkpoint.names = checkpoint._match_names(skeleton)
        return checkpoint
    assert resolved.folder is not None
    check_folder(resolved.folder, resolved.label)
    try:
        config = AutoConfig.from_pretrained(str(resolved.folder), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise PrunekitError(f"could not read the config of {resolved.folder}: {one_line(error)}") from error
    from prunekit.structured.shrink import SPEC_KEY

    if getattr(config, SPEC_KEY, None) is not None:
        raise PrunekitError(f"{resolved.folder} is a structurally pruned model; it is pruned again in memory only")
    if getattr(config, "quantization_config", None):
        raise PrunekitError(f"{resolved.folder} holds a quantized model; prunekit needs plain float weights "
                            f"(pass the .gguf file or an unquantized checkpoint)")
    tensors = SafetensorsFolder(resolved.folder)
    checkpoint = Checkpoint(resolved, config, tensors, _dominant_dtype(tensors.specs()), trust_remote_code)
    checkpoint.skeleton()
    return checkpoint


def build_skeleton(config: Any, trust_remote_code: bool = False) -> nn.Module:
    """The stock model class with meta parameters and real buffers, SDPA attention where supported."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from prunekit.models.folder import is_attention_error

    try:
        with init_empty_weights(include_buffers=False):
            try:
                model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa",
                                                         trust_remote_code=trust_remote_code)
            except (ValueError, ImportError) as error:
                if not is_attention_error(error):
                    raise
                # the failed attempt left "sdpa" in the config; models without attention (Mamba) take eager
                model = AutoModelForCausalLM.from_config(config, attn_implementation="eager",
                                                         trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, TypeError, RuntimeError, ImportError) as error:
        raise PrunekitError(f"could not build a causal LM from the config ({one_line(error)})") from error
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval()


def tied_parameters(model: nn.Module) -> set[str]:
    """Names under which an already-listed parameter appears again (a tied LM head)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.add(name)
        else:
            seen[id(param)] = name
    if getattr(model.config, "tie_word_embeddings", False):
        tied.add("lm_head.weight")  # written once, as the embeddings
    return tied


def _dominant_dtype(specs: dict[str, TensorSpec]) -> torch.dtype:
    by_bytes: Counter[torch.dtype] = Counter()
    for spec in specs.values():
        if spec.dtype.is_floating_point:
            by_bytes[spec.dtype] += spec.nbytes
    return by_bytes.most_common(1)[0][0] if by_bytes else torch.float32


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count
