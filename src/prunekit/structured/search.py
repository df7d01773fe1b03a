"""Scores of heads and channels, and the search that decides how many of each every layer loses.

Scores (per input channel j of o_proj / down_proj, W that layer's weight, X its input):

* IFV  — the fluctuation Var(X_j) (FLAP);
* WIFV — Var(X_j) · ||W[:, j]||² (FLAP's default);
* WIFN — mean_i |W_ij| · ||X_j||₂ (Wanda's score on the column: the `wanda-sp` baseline);
* MAG  — ||W[:, j]||₂ (data-free: the `magnitude-sp` baseline).

Channel scores are standardised over each layer's module (zero mean, unit deviation, as FLAP does, so
layers can be compared), a head's score is the mean over its channels, a unit's score the mean over its
heads. FLAP squares the attention channel scores before standardising (`square_heads`; its reference
code, CASIA-IVA-Lab/FLAP lib/prune.py, does so for every metric and structure); the MLP channels are not
squared. The wanda-sp and magnitude-sp references sum a head's raw channel scores: the mean of the
standardised scores ranks a layer's heads exactly as that sum does (every head has head_dim channels and
standardising is one increasing affine map per layer), and it keeps heads comparable with channels in the
adaptive structures. Removing a unit costs its parameters (layout.py); the target is a fraction of the
prunable block parameters.

Structures (the search):

* UL-UM — uniform layers, uniform modules: every layer loses `sparsity` of its parameters, attention
  heads at that ratio (rounded to whole units) and the MLP the rest of the layer's share;
* UL-MM — uniform layers, manual modules: as UL-UM with the attention ratio given (`attention_sparsity`);
* AL-MM — adaptive layers, manual modules: one threshold over all layers' heads removes
  `attention_sparsity` of the attention parameters, one over all channels removes the rest;
* AL-AM — adaptive layers and modules: one global threshold over heads and channels together, walked
  in score order and counted in parameters until the target is met.

Every search keeps a per-layer floor (`min_keep`, at least one unit) and meets the target within one
unit's parameters; a target that needs more than the floors allow is an error, not a silent cap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from prunekit.errors import PrunekitError
from prunekit.pruning.statistics import InputMeanVariance
from prunekit.structured.layout import BlockLayout, LlamaStructure

if TYPE_CHECKING:
    from prunekit.structured.collect import BlockStatistics

METRICS = ("IFV", "WIFV", "WIFN", "MAG")
STRUCTURES = ("UL-UM", "UL-MM", "AL-MM", "AL-AM")
ADAPTIVE_HINT = ", or use an adaptive structure (AL-AM)"
GQARule = Literal["auto", "query-heads", "kv-groups"]


def column_summary(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """What the scores need of an output projection's weight [out, in], per input channel (column); taken
    while the block is loaded, so a plan over all blocks never needs every block's weights at once."""
    weight = weight.detach().float()
    return {"sq_norm": weight.square().sum(0), "abs_mean": weight.abs().mean(0)}


def channel_scores(metric: str, columns: dict[str, torch.Tensor], stat: InputMeanVariance | None) -> torch.Tensor:
    """Importance of each input channel (column) of an output projection, from its `column_summary`."""
    if metric == "MAG":
        return columns["sq_norm"].sqrt()
    if stat is None:
        raise ValueError(f"metric {metric} needs calibration statistics")
    if metric == "IFV":
        return stat.variance()
    if metric == "WIFV":
        return stat.variance() * columns["sq_norm"]
    if metric == "WIFN":
        return columns["abs_mean"] * stat.norms()
    raise ValueError(f"unknown metric {metric}")


def standardize(scores: torch.Tensor) -> torch.Tensor:
    std = scores.std()
    centred = scores - scores.mean()
    return centred / std if std > 0 else centred


@dataclass
class ModuleUnits:
    """The removable units of one module of one layer, lowest score (first to go) first."""

    layer: int
    kind: Literal["attn", "mlp"]
    scores: torch.Tensor  # ascending
    unit_params: int
    total: int
    keep_at_least: int
    #: what unit i removes: query heads and KV heads (attn) or a channel (mlp)
    heads: list[list[int]] = field(default_factory=list)
    kv_heads: list[list[int]] = field(default_factory=list)
    channels: list[int] = field(default_factory=list)

    @property
    def removable(self) -> int:
        return self.total - self.keep_at_least


def resolve_gqa(rule: str, layout: BlockLayout) -> str:
    if rule == "auto":
        return "kv-groups" if layout.group_size == 1 else "query-heads"
    return rule


def _floor(total: int, min_keep: float) -> int:
    return max(1, math.ceil(min_keep * total - 1e-9))


def block_units(structure: LlamaStructure, index: int, stats: BlockStatistics | None, metric: str, gqa: str,
                min_keep: float, square_heads: bool = False, columns: dict[str, dict[str, torch.Tensor]] | None = None
                ) -> tuple[ModuleUnits, ModuleUnits]:
    """Score one block's heads and channels and express them as removal units.

    `columns` are the block's `column_summary` of o_proj and down_proj (from a collect pass); without them
    they are read from the block, which must then be in memory.
    """
    block = structure.blocks()[index]
    layout = structure.layout(block)
    if columns is None:
        columns = structure.column_summaries(block)
    d, r, kv = layout.head_dim, layout.group_size, layout.kv_heads

    attn_channels = channel_scores(metric, columns["o_proj"], stats.attn if stats else None)
    head_scores = standardize(attn_channels.square() if square_heads else attn_channels)
    head_scores = head_scores.view(layout.heads, d).mean(1).view(kv, r)  # heads of group g: g·r … g·r+r−1
    rule = resolve_gqa(gqa, layout)
    if rule == "query-heads":
        ranked, order = torch.sort(head_scores, dim=1, stable=True)
        attn_units = ModuleUnits(
            layer=index, kind="attn", scores=ranked.mean(0), unit_params=kv * layout.q_params, total=r,
            keep_at_least=_floor(r, min_keep),
            heads=[[g * r + int(order[g, slot]) for g in range(kv)] for slot in range(r)],
            kv_heads=[[] for _ in range(r)],
        )
    elif rule == "kv-groups":
        group_scores, order = torch.sort(head_scores.mean(1), stable=True)
        attn_units = ModuleUnits(
            layer=index, kind="attn", scores=group_scores, unit_params=r * layout.q_params + layout.kv_params,
            total=kv, keep_at_least=_floor(kv, min_keep),
            heads=[list(range(int(g) * r, int(g) * r + r)) for g in order],
            kv_heads=[[int(g)] for g in order],
        )
    else:
        raise ValueError(f"unknown GQA rule {gqa}")

    mlp_scores = standardize(channel_scores(metric, columns["down_proj"], stats.mlp if stats else None))
    ranked, order = torch.sort(mlp_scores, stable=True)
    mlp_units = ModuleUnits(
        layer=index, kind="mlp", scores=ranked, unit_params=layout.channel_params, total=layout.channels,
        keep_at_least=_floor(layout.channels, min_keep), channels=[int(c) for c in order],
    )
    return attn_units, mlp_units


# -- searches ---------------------------------------------------------------------------------------


def _too_much(sparsity: float, where: str, detail: str, hint: str = "") -> PrunekitError:
    return PrunekitError(f"sparsity {sparsity:g} would empty {where} ({detail}); lower the sparsity or min_keep{hint}")


def global_counts(modules: list[ModuleUnits], budget: float, sparsity: float) -> list[int]:
    """Walk all units in ascending score, removing each whose parameters still fit the budget.

    A unit that would overshoot is taken only if that lands closer to the budget; otherwise its
    module is closed (its later units score higher) and cheaper units keep filling the budget.
    """
    capacity = sum(m.removable * m.unit_params for m in modules)
    smallest = min((m.unit_params for m in modules), default=0)
    if budget > capacity + smallest / 2:
        raise _too_much(sparsity, "a layer", f"at most {capacity} of the needed {budget:.0f} parameters can go "
                                             "while every layer keeps its floor")
    entries = sorted((score, i, r) for i, m in enumerate(modules)
                     for r, score in enumerate(m.scores.tolist()[: m.removable]))
    counts = [0] * len(modules)
    closed: set[int] = set()
    removed = 0.0
    for _score, i, r in entries:
        if removed >= budget:
            break
        if i in closed or r != counts[i]:
            continue
        p = modules[i].unit_params
        if removed + p <= budget:
            counts[i] += 1
            removed += p
        else:
            if removed + p - budget < budget - removed:
                counts[i] += 1
                removed += p
            closed.add(i)
    return counts


def _allocate(targets: list[float], caps: list[int]) -> list[int]:
    """Integers with the same (rounded) sum as `targets`, each within [0, cap], by largest remainder."""
    clipped = [min(max(t, 0.0), c) for t, c in zip(targets, caps, strict=True)]
    counts = [math.floor(t) for t in clipped]
    extra = round(sum(clipped)) - sum(counts)
    by_remainder = sorted(range(len(clipped)), key=lambda i: clipped[i] - counts[i], reverse=True)
    for i in by_remainder:
        if extra <= 0:
            break
        if counts[i] < caps[i]:
            counts[i] += 1
            extra -= 1
    return counts


def layerwise_counts(attn: list[ModuleUnits], mlp: list[ModuleUnits], layouts: list[BlockLayout],
                     layer_ratios: list[float], attn_ratios: list[float], *, strict: bool,
                     sparsity: float) -> tuple[list[int], list[int]]:
    """Each layer i loses `layer_ratios[i]` of its parameters: heads at `attn_ratios[i]` (whole units),
    the MLP the rest. With `strict`, a layer whose share exceeds its floor is an error; else it is capped."""
    attn_counts, channel_targets = [], []
    for a, m, layout, rho, rho_a in zip(attn, mlp, layouts, layer_ratios, attn_ratios, strict=True):
        n = round(rho_a * a.total)
        if n > a.removable:
            if strict:
                raise _too_much(sparsity, f"the attention of layer {a.layer}",
                                f"{n} of {a.total} head units, floor {a.keep_at_least}", ADAPTIVE_HINT)
            n = a.removable
        want = (rho * layout.total_params - n * a.unit_params) / m.unit_params
        if want < 0 and n > 0:  # attention rounding overshot the layer's share: take one unit fewer
            n -= 1
            want = (rho * layout.total_params - n * a.unit_params) / m.unit_params
        if want > m.removable + 0.5 and strict:
            raise _too_much(sparsity, f"the MLP of layer {m.layer}",
                            f"{want:.0f} of {m.total} channels, floor {m.keep_at_least}", ADAPTIVE_HINT)
        attn_counts.append(n)
        channel_targets.append(want)
    return attn_counts, _allocate(channel_targets, [m.removable for m in mlp])


def search(structure_name: str, attn: list[ModuleUnits], mlp: list[ModuleUnits], layouts: list[BlockLayout],
           sparsity: float, attention_sparsity: float | None) -> tuple[list[int], list[int]]:
    """Units to remove per layer (attention, MLP) for one of the four FLAP structures."""
    total = sum(layout.total_params for layout in layouts)
    budget = sparsity * total
    attn_ratio = sparsity if attention_sparsity is None else attention_sparsity
    if structure_name in ("UL-UM", "UL-MM"):
        ratio = sparsity if structure_name == "UL-UM" else attn_ratio
        return layerwise_counts(attn, mlp, layouts, [sparsity] * len(layouts), [ratio] * len(layouts),
                                strict=True, sparsity=sparsity)
    if structure_name == "AL-MM":
        attn_total = sum(a.total * a.unit_params for a in attn)
        attn_counts = global_counts(attn, attn_ratio * attn_total, sparsity)
        removed = sum(n * a.unit_params for n, a in zip(attn_counts, attn, strict=True))
        return attn_counts, global_counts(mlp, max(budget - removed, 0.0), sparsity)
    if structure_name == "AL-AM":
        counts = global_counts(attn + mlp, budget, sparsity)
        return counts[: len(attn)], counts[len(attn) :]
    raise ValueError(f"unknown structure {structure_name}")


def logistic_ratios(num_layers: int, lam: float, k: float, x0: float, protect: int, cap: float) -> list[float]:
    """SEAP's depth schedule ρ_i = λ / (1 + exp(−k (x_i − x0))), x_i = i / (L − 1); the first and last
    `protect` layers are kept whole, every ratio is capped at `cap`."""
    ratios = []
    for i in range(num_layers):
        if i < protect or i >= num_layers - protect:
            ratios.append(0.0)
            continue
        x = i / max(num_layers - 1, 1)
        ratios.append(min(cap, lam / (1.0 + math.exp(-k * (x - x0)))))
    return ratios


def logistic_counts(attn: list[ModuleUnits], mlp: list[ModuleUnits], layouts: list[BlockLayout], sparsity: float,
                    *, k: float, x0: float, protect: int, cap: float
                    ) -> tuple[list[int], list[int], list[float], float]:
    """SEAP: find λ by bisection so the logistic schedule removes `sparsity` of all block parameters."""
    total = sum(layout.total_params for layout in layouts)
    budget = sparsity * total

    def removed(lam: float) -> tuple[float, list[float]]:
        ratios = logistic_ratios(len(layouts), lam, k, x0, protect, cap)
        attn_counts, mlp_counts = layerwise_counts(attn, mlp, layouts, ratios, ratios, strict=False,
                                                   sparsity=sparsity)
        params = sum(n * a.unit_params for n, a in zip(attn_counts, attn, strict=True))
        params += sum(n * m.unit_params for n, m in zip(mlp_counts, mlp, strict=True))
        return params, ratios

    high = 1.0
    while removed(high)[0] < budget:
        if high > 1e6:
            raise _too_much(sparsity, "the protected/capped layers",
                            f"protect={protect} layer(s) at each end, per-layer cap {cap:g}")
        high *= 2
    low = 0.0
    for _ in range(60):
        mid = (low + high) / 2
        if removed(mid)[0] < budget:
            low = mid
        else:
            high = mid
    lam = high if abs(removed(high)[0] - budget) <= abs(removed(low)[0] - budget) else low
    ratios = logistic_ratios(len(layouts), lam, k, x0, protect, cap)
    attn_counts, mlp_counts = layerwise_counts(attn, mlp, layouts, ratios, ratios, strict=False, sparsity=sparsity)
    return attn_counts, mlp_counts, ratios, lam
