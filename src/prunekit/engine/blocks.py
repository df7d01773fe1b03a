"""Where a block's weights come from (`BlockSource`) and where a finished block goes (`BlockSink`).

In memory, the model is the source and the sink: a block moves to the compute device and back, and the
methods edit it in place. Streamed, the model is a weightless skeleton (models/checkpoint.py): a block is
filled from the checkpoint in the compute dtype, processed, written into its own output shard in the output
dtype, and emptied again, so memory holds one block at a time. The engine does not know which it has.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from prunekit.adapters.base import Adapter
from prunekit.export.shards import shard_name, write_index, write_shard
from prunekit.models.checkpoint import Checkpoint, tied_parameters
from prunekit.models.tensors import TensorSpec


def _set_tensor(root: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace parameter `name` (dotted, relative to `root`) by `value`, frozen."""
    owner_name, _, leaf = name.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)


def _empty(root: nn.Module, names: list[str]) -> None:
    """Give parameters back to the meta device (their memory is freed)."""
    for name in names:
        owner_name, _, leaf = name.rpartition(".")
        owner = root.get_submodule(owner_name) if owner_name else root
        old = owner._parameters[leaf]
        owner._parameters[leaf] = nn.Parameter(torch.empty(old.shape, dtype=old.dtype, device="meta"),
                                               requires_grad=False)


class InMemoryBlocks:
    """The blocks of a model that is in memory: moved to the compute device for their turn, then home."""

    streamed = False

    def __init__(self, model: nn.Module, adapter: Adapter, device: torch.device):
        self.model, self.adapter, self.device = model, adapter, device
        self._homes: dict[int, torch.device] = {}

    def load(self, index: int) -> nn.Module:
        block = self.adapter.blocks()[index]
        self._homes[index] = next(block.parameters()).device
        return block.to(self.device)

    def release(self, index: int, block: nn.Module) -> None:
        block.to(self._homes.pop(index, self.device))

    @contextlib.contextmanager
    def stem(self) -> Iterator[None]:
        """Embeddings and everything the model runs before block 0, on the compute device."""
        blocks = self.adapter.blocks()
        home = next(self.model.parameters()).device
        if home == self.device:
            yield
            return
        saved = list(blocks)
        try:
            for i in range(len(blocks)):
                blocks[i] = nn.Identity()  # only the stem moves, not every block
            self.model.to(self.device)
            yield
        finally:
            self.model.to(home)
            for i, block in enumerate(saved):
                blocks[i] = block

    def bytes_read(self) -> int:
        return 0


class StreamedBlocks:
    """Blocks filled from a checkpoint on disk, one at a time, in `compute_dtype` on `device`."""

    streamed = True

    def __init__(self, checkpoint: Checkpoint, adapter: Adapter, device: torch.device,
                 compute_dtype: torch.dtype = torch.float32):
        self.checkpoint, self.adapter, self.device, self.compute_dtype = checkpoint, adapter, device, compute_dtype
        self.model = checkpoint.skeleton()
        #: the weightless blocks as the config builds them: a block shrunk by one pass is rebuilt for the next
        self._pristine = [copy.deepcopy(block) for block in adapter.blocks()]

    def _fill(self, root: nn.Module, prefix: str, names: list[str]) -> None:
        for name in names:
            tensor = self.checkpoint.read(f"{prefix}{name}")
            _set_tensor(root, name, tensor.to(device=self.device, dtype=self.compute_dtype))
            del tensor

    def load(self, index: int) -> nn.Module:
        blocks = self.adapter.blocks()
        blocks[index] = block = copy.deepcopy(self._pristine[index])
        prefix = self.adapter.block_prefix(index) + "."
        self._fill(block, prefix, [n for n, _ in block.named_parameters()])
        return block

    def release(self, index: int, block: nn.Module) -> None:
        _empty(block, [n for n, _ in block.named_parameters()])

    def outside_blocks(self, include_head: bool = False) -> list[str]:
        """Parameter names of the model that are not in a block (embeddings, final norm, head)."""
        blocks = self.adapter.blocks_path + "."
        tied = tied_parameters(self.model)
        names = [n for n, _ in self.model.named_parameters() if not n.startswith(blocks) and n not in tied]
        if not include_head:
            names = [n for n in names if not n.startswith(self.adapter.head_path)]
        return names

    @contextlib.contextmanager
    def stem(self) -> Iterator[None]:
        """Everything outside the blocks but the LM head, filled for as long as it is needed."""
        names = self.outside_blocks(include_head=False)
        self._fill(self.model, "", names)
        try:
            yield
        finally:
            _empty(self.model, names)

    @contextlib.contextmanager
    def tail(self) -> Iterator[None]:
        """The final norm and the head, for evaluation (a tied head reads the input embeddings)."""
        names = [n for n in self.outside_blocks(include_head=True)
                 if not any(n.startswith(p + ".") for p in self.adapter.embeddings_paths)]
        head = f"{self.adapter.head_path}.weight"
        tied = head not in names
        self._fill(self.model, "", names)
        if tied:
            embedding = f"{self.adapter.embeddings_paths[0]}.weight"
            _set_tensor(self.model, head, self.checkpoint.read(embedding).to(self.device, self.compute_dtype))
        try:
            yield
        finally:
            _empty(self.model, names + ([head] if tied else []))

    def bytes_read(self) -> int:
        return int(self.checkpoint.tensors.bytes_read)


class ShardSink:
    """Finished blocks into `folder` as one safetensors shard each, in `dtype`; the rest into shard 1.

    One shard per block means a block is written exactly once, completely, when it is done: a killed run
    loses at most the block in progress, and a resumed run rewrites nothing it already finished.
    """

    def __init__(self, folder: Path, source: StreamedBlocks, dtype: torch.dtype):
        self.folder, self.source, self.dtype = folder, source, dtype
        self.count = len(source.adapter.blocks()) + 1
        self.bytes_written = 0
        self.parameters_written = 0

    def block_file(self, index: int) -> Path:
        return self.folder / shard_name(index + 2, self.count)

    def write_block(self, index: int, block: nn.Module) -> None:
        prefix = self.source.adapter.block_prefix(index) + "."
        tensors = {f"{prefix}{n}": t for n, t in block.state_dict().items() if t.device.type != "meta"}
        specs = {n: TensorSpec(tuple(t.shape), self._dtype_of(t)) for n, t in tensors.items()}
        self.bytes_written += write_shard(self.block_file(index), tensors.items(), specs, {"format": "pt"})
        self.parameters_written += sum(t.numel() for t in tensors.values())

    def _dtype_of(self, tensor: torch.Tensor) -> torch.dtype:
        return self.dtype if tensor.dtype.is_floating_point else tensor.dtype

    def finish(self, replaced: dict[str, torch.Tensor] | None = None) -> int:
        """Shard 1 (embeddings, final norm, head: copied, or `replaced` when pruned) and the index."""
        replaced = replaced or {}
        names = self.source.outside_blocks(include_head=True)
        model = self.source.model
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        specs = {n: TensorSpec(shapes[n], self.dtype) for n in names}

        def tensors():
            for name in names:
                yield name, replaced[name] if name in replaced else self.source.checkpoint.read(name)

        first = self.folder / shard_name(1, self.count)
        self.bytes_written += write_shard(first, tensors(), specs, {"format": "pt"})
        self.parameters_written += sum(_numel(spec.shape) for spec in specs.values())
        weight_map = dict.fromkeys(names, first.name)
        total = sum(spec.nbytes for spec in specs.values())
        for index in range(self.count - 1):
            path = self.block_file(index)
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118
                    weight_map[key] = path.name
                    sliced = handle.get_slice(key)
                    total += TensorSpec(tuple(sliced.get_shape()), self._dtype_from(sliced.get_dtype())).nbytes
        write_index(self.folder, weight_map, total)
        return self.bytes_written

    def parameters(self) -> int:
        """Parameters in the finished output (from the shard headers, so a resumed run counts them all)."""
        from safetensors import safe_open

        total = 0
        for path in sorted(self.folder.glob("model-*.safetensors")):
            with safe_open(str(path), framework="pt") as handle:
                total += sum(_numel(tuple(handle.get_slice(k).get_shape())) for k in handle.keys())  # noqa: SIM118
        return total

    @staticmethod
    def _dtype_from(name: str) -> torch.dtype:
        from prunekit.models.tensors import SAFETENSORS_DTYPES

        return SAFETENSORS_DTYPES[name]


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count
