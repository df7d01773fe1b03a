"""Magnitude pruning (Han et al., 2015): drop the smallest |W|.

Statistics: none (no calibration data). Score: |W_ij|. Mask: the lowest scores within the whole
layer (`group="layer"`, the reference; exactly round(s · numel) weights) or within each output row
(`group="row"`, Wanda's comparison group, with its per-row `count` rule); N:M patterns compare within each
run of M inputs. Weights: only masked.
"""

from __future__ import annotations

from typing import Literal

import torch

from prunekit.methods.base import MethodConfig, PruneResult, PruningMethod
from prunekit.methods.registry import register
from prunekit.pruning.masks import CountRule, mask_from_scores
from prunekit.pruning.target import SparsityTarget


class MagnitudeConfig(MethodConfig):
    group: Literal["layer", "row"] = "layer"
    #: With group="row": the reference's int(in_features · s) per row, or the exact layer total.
    count: CountRule = "reference"


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    return weight.abs()


@register
class Magnitude(PruningMethod):
    name = "magnitude"
    config_class = MagnitudeConfig
    statistic = None

    def prune_layer(self, weight, stats, target: SparsityTarget) -> PruneResult:
        mask = mask_from_scores(magnitude_scores(weight), target, group=self.config.group, count=self.config.count)
        return PruneResult(weight.masked_fill(mask, 0.0), mask)
