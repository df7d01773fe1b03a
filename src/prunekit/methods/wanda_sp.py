"""Wanda-sp: the structured Wanda baseline of the FLAP paper.

Score of an input channel j of o_proj / down_proj: mean_i |W_ij| · ||X_j||₂ (Wanda's score over the
column). A head scores the mean of its channels' standardised scores, which ranks the heads of a layer
exactly as the reference's sum of raw channel scores (structured/search.py). Structure: uniform per layer
and module (UL-UM), no bias
compensation — FLAP's machinery with Wanda's score, so the comparison isolates FLAP's choices.
"""

from __future__ import annotations

from typing import Literal

from prunekit.methods.registry import register
from prunekit.structured.method import StructuredConfig, StructuredMethod


class WandaSPConfig(StructuredConfig):
    structure: Literal["UL-UM", "UL-MM", "AL-MM", "AL-AM"] = "UL-UM"
    compensate: bool = False


@register
class WandaSP(StructuredMethod):
    name = "wanda-sp"
    config_class = WandaSPConfig

    @property
    def metric(self) -> str:
        return "WIFN"
