"""The method contract: what a pruning method gathers, how it scores, how it masks, whether it updates.

A method is one file with a typed config (pydantic, unknown fields rejected) and a subclass of
`PruningMethod`, registered by name. It says what `statistic` it gathers over a shared-input group's input,
how it prunes (`prune_group`, by default `prune_layer` once per linear, with the weight as an fp32 [out, in]
matrix) and whether it `updates_weights`; `program` says which engine passes it needs (one sequential pass
unless the method decides over several blocks at once).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from prunekit.pruning.statistics import Statistic
from prunekit.pruning.target import SparsityPlan, SparsityTarget

if TYPE_CHECKING:
    from prunekit.adapters.base import Adapter


class MethodConfig(BaseModel):
    """Base of every method's config: typed, and a misspelt field is an error, not a silent default."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class PruneResult:
    """The layer's new weight (zeros where pruned, possibly updated elsewhere) and the pruned mask.

    `column_order`, when set, is the input-channel permutation under which an N:M pattern holds
    (`mask[:, column_order]` is N:M): RIA's channel reallocation.
    """

    weight: torch.Tensor
    mask: torch.Tensor
    column_order: torch.Tensor | None = None


class PruningMethod(ABC):
    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]
    #: What is gathered over the calibration tokens for each input; None = needs no data.
    statistic: ClassVar[type[Statistic] | None] = None
    #: Whether surviving weights change (OBS updates) or are only masked.
    updates_weights: ClassVar[bool] = False
    #: Decides for a whole block at once (BESA): the engine calls `prune_block` instead of `prune_group`.
    block_level: ClassVar[bool] = False

    def __init__(self, config: MethodConfig | None = None):
        self.config = config if config is not None else self.config_class()

    @property
    def needs_calibration(self) -> bool:
        return self.statistic is not None

    @abstractmethod
    def prune_layer(
        self, weight: torch.Tensor, stats: Statistic | None, target: SparsityTarget
    ) -> PruneResult:
        """Prune one [out, in] fp32 weight matrix to `target`."""

    def prune_group(
        self, weights: dict[str, torch.Tensor], stats: Statistic | None, targets: dict[str, SparsityTarget]
    ) -> dict[str, PruneResult]:
        """Prune linears that share one input (q/k/v, gate/up). By default, one layer at a time;
        a method may override this to share work across the group (SparseGPT shares H⁻¹)."""
        return {name: self.prune_layer(weight, stats, targets[name]) for name, weight in weights.items()}

    def prune_block(self, linears: dict, block_forward, inputs, dense_outputs, targets: dict[str, SparsityTarget],
                    progress=None) -> dict[str, PruneResult]:
        """Prune every linear of one block together (block-level methods only): `block_forward(batch)` runs the
        block, `inputs` are its calibration inputs in batches, `dense_outputs` its unpruned outputs (or None)."""
        raise NotImplementedError(f"{self.name} prunes layer by layer")

    def program(self, plan: SparsityPlan, adapter: Adapter, *, propagate: str = "pruned"):
        """The engine passes this method needs: one sequential pass (statistics → prune → propagate)."""
        from prunekit.engine.passes import Passes, SequentialPass

        return Passes(SequentialPass(self, plan, adapter, propagate))

    def describe(self) -> dict:
        return {"name": self.name, "config": self.config.model_dump(), "updates_weights": self.updates_weights}
