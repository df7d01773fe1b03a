"""Reading a checkpoint one tensor at a time, so memory is bounded by a tensor, not by the model.

`SafetensorsFolder` reads a Hugging Face folder (one file or shards with `model.safetensors.index.json`)
through `safetensors.safe_open`, opening the file for each read: the whole file is memory-mapped while it is
open, and pages touched through a mapping count in the process's resident memory until it is closed, so a
handle kept open over a 5 GB shard would grow the RSS by the shard. `GGUFTensors` (models/gguf.py) offers
the same interface over a GGUF file, dequantizing one tensor per read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from prunekit.errors import PrunekitError
from prunekit.models.messages import one_line

INDEX = "model.safetensors.index.json"

#: safetensors dtype strings → torch dtypes (the ones a model checkpoint holds).
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip
TORCH_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()


class TensorReader(Protocol):
    """What the streamed engine reads a checkpoint through."""

    #: bytes read from disk so far (for the run record)
    bytes_read: int

    def specs(self) -> dict[str, TensorSpec]:
        """Every tensor's shape and stored dtype, from headers only."""

    def read(self, name: str) -> torch.Tensor:
        """One tensor, on CPU, in its stored dtype (a GGUF tensor comes dequantized)."""


class SafetensorsFolder:
    """The safetensors files of a model folder; `read` opens, reads and closes (see the module docstring)."""

    def __init__(self, folder: str | Path):
        from safetensors import SafetensorError, safe_open

        self.folder = Path(folder)
        self.bytes_read = 0
        index = self.folder / INDEX
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise PrunekitError(f"{index} is not a valid safetensors index ({one_line(error)})") from error
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.folder / f).is_file()]
            if missing:
                raise PrunekitError(f"shard {missing[0]} listed in {index} is missing from {self.folder}")
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
            if not files:
                raise PrunekitError(f"{self.folder} has no *.safetensors weights")
            weight_map = {}
        self._file_of: dict[str, str] = {}
        self._specs: dict[str, TensorSpec] = {}
        for name in files:
            path = self.folder / name
            try:
                with safe_open(str(path), framework="pt") as handle:
                    for key in handle.keys():  # noqa: SIM118  (a safe_open handle is not a dict)
                        info = handle.get_slice(key)
                        dtype = SAFETENSORS_DTYPES.get(info.get_dtype())
                        if dtype is None:
                            raise PrunekitError(f"tensor {key} in {path} has unsupported dtype {info.get_dtype()}")
                        self._specs[key] = TensorSpec(tuple(info.get_shape()), dtype)
                        self._file_of[key] = name
            except (SafetensorError, OSError) as error:
                raise PrunekitError(f"corrupt safetensors file {path} ({one_line(error)}); re-download or re-save it"
                                    ) from error
        for key, name in weight_map.items():
            if self._file_of.get(key) != name:
                raise PrunekitError(f"tensor {key} is listed in {index} under {name} but that shard does not hold it")

    def specs(self) -> dict[str, TensorSpec]:
        return dict(self._specs)

    def files(self) -> list[Path]:
        return [self.folder / name for name in sorted(set(self._file_of.values()))]

    def read(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        file = self._file_of.get(name)
        if file is None:
            raise PrunekitError(f"tensor {name} is not in the checkpoint {self.folder}")
        with safe_open(str(self.folder / file), framework="pt") as handle:
            tensor = handle.get_tensor(name)
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor
