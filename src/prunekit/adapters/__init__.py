"""Architecture adapters: one file per model family."""

from prunekit.adapters import bamba, gpt2, gpt_neox, llama, mamba, mamba2, opt  # noqa: F401  (registration)
from prunekit.adapters.base import Adapter, is_prunable_linear, set_weight_matrix, weight_matrix
from prunekit.adapters.registry import get_adapter, supported_model_types

__all__ = [
    "Adapter",
    "get_adapter",
    "is_prunable_linear",
    "set_weight_matrix",
    "supported_model_types",
    "weight_matrix",
]
