"""Calibration and evaluation data: SOURCE strings, calibration windows, provenance."""

from prunekit.data.calibration import (
    DEFAULT_SEQLEN,
    CalibrationSet,
    build_calibration,
    draw_offsets,
    model_context,
    resolve_seqlen,
)
from prunekit.data.sources import (
    ACCEPTED_SOURCES,
    DATASETS,
    JOINER,
    TextSource,
    TokenSource,
    load_token_ids,
    resolve_source,
    sample_from_model,
    sha256_ids,
    split_documents,
    tokenize_documents,
)

__all__ = [
    "ACCEPTED_SOURCES",
    "DATASETS",
    "DEFAULT_SEQLEN",
    "JOINER",
    "CalibrationSet",
    "TextSource",
    "TokenSource",
    "build_calibration",
    "draw_offsets",
    "load_token_ids",
    "model_context",
    "resolve_seqlen",
    "resolve_source",
    "sample_from_model",
    "sha256_ids",
    "split_documents",
    "tokenize_documents",
]
