"""What the structured methods measure in the engine's collect pass, block by block, over the dense model.

The inputs of o_proj and down_proj are where a head (o_proj columns) and an MLP channel (down_proj column)
meet the residual stream, so their mean and variance say how much each piece moves the output (FLAP). The
collect pass propagates the *dense* outputs: every block's statistics are gathered before any block is
changed, which the adaptive (cross-layer) searches need. While a block is loaded, the per-column summaries
of those two projections are kept too, so the plan never needs the weights of all blocks at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from prunekit.pruning.statistics import InputMeanVariance
from prunekit.structured.layout import LlamaStructure

_KINDS = ("attn", "mlp")
_PROJECTIONS = ("o_proj", "down_proj")


@dataclass
class BlockStatistics:
    """What the structured methods know about one block's data."""

    attn: InputMeanVariance  # input of o_proj: heads × head_dim channels
    mlp: InputMeanVariance  # input of down_proj: intermediate channels

    def merge(self, other: BlockStatistics) -> None:
        self.attn.merge(other.attn)
        self.mlp.merge(other.mlp)


@dataclass
class BlockSummary:
    """One block as the collect pass saw it: data statistics (None without data) and column summaries."""

    stats: BlockStatistics | None
    columns: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


class StructuredObserver:
    """The `Observer` of the collect pass (engine/passes.py) for head and channel removal."""

    def __init__(self, structure: LlamaStructure, needs_data: bool):
        self.structure = structure
        self.needs_data = needs_data

    def observed(self, index: int, block: nn.Module):
        modules = self.structure.observed_inputs(block)
        return {kind: (name, module, InputMeanVariance(module.in_features, module.weight.device))
                for kind, (name, module) in modules.items()}

    def summarize(self, index: int, block: nn.Module, stats) -> dict[str, torch.Tensor]:
        flat: dict[str, torch.Tensor] = {}
        for kind, statistic in stats.items():
            for name, tensor in statistic.state().items():
                flat[f"{kind}.{name}"] = tensor.detach().cpu()
        for projection, summary in self.structure.column_summaries(block).items():
            for name, tensor in summary.items():
                flat[f"{projection}.{name}"] = tensor.cpu()
        return flat

    def decide(self, summaries: list[dict[str, torch.Tensor]]) -> list[BlockSummary]:
        return [self.unflatten(flat) for flat in summaries]

    @staticmethod
    def unflatten(flat: dict[str, torch.Tensor]) -> BlockSummary:
        columns = {p: {k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith(p + ".")} for p in _PROJECTIONS}
        stats = None
        if "attn.tokens" in flat:
            parts = []
            for kind in _KINDS:
                statistic = InputMeanVariance(flat[f"{kind}.sum"].numel())
                statistic.load_state({k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith(kind + ".")})
                parts.append(statistic)
            stats = BlockStatistics(*parts)
        return BlockSummary(stats, columns)


@torch.no_grad()
def collect_statistics(model, structure: LlamaStructure, input_ids: torch.Tensor, *, batch_size: int = 16,
                       device: str = "cpu", progress: bool = True) -> tuple[list[BlockStatistics], float]:
    """Statistics of every block of an in-memory model over the calibration rows, and the seconds spent
    (the engine's collect pass, for callers that plan by hand: tests, benchmarks)."""
    from prunekit.engine import Engine, EngineOptions, InMemoryBlocks
    from prunekit.engine.passes import CollectPass, Passes

    started = time.perf_counter()
    source = InMemoryBlocks(model, structure.adapter, torch.device(device))
    collect = CollectPass(StructuredObserver(structure, needs_data=True))
    Engine(source, options=EngineOptions(batch_size=batch_size, device=device, progress=progress)).run(
        Passes(collect), input_ids)
    return [summary.stats for summary in collect.result], time.perf_counter() - started
