"""GPT-NeoX (Pythia): fused QKV, parallel residual; attention runs before the MLP in the forward."""

from prunekit.adapters.base import Adapter
from prunekit.adapters.registry import register


@register
class GPTNeoXAdapter(Adapter):
    family = "gpt_neox"
    model_types = ("gpt_neox",)
    embeddings_paths = ("gpt_neox.embed_in",)
    blocks_path = "gpt_neox.layers"
    final_norm_path = "gpt_neox.final_layer_norm"
    head_path = "lm_head"  # transformers 5 renamed `embed_out`
    linear_groups = (
        ("attention.query_key_value",),
        ("attention.dense",),
        ("mlp.dense_h_to_4h",),
        ("mlp.dense_4h_to_h",),
    )
