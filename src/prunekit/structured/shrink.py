"""Plans (which heads and channels stay), bias compensation, and the physical shrink of the modules.

A plan is computed from the dense weights and statistics and is self-contained: it lists the kept
query heads (grouped by kept KV head), kept KV heads and kept MLP channels of every layer, plus the
bias that compensates the removed pieces. Applying it replaces q/k/v/o and gate/up/down with smaller
`nn.Linear` modules, so any copy of the dense model can be turned into the pruned one.

Bias compensation (FLAP): a removed input channel j of o_proj / down_proj contributed W[:, j] · x_j; its
mean over the calibration tokens, W[:, removed] · mean(X[removed]), is added to the projection's bias,
so the layer's output keeps its baseline and only the fluctuation around it is lost.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from prunekit.structured.layout import LlamaStructure
from prunekit.structured.search import ModuleUnits

if TYPE_CHECKING:
    from prunekit.structured.collect import BlockStatistics

SPEC_KEY = "prunekit_structure"
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass
class LayerPlan:
    heads: list[int]  # kept query heads, in the order of their kept KV heads
    kv_heads: list[int]
    channels: list[int]
    removed_params: int
    total_params: int
    #: input means of o_proj / down_proj over the calibration tokens (bias compensation, when enabled)
    attn_mean: torch.Tensor | None = None
    mlp_mean: torch.Tensor | None = None
    #: the compensation added to o_proj's / down_proj's bias, set when the plan is applied
    o_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None


@dataclass
class StructurePlan:
    layers: list[LayerPlan]
    target: float
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def removed_params(self) -> int:
        return sum(layer.removed_params for layer in self.layers)

    @property
    def total_params(self) -> int:
        return sum(layer.total_params for layer in self.layers)

    @property
    def achieved(self) -> float:
        return self.removed_params / self.total_params if self.total_params else 0.0


def _channels_of(heads: list[int], head_dim: int) -> torch.Tensor:
    if not heads:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


def _compensation(weight: torch.Tensor, removed: torch.Tensor, mean: torch.Tensor | None) -> torch.Tensor | None:
    if mean is None or removed.numel() == 0:
        return None
    removed = removed.to(weight.device)
    return (weight.double()[:, removed] @ mean.to(weight.device).double()[removed]).float()


def build_plan(structure: LlamaStructure, attn: list[ModuleUnits], mlp: list[ModuleUnits], attn_counts: list[int],
               mlp_counts: list[int], stats: list[BlockStatistics] | None, *, compensate: bool, target: float,
               info: dict[str, Any] | None = None) -> StructurePlan:
    """Turn unit counts into kept indices for every layer (with the input means that compensation needs).

    Only shapes are read from the blocks, so this works on a streamed model's weightless skeleton; the
    compensation biases need the removed columns' weights and are computed when a block is shrunk.
    """
    layers = []
    for index, (block, a, m, na, nm) in enumerate(zip(structure.blocks(), attn, mlp, attn_counts, mlp_counts,
                                                      strict=True)):
        layout = structure.layout(block)
        gone_heads = {h for unit in a.heads[:na] for h in unit}
        gone_kv = {g for unit in a.kv_heads[:na] for g in unit}
        gone_channels = set(m.channels[:nm])
        kv_kept = [g for g in range(layout.kv_heads) if g not in gone_kv]
        r = layout.group_size
        heads = [h for g in kv_kept for h in range(g * r, g * r + r) if h not in gone_heads]
        channels = [c for c in range(layout.channels) if c not in gone_channels]
        removed = (layout.heads - len(heads)) * layout.q_params + len(gone_kv) * layout.kv_params
        removed += len(gone_channels) * layout.channel_params
        plan = LayerPlan(heads, kv_kept, channels, removed, layout.total_params)
        if compensate and stats is not None:
            plan.attn_mean, plan.mlp_mean = stats[index].attn.mean(), stats[index].mlp.mean()
        layers.append(plan)
    return StructurePlan(layers, target, dict(info or {}))


def _linear_like(old: nn.Linear, in_features: int, out_features: int, bias: bool) -> nn.Linear:
    """An uninitialised linear (its values are copied in right away)."""
    return torch.nn.utils.skip_init(nn.Linear, in_features, out_features, bias=bias, device=old.weight.device,
                                    dtype=old.weight.dtype)


@torch.no_grad()
def keep_rows(old: nn.Linear, rows: torch.Tensor) -> nn.Linear:
    new = _linear_like(old, old.in_features, rows.numel(), old.bias is not None)
    new.weight.copy_(old.weight[rows.to(old.weight.device)])
    if old.bias is not None:
        new.bias.copy_(old.bias[rows.to(old.bias.device)])
    return new


@torch.no_grad()
def keep_columns(old: nn.Linear, columns: torch.Tensor, extra_bias: torch.Tensor | None) -> nn.Linear:
    has_bias = old.bias is not None or extra_bias is not None
    new = _linear_like(old, columns.numel(), old.out_features, has_bias)
    new.weight.copy_(old.weight[:, columns.to(old.weight.device)])
    if has_bias:
        bias = torch.zeros(old.out_features, dtype=torch.float64, device=old.weight.device)
        if old.bias is not None:
            bias += old.bias.double()
        if extra_bias is not None:
            bias += extra_bias.to(bias.device, torch.float64)
        new.bias.copy_(bias)
    return new


def check_gqa(heads: list[int], kv_heads: list[int], group_size: int, layer: int) -> int:
    """Kept query heads must fill equal, contiguous groups over the kept KV heads; returns the new group size."""
    if not kv_heads or not heads or len(heads) % len(kv_heads):
        raise ValueError(f"layer {layer}: {len(heads)} query heads cannot share {len(kv_heads)} KV heads equally")
    per = len(heads) // len(kv_heads)
    for i, g in enumerate(kv_heads):
        for h in heads[i * per : (i + 1) * per]:
            if h // group_size != g:
                raise ValueError(f"layer {layer}: query head {h} is not in KV group {g}")
    return per


@torch.no_grad()
def compensation(structure: LlamaStructure, block: nn.Module, layer: LayerPlan
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """FLAP's biases for o_proj and down_proj of a dense block: W[:, removed] · mean(X[removed])."""
    layout = structure.layout(block)
    gone_cols = _channels_of(sorted(set(range(layout.heads)) - set(layer.heads)), layout.head_dim)
    gone_channels = torch.tensor(sorted(set(range(layout.channels)) - set(layer.channels)), dtype=torch.long)
    return (_compensation(structure.attention(block).o_proj.weight, gone_cols, layer.attn_mean),
            _compensation(structure.mlp_module(block).down_proj.weight, gone_channels, layer.mlp_mean))


@torch.no_grad()
def apply_block(structure: LlamaStructure, block: nn.Module, layer: LayerPlan, index: int) -> None:
    """Shrink one block in place to its layer plan; the removed pieces' mean output goes into the biases."""
    layout = structure.layout(block)
    attn, mlp = structure.attention(block), structure.mlp_module(block)
    per_group = check_gqa(layer.heads, layer.kv_heads, layout.group_size, index)
    q_rows = _channels_of(layer.heads, layout.head_dim)
    kv_rows = _channels_of(layer.kv_heads, layout.head_dim)
    layer.o_bias, layer.down_bias = compensation(structure, block, layer)
    attn.q_proj = keep_rows(attn.q_proj, q_rows)
    attn.k_proj = keep_rows(attn.k_proj, kv_rows)
    attn.v_proj = keep_rows(attn.v_proj, kv_rows)
    attn.o_proj = keep_columns(attn.o_proj, q_rows, layer.o_bias)
    attn.num_key_value_groups = per_group
    for name, value in (("num_heads", len(layer.heads)), ("num_attention_heads", len(layer.heads)),
                        ("num_key_value_heads", len(layer.kv_heads))):
        if hasattr(attn, name):
            setattr(attn, name, value)
    channels = torch.tensor(layer.channels, dtype=torch.long)
    mlp.gate_proj = keep_rows(mlp.gate_proj, channels)
    mlp.up_proj = keep_rows(mlp.up_proj, channels)
    mlp.down_proj = keep_columns(mlp.down_proj, channels, layer.down_bias)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(layer.channels)


@torch.no_grad()
def apply_plan(model: nn.Module, structure: LlamaStructure, plan: StructurePlan) -> None:
    """Shrink every block of an in-memory `model` to the plan, then record the sizes in its config."""
    if getattr(structure, "ssm", False):
        structure.apply_plan(model, plan)
        return
    blocks = structure.blocks()
    if len(blocks) != len(plan.layers):
        raise ValueError(f"plan has {len(plan.layers)} layers, the model {len(blocks)}")
    for index, (block, layer) in enumerate(zip(blocks, plan.layers, strict=True)):
        apply_block(structure, block, layer, index)
    setattr(model.config, SPEC_KEY, structure_spec(model, structure))


def layer_spec(structure: LlamaStructure, block: nn.Module) -> dict[str, Any]:
    """One block's head counts, intermediate size and which linears carry a bias: all a loader needs."""
    layout = structure.layout(block)
    biased = [name for name in LINEARS if block.get_submodule(name).bias is not None]
    return {"num_attention_heads": layout.heads, "num_key_value_heads": layout.kv_heads,
            "intermediate_size": layout.channels, "bias": biased}


def structure_spec(model: nn.Module, structure: LlamaStructure, layers: list[dict[str, Any]] | None = None
                   ) -> dict[str, Any]:
    """The per-layer sizes recorded in a shrunk model's config (from its blocks, or `layers` when streamed)."""
    if getattr(structure, "ssm", False):
        return structure.spec(layers)
    if layers is None:
        layers = [layer_spec(structure, block) for block in structure.blocks()]
    return {"format": 1, "family": structure.adapter.family, "head_dim": structure.head_dim, "layers": layers}
