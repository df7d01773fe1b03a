"""prunekit: post-training pruning of large language models, with measurements you can trust."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """`prunekit.prune` and `prunekit.load`, imported on first use so `import prunekit` stays light."""
    if name == "prune":
        from prunekit.api import prune

        return prune
    if name == "load":
        from prunekit.structured.io import load

        return load
    raise AttributeError(f"module 'prunekit' has no attribute {name!r}")
