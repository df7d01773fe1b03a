"""What the engine needs to know about a model family, stated explicitly (no tracing).

An adapter names the embeddings, the decoder blocks, the final norm and the head; the prunable
linears of a block, grouped by shared input and listed in execution order; and how to read and
write a linear's weight as an [out, in] matrix (GPT-2's Conv1D stores it transposed).

Two per-block seams serve state-space and hybrid models: `groups_for(block)` (a hybrid's attention and
SSM blocks have different linears) and `observe_input` (Mamba-1 multiplies by dt_proj's weight without
calling the module, so its input is read from x_proj's output instead of a pre-hook on dt_proj).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator
from typing import ClassVar

import torch
from torch import nn

from prunekit.errors import PrunekitError

#: Globs of the feed-forward (MLP) linears across the families, on full layer names: what the reference codes
#: of Wanda-for-safety and DSnoT skip when they leave the MLP dense (`"mlp" in name`, `--skip_layer mlp`).
MLP_LINEAR_GLOBS: tuple[str, ...] = ("*mlp*", "*.fc1", "*.fc2", "*feed_forward*")


def is_mlp_linear(name: str) -> bool:
    """Whether a full layer name (e.g. `model.layers.3.mlp.up_proj`) is a feed-forward linear."""
    return any(fnmatch.fnmatchcase(name, glob) for glob in MLP_LINEAR_GLOBS)


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
    #: State-space families: the SSM linears by part name (in_proj, x_proj, dt_proj, out_proj), relative to a block.
    ssm_parts: ClassVar[dict[str, str]] = {}
    #: The model's forward unpacks (hidden_states, attention weights) from every block (Bamba).
    block_returns_tuple: ClassVar[bool] = False

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

    def groups_for(self, block: nn.Module) -> tuple[tuple[str, ...], ...]:
        """The shared-input groups of this block (the same for every block except in hybrids)."""
        return self.linear_groups

    def observe_input(self, block: nn.Module, name: str, module: nn.Module,
                      callback: Callable[[torch.Tensor], None]) -> torch.utils.hooks.RemovableHandle:
        """Call `callback` with the input of linear `name` of `block` on every forward (a pre-hook)."""
        return module.register_forward_pre_hook(lambda _module, inputs: callback(inputs[0]))

    def block_linears(self, block: nn.Module) -> Iterator[tuple[tuple[str, ...], dict[str, nn.Module]]]:
        """Yield (group, {name: module}) for each shared-input group of a block, in execution order."""
        for group in self.groups_for(block):
            modules = {name: block.get_submodule(name) for name in group}
            for name, module in modules.items():
                if not is_prunable_linear(module):
                    raise TypeError(f"{self.family} adapter: {name} is {type(module).__name__}, not a linear")
            yield group, modules

    def ssm_skip_globs(self, parts: list[str]) -> list[str]:
        """Plan globs that leave every SSM linear outside `parts` unpruned (one line if a part is unknown)."""
        unknown = [p for p in parts if p not in self.ssm_parts]
        if unknown:
            accepted = ", ".join(self.ssm_parts) or "none (not a state-space model)"
            raise PrunekitError(f"SSM part {unknown[0]!r} does not exist in {self.family} layers; accepted: {accepted}")
        return [f"{self.blocks_path}.*.{path}" for part, path in self.ssm_parts.items() if part not in parts]

    def head_linears(self) -> dict[str, nn.Module]:
        """The LM head, pruned only when the user asks for it."""
        return {self.head_path: self.head()}
