"""ssm-headmerge: merge B/C heads of Mamba-2 layers by averaging ("On Pruning State-Space LLMs").

Consecutive B/C groups (the heads of B and C that several SSM heads share) are averaged into one, in in_proj
and the conv, so every SSM head then reads the merged group. `--sparsity` is the share of B/C groups removed:
with G groups the kept count G − round(s·G) must divide G (G = 4: 0.5 merges pairs, 0.75 merges all four);
other ratios are refused with the accepted ones. Weights only; Mamba-1 has a single B/C head and is refused.
"""

from __future__ import annotations

from prunekit.methods.base import MethodConfig
from prunekit.methods.registry import register
from prunekit.structured.method import StructuredMethod


class SsmHeadmergeConfig(MethodConfig):
    pass


@register
class SsmHeadmerge(StructuredMethod):
    name = "ssm-headmerge"
    config_class = SsmHeadmergeConfig
    ssm_support = True
    ssm_only = True

    @property
    def metric(self) -> str:
        return "average"

    @property
    def needs_calibration(self) -> bool:
        return False

    def ssm_check(self, structure, sparsity):
        from prunekit.structured.ssm_plan import check_ratio

        check_ratio(structure, sparsity, "merge", self.name)

    def ssm_plan(self, structure, summaries, sparsity):
        from prunekit.structured.ssm_plan import plan_headmerge

        return plan_headmerge(structure, summaries, sparsity, self.name)
