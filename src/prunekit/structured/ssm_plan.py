"""Scores and plans of the structured SSM methods, on the engine's collect pass.

While a block is loaded, the collect pass (dense propagation) measures the inputs of in_proj (the hidden
states), x_proj (Mamba-1: the conv output, which B/C are read from) and out_proj (the gated scan output that a
head's channels put into the residual stream), and `summarize` turns them and the block's weights into small
score tensors. The plan is then decided over all blocks from those summaries alone, so a streamed model never
holds more than one block. Scores (our own choices, stated in docs/ssm.md; the paper's code defaults to Taylor
scores, which need gradients):

* state n of B/C group g: ||W_B[g,n] ⊙ s||² + ||W_C[g,n] ⊙ s||², s = RMS of the rows' input per input channel
  (`wanda`), or s = 1 (`magnitude`, weights only); B and C keep the same states (h·C must stay a dot product);
* channel c (head dimension): E[y_c²] · ||W_out[:, c]||² (`wanda`), or ||W_out[:, c]||² · (||W_x[c]||² + ||W_z[c]||²);
* head (SSM-FLAP): Σ_c∈head Var[y_c] · ||W_out[:, c]||² (WIFV: FLAP's weighted input fluctuation), or
  Σ Var[y_c] (IFV); the removed heads' mean output moves into out_proj's bias where one exists.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.pruning.statistics import InputMeanVariance
from prunekit.structured.ssm import SsmLayerPlan, SsmLayout, SsmPlan, SsmStructure


class SsmObserver:
    """The collect pass's `Observer` for SSM layers (non-SSM blocks of a hybrid are only propagated)."""

    def __init__(self, structure: SsmStructure, needs_data: bool):
        self.structure = structure
        self.needs_data = needs_data

    def observed(self, index: int, block: nn.Module) -> dict[str, tuple[str, nn.Module, InputMeanVariance]]:
        path = self.structure.mixer_path(block)
        if path is None:
            return {}
        mixer = block.get_submodule(path)
        names = ["in_proj", "x_proj", "out_proj"] if self.structure.kind == "mamba" else ["in_proj", "out_proj"]
        return {name: (f"{path}.{name}", getattr(mixer, name),
                       InputMeanVariance(getattr(mixer, name).in_features, mixer.in_proj.weight.device))
                for name in names}

    @torch.no_grad()
    def summarize(self, index: int, block: nn.Module, stats: dict[str, InputMeanVariance]) -> dict[str, torch.Tensor]:
        layout = self.structure.layout(block)
        if layout is None:
            return {}
        return block_scores(self.structure.mixer(block), layout, stats)

    def decide(self, summaries: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        return summaries


def _rms(stat: InputMeanVariance | None, width: int) -> torch.Tensor:
    if stat is None:
        return torch.ones(width, dtype=torch.float64)
    return (stat.sum_squares / max(stat.tokens, 1)).sqrt().cpu()


def block_scores(mixer: nn.Module, layout: SsmLayout, stats: dict[str, InputMeanVariance]) -> dict[str, torch.Tensor]:
    """Every score the SSM methods may use, for one mixer (small tensors, kept per block)."""
    inner, g, n, rank = layout.intermediate, layout.groups, layout.state, layout.dt_rank
    out_norm = mixer.out_proj.weight.detach().double().cpu().square().sum(0)  # ||W_out[:, c]||²
    in_w = mixer.in_proj.weight.detach().double().cpu()
    scores: dict[str, torch.Tensor] = {"shape": torch.tensor([layout.heads, layout.head_dim, g, n])}
    xz = in_w[:inner].square().sum(1) + in_w[inner : 2 * inner].square().sum(1)
    scores["channel_magnitude"] = (out_norm * xz).float()
    if layout.kind == "mamba":
        bc_w, bc_in = mixer.x_proj.weight.detach().double().cpu(), stats.get("x_proj")
        b_rows, c_rows = bc_w[rank : rank + n], bc_w[rank + n : rank + 2 * n]
    else:
        bc_w, bc_in = in_w, stats.get("in_proj")
        b_rows, c_rows = in_w[2 * inner : 2 * inner + g * n], in_w[2 * inner + g * n : 2 * inner + 2 * g * n]
    for metric, stat in (("magnitude", None), ("wanda", bc_in)):
        if metric == "wanda" and stat is None:
            continue
        s = _rms(stat, bc_w.shape[1])[None, :]
        scores[f"state_{metric}"] = ((b_rows * s).square().sum(1) + (c_rows * s).square().sum(1)).reshape(g, n).float()
    out = stats.get("out_proj")
    if out is not None:
        energy = (out.sum_squares / max(out.tokens, 1)).cpu()
        variance = out.variance().double().cpu()
        scores["channel_wanda"] = (energy * out_norm).float()
        per_head = lambda v: v.reshape(layout.heads, layout.head_dim).sum(1).float()  # noqa: E731
        scores["head_wifv"] = per_head(variance * out_norm)
        scores["head_ifv"] = per_head(variance)
        scores["mean"] = out.mean().cpu()
    return scores


def _count(ratio: float, total: int, what: str, index: int, method: str) -> int:
    removed = round(ratio * total)
    if removed >= total:
        where = "the model" if index < 0 else f"layer {index}"
        raise PrunekitError(f"{method} at {ratio:g} would remove all {total} {what} of {where}; "
                            f"use a ratio below {(total - 0.5) / total:.3g}")
    return removed


def _score(summary: dict[str, torch.Tensor], key: str, method: str) -> torch.Tensor:
    if key not in summary:
        raise PrunekitError(f"{method}: score {key!r} needs calibration data")
    return summary[key]


def _lowest(scores: torch.Tensor, k: int) -> set[int]:
    """The k lowest-scoring positions (ties: the lower index first)."""
    order = sorted(range(scores.numel()), key=lambda i: (float(scores[i]), i))
    return set(order[:k])


def _layer(layout: SsmLayout, heads: list[int], channels: list[int], states: list[list[int]], merge: int,
           mean: torch.Tensor | None) -> SsmLayerPlan:
    new_heads = len(heads)
    new_dim = len(channels) // max(new_heads, 1)
    after = layout.params(heads=new_heads, head_dim=new_dim, groups=layout.groups // merge, state=len(states[0]))
    total = layout.params()
    return SsmLayerPlan(heads, channels, states, merge, total - after, total, mean)


def _full(layout: SsmLayout) -> tuple[list[int], list[int], list[list[int]]]:
    return (list(range(layout.heads)), list(range(layout.intermediate)),
            [list(range(layout.state)) for _ in range(layout.groups)])


def _per_layer(structure: SsmStructure, summaries: list[dict],
               plan_layer: Callable[[int, SsmLayout, dict | None], SsmLayerPlan]) -> list[SsmLayerPlan | None]:
    """One plan per SSM layer (None for the other blocks of a hybrid), each from its layout and summary."""
    blocks = structure.blocks()
    if summaries and len(summaries) != len(blocks):
        raise ValueError(f"{len(summaries)} block summaries for {len(blocks)} blocks")
    return [None if (layout := structure.layout(block)) is None
            else plan_layer(index, layout, summaries[index] if summaries else None)
            for index, block in enumerate(blocks)]


def plan_states(structure: SsmStructure, summaries: list[dict], ratio: float, metric: str, method: str) -> SsmPlan:
    def plan_layer(index: int, layout: SsmLayout, summary: dict | None) -> SsmLayerPlan:
        scores = _score(summary, f"state_{metric}", method)
        k = _count(ratio, layout.state, "SSM states", index, method)
        heads, channels, _ = _full(layout)
        states = [sorted(set(range(layout.state)) - _lowest(scores[g], k)) for g in range(layout.groups)]
        return _layer(layout, heads, channels, states, 1, None)

    return SsmPlan(_per_layer(structure, summaries, plan_layer), ratio, {"metric": metric, "unit": "state"})


def plan_headdim(structure: SsmStructure, summaries: list[dict], ratio: float, metric: str, method: str) -> SsmPlan:
    """The same number of channels leave every head (Mamba-1: channels of d_inner, one pool)."""
    def plan_layer(index: int, layout: SsmLayout, summary: dict | None) -> SsmLayerPlan:
        scores = _score(summary, f"channel_{metric}", method)
        heads, _, states = _full(layout)
        if layout.kind == "mamba":
            k = _count(ratio, layout.intermediate, "inner channels", index, method)
            channels = sorted(set(range(layout.intermediate)) - _lowest(scores, k))
            heads = channels  # a Mamba-1 channel is its own head
        else:
            k = _count(ratio, layout.head_dim, "channels of each head", index, method)
            d = layout.head_dim
            per_head = scores.reshape(layout.heads, d)
            channels = [h * d + p for h in heads for p in sorted(set(range(d)) - _lowest(per_head[h], k))]
        return _layer(layout, heads, channels, states, 1, None)

    return SsmPlan(_per_layer(structure, summaries, plan_layer), ratio, {"metric": metric, "unit": "channel"})


def plan_headmerge(structure: SsmStructure, summaries: list[dict], ratio: float, method: str) -> SsmPlan:
    """Consecutive B/C groups averaged: G → G − round(ratio·G) groups, which must divide G evenly."""
    def plan_layer(index: int, layout: SsmLayout, _summary: dict | None) -> SsmLayerPlan:
        if layout.kind != "mamba2":
            raise PrunekitError(f"{method} merges B/C heads of Mamba-2 layers; Mamba-1 layers have one B/C head")
        removed = _count(ratio, layout.groups, "B/C heads", index, method)
        kept = layout.groups - removed
        if removed == 0 or layout.groups % kept:
            valid = [f"{1 - k / layout.groups:g}" for k in range(1, layout.groups) if layout.groups % k == 0]
            raise PrunekitError(f"{method} at {ratio:g} would leave {kept} of {layout.groups} B/C heads in layer "
                                f"{index}, which does not merge them in equal sets; accepted ratios: "
                                f"{', '.join(valid) or 'none (a single B/C head)'}")
        heads, channels, states = _full(layout)
        return _layer(layout, heads, channels, states, layout.groups // kept, None)

    return SsmPlan(_per_layer(structure, [], plan_layer), ratio, {"unit": "B/C head"})


def plan_heads(structure: SsmStructure, summaries: list[dict], ratio: float, metric: str, adaptive: bool,
               compensate: bool, method: str) -> SsmPlan:
    """SSM-FLAP: whole heads (Mamba-1: channels). A removal unit is one head of every B/C group (the lowest
    remaining one of each), so the groups stay equal. Uniform: round(ratio·units) per layer; adaptive: scores
    standardised per layer, one global threshold, at least one unit left in every layer."""
    key = f"head_{metric.lower()}"
    entries = []  # (layer index, layout, unit scores ascending, unit head lists)
    for index, (block, summary) in enumerate(zip(structure.blocks(), summaries, strict=True)):
        layout = structure.layout(block)
        if layout is None:
            continue
        scores = _score(summary, key, method).double()
        z = (scores - scores.mean()) / (scores.std() if scores.numel() > 1 and scores.std() > 0 else 1.0)
        per_group = layout.heads // layout.groups
        ordered = [sorted(range(g * per_group, (g + 1) * per_group), key=lambda h: (float(z[h]), h))
                   for g in range(layout.groups)]
        units = [[ordered[g][k] for g in range(layout.groups)] for k in range(per_group)]
        unit_scores = [float(z[torch.tensor(u)].mean()) for u in units]
        entries.append((index, layout, unit_scores, units))
    counts: dict[int, int] = {}
    if adaptive:
        total = sum(len(units) for *_, units in entries)
        budget = _count(ratio, total, "SSM heads", -1, method) if entries else 0
        candidates = sorted((score, index, k) for index, _l, scores, _u in entries
                            for k, score in enumerate(scores[:-1]))  # the last unit of a layer always stays
        for _score_value, index, _k in candidates[:budget]:
            counts[index] = counts.get(index, 0) + 1
    else:
        for index, _layout, _scores, units in entries:
            counts[index] = _count(ratio, len(units), "head units", index, method)
    layers: list[SsmLayerPlan | None] = [None] * len(structure.blocks())
    for index, layout, _scores, units in entries:
        gone = {h for unit in units[: counts.get(index, 0)] for h in unit}
        heads = [h for h in range(layout.heads) if h not in gone]
        channels = [h * layout.head_dim + p for h in heads for p in range(layout.head_dim)]
        mean = summaries[index].get("mean") if compensate else None
        _, _, states = _full(layout)
        layers[index] = _layer(layout, heads, channels, states, 1, mean)
    return SsmPlan(layers, ratio, {"metric": metric, "unit": "head", "adaptive": adaptive})


def check_ratio(structure: SsmStructure, ratio: float, unit: str, method: str, adaptive: bool = False) -> None:
    """The plan's ratio checks, from the shapes alone, before any calibration (one line on failure)."""
    layouts = [(i, layout) for i, block in enumerate(structure.blocks())
               if (layout := structure.layout(block)) is not None]
    if unit == "merge":
        plan_headmerge(structure, [], ratio, method)
        return
    if unit == "head" and adaptive:
        total = sum(layout.heads // layout.groups for _i, layout in layouts)
        _count(ratio, total, "SSM head units", -1, method)
        return
    for index, layout in layouts:
        if unit == "state":
            _count(ratio, layout.state, "SSM states", index, method)
        elif unit == "channel" and layout.kind == "mamba":
            _count(ratio, layout.intermediate, "inner channels", index, method)
        elif unit == "channel":
            _count(ratio, layout.head_dim, "channels of each head", index, method)
        else:
            _count(ratio, layout.heads // layout.groups, "head units", index, method)
