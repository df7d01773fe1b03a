"""Measurements of a (pruned) model: the pinned perplexity protocol."""

from prunekit.evaluation.perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]
