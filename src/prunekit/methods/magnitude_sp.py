"""Magnitude-sp: the data-free structured baseline of the FLAP paper.

Score of an input channel j of o_proj / down_proj: ||W[:, j]||₂ (heads ranked as by the sum of their
channels, structured/search.py). Structure: uniform per layer and module (UL-UM). No calibration data,
hence no bias compensation.
"""

from __future__ import annotations

from typing import Literal

from prunekit.methods.registry import register
from prunekit.structured.method import StructuredConfig, StructuredMethod


class MagnitudeSPConfig(StructuredConfig):
    structure: Literal["UL-UM", "UL-MM", "AL-MM", "AL-AM"] = "UL-UM"


@register
class MagnitudeSP(StructuredMethod):
    name = "magnitude-sp"
    config_class = MagnitudeSPConfig

    @property
    def metric(self) -> str:
        return "MAG"
