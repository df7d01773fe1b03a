"""Mask refiners that run after any method (`--refine dsnot`), and the method that composes the two.

A refiner gathers its own statistic and rewrites a layer's pruned mask; `RefinedMethod(base, refiner)`
is an ordinary `PruningMethod` whose statistic combines both (`CombinedStatistic`), so the engine
treats it like any other method.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from prunekit.methods.base import MethodConfig, PruneResult, PruningMethod
from prunekit.pruning.statistics import CombinedStatistic, Statistic
from prunekit.pruning.target import SparsityTarget


class Refiner(ABC):
    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]
    statistic: ClassVar[type[Statistic]]

    def __init__(self, config: MethodConfig | None = None):
        self.config = config if config is not None else self.config_class()

    @abstractmethod
    def refine(self, dense: torch.Tensor, result: PruneResult, stats: Statistic, target: SparsityTarget
               ) -> torch.Tensor:
        """The new pruned mask of a layer, given its dense weight and the base method's result."""

    def applies_to(self, name: str) -> bool:
        """Whether the refiner rewrites this layer (by full name); the others keep the base method's result."""
        return True

    def describe(self) -> dict:
        return {"name": self.name, "config": self.config.model_dump()}


REFINERS: dict[str, type[Refiner]] = {}


def register_refiner(cls: type[Refiner]) -> type[Refiner]:
    REFINERS[cls.name] = cls
    return cls


class RefinedMethod(PruningMethod):
    """`base`'s masks, then `refiner`'s. Regrown weights come back with their dense value; pruned ones are 0."""

    config_class = MethodConfig

    def __init__(self, base: PruningMethod, refiner: Refiner):
        super().__init__(base.config)
        self.base, self.refiner = base, refiner
        self.name = f"{base.name}+{refiner.name}"  # type: ignore[misc]
        self.updates_weights = base.updates_weights  # type: ignore[misc]
        parts = (base.statistic, refiner.statistic) if base.statistic else (refiner.statistic,)
        self.statistic = CombinedStatistic.of(*parts)  # type: ignore[misc]

    def prune_layer(self, weight, stats, target):
        return self.prune_group({"layer": weight}, stats, {"layer": target})["layer"]

    def prune_group(self, weights: dict[str, torch.Tensor], stats: CombinedStatistic,
                    targets: dict[str, SparsityTarget]) -> dict[str, PruneResult]:
        base_stats = stats.part(self.base.statistic) if self.base.statistic else None
        results = self.base.prune_group(weights, base_stats, targets)
        refined = {}
        for name, result in results.items():
            if not self.refiner.applies_to(name):
                refined[name] = result
                continue
            dense = weights[name]
            mask = self.refiner.refine(dense, result, stats.part(self.refiner.statistic), targets[name])
            weight = torch.where(result.mask, dense, result.weight).masked_fill(mask, 0.0)
            refined[name] = PruneResult(weight, mask, result.column_order)
        return refined

    def describe(self) -> dict:
        return {**self.base.describe(), "name": self.name, "refine": self.refiner.describe()}
