"""ssm-state: remove SSM state dimensions ("On Pruning State-Space LLMs", Ghattas et al.: d_state pruning).

In every SSM layer the same share of the N states leaves every B/C group: their rows of B and C (Mamba-2:
in_proj rows and conv filters; Mamba-1: x_proj rows and A_log columns). B and C keep the same states, so the
state update and readout stay a dot product over the kept ones. `--sparsity` is the share of states removed
(rounded per layer; a ratio that would remove every state is refused). Score (structured/ssm_plan.py):
`wanda` (default; the rows' weights times the RMS of their input) or `magnitude` (weights only).
"""

from __future__ import annotations

from typing import Literal

from prunekit.methods.base import MethodConfig
from prunekit.methods.registry import register
from prunekit.structured.method import SsmUnitMethod


class SsmStateConfig(MethodConfig):
    metric: Literal["wanda", "magnitude"] = "wanda"


@register
class SsmState(SsmUnitMethod):
    name = "ssm-state"
    config_class = SsmStateConfig
    unit = "state"
    planner = "plan_states"
