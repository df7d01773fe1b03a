"""Calibration activations between blocks: [rows, seqlen, hidden] in a chosen dtype, in memory or on disk.

Each pass over a block reads the rows batch by batch and writes the block's outputs back row for row
(`update`), so only one copy is ever needed: a batch's outputs replace its own inputs, which nothing
reads again. `MemoryActivations` keeps them in a tensor and, when the run must survive a kill, saves a
copy after each block. `SpilledActivations` keeps them in two files in the run's staging folder (read
from one, write the other, switch at `commit`), so the inputs of the block in progress stay intact on
disk whatever happens; reads and writes are plain positioned file I/O rather than a memory map, because
pages touched through a map count in the resident memory this store exists to bound.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from prunekit.files import atomic_save_tensors

#: numpy has no bfloat16: such rows travel as int16 bit patterns.
_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16, torch.float64: np.float64}


class ActivationStore:
    rows: int
    shape: tuple[int, ...]  # per row: (seqlen, hidden)
    dtype: torch.dtype

    def batches(self, batch_size: int, device: torch.device | str = "cpu",
                dtype: torch.dtype | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        for start in range(0, self.rows, batch_size):
            count = min(batch_size, self.rows - start)
            yield start, self.read(start, count).to(device=device, dtype=dtype or self.dtype)

    def read(self, start: int, count: int) -> torch.Tensor:
        raise NotImplementedError

    def update(self, start: int, values: torch.Tensor) -> None:
        raise NotImplementedError

    def commit(self) -> None:
        """All rows have been updated: the outputs become the inputs of the next block."""

    @property
    def nbytes(self) -> int:
        per_row = int(np.prod(self.shape)) * torch.empty((), dtype=self.dtype).element_size()
        return self.rows * per_row


class MemoryActivations(ActivationStore):
    def __init__(self, values: torch.Tensor):
        self.values = values
        self.rows, self.shape, self.dtype = values.shape[0], tuple(values.shape[1:]), values.dtype

    def read(self, start: int, count: int) -> torch.Tensor:
        return self.values[start : start + count]

    def update(self, start: int, values: torch.Tensor) -> None:
        self.values[start : start + values.shape[0]] = values.to(device=self.values.device, dtype=self.dtype)

    def save(self, path: Path) -> None:
        atomic_save_tensors({"activations": self.values.cpu()}, path)


class SpilledActivations(ActivationStore):
    """Two raw files in `folder`; `current` names the one holding the inputs of the next block."""

    def __init__(self, folder: Path, rows: int, shape: tuple[int, ...], dtype: torch.dtype, current: int = 0):
        self.folder, self.rows, self.shape, self.dtype = folder, rows, tuple(shape), dtype
        self.current = current
        self._row_bytes = int(np.prod(self.shape)) * torch.empty((), dtype=dtype).element_size()
        for side in (0, 1):
            path = self.path(side)
            if not path.exists() or path.stat().st_size != rows * self._row_bytes:
                with path.open("ab") as handle:
                    handle.truncate(rows * self._row_bytes)

    def path(self, side: int) -> Path:
        return self.folder / f"activations-{side}.bin"

    def read(self, start: int, count: int) -> torch.Tensor:
        with self.path(self.current).open("rb") as handle:
            handle.seek(start * self._row_bytes)
            array = np.fromfile(handle, dtype=_NUMPY[self.dtype], count=count * self._row_bytes // self._itemsize)
        tensor = torch.from_numpy(array)
        if self.dtype == torch.bfloat16:
            tensor = tensor.view(torch.bfloat16)
        return tensor.view(count, *self.shape)

    def update(self, start: int, values: torch.Tensor) -> None:
        data = values.detach().to(device="cpu", dtype=self.dtype).contiguous()
        raw = data.reshape(-1).view(torch.uint8).numpy()
        fd = os.open(self.path(1 - self.current), os.O_WRONLY)
        try:
            os.pwrite(fd, memoryview(raw), start * self._row_bytes)
        finally:
            os.close(fd)

    def commit(self) -> None:
        fd = os.open(self.path(1 - self.current), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self.current = 1 - self.current

    def fill(self, values: torch.Tensor, start: int = 0) -> None:
        """Write captured block-0 inputs straight into the current side."""
        data = values.detach().to(device="cpu", dtype=self.dtype).contiguous()
        fd = os.open(self.path(self.current), os.O_WRONLY)
        try:
            os.pwrite(fd, memoryview(data.reshape(-1).view(torch.uint8).numpy()), start * self._row_bytes)
        finally:
            os.close(fd)

    @property
    def _itemsize(self) -> int:
        return np.dtype(_NUMPY[self.dtype]).itemsize
