"""Pruning methods, one file each, registered by name."""

from prunekit.methods import (  # noqa: F401  (registration)
    alps,
    besa,
    dsnot,
    flap,
    gblm,
    magnitude,
    magnitude_sp,
    ria,
    seap,
    sparsegpt,
    ssm_headdim,
    ssm_headmerge,
    ssm_state,
    wanda,
    wanda_sp,
)
from prunekit.methods.base import MethodConfig, PruneResult, PruningMethod
from prunekit.methods.registry import METHODS, build_method, register

__all__ = ["METHODS", "MethodConfig", "PruneResult", "PruningMethod", "build_method", "register"]
