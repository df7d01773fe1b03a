"""The contract of a structured method: a typed config, the calibration sets it measures, and a rule from
their statistics to a plan.

Structured methods are registered in the same registry as the unstructured ones (so the CLI and
`prunekit.prune` take them by name) and run on the same engine: one collect pass per calibration set (or a
weights-only one), then the plan, then an apply pass that shrinks each block (structured/engine.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, field_validator

from prunekit.methods.base import MethodConfig
from prunekit.structured.layout import LlamaStructure
from prunekit.structured.search import ModuleUnits, block_units, search
from prunekit.structured.shrink import StructurePlan, build_plan

if TYPE_CHECKING:
    from prunekit.structured.collect import BlockStatistics, BlockSummary


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
    config_class: ClassVar[type[MethodConfig]]
    structured: ClassVar[bool] = True
    #: whether the method prunes state-space layers (structured/ssm_plan.py), and whether only those
    ssm_support: ClassVar[bool] = False
    ssm_only: ClassVar[bool] = False
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

    def units(self, structure: LlamaStructure, stats: list[BlockStatistics] | None,
              columns: list[dict | None] | None = None) -> tuple[list[ModuleUnits], list[ModuleUnits]]:
        """Every block's scored head units and MLP channels, lowest score first (`columns`: the blocks' column
        summaries from a collect pass; without them the weights are read from the in-memory blocks)."""
        cfg = self.config
        count = len(structure.blocks())
        columns = columns or [None] * count
        units = [block_units(structure, i, stats[i] if stats else None, self.metric, cfg.gqa, cfg.min_keep,
                             self.square_heads, columns[i]) for i in range(count)]
        return [u[0] for u in units], [u[1] for u in units]

    def plan(self, structure: LlamaStructure, stats: list[BlockStatistics] | list[BlockSummary] | None,
             sparsity: float) -> StructurePlan:
        """Score, search, and fix the kept indices (with the means that bias compensation needs)."""
        cfg = self.config
        stats, columns = _split(stats, len(structure.blocks()))
        attn, mlp = self.units(structure, stats, columns)
        layouts = [structure.layout(b) for b in structure.blocks()]
        attn_counts, mlp_counts = search(cfg.structure, attn, mlp, layouts, sparsity, cfg.attention_sparsity)
        return build_plan(structure, attn, mlp, attn_counts, mlp_counts, stats, compensate=self.compensate,
                          target=sparsity, info={"structure": cfg.structure, "metric": self.metric})

    def calibration_sources(self) -> dict[str, str | None]:
        """Name → SOURCE of each calibration set measured in its own collect pass (None: the run's own
        calibration). Empty: the plan needs only the weights."""
        return {"model": None} if self.needs_calibration else {}

    def plans(self, structure: LlamaStructure, collected: dict[str, list[BlockSummary]], sparsity: float
              ) -> tuple[dict[str, StructurePlan], str]:
        """Every plan of the run and the one the in-memory model receives."""
        summaries = collected.get("model") or collected.get("weights")
        if getattr(structure, "ssm", False):
            return {"model": self.ssm_plan(structure, summaries, sparsity)}, "model"
        return {"model": self.plan(structure, summaries, sparsity)}, "model"

    def ssm_plan(self, structure, summaries: list[dict], sparsity: float):
        """The plan for state-space layers (structured/ssm_plan.py), for methods with `ssm_support`."""
        raise NotImplementedError

    def ssm_check(self, structure, sparsity: float) -> None:
        """What the plan would refuse (a ratio removing every state/head), from the shapes, before any work."""

    def saved_names(self, plans: dict[str, StructurePlan]) -> list[str]:
        return list(plans)


class SsmUnitMethod(StructuredMethod):
    """A structured method of SSM layers only that removes a share of one kind of unit from every layer; a
    subclass names the unit (`check_ratio`'s kind) and its planner in structured/ssm_plan.py."""

    ssm_support = True
    ssm_only = True
    #: the unit removed ("state", "channel") and the ssm_plan function that plans it
    unit: ClassVar[str]
    planner: ClassVar[str]

    @property
    def needs_calibration(self) -> bool:
        return self.config.metric == "wanda"

    def ssm_check(self, structure, sparsity: float) -> None:
        from prunekit.structured.ssm_plan import check_ratio

        check_ratio(structure, sparsity, self.unit, self.name)

    def ssm_plan(self, structure, summaries: list[dict], sparsity: float):
        from prunekit.structured import ssm_plan

        return getattr(ssm_plan, self.planner)(structure, summaries, sparsity, self.config.metric, self.name)


def _split(stats, count: int) -> tuple[list | None, list]:
    """Block statistics and column summaries from either form a caller may pass."""
    from prunekit.structured.collect import BlockSummary

    if stats and isinstance(stats[0], BlockSummary):
        data = [s.stats for s in stats]
        return (data if data[0] is not None else None), [s.columns for s in stats]
    return stats, [None] * count


def ssm_method_names() -> list[str]:
    from prunekit.methods.registry import METHODS

    return sorted(name for name, cls in METHODS.items() if getattr(cls, "ssm_support", False))


def check_applies(method: StructuredMethod, structure, sparsity: float | None = None) -> None:
    """One line, before any work, when a structured method and the model's layers do not go together."""
    from prunekit.errors import PrunekitError

    if getattr(structure, "ssm", False) and not method.ssm_support:
        raise PrunekitError(f"method {method.name} does not apply to state-space (SSM) layers of "
                            f"{structure.adapter.family}; structured methods that do: {', '.join(ssm_method_names())}")
    if not getattr(structure, "ssm", False) and method.ssm_only:
        raise PrunekitError(f"method {method.name} prunes state-space (SSM) layers; {structure.adapter.family} has "
                            "none (model types with SSM layers: mamba, falcon_mamba, mamba2, bamba)")
    if getattr(structure, "ssm", False) and sparsity is not None:
        method.ssm_check(structure, sparsity)
