"""Structured view of state-space layers (Mamba-1, Mamba-2, the Mamba-2 mixers of Bamba): sizes, the
physical shrink of a mixer to a layer plan, the per-layer spec saved in config.json, and the rebuild on load.

Mamba-2 mixer (H heads of d channels, G groups of B/C with N states, I = H·d):

    in_proj rows   [ z: I | x: I | B: G·N | C: G·N | dt: H ]      conv1d channels [ x: I | B: G·N | C: G·N ]
    per head       A_log[h], D[h], dt_bias[h];  gated RMSNorm weight over I;  out_proj columns over I

A head h owns channels h·d … (h+1)·d of z, x, the conv, the norm and out_proj, plus its dt row and scalars;
heads h·H/G … read B/C group g. Mamba-1 has no heads (a channel of d_inner is its own head: its z and x rows,
conv filter, x_proj column, dt_proj row, A_log row, D) and one B/C "group" whose N states are rows of x_proj.

What a plan removes is exactly what zeroing it in the dense model removes: a removed state's B/C rows (and
conv filters) give B = C = 0 there, a removed channel's x and z give y = 0. The one module that sees the
removal is Mamba-2's gated RMSNorm, whose group mean would divide by fewer channels; the shrink scales its
weight by √(g/g′) and its ε by g/g′ (g, g′: channels per norm group before/after), which is the dense model
with zeros in those channels, exactly. Head merging averages consecutive B/C groups and keeps the norm groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from prunekit.adapters import get_adapter
from prunekit.errors import PrunekitError

SSM_FAMILIES = ("mamba", "mamba2", "bamba")


@dataclass(frozen=True)
class SsmLayout:
    """Sizes of one mixer; `heads`/`head_dim` are channels/1 for Mamba-1."""

    kind: str  # "mamba" (Mamba-1) or "mamba2"
    hidden: int
    heads: int
    head_dim: int
    groups: int
    state: int
    dt_rank: int
    kernel: int
    biases: tuple[str, ...]  # linears with a bias (in_proj, out_proj, ...)
    conv_bias: bool

    @property
    def intermediate(self) -> int:
        return self.heads * self.head_dim

    def params(self, heads: int | None = None, head_dim: int | None = None, groups: int | None = None,
               state: int | None = None) -> int:
        """Every parameter of the mixer at these sizes (default: the current ones)."""
        h = self.heads if heads is None else heads
        d = self.head_dim if head_dim is None else head_dim
        g = self.groups if groups is None else groups
        n = self.state if state is None else state
        inner, hidden, bias = h * d, self.hidden, lambda name: name in self.biases
        if self.kind == "mamba":
            rows = 2 * inner
            conv = inner
            total = (hidden + bias("in_proj")) * rows + inner * (self.dt_rank + 2 * n) + (self.dt_rank + 1) * inner
            total += inner * n + inner
        else:
            rows = 2 * inner + 2 * g * n + h
            conv = inner + 2 * g * n
            total = (hidden + bias("in_proj")) * rows + 3 * h + inner
        total += conv * (self.kernel + self.conv_bias) + inner * hidden + (hidden if bias("out_proj") else 0)
        return total


@dataclass
class SsmLayerPlan:
    """What one SSM layer keeps: heads, the channels of those heads (head-major, equally many per head), the
    states of each B/C group, and how many consecutive groups are averaged into one (`merge`)."""

    heads: list[int]
    channels: list[int]
    states: list[list[int]]
    merge: int
    removed_params: int
    total_params: int
    #: out_proj's input mean over the calibration tokens (bias compensation, when enabled and a bias exists)
    mean: torch.Tensor | None = None
    out_bias: torch.Tensor | None = None

    def summary(self) -> dict[str, Any]:
        return {"heads": len(self.heads), "channels": len(self.channels), "states": len(self.states[0]),
                "groups": len(self.states) // self.merge,
                "sparsity": round(self.removed_params / self.total_params, 4) if self.total_params else 0.0}


@dataclass
class SsmPlan:
    """A plan for every block (None: a block that is not an SSM layer, left as it is)."""

    layers: list[SsmLayerPlan | None]
    target: float
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def removed_params(self) -> int:
        return sum(layer.removed_params for layer in self.layers if layer is not None)

    @property
    def total_params(self) -> int:
        return sum(layer.total_params for layer in self.layers if layer is not None)

    @property
    def achieved(self) -> float:
        return self.removed_params / self.total_params if self.total_params else 0.0


class SsmStructure:
    """Structured view of a model whose blocks hold Mamba-1 or Mamba-2 mixers (hybrids: some blocks)."""

    ssm: ClassVar[bool] = True

    def __init__(self, model: nn.Module):
        self.model = model
        self.adapter = get_adapter(model)
        self.kind = "mamba" if self.adapter.family == "mamba" else "mamba2"

    def blocks(self) -> nn.ModuleList:
        return self.adapter.blocks()

    def mixer_path(self, block: nn.Module) -> str | None:
        if self.adapter.family == "bamba":
            return "mamba" if block.block_type == "linear_attention" else None
        return "mixer"

    def mixer(self, block: nn.Module) -> nn.Module | None:
        path = self.mixer_path(block)
        return None if path is None else block.get_submodule(path)

    def layout(self, block: nn.Module) -> SsmLayout | None:
        mixer = self.mixer(block)
        if mixer is None:
            return None
        biases = tuple(name for name in ("in_proj", "x_proj", "dt_proj", "out_proj")
                       if getattr(getattr(mixer, name, None), "bias", None) is not None)
        conv = mixer.conv1d
        if self.kind == "mamba":
            inner = mixer.in_proj.out_features // 2
            return SsmLayout("mamba", mixer.in_proj.in_features, inner, 1, 1, mixer.A_log.shape[1],
                             mixer.dt_proj.in_features, conv.kernel_size[0], biases, conv.bias is not None)
        heads = mixer.A_log.shape[0]
        inner = mixer.out_proj.in_features
        groups, state = mixer.n_groups, mixer.ssm_state_size
        return SsmLayout("mamba2", mixer.in_proj.in_features, heads, inner // heads, groups, state, 0,
                         conv.kernel_size[0], biases, conv.bias is not None)

    # -- the shrink ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def apply(self, block: nn.Module, layer: SsmLayerPlan | None, index: int) -> dict[str, Any] | None:
        """Shrink block `index` to its plan (nothing for a non-SSM block); returns its spec."""
        if layer is not None:
            mixer, layout = self.mixer(block), self.layout(block)
            if self.kind == "mamba":
                _shrink_mamba(mixer, layout, layer)
            else:
                _shrink_mamba2(mixer, layout, layer, index)
        return self.layer_spec(block)

    def apply_plan(self, model: nn.Module, plan: SsmPlan) -> None:
        from prunekit.structured.shrink import SPEC_KEY

        for index, (block, layer) in enumerate(zip(self.blocks(), plan.layers, strict=True)):
            self.apply(block, layer, index)
        setattr(model.config, SPEC_KEY, self.spec())

    def layer_spec(self, block: nn.Module) -> dict[str, Any] | None:
        layout = self.layout(block)
        if layout is None:
            return None
        spec = {"kind": layout.kind, "heads": layout.heads, "head_dim": layout.head_dim, "groups": layout.groups,
                "state": layout.state, "bias": list(layout.biases), "conv_bias": layout.conv_bias}
        if layout.kind == "mamba2":
            norm = self.mixer(block).norm
            spec.update(norm_group_size=int(norm.group_size), norm_eps=float(norm.variance_epsilon))
        return spec

    def spec(self, layers: list[dict[str, Any] | None] | None = None) -> dict[str, Any]:
        if layers is None:
            layers = [self.layer_spec(block) for block in self.blocks()]
        return {"format": 1, "kind": "ssm", "family": self.adapter.family, "layers": layers}


def _rows(linear: nn.Linear, pieces: list[torch.Tensor]) -> nn.Linear:
    """A new linear whose rows are `pieces` of [rows, in + (1 if bias)] (weight and bias side by side)."""
    stacked = torch.cat(pieces, dim=0)
    has_bias = linear.bias is not None
    new = torch.nn.utils.skip_init(nn.Linear, linear.in_features, stacked.shape[0], bias=has_bias,
                                   device=linear.weight.device, dtype=linear.weight.dtype)
    new.weight.copy_(stacked[:, : linear.in_features])
    if has_bias:
        new.bias.copy_(stacked[:, linear.in_features])
    return new


def _with_bias(linear: nn.Linear) -> torch.Tensor:
    """[out, in (+1)]: the weight with the bias as a last column, so rows can be cut and averaged together."""
    if linear.bias is None:
        return linear.weight.detach()
    return torch.cat([linear.weight.detach(), linear.bias.detach()[:, None]], dim=1)


def _conv(old: nn.Conv1d, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Conv1d:
    channels, kernel = weight.shape[0], old.kernel_size[0]
    new = torch.nn.utils.skip_init(nn.Conv1d, channels, channels, kernel, groups=channels, padding=kernel - 1,
                                   bias=bias is not None, device=old.weight.device, dtype=old.weight.dtype)
    new.weight.copy_(weight)
    if bias is not None:
        new.bias.copy_(bias)
    return new


def _out_proj(linear: nn.Linear, channels: torch.Tensor, layer: SsmLayerPlan) -> nn.Linear:
    """out_proj on the kept channels; with a bias, the removed channels' mean output goes into it (FLAP)."""
    from prunekit.structured.shrink import _compensation, keep_columns

    extra = None
    if linear.bias is not None and layer.mean is not None:
        removed = torch.tensor(sorted(set(range(linear.in_features)) - set(channels.tolist())), dtype=torch.long)
        extra = _compensation(linear.weight, removed, layer.mean)
    layer.out_bias = extra
    return keep_columns(linear, channels, extra)


def _shrink_mamba(mixer: nn.Module, layout: SsmLayout, layer: SsmLayerPlan) -> None:
    inner, rank, n = layout.intermediate, layout.dt_rank, layout.state
    channels = torch.tensor(layer.channels, dtype=torch.long)
    states = torch.tensor(layer.states[0], dtype=torch.long)
    full = _with_bias(mixer.in_proj)
    mixer.in_proj = _rows(mixer.in_proj, [full[channels], full[inner + channels]])
    conv = mixer.conv1d
    mixer.conv1d = _conv(conv, conv.weight[channels], None if conv.bias is None else conv.bias[channels])
    x_rows = torch.cat([torch.arange(rank), rank + states, rank + n + states])
    x_proj = mixer.x_proj
    new_x = torch.nn.utils.skip_init(nn.Linear, channels.numel(), x_rows.numel(), bias=x_proj.bias is not None,
                                     device=x_proj.weight.device, dtype=x_proj.weight.dtype)
    new_x.weight.copy_(x_proj.weight[x_rows][:, channels])
    if x_proj.bias is not None:
        new_x.bias.copy_(x_proj.bias[x_rows])
    mixer.x_proj = new_x
    mixer.dt_proj = _rows(mixer.dt_proj, [_with_bias(mixer.dt_proj)[channels]])
    mixer.A_log = nn.Parameter(mixer.A_log.detach()[channels][:, states].clone())
    mixer.D = nn.Parameter(mixer.D.detach()[channels].clone())
    mixer.out_proj = _out_proj(mixer.out_proj, channels, layer)
    mixer.intermediate_size = channels.numel()
    mixer.ssm_state_size = states.numel()


def _group_rows(block: torch.Tensor, groups: int, states: list[list[int]], merge: int, n: int) -> torch.Tensor:
    """The B (or C) rows of in_proj / the conv: kept states of every group, then `merge` consecutive groups
    averaged into one."""
    per_group = torch.stack([block[g * n + torch.tensor(states[g], dtype=torch.long)] for g in range(groups)])
    if merge > 1:
        per_group = per_group.reshape(groups // merge, merge, *per_group.shape[1:]).mean(dim=1)
    return per_group.reshape(-1, *per_group.shape[2:])


def _shrink_mamba2(mixer: nn.Module, layout: SsmLayout, layer: SsmLayerPlan, index: int) -> None:
    inner, g, n = layout.intermediate, layout.groups, layout.state
    heads = torch.tensor(layer.heads, dtype=torch.long)
    channels = torch.tensor(layer.channels, dtype=torch.long)
    if len({len(s) for s in layer.states}) != 1 or g % layer.merge:
        raise ValueError(f"layer {index}: every B/C group must keep as many states, and {layer.merge} must divide {g}")
    full = _with_bias(mixer.in_proj)
    b_rows, c_rows = full[2 * inner : 2 * inner + g * n], full[2 * inner + g * n : 2 * inner + 2 * g * n]
    mixer.in_proj = _rows(mixer.in_proj, [
        full[channels], full[inner + channels], _group_rows(b_rows, g, layer.states, layer.merge, n),
        _group_rows(c_rows, g, layer.states, layer.merge, n), full[2 * inner + 2 * g * n + heads]])
    conv, kernel = mixer.conv1d, layout.kernel
    conv_full = conv.weight.detach().reshape(-1, kernel)  # [channels, kernel (+ bias)]
    if conv.bias is not None:
        conv_full = torch.cat([conv_full, conv.bias.detach()[:, None]], dim=1)
    b_conv, c_conv = conv_full[inner : inner + g * n], conv_full[inner + g * n :]
    new_conv = torch.cat([conv_full[channels], _group_rows(b_conv, g, layer.states, layer.merge, n),
                          _group_rows(c_conv, g, layer.states, layer.merge, n)])
    mixer.conv1d = _conv(conv, new_conv[:, :kernel].reshape(-1, 1, kernel),
                         new_conv[:, kernel] if conv.bias is not None else None)
    for name in ("A_log", "D", "dt_bias"):
        setattr(mixer, name, nn.Parameter(getattr(mixer, name).detach()[heads].clone()))
    norm = mixer.norm
    norm_groups = inner // norm.group_size
    kept_per_group = torch.bincount(channels // norm.group_size, minlength=norm_groups)
    if not torch.all(kept_per_group == kept_per_group[0]) or kept_per_group[0] == 0:
        raise ValueError(f"layer {index}: the kept channels must fill the {norm_groups} norm groups equally")
    ratio = norm.group_size / int(kept_per_group[0])  # g / g'
    norm.weight = nn.Parameter(norm.weight.detach()[channels] * ratio**0.5)
    norm.variance_epsilon = norm.variance_epsilon * ratio
    norm.group_size = int(kept_per_group[0])
    mixer.out_proj = _out_proj(mixer.out_proj, channels, layer)
    mixer.num_heads = heads.numel()
    mixer.head_dim = channels.numel() // heads.numel()
    mixer.intermediate_size = channels.numel()
    mixer.n_groups = g // layer.merge
    mixer.ssm_state_size = len(layer.states[0])
    mixer.conv_dim = mixer.intermediate_size + 2 * mixer.n_groups * mixer.ssm_state_size


# -- reload -------------------------------------------------------------------------------------------------


def shrink_to_spec(model: nn.Module, spec: dict[str, Any]) -> None:
    """Give a freshly built (full-size) model the recorded per-layer sizes; the state dict fills the values."""
    structure = SsmStructure(model)
    blocks = structure.blocks()
    layers = spec.get("layers", [])
    if len(layers) != len(blocks):
        raise PrunekitError(f"the saved structure lists {len(layers)} layers but the config builds {len(blocks)}")
    for block, layer in zip(blocks, layers, strict=True):
        mixer = structure.mixer(block)
        if layer is None or mixer is None:
            continue
        hidden = mixer.in_proj.in_features
        heads, d, groups, n = layer["heads"], layer["head_dim"], layer["groups"], layer["state"]
        inner, kernel = heads * d, mixer.conv1d.kernel_size[0]

        def linear(fan_in: int, fan_out: int, name: str, layer: dict = layer) -> nn.Linear:
            return nn.Linear(fan_in, fan_out, bias=name in layer["bias"], dtype=torch.float32)

        if layer["kind"] == "mamba":
            rank = mixer.dt_proj.in_features
            conv_dim = inner
            mixer.in_proj = linear(hidden, 2 * inner, "in_proj")
            mixer.x_proj = linear(inner, rank + 2 * n, "x_proj")
            mixer.dt_proj = linear(rank, inner, "dt_proj")
            mixer.A_log = nn.Parameter(torch.empty(inner, n))
            mixer.D = nn.Parameter(torch.empty(inner))
        else:
            conv_dim = inner + 2 * groups * n
            mixer.in_proj = linear(hidden, inner + conv_dim + heads, "in_proj")
            for name in ("A_log", "D", "dt_bias"):
                setattr(mixer, name, nn.Parameter(torch.empty(heads)))
            mixer.norm.weight = nn.Parameter(torch.empty(inner))
            mixer.norm.group_size = layer["norm_group_size"]
            mixer.norm.variance_epsilon = layer["norm_eps"]
            mixer.num_heads, mixer.head_dim, mixer.n_groups, mixer.conv_dim = heads, d, groups, conv_dim
        mixer.conv1d = nn.Conv1d(conv_dim, conv_dim, kernel, groups=conv_dim, padding=kernel - 1,
                                 bias=layer["conv_bias"])
        mixer.out_proj = linear(inner, hidden, "out_proj")
        mixer.intermediate_size, mixer.ssm_state_size = inner, n
