"""The block-by-block calibration engine."""

from prunekit.engine.sequential import EngineOptions, EngineResult, EngineState, LayerRecord, SequentialEngine

__all__ = ["EngineOptions", "EngineResult", "EngineState", "LayerRecord", "SequentialEngine"]
