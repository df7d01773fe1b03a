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
from prunekit.structured.method import SsmUnitMethod


class SsmHeaddimConfig(MethodConfig):
    metric: Literal["wanda", "magnitude"] = "wanda"


@register
class SsmHeaddim(SsmUnitMethod):
    name = "ssm-headdim"
    config_class = SsmHeaddimConfig
    unit = "channel"
    planner = "plan_headdim"
