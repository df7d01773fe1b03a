"""The block-by-block engine shared by every method: one loop (loop.py), three kinds of pass (passes.py),
blocks from memory or disk (blocks.py), activations in memory or spilled (activations.py), statistics reduced
across ranks (reduce.py), and a run that survives a kill (state.py)."""

from prunekit.engine.blocks import InMemoryBlocks, ShardSink, StreamedBlocks
from prunekit.engine.loop import Engine, EngineOptions, EngineResult
from prunekit.engine.passes import ApplyPass, CollectPass, LayerRecord, SequentialPass

__all__ = ["ApplyPass", "CollectPass", "Engine", "EngineOptions", "EngineResult", "InMemoryBlocks", "LayerRecord",
           "SequentialPass", "ShardSink", "StreamedBlocks"]
