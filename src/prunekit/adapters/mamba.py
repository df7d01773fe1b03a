"""Mamba-1 (`mamba`, `falcon_mamba`): one mixer per block, no attention and no MLP.

The mixer's linears run in the order in_proj → (conv1d) → x_proj → dt_proj → out_proj. dt_proj is never
called as a module: the mixer multiplies its weight with the first `time_step_rank` columns of x_proj's output
(transformers' `MambaMixer.forward`), so its input is read from a forward hook on x_proj instead of a pre-hook.
Which SSM linears are pruned is chosen with the `ssm_parts` option (adapters/ssm.py; default in_proj only).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from prunekit.adapters.base import Adapter
from prunekit.adapters.registry import register


@register
class MambaAdapter(Adapter):
    family = "mamba"
    model_types = ("mamba", "falcon_mamba")
    embeddings_paths = ("backbone.embeddings",)
    blocks_path = "backbone.layers"
    final_norm_path = "backbone.norm_f"
    head_path = "lm_head"
    linear_groups = (("mixer.in_proj",), ("mixer.x_proj",), ("mixer.dt_proj",), ("mixer.out_proj",))
    ssm_parts: ClassVar[dict[str, str]] = {
        "in_proj": "mixer.in_proj", "x_proj": "mixer.x_proj", "dt_proj": "mixer.dt_proj", "out_proj": "mixer.out_proj"}

    def observe_input(self, block: nn.Module, name: str, module: nn.Module,
                      callback: Callable[[torch.Tensor], None]) -> torch.utils.hooks.RemovableHandle:
        if name != "mixer.dt_proj":
            return super().observe_input(block, name, module, callback)
        rank = module.in_features  # time_step_rank: the first columns of x_proj's output feed dt_proj
        return block.mixer.x_proj.register_forward_hook(lambda _m, _inputs, output: callback(output[..., :rank]))
