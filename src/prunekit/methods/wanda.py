"""Wanda (Sun et al., 2024): Pruning by Weights and activations.

Statistics: ||X_j||₂ of each input channel over all calibration tokens. Score: |W_ij| · ||X_j||₂.
Mask: the lowest scores within each output row (or within each run of M inputs for N:M); each row loses
int(in_features · s) weights as in the reference code (`count="reference"`), or the layer loses exactly
round(s · numel) (`count="exact-total"`, see pruning/masks.py). With
`use_variant`, each row instead keeps the smallest prefix of its sorted scores whose sum reaches a
fraction α of the row's total, α found by bisection so the layer meets the target sparsity.
Weights: only masked.
"""

from __future__ import annotations

import torch

from prunekit.methods.base import MethodConfig, PruneResult, PruningMethod
from prunekit.methods.registry import register
from prunekit.pruning.masks import CountRule, mask_from_scores
from prunekit.pruning.statistics import InputSquaredNorms
from prunekit.pruning.target import SparsityTarget


class WandaConfig(MethodConfig):
    #: Per-row count: the reference's int(in_features · s), or the exact layer total round(s · numel).
    count: CountRule = "reference"
    use_variant: bool = False
    #: Bisection stops when the achieved sparsity is this close to the target.
    variant_tolerance: float = 1e-3


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    return weight.abs() * input_norms.to(weight.device).unsqueeze(0)


def cumulative_score_mask(scores: torch.Tensor, sparsity: float, tolerance: float) -> torch.Tensor:
    """Wanda's variant: prune, per row, the lowest scores whose cumulative sum stays <= α · row sum."""
    sorted_scores, order = torch.sort(scores, dim=1, stable=True)
    cumulative = torch.cumsum(sorted_scores, dim=1)
    row_sums = scores.sum(dim=1, keepdim=True)
    low, high = 0.0, 1.0
    sorted_mask = torch.zeros_like(scores, dtype=torch.bool)
    for _ in range(60):
        alpha = (low + high) / 2
        sorted_mask = cumulative <= alpha * row_sums
        achieved = sorted_mask.float().mean().item()
        if abs(achieved - sparsity) <= tolerance:
            break
        if achieved > sparsity:
            high = alpha
        else:
            low = alpha
    mask = torch.zeros_like(sorted_mask)
    mask.scatter_(1, order, sorted_mask)
    return mask


@register
class Wanda(PruningMethod):
    name = "wanda"
    config_class = WandaConfig
    statistic = InputSquaredNorms

    def prune_layer(self, weight, stats: InputSquaredNorms, target: SparsityTarget) -> PruneResult:
        scores = wanda_scores(weight, stats.norms())
        if self.config.use_variant and not target.is_nm:
            mask = cumulative_score_mask(scores, target.sparsity, self.config.variant_tolerance)
        else:
            mask = mask_from_scores(scores, target, group="row", count=self.config.count)
        return PruneResult(weight.masked_fill(mask, 0.0), mask)
