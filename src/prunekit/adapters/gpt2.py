"""GPT-2: fused QKV, Conv1D layers whose weights are stored [in, out] (handled by base.weight_matrix)."""

from prunekit.adapters.base import Adapter
from prunekit.adapters.registry import register


@register
class GPT2Adapter(Adapter):
    family = "gpt2"
    model_types = ("gpt2",)
    embeddings_paths = ("transformer.wte", "transformer.wpe")
    blocks_path = "transformer.h"
    final_norm_path = "transformer.ln_f"
    head_path = "lm_head"
    linear_groups = (
        ("attn.c_attn",),
        ("attn.c_proj",),
        ("mlp.c_fc",),
        ("mlp.c_proj",),
    )
