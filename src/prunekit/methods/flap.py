"""FLAP (An et al., AAAI 2024): Fluctuation-based Adaptive Structured Pruning, retraining-free.

Statistics: mean and variance of every input channel of o_proj (grouped by head) and down_proj (per
MLP channel), one dense pass. Score: IFV, WIFV (default) or WIFN (structured/search.py), squared for the
attention channels before standardising and pooling per head, as the reference code does. Structure:
UL-UM, UL-MM, AL-MM or AL-AM (default: scores standardised per layer, one global threshold over heads
and channels counted in parameters). Weights: the removed channels' mean contribution is added to the
output projection's bias (bias compensation). The result is a physically smaller model.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import field_validator

from prunekit.methods.registry import register
from prunekit.structured.method import StructuredConfig, StructuredMethod


class FlapConfig(StructuredConfig):
    metric: Literal["IFV", "WIFV", "WIFN"] = "WIFV"
    compensate: bool = True

    @field_validator("metric", mode="before")
    @classmethod
    def _upper_metric(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


@register
class Flap(StructuredMethod):
    name = "flap"
    config_class = FlapConfig
    square_heads = True
