"""Measurements of a (pruned) model: perplexity under the pinned protocol, zero-shot tasks (lm-eval),
divergence from the dense model, and inference speed against a baseline."""

from prunekit.evaluation.divergence import (
    DivergenceResult,
    ReferenceCache,
    cache_reference,
    compare,
    divergence,
)
from prunekit.evaluation.local_tasks import LocalTaskSet, build_local_tasks
from prunekit.evaluation.perplexity import PerplexityResult, perplexity
from prunekit.evaluation.speed import SpeedReport, measure_speed
from prunekit.evaluation.zeroshot import PAPER_SUITE, ZeroShotResult, zeroshot

__all__ = [
    "PAPER_SUITE",
    "DivergenceResult",
    "LocalTaskSet",
    "PerplexityResult",
    "ReferenceCache",
    "SpeedReport",
    "ZeroShotResult",
    "build_local_tasks",
    "cache_reference",
    "compare",
    "divergence",
    "measure_speed",
    "perplexity",
    "zeroshot",
]
