"""The contract of a structured method: a typed config and a rule from statistics to a plan.

Structured methods are registered in the same registry as the unstructured ones (so the CLI and
`prunekit.prune` take them by name) but carry `structured = True`: `prunekit.prune` sends them to the
structured engine (engine.py) instead of the per-linear one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

import torch
from pydantic import Field, field_validator

from prunekit.methods.base import MethodConfig
from prunekit.structured.layout import LlamaStructure
from prunekit.structured.search import ModuleUnits, block_units, search
from prunekit.structured.shrink import StructurePlan, build_plan

if TYPE_CHECKING:
    from prunekit.structured.collect import BlockStatistics


class Gather(Protocol):
    """What the engine gives a method to get data: token ids from a source, then statistics from ids."""

    def prepare(self, source: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        """Calibration ids and provenance from `source` (None: the run's own calibration argument)."""

    def collect(self, ids: torch.Tensor) -> list[BlockStatistics]:
        """Per-block statistics of the dense model over `ids`."""


class StructuredConfig(MethodConfig):
    """Options every structured method shares."""

    structure: Literal["UL-UM", "UL-MM", "AL-MM", "AL-AM"] = "AL-AM"
    #: GQA rule: `query-heads` (equal count per KV group), `kv-groups` (whole groups), `auto` (see layout.py).
    gqa: Literal["auto", "query-heads", "kv-groups"] = "auto"
    #: MM structures: the fraction of attention parameters removed (default: the target sparsity).
    attention_sparsity: float | None = Field(default=None, ge=0.0, lt=1.0)
    #: Per-layer floor: every layer keeps at least this fraction of its head units and channels (and one of each).
    min_keep: float = Field(default=0.0, ge=0.0, lt=1.0)

    @field_validator("structure", mode="before")
    @classmethod
    def _upper_structure(cls, value: Any) -> Any:
        known = ("UL-UM", "UL-MM", "AL-MM", "AL-AM")
        return value.upper() if isinstance(value, str) and value.upper() in known else value


class StructuredMethod:
    name: ClassVar[str]
    config_class: ClassVar[type[StructuredConfig]]
    structured: ClassVar[bool] = True
    updates_weights: ClassVar[bool] = False
    #: Square the attention channel scores before standardising (FLAP's reference does; search.py).
    square_heads: ClassVar[bool] = False

    def __init__(self, config: StructuredConfig | None = None):
        self.config = config if config is not None else self.config_class()

    @property
    def metric(self) -> str:
        return self.config.metric  # type: ignore[attr-defined]

    @property
    def compensate(self) -> bool:
        return bool(getattr(self.config, "compensate", False))

    @property
    def needs_calibration(self) -> bool:
        return self.metric != "MAG" or self.compensate

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "config": self.config.model_dump(), "structured": True,
                "metric": self.metric, "bias_compensation": self.compensate}

    def units(self, structure: LlamaStructure, stats: list[BlockStatistics] | None
              ) -> tuple[list[ModuleUnits], list[ModuleUnits]]:
        """Every block's scored head units and MLP channels, lowest score first."""
        cfg = self.config
        units = [block_units(structure, i, stats[i] if stats else None, self.metric, cfg.gqa, cfg.min_keep,
                             self.square_heads) for i in range(len(structure.blocks()))]
        return [u[0] for u in units], [u[1] for u in units]

    def plan(self, structure: LlamaStructure, stats: list[BlockStatistics] | None, sparsity: float) -> StructurePlan:
        """Score, search, and fix the kept indices (with compensation biases when enabled)."""
        cfg = self.config
        attn, mlp = self.units(structure, stats)
        layouts = [structure.layout(b) for b in structure.blocks()]
        attn_counts, mlp_counts = search(cfg.structure, attn, mlp, layouts, sparsity, cfg.attention_sparsity)
        return build_plan(structure, attn, mlp, attn_counts, mlp_counts, stats, compensate=self.compensate,
                          target=sparsity, info={"structure": cfg.structure, "metric": self.metric})

    def make_plans(self, structure: LlamaStructure, sparsity: float, gather: Gather
                   ) -> tuple[dict[str, StructurePlan], str, Any]:
        """All plans this run produces, the one applied to the model in memory, and the data provenance."""
        stats, provenance = None, None
        if self.needs_calibration:
            ids, provenance = gather.prepare(None)
            stats = gather.collect(ids)
        return {"model": self.plan(structure, stats, sparsity)}, "model", provenance
