"""Attention over a prefix shared by every row of a batch, read once instead of once per row.

A study's prompts of one template share hundreds of tokens (AIM: ~420 of SmolLM2's ~500). Copying that prefix's
keys/values into every row makes each decode step read it `batch` times, and on a CPU that memory traffic is a
third of a small model's decode time. Softmax attention over the keys [prefix; own] splits exactly
(the decomposition Hydragen, Juravsky et al. 2024, uses on GPUs):

    out = (Σ_prefix e^(s−m)·v + Σ_own e^(s−m)·v) / (Σ_prefix e^(s−m) + Σ_own e^(s−m)),   m = the max over both

so the prefix scores of all rows' queries are one matrix product against a single copy of the prefix, and each row
keeps only its own tokens (suffix and answer) in its cache. Same result as attending to the concatenation, up
to float summation order (the throughput study and the tests compare the tokens with the plain path).

Used through transformers' attention interface for the families listed in `FAMILIES` (their attention layers
hand the interface every forward keyword, which carries the prefix); others use the replicated prefix.
"""

from __future__ import annotations

from typing import Any

import torch

#: the name registered with transformers' AttentionInterface and AttentionMaskInterface
NAME = "prunekit_shared_prefix"
#: model types whose attention is the plain scaled-dot-product one, reached through the attention interface
FAMILIES = frozenset({"llama", "qwen2"})
_registered = False


def supports(model: Any) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) in FAMILIES


def register() -> None:
    """Make `NAME` an attention implementation (idempotent). Its mask is the additive float mask of `eager`."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(NAME, shared_prefix_attention)
    AttentionMaskInterface.register(NAME, eager_mask)
    _registered = True


class SharedPrefix:
    """The prefix's keys/values per layer, one copy each ((kv_heads, prefix, head_dim)), from a batch-of-one cache;
    `calls` counts the layers that used it (a model that bypassed it is detected, not trusted)."""

    def __init__(self, cache: Any) -> None:
        self.layers = [(layer.keys[0], layer.values[0]) for layer in cache.layers]
        self.calls = 0

    def __len__(self) -> int:
        return int(self.layers[0][0].shape[1]) if self.layers else 0


def shared_prefix_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                            shared_prefix: SharedPrefix | None = None, **_: Any) -> tuple[torch.Tensor, None]:
    """Attention of `query` (batch, heads, q, d) over the shared prefix and the rows' own `key`/`value`
    (batch, kv_heads, own, d); `attention_mask` (additive, batch × 1 × q × ≥own) masks only the own part.
    Returns (batch, q, heads, d) as transformers' attention functions do."""
    if shared_prefix is None:
        raise RuntimeError(f"attention {NAME!r} called without its shared prefix")
    b, heads, q, d = query.shape
    kv_heads, own = key.shape[1], key.shape[2]
    group = heads // kv_heads  # query head h reads kv head h // group (transformers' repeat_kv order)
    prefix_keys, prefix_values = shared_prefix.layers[module.layer_idx]
    p = prefix_keys.shape[1]
    scale = scaling if scaling is not None else d ** -0.5
    grouped = query.reshape(b, kv_heads, group * q, d) * scale
    # prefix: every row's queries of one kv head against the single copy of its keys (one matrix product)
    by_head = grouped.transpose(0, 1).reshape(kv_heads, b * group * q, d)
    prefix_scores = torch.matmul(by_head, prefix_keys.transpose(1, 2)).view(kv_heads, b, group * q, p).transpose(0, 1)
    own_scores = torch.matmul(grouped, key.transpose(2, 3))
    if attention_mask is not None:
        mask = attention_mask[..., :own].reshape(b, 1, 1, q, own)
        own_scores = (own_scores.view(b, kv_heads, group, q, own) + mask).view(b, kv_heads, group * q, own)
    peak = torch.maximum(prefix_scores.amax(-1), own_scores.amax(-1)).unsqueeze(-1)
    prefix_weights, own_weights = torch.exp(prefix_scores - peak), torch.exp(own_scores - peak)
    total = prefix_weights.sum(-1, keepdim=True) + own_weights.sum(-1, keepdim=True)
    prefix_out = torch.matmul(prefix_weights.transpose(0, 1).reshape(kv_heads, b * group * q, p), prefix_values)
    out = prefix_out.view(kv_heads, b, group * q, d).transpose(0, 1) + torch.matmul(own_weights, value)
    shared_prefix.calls += 1
    return (out / total).reshape(b, heads, q, d).transpose(1, 2).contiguous(), None
