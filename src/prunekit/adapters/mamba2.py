"""Mamba-2 (`mamba2`): one mixer per block. in_proj produces [z | x | B | C | dt] (gate, SSM input, the
state projections of each group, one time step per head); conv1d runs over x, B and C; out_proj reads the
gated-RMS-normalised scan output. The per-head parameters (A_log, D, dt_bias) are not linears and are only
touched by the structured methods (structured/ssm.py)."""

from typing import ClassVar

from prunekit.adapters.base import Adapter
from prunekit.adapters.registry import register


@register
class Mamba2Adapter(Adapter):
    family = "mamba2"
    model_types = ("mamba2",)
    embeddings_paths = ("backbone.embeddings",)
    blocks_path = "backbone.layers"
    final_norm_path = "backbone.norm_f"
    head_path = "lm_head"
    linear_groups = (("mixer.in_proj",), ("mixer.out_proj",))
    ssm_parts: ClassVar[dict[str, str]] = {"in_proj": "mixer.in_proj", "out_proj": "mixer.out_proj"}
