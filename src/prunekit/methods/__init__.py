"""Pruning methods, one file each, registered by name."""

from prunekit.methods import flap, magnitude, magnitude_sp, seap, sparsegpt, wanda, wanda_sp  # noqa: F401  (registration)
from prunekit.methods.base import MethodConfig, PruneResult, PruningMethod
from prunekit.methods.registry import METHODS, build_method, register

__all__ = ["METHODS", "MethodConfig", "PruneResult", "PruningMethod", "build_method", "register"]
