"""Writing safetensors shards tensor by tensor, so a block (or a whole converted model) is never held twice.

safetensors' `save_file` needs every tensor of a file in memory at once, in its final dtype. Here the
header is written first from the shapes and dtypes (known before any tensor is computed), then each tensor
is converted to the output dtype and appended on its own. The files are the standard format (8-byte header
length, JSON header, data; stock `safe_open` and `from_pretrained` read them) and each is written under a
temporary name and renamed when complete, like every file prunekit writes.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from contextlib import suppress
from pathlib import Path

import torch

from prunekit.files import atomic_write_json
from prunekit.models.tensors import INDEX, TORCH_TO_SAFETENSORS, TensorSpec


class ShardWriter:
    """One safetensors file, written in the order of `specs`; call `write` for each tensor, then `close`."""

    def __init__(self, path: str | Path, specs: dict[str, TensorSpec], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.specs = dict(specs)
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = metadata
        offset = 0
        for name, spec in self.specs.items():
            header[name] = {"dtype": TORCH_TO_SAFETENSORS[spec.dtype], "shape": list(spec.shape),
                            "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.tmp")
        self._handle = self._tmp.open("wb")
        self._handle.write(struct.pack("<Q", len(encoded)) + encoded)
        self._pending = list(self.specs)
        self.bytes_written = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if not self._pending or self._pending[0] != name:
            expected = self._pending[0] if self._pending else "nothing"
            raise ValueError(f"{self.path.name}: got tensor {name}, expected {expected}")
        spec = self.specs[name]
        if tuple(tensor.shape) != spec.shape:
            raise ValueError(f"{name}: shape {tuple(tensor.shape)} differs from the header's {spec.shape}")
        data = tensor.detach().to(device="cpu", dtype=spec.dtype).contiguous()
        if data.numel():  # the tensor's own bytes, without a copy
            self._handle.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
        self.bytes_written += spec.nbytes
        self._pending.pop(0)

    def close(self) -> Path:
        if self._pending:
            self.abort()
            raise ValueError(f"{self.path.name}: {len(self._pending)} tensors were never written ({self._pending[0]})")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        with suppress(OSError):
            self._handle.close()
        with suppress(OSError):
            self._tmp.unlink()


def write_shard(path: str | Path, tensors: Iterable[tuple[str, torch.Tensor]], specs: dict[str, TensorSpec],
                metadata: dict[str, str] | None = None) -> int:
    """Write `tensors` (a generator is fine: one is alive at a time) into one file; returns bytes written."""
    writer = ShardWriter(path, specs, metadata)
    try:
        for name, tensor in tensors:
            writer.write(name, tensor)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return writer.bytes_written


def write_index(folder: str | Path, weight_map: dict[str, str], total_size: int) -> Path:
    """`model.safetensors.index.json`: which shard holds each tensor (what `from_pretrained` reads)."""
    return atomic_write_json(Path(folder) / INDEX,
                             {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))})


def shard_name(index: int, count: int) -> str:
    return f"model-{index:05d}-of-{count:05d}.safetensors"
