"""prunekit: post-training pruning of large language models, with measurements you can trust."""

__version__ = "0.1.0"
