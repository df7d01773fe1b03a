"""Coupled groups of a block, per adapter family: what must be removed together to stay a valid model.

Llama family (Llama, Mistral, Qwen2/3, Gemma 3, SmolLM2 share the module names):

* a query head h = rows h·d … (h+1)·d of q_proj and the same columns of o_proj;
* a key/value head g = those rows of k_proj and v_proj; query heads g·r … (g+1)·r read it (r = heads / kv heads);
* an MLP channel j = row j of gate_proj and up_proj and column j of down_proj.

GQA rule: transformers' attention repeats every KV head r times, so every KV group must keep the same
number of query heads. Two removal units satisfy it:

* ``query-heads`` (default for GQA): a unit is one query head from *every* KV group — the lowest-scoring
  remaining head of each group — so the per-group count stays equal and all KV heads are kept;
* ``kv-groups`` (default for multi-head attention, where a group is one head): a unit is one whole KV group,
  its key/value head and all its query heads.

The layout is read from the module shapes, so an already-pruned model is described correctly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from prunekit.adapters import get_adapter
from prunekit.errors import PrunekitError


@dataclass(frozen=True)
class BlockLayout:
    """Sizes of one block and the parameter count of each removable piece."""

    hidden: int
    head_dim: int
    heads: int
    kv_heads: int
    channels: int
    q_params: int  # one query head: q rows (+ bias) and o columns
    kv_params: int  # one key/value head: k and v rows (+ biases)
    channel_params: int  # one MLP channel: gate and up rows (+ biases) and a down column
    total_params: int  # every weight and bias of q, k, v, o, gate, up, down

    @property
    def group_size(self) -> int:
        return self.heads // self.kv_heads


class LlamaStructure:
    """Structured view of a llama-family model."""

    families: ClassVar[tuple[str, ...]] = ("llama",)
    attn: ClassVar[str] = "self_attn"
    mlp: ClassVar[str] = "mlp"

    def __init__(self, model: nn.Module):
        self.model = model
        self.adapter = get_adapter(model)
        config = model.config
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def blocks(self) -> nn.ModuleList:
        return self.adapter.blocks()

    def attention(self, block: nn.Module) -> nn.Module:
        return block.get_submodule(self.attn)

    def mlp_module(self, block: nn.Module) -> nn.Module:
        return block.get_submodule(self.mlp)

    def column_summaries(self, block: nn.Module) -> dict[str, dict]:
        """Per-column summaries of the two output projections a head or channel removal cuts."""
        from prunekit.structured.search import column_summary

        return {"o_proj": column_summary(self.attention(block).o_proj.weight),
                "down_proj": column_summary(self.mlp_module(block).down_proj.weight)}

    def observed_inputs(self, block: nn.Module) -> dict[str, tuple[str, nn.Module]]:
        """Where heads and channels meet the residual stream: the inputs whose fluctuation FLAP measures
        (kind → name relative to the block, module)."""
        return {"attn": (f"{self.attn}.o_proj", self.attention(block).o_proj),
                "mlp": (f"{self.mlp}.down_proj", self.mlp_module(block).down_proj)}

    def layout(self, block: nn.Module) -> BlockLayout:
        attn, mlp = self.attention(block), self.mlp_module(block)
        q, k, v, o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        d = self.head_dim
        hidden = q.in_features

        def bias(linear: nn.Linear) -> int:
            return 0 if linear.bias is None else 1

        total = sum(m.weight.numel() + (0 if m.bias is None else m.bias.numel()) for m in (q, k, v, o, gate, up, down))
        return BlockLayout(
            hidden=hidden, head_dim=d, heads=q.out_features // d, kv_heads=k.out_features // d,
            channels=gate.out_features,
            q_params=d * (hidden + bias(q)) + d * o.out_features,
            kv_params=d * (hidden + bias(k)) + d * (hidden + bias(v)),
            channel_params=(hidden + bias(gate)) + (hidden + bias(up)) + down.out_features,
            total_params=total,
        )


_STRUCTURES: dict[str, type[LlamaStructure]] = {family: cls for cls in (LlamaStructure,) for family in cls.families}


def get_structure(model: nn.Module) -> LlamaStructure:
    """The structured view of `model`, or one line saying its family has no structured adapter."""
    adapter = get_adapter(model)  # unsupported architectures fail here with their own line
    from prunekit.structured.ssm import SSM_FAMILIES, SsmStructure

    if adapter.family in SSM_FAMILIES:
        return SsmStructure(model)  # type: ignore[return-value]
    cls = _STRUCTURES.get(adapter.family)
    if cls is None:
        model_type = getattr(model.config, "model_type", "?")
        raise PrunekitError(
            f"no structured adapter for the {adapter.family} family (model_type {model_type!r}); structured "
            f"pruning supports: {', '.join(sorted(_STRUCTURES))} (Llama, Mistral, Qwen2/3, Gemma 3, SmolLM2)"
        )
    return cls(model)
