"""Measurements of a (pruned) model: the pinned perplexity protocol."""

from prunekit.evaluation.perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]

# zero-shot (lm-eval), offline local tasks, divergence from the dense model (issue 4)
from prunekit.evaluation.divergence import (
    DivergenceResult,
    ReferenceCache,
    cache_reference,
    compare,
    divergence,
)
from prunekit.evaluation.local_tasks import LocalTaskSet, build_local_tasks
from prunekit.evaluation.zeroshot import PAPER_SUITE, ZeroShotResult, zeroshot

__all__ += [
    "PAPER_SUITE",
    "DivergenceResult",
    "LocalTaskSet",
    "ReferenceCache",
    "ZeroShotResult",
    "build_local_tasks",
    "cache_reference",
    "compare",
    "divergence",
    "zeroshot",
]
