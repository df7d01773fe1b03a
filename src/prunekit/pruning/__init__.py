"""Sparsity targets and mask rules shared by every method."""

from prunekit.pruning.masks import (
    mask_from_scores,
    nm_mask,
    row_counts,
    unstructured_layer_mask,
    unstructured_row_mask,
)
from prunekit.pruning.target import SparsityPlan, SparsityTarget, parse_pattern

__all__ = [
    "SparsityPlan",
    "SparsityTarget",
    "mask_from_scores",
    "nm_mask",
    "parse_pattern",
    "row_counts",
    "unstructured_layer_mask",
    "unstructured_row_mask",
]
