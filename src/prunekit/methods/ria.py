"""RIA (Zhang et al., ICLR 2024, "Plug-and-Play"): Relative Importance and Activations.

Statistics: ||X_j||₂ per input channel. Score: (|W_ij| / Σ_i |W_ij| + |W_ij| / Σ_j |W_ij|) · ||X_j||₂^a,
a weight's share of its input channel's and of its output row's total magnitude, times the activation
norm to the power a (0.5). Mask: the lowest scores of the whole layer (`group="layer"`, the reference
default) or of each row. N:M: with channel permutation (the paper's), the input channels are first
reordered so that strong channels do not compete inside one group of M: columns sorted by their score
sum are dealt out to the M slots of the groups in a zig-zag (heuristic reallocation), then each slot is
re-matched to the groups by a linear sum assignment that maximises the retained score (scipy). The N:M
pattern then holds on the permuted columns (`PruneResult.column_order`). Weights: only masked.
"""

from __future__ import annotations

from typing import Literal

import torch
from scipy.optimize import linear_sum_assignment

from prunekit.methods.base import MethodConfig, PruneResult, PruningMethod
from prunekit.methods.registry import register
from prunekit.pruning.masks import mask_from_scores, nm_mask
from prunekit.pruning.statistics import InputSquaredNorms
from prunekit.pruning.target import SparsityTarget


class RIAConfig(MethodConfig):
    #: Exponent of the activation norm.
    a: float = 0.5
    group: Literal["layer", "row"] = "layer"
    #: N:M only: none, the heuristic channel reallocation, or reallocation refined by linear sum assignment.
    permutation: Literal["none", "heuristic", "lsa"] = "lsa"


def ria_scores(weight: torch.Tensor, input_norms: torch.Tensor, a: float = 0.5) -> torch.Tensor:
    magnitude = weight.abs()
    relative = magnitude / magnitude.sum(dim=0, keepdim=True) + magnitude / magnitude.sum(dim=1, keepdim=True)
    return relative.nan_to_num(0.0) * input_norms.to(weight.device).unsqueeze(0).pow(a)


def heuristic_order(scores: torch.Tensor, m: int) -> torch.Tensor:
    """Columns sorted by their score sum, cut into m equal runs; run r fills slot r of every group of m,
    every other run reversed, so each group gets one column from each strength band."""
    cols = scores.shape[1]
    ranked = torch.argsort(scores.sum(dim=0), stable=True)
    order = torch.empty_like(ranked)
    per_slot = cols // m
    for slot in range(m):
        band = ranked[slot * per_slot : (slot + 1) * per_slot]
        order[slot::m] = band.flip(0) if slot % 2 else band
    return order


def retained_score(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Total score an N:M mask keeps (the m - n highest of every group of m)."""
    rows, cols = scores.shape
    return scores.reshape(rows, cols // m, m).topk(m - n, dim=-1).values.sum()


def lsa_refine(scores: torch.Tensor, order: torch.Tensor, n: int, m: int, chunk: int = 64) -> torch.Tensor:
    """For each slot in turn, re-assign that slot's columns to the groups so the kept score is maximal.

    The kept score of a group whose other m − 1 columns are fixed, once a candidate x joins them, is
    (sum of their top k − 1) + max(x, their k-th largest), with k = m − n kept: no sort per pair."""
    order = order.clone()
    rows, cols = scores.shape
    groups, keep = cols // m, m - n
    for slot in range(m):
        permuted = scores[:, order].reshape(rows, groups, m)
        candidates = permuted[:, :, slot]  # [rows, groups]: the column each group offers for this slot
        others = permuted[:, :, [j for j in range(m) if j != slot]].sort(dim=-1, descending=True).values
        base = others[..., : keep - 1].sum(dim=(0, 2)).double()  # [groups]
        kth = others[..., keep - 1]  # [rows, groups]
        gain = torch.empty(groups, groups, dtype=torch.float64)
        for start in range(0, groups, chunk):
            host_kth = kth[:, start : start + chunk]  # groups receiving a candidate
            best = torch.maximum(candidates[:, None, :], host_kth[:, :, None]).sum(dim=0)
            gain[start : start + chunk] = best.double() + base[start : start + chunk, None]
        _, chosen = linear_sum_assignment(gain.numpy(), maximize=True)
        slot_columns = order[slot::m].clone()
        order[slot::m] = slot_columns[torch.as_tensor(chosen)]
    return order


def ria_nm_mask(scores: torch.Tensor, n: int, m: int, permutation: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """N:M mask in original column order, and the column order under which it is N:M (None: identity)."""
    if permutation == "none":
        return nm_mask(scores, n, m), None
    order = heuristic_order(scores, m)
    if permutation == "lsa":
        order = lsa_refine(scores, order, n, m)
    mask = torch.empty_like(scores, dtype=torch.bool)
    mask[:, order] = nm_mask(scores[:, order], n, m)
    return mask, order


@register
class RIA(PruningMethod):
    name = "ria"
    config_class = RIAConfig
    statistic = InputSquaredNorms

    def prune_layer(self, weight, stats: InputSquaredNorms, target: SparsityTarget) -> PruneResult:
        scores = ria_scores(weight, stats.norms(), self.config.a)
        order = None
        if target.is_nm:
            mask, order = ria_nm_mask(scores, target.n, target.m, self.config.permutation)  # type: ignore[arg-type]
        else:
            mask = mask_from_scores(scores, target, group=self.config.group)
        return PruneResult(weight.masked_fill(mask, 0.0), mask, order)
