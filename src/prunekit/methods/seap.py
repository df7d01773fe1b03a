"""SEAP (2025): training-free, task-specific Sparse Expert Activation Pruning.

Statistics: FLAP's input mean/variance of o_proj and down_proj, gathered separately on the prompts of
each task (`tasks`: NAME → SOURCE: a .txt file, a folder of them, or a .jsonl[:field]); the general
statistics are all tasks' accumulators added. Score: a FLAP metric (WIFV by default). Depth schedule:
layer i loses ρ_i = λ / (1 + exp(−k (x_i − x0))) of its parameters (x_i = i / (L − 1)), the first and
last `protect` layers none, λ found by bisection so the whole model loses the target fraction; inside a
layer heads are removed at ρ_i (whole units) and the MLP takes the rest. One plan per task plus a
`general` plan; the model in memory gets `apply` (default `general`), the CLI saves every plan.
Weights: FLAP's bias compensation with each task's own means.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from prunekit.methods.registry import register
from prunekit.structured.collect import BlockSummary
from prunekit.structured.layout import LlamaStructure
from prunekit.structured.method import StructuredConfig, StructuredMethod, _split
from prunekit.structured.search import logistic_counts
from prunekit.structured.shrink import StructurePlan, build_plan

if TYPE_CHECKING:
    from prunekit.structured.collect import BlockStatistics

GENERAL = "general"


class SeapConfig(StructuredConfig):
    structure: Literal["logistic"] = "logistic"
    metric: Literal["IFV", "WIFV", "WIFN"] = "WIFV"
    compensate: bool = True
    #: task name → SOURCE of its prompts.
    tasks: dict[str, str] = Field(default_factory=dict)
    #: steepness and midpoint (in relative depth 0…1) of the logistic schedule.
    k: float = Field(default=4.0, gt=0.0)
    x0: float = 0.5
    #: layers kept whole at each end of the stack.
    protect: int = Field(default=1, ge=0)
    #: no layer loses more than this fraction of its parameters.
    max_layer_sparsity: float = Field(default=0.9, gt=0.0, lt=1.0)
    #: which plan the in-memory model receives: `general` or a task name.
    apply: str = GENERAL
    #: which models the CLI saves.
    outputs: Literal["all", "tasks", "general"] = "all"

    @field_validator("metric", mode="before")
    @classmethod
    def _upper_metric(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _tasks_given(self) -> SeapConfig:
        """Checked with the options, before any model is loaded."""
        if not self.tasks:
            raise ValueError("seap needs at least one task: pass --task NAME=SOURCE (repeatable)")
        if GENERAL in self.tasks:
            raise ValueError(f"task name {GENERAL!r} is reserved for the all-task mask; choose another name")
        if self.apply != GENERAL and self.apply not in self.tasks:
            raise ValueError(f"apply={self.apply!r} is neither {GENERAL!r} nor a task ({', '.join(self.tasks)})")
        return self


def merged(per_task: list[list[BlockStatistics]]) -> list[BlockStatistics]:
    """The general statistics: every task's accumulators added, block by block."""
    total = copy.deepcopy(per_task[0])
    for stats in per_task[1:]:
        for mine, theirs in zip(total, stats, strict=True):
            mine.merge(theirs)
    return total


@register
class Seap(StructuredMethod):
    name = "seap"
    config_class = SeapConfig

    def plan(self, structure: LlamaStructure, stats: list[BlockStatistics] | list[BlockSummary] | None,
             sparsity: float) -> StructurePlan:
        cfg = self.config
        stats, columns = _split(stats, len(structure.blocks()))
        attn, mlp = self.units(structure, stats, columns)
        layouts = [structure.layout(b) for b in structure.blocks()]
        attn_counts, mlp_counts, ratios, lam = logistic_counts(
            attn, mlp, layouts, sparsity, k=cfg.k, x0=cfg.x0, protect=cfg.protect, cap=cfg.max_layer_sparsity)
        info = {"structure": "logistic", "metric": self.metric, "lambda": lam,
                "layer_ratios": [round(r, 4) for r in ratios]}
        return build_plan(structure, attn, mlp, attn_counts, mlp_counts, stats, compensate=self.compensate,
                          target=sparsity, info=info)

    def calibration_sources(self) -> dict[str, str | None]:
        return dict(self.config.tasks)

    def plans(self, structure: LlamaStructure, collected: dict[str, list[BlockSummary]], sparsity: float
              ) -> tuple[dict[str, StructurePlan], str]:
        """One plan per task, and the general plan from all tasks' statistics added."""
        plans = {name: self.plan(structure, summaries, sparsity) for name, summaries in collected.items()}
        general = [BlockSummary(stats, first.columns) for stats, first in zip(
            merged([[s.stats for s in summaries] for summaries in collected.values()]),
            next(iter(collected.values())), strict=True)]
        plans[GENERAL] = self.plan(structure, general, sparsity)
        return plans, self.config.apply

    def saved_names(self, plans: dict[str, StructurePlan]) -> list[str]:
        tasks = list(self.config.tasks)
        return {"all": [*tasks, GENERAL], "tasks": tasks, "general": [GENERAL]}[self.config.outputs]
