"""Llama family: Llama, Mistral, Qwen2/Qwen3, Gemma 3 (text), SmolLM. Pre-norm blocks with GQA and
rotary position embeddings, which the model computes once and passes to every block."""

from prunekit.adapters.base import Adapter
from prunekit.adapters.registry import register


@register
class LlamaAdapter(Adapter):
    family = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma2", "gemma")
    embeddings_paths = ("model.embed_tokens",)
    blocks_path = "model.layers"
    final_norm_path = "model.norm"
    head_path = "lm_head"
    linear_groups = (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    )
