"""ssm-headdim: remove channels of every SSM head ("On Pruning State-Space LLMs": head-dimension pruning).

A channel is its rows of z and x in in_proj, its conv filter, its column of out_proj and its norm weight
(Mamba-1: also its x_proj column, dt_proj row, A_log row and D; there a channel is its own head, and the
channels of d_inner form one pool). Every Mamba-2 head loses the same number of channels, so the heads stay
equal. `--sparsity` is the share of channels removed per head. Score: `wanda` (default; E[y²] of the channel at
out_proj's input times its out_proj column's squared norm) or `magnitude` (weights only).
"""

from __future__ import annotations

from typing import Literal

from prunekit.methods.base import MethodConfig
from prunekit.methods.registry import register
from prunekit.structured.method import StructuredMethod


class SsmHeaddimConfig(MethodConfig):
    metric: Literal["wanda", "magnitude"] = "wanda"


@register
class SsmHeaddim(StructuredMethod):
    name = "ssm-headdim"
    config_class = SsmHeaddimConfig
    ssm_support = True
    ssm_only = True

    @property
    def needs_calibration(self) -> bool:
        return self.config.metric == "wanda"

    def ssm_check(self, structure, sparsity):
        from prunekit.structured.ssm_plan import check_ratio

        check_ratio(structure, sparsity, "channel", self.name)

    def ssm_plan(self, structure, summaries, sparsity):
        from prunekit.structured.ssm_plan import plan_headdim

        return plan_headdim(structure, summaries, sparsity, self.config.metric, self.name)
