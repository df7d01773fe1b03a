"""GGUF files: read the header, dequantize one tensor at a time, convert to a plain safetensors folder.

transformers knows how GGUF names and lays out each family's tensors (`get_gguf_hf_weights_map`, and a
per-architecture processor that undoes llama.cpp's q/k permutation or Gemma's norm offset); prunekit uses
that knowledge tensor by tensor instead of transformers' whole-model loader, so a GGUF is never held in
memory twice (packed and dequantized) and a large one can be streamed block by block.
"""

from __future__ import annotations

import contextlib
import mmap
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prunekit.errors import PrunekitError
from prunekit.models.messages import one_line
from prunekit.models.tensors import TensorSpec

#: Tensor types that need no dequantization.
_FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def inspect_gguf(path: Path) -> dict[str, Any]:
    """Parse a GGUF header and tensor table, so that a broken file fails here, by name, in one line."""
    import gguf

    reader = None
    try:
        reader = gguf.GGUFReader(str(path))
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
        architecture = _field(reader, "general.architecture")
        file_type = _field(reader, "general.file_type")
        count = len(reader.tensors)
        types = sorted({t.tensor_type.name for t in reader.tensors})
    except Exception as error:  # the parser raises anything (ValueError, IndexError, ...) on garbage
        raise PrunekitError(
            f"{path} is not a readable GGUF file ({one_line(error)}); expected a complete .gguf model"
        ) from error
    finally:
        reader = None  # release the memory map
    size = path.stat().st_size
    if count == 0 or end > size:
        raise PrunekitError(f"{path} is a truncated or empty GGUF file ({size} bytes, tensors need {end})")
    unsupported = [t for t in types if t not in _FLOAT_TYPES and not _can_dequantize(t)]
    if unsupported:
        raise PrunekitError(f"{path} holds tensors of quantization type {unsupported[0]}, which gguf-py cannot "
                            f"dequantize; accepted: F32, F16, BF16 and the types of gguf.quants")
    info: dict[str, Any] = {"gguf_architecture": architecture, "gguf_tensors": count, "gguf_tensor_types": types}
    if isinstance(file_type, int):
        try:
            info["source_quantization"] = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_")
        except ValueError:
            info["source_quantization"] = str(file_type)
    return info


def _can_dequantize(type_name: str) -> bool:
    from gguf import GGMLQuantizationType
    from gguf.quants import _type_traits  # the registry of dequantizers gguf-py implements

    return GGMLQuantizationType[type_name] in _type_traits


def _field(reader: Any, key: str) -> Any:
    """A scalar or string GGUF metadata value, or None (works across gguf-py versions)."""
    entry = reader.fields.get(key)
    if entry is None:
        return None
    if hasattr(entry, "contents"):
        return entry.contents()
    value = entry.parts[entry.data[0]]
    return bytes(value).decode("utf-8") if value.dtype == "uint8" else value.tolist()[0]


def natural_dtype(info: dict[str, Any]) -> torch.dtype:
    """The dtype a GGUF's weights are written out in by default: its float type, float16 for quantized files
    (llama.cpp's own dequantization target; the dequantized values are scale × small integer)."""
    quant = str(info.get("source_quantization", ""))
    return {"ALL_F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}.get(quant, torch.float16)


def gguf_config(path: Path):
    """The transformers config stored in a GGUF's metadata (no tensors are read)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, NotImplementedError) as error:
        raise PrunekitError(f"could not read the model config of GGUF file {path}: {one_line(error)}") from error
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def gguf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        raise PrunekitError(f"could not read the tokenizer of GGUF file {path}: {one_line(error)}") from error


class GGUFTensors:
    """A GGUF file read as Hugging Face tensors, one dequantized tensor per `read`.

    `skeleton` is the model built from the file's config on the meta device: its parameter names give the
    GGUF → HF name map. After each read the touched pages of the file mapping are dropped (MADV_DONTNEED),
    so resident memory stays at one tensor however large the file is.
    """

    def __init__(self, path: Path, skeleton: torch.nn.Module):
        import gguf
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
        )

        self.path = path
        self.bytes_read = 0
        self._reader = gguf.GGUFReader(str(path))
        architecture = _field(self._reader, "general.architecture")
        config = skeleton.config.to_dict()
        self._processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config)
        to_hf = get_gguf_hf_weights_map(skeleton, self._processor)
        self._tensors = {}
        self._specs: dict[str, TensorSpec] = {}
        shapes = {name: tuple(p.shape) for name, p in skeleton.state_dict().items()}
        for tensor in self._reader.tensors:
            hf_name = to_hf.get(tensor.name)
            if hf_name is None:
                continue
            self._tensors[hf_name] = tensor
            shape = shapes.get(hf_name, tuple(int(s) for s in reversed(tensor.shape)))
            self._specs[hf_name] = TensorSpec(shape, torch.float32)
        self._to_gguf = {hf: t.name for hf, t in self._tensors.items()}

    def specs(self) -> dict[str, TensorSpec]:
        return dict(self._specs)

    def read(self, name: str) -> torch.Tensor:
        from gguf import dequantize

        tensor = self._tensors.get(name)
        if tensor is None:
            raise PrunekitError(f"tensor {name} is not in the GGUF file {self.path}")
        weights = dequantize(tensor.data, tensor.tensor_type)
        result = self._processor.process(weights=weights, name=tensor.name, tensor_key_mapping=self._to_gguf,
                                         parsed_parameters={"config": {}, "tensors": {}})
        out = torch.from_numpy(np.array(result.weights, dtype=np.float32, copy=True))
        self.bytes_read += int(tensor.n_bytes)
        self._drop_pages()
        expected = self._specs[name].shape
        if tuple(out.shape) != expected:
            out = out.reshape(expected)
        return out

    def _drop_pages(self) -> None:
        data = self._reader.data
        handle = getattr(data, "_mmap", None)
        if handle is not None and hasattr(mmap, "MADV_DONTNEED"):
            with contextlib.suppress(OSError, ValueError):
                handle.madvise(mmap.MADV_DONTNEED)


def convert_gguf(path: Path, stage: Path, meta: dict[str, Any], dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Write a GGUF as a plain safetensors folder into `stage` (config, tokenizer, weights), tensor by tensor."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, GenerationConfig

    from prunekit.export.shards import write_shard

    started = time.monotonic()
    info = {**meta, **inspect_gguf(path)}
    config = gguf_config(path)
    config.dtype = dtype
    try:
        with init_empty_weights():
            skeleton = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError, RuntimeError) as error:
        raise PrunekitError(f"could not build the model of GGUF file {path}: {one_line(error)}") from error
    config.architectures = [type(skeleton).__name__]
    reader = GGUFTensors(path, skeleton)
    specs = {name: TensorSpec(spec.shape, dtype) for name, spec in reader.specs().items()}
    expected = set(skeleton.state_dict())
    if getattr(config, "tie_word_embeddings", False):
        expected.discard("lm_head.weight")
    missing = sorted(expected - set(specs))
    if missing:
        raise PrunekitError(f"GGUF file {path} has no tensor for {missing[0]} ({len(missing)} missing)")
    write_shard(stage / "model.safetensors", ((name, reader.read(name)) for name in specs), specs,
                metadata={"format": "pt"})
    config.save_pretrained(stage)
    GenerationConfig.from_model_config(config).save_pretrained(stage)
    gguf_tokenizer(path).save_pretrained(stage)
    info["conversion_seconds"] = round(time.monotonic() - started, 1)
    return info
