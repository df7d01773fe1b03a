"""OPT: learned position embeddings added before the first block, post- or pre-norm blocks."""

from prunekit.adapters.base import Adapter
from prunekit.adapters.registry import register


@register
class OPTAdapter(Adapter):
    family = "opt"
    model_types = ("opt",)
    embeddings_paths = ("model.decoder.embed_tokens", "model.decoder.embed_positions", "model.decoder.project_in")
    blocks_path = "model.decoder.layers"
    final_norm_path = "model.decoder.final_layer_norm"
    head_path = "lm_head"
    linear_groups = (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.out_proj",),
        ("fc1",),
        ("fc2",),
    )
