"""GBLM-Pruner (Das et al., 2023): gradient-based language-model pruning.

Statistics: ||X_j||₂ per input channel, plus the per-weight gradient norms G = √Σ_n (100 · ∂L_n/∂W)² of
the language-model loss over the calibration windows n (`prunekit.pruning.gradients`, computed once and
read from `gradients=PATH`). Score, as the reference: |W_ij| · (G_ij + ||X_j||₂ / √N), with N the number
of calibration windows (the reference averages ||x||² per window). Mask: the lowest scores of each
output row, or of each run of M inputs for N:M. Weights: only masked.
"""

from __future__ import annotations

import math

import torch
from pydantic import field_validator

from prunekit.methods.base import MethodConfig, PruneResult, PruningMethod
from prunekit.methods.registry import register
from prunekit.pruning.gradients import check_gradient_file, load_gradient_norm
from prunekit.pruning.masks import mask_from_scores
from prunekit.pruning.statistics import InputSquaredNorms
from prunekit.pruning.target import SparsityTarget


class GBLMConfig(MethodConfig):
    #: safetensors file written by compute_gradient_norms for this model and calibration set.
    gradients: str

    @field_validator("gradients")
    @classmethod
    def _readable(cls, value: str) -> str:
        check_gradient_file(value)
        return value


def gblm_scores(weight: torch.Tensor, gradient_norms: torch.Tensor, input_norms: torch.Tensor,
                windows: int) -> torch.Tensor:
    activation = input_norms.to(weight.device).unsqueeze(0) / math.sqrt(max(windows, 1))
    return weight.abs() * (gradient_norms.to(weight.device) + activation)


@register
class GBLM(PruningMethod):
    name = "gblm"
    config_class = GBLMConfig
    statistic = InputSquaredNorms

    def prune_group(self, weights, stats: InputSquaredNorms, targets) -> dict[str, PruneResult]:
        """Needs the layers' names to find their gradients, so it works on named groups."""
        results = {}
        for name, weight in weights.items():
            gradient = load_gradient_norm(self.config.gradients, name, tuple(weight.shape))
            scores = gblm_scores(weight, gradient, stats.norms(), stats.windows)
            mask = mask_from_scores(scores, targets[name], group="row")
            results[name] = PruneResult(weight.masked_fill(mask, 0.0), mask)
        return results

    def prune_layer(self, weight, stats, target: SparsityTarget) -> PruneResult:
        raise TypeError("gblm looks gradients up by layer name: call prune_group({name: weight}, ...)")
