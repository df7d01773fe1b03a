"""What the engine needs to know about a model family, stated explicitly (no tracing).

An adapter names the embeddings, the decoder blocks, the final norm and the head; the prunable
linears of a block, grouped by shared input and listed in execution order; and how to read and
write a linear's weight as an [out, in] matrix (GPT-2's Conv1D stores it transposed).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar

import torch
from torch import nn


def is_prunable_linear(module: nn.Module) -> bool:
    """nn.Linear, or transformers' Conv1D (GPT-2), which is a linear layer with a transposed weight."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as [out_features, in_features] (a view: Conv1D's [in, out] is transposed)."""
    if type(module).__name__ == "Conv1D":
        return module.weight.data.t()
    return module.weight.data


def set_weight_matrix(module: nn.Module, matrix: torch.Tensor) -> None:
    """Write an [out, in] matrix back into the module, in the module's own layout and dtype."""
    target = module.weight.data
    value = matrix.t() if type(module).__name__ == "Conv1D" else matrix
    target.copy_(value.to(dtype=target.dtype, device=target.device))


class Adapter:
    """Base class: subclasses fill in the module paths of one family."""

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    #: Paths relative to the model.
    embeddings_paths: ClassVar[tuple[str, ...]]
    blocks_path: ClassVar[str]
    final_norm_path: ClassVar[str | None]
    head_path: ClassVar[str]
    #: Prunable linears of a block, relative to the block, grouped by shared input, in execution order.
    linear_groups: ClassVar[tuple[tuple[str, ...], ...]]

    def __init__(self, model: nn.Module):
        self.model = model

    def blocks(self) -> nn.ModuleList:
        return self.model.get_submodule(self.blocks_path)

    def block_prefix(self, index: int) -> str:
        return f"{self.blocks_path}.{index}"

    def embeddings(self) -> list[nn.Module]:
        return [self.model.get_submodule(p) for p in self.embeddings_paths if self._has(p)]

    def final_norm(self) -> nn.Module | None:
        return self.model.get_submodule(self.final_norm_path) if self.final_norm_path else None

    def head(self) -> nn.Module:
        return self.model.get_submodule(self.head_path)

    def _has(self, path: str) -> bool:
        try:
            self.model.get_submodule(path)
        except AttributeError:
            return False
        return True

    def block_linears(self, block: nn.Module) -> Iterator[tuple[tuple[str, ...], dict[str, nn.Module]]]:
        """Yield (group, {name: module}) for each shared-input group of a block, in execution order."""
        for group in self.linear_groups:
            modules = {name: block.get_submodule(name) for name in group}
            for name, module in modules.items():
                if not is_prunable_linear(module):
                    raise TypeError(f"{self.family} adapter: {name} is {type(module).__name__}, not a linear")
            yield group, modules

    def head_linears(self) -> dict[str, nn.Module]:
        """The LM head, pruned only when the user asks for it."""
        return {self.head_path: self.head()}
