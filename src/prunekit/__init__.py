"""prunekit: post-training pruning of large language models, with measurements you can trust."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """`prunekit.prune`, `prunekit.load` and `prunekit.retrain`, imported on first use (`import prunekit` stays
    light)."""
    if name == "prune":
        from prunekit.api import prune

        return prune
    if name == "load":
        from prunekit.structured.io import load

        return load
    if name == "retrain":  # the package, callable: prunekit.retrain(PRUNED_DIR, OUT, calib=...)
        from importlib import import_module

        return import_module("prunekit.retrain")
    raise AttributeError(f"module 'prunekit' has no attribute {name!r}")
