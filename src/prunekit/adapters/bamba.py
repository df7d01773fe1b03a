"""Bamba (`bamba`): a hybrid of Mamba-2 mixers and attention layers, each followed by a gated MLP.

Every decoder layer holds either `mamba` (a Mamba-2 mixer, `block_type == "linear_attention"`) or `self_attn`
(`"full_attention"`), so the shared-input groups are chosen per block (`groups_for`): one engine run handles
both kinds. Blocks return (hidden_states, attention weights), which the engine unpacks (`block_returns_tuple`).
A layer of any other kind (or an MoE feed-forward) is refused in one line before any work.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from prunekit.adapters.base import Adapter
from prunekit.adapters.registry import register
from prunekit.errors import PrunekitError

_MLP = (("feed_forward.gate_proj", "feed_forward.up_proj"), ("feed_forward.down_proj",))
_GROUPS = {
    "linear_attention": (("mamba.in_proj",), ("mamba.out_proj",), *_MLP),
    "full_attention": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",), *_MLP),
}


@register
class BambaAdapter(Adapter):
    family = "bamba"
    model_types = ("bamba",)
    embeddings_paths = ("model.embed_tokens",)
    blocks_path = "model.layers"
    final_norm_path = "model.final_layernorm"
    head_path = "lm_head"
    linear_groups = _GROUPS["linear_attention"]
    ssm_parts: ClassVar[dict[str, str]] = {"in_proj": "mamba.in_proj", "out_proj": "mamba.out_proj"}
    block_returns_tuple = True

    def __init__(self, model: nn.Module):
        super().__init__(model)
        for index, block in enumerate(self.blocks()):
            kind = getattr(block, "block_type", None)
            feed_forward = getattr(block, "feed_forward", None)
            if kind not in _GROUPS or feed_forward is None or not hasattr(feed_forward, "gate_proj"):
                what = kind if kind not in _GROUPS else f"{kind} with feed-forward {type(feed_forward).__name__}"
                raise PrunekitError(f"bamba layer {index} is of type {what!r}, which prunekit does not support; "
                                    f"supported layer types: {', '.join(_GROUPS)} with a dense gated MLP")

    def groups_for(self, block: nn.Module) -> tuple[tuple[str, ...], ...]:
        return _GROUPS[block.block_type]

    def is_ssm_block(self, block: nn.Module) -> bool:
        return block.block_type == "linear_attention"
