"""FLAP (An et al., AAAI 2024): Fluctuation-based Adaptive Structured Pruning, retraining-free.

Statistics: mean and variance of every input channel of o_proj (grouped by head) and down_proj (per
MLP channel), one dense pass. Score: IFV, WIFV (default) or WIFN (structured/search.py), squared for the
attention channels before standardising and pooling per head, as the reference code does. Structure:
UL-UM, UL-MM, AL-MM or AL-AM (default: scores standardised per layer, one global threshold over heads
and channels counted in parameters). Weights: the removed channels' mean contribution is added to the
output projection's bias (bias compensation). The result is a physically smaller model.

On state-space layers (Mamba, Mamba-2, Bamba's mixers) `flap` is SSM-FLAP: whole heads leave in_proj (z, x,
dt), the conv, A_log, D, dt_bias, the norm and out_proj (structured/ssm_plan.py).
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
    ssm_support = True

    def ssm_check(self, structure, sparsity):
        from prunekit.structured.ssm_plan import check_ratio

        check_ratio(structure, sparsity, "head", self.name, adaptive=self.config.structure.startswith("AL"))

    def ssm_plan(self, structure, summaries, sparsity):
        """SSM-FLAP: whole SSM heads by their fluctuation (IFV/WIFV), uniform (UL-*) or adaptive (AL-*) across
        layers, the removed heads' mean output compensated in out_proj's bias where one exists."""
        from prunekit.errors import PrunekitError
        from prunekit.structured.ssm_plan import plan_heads

        if self.metric == "WIFN":
            raise PrunekitError("flap on SSM layers scores heads by IFV or WIFV; WIFN needs per-channel norms of "
                                "attention inputs")
        return plan_heads(structure, summaries, sparsity, self.metric, self.config.structure.startswith("AL"),
                          self.compensate, self.name)
