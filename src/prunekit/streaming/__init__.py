"""Models on disk, pruned and evaluated block by block: memory bounded by a block, not by the model.

prune.py runs a recipe from a checkpoint into an output folder (resumable); budget.py sizes the run (memory,
disk, time) before it starts.
"""

from prunekit.streaming.prune import StreamRequest, prune_files

__all__ = ["StreamRequest", "prune_files"]
