"""One calibration pass through the dense model: input mean/variance of every o_proj and down_proj.

Those two inputs are where a head (o_proj columns) and an MLP channel (down_proj column) meet the
residual stream, so their fluctuation says how much each piece moves the output (FLAP). The pass runs
block by block on cached activations, like the unstructured engine, but propagates the *dense*
outputs: every block's statistics are gathered before any block is changed, which the adaptive
(cross-layer) searches need, and one pass serves every method, ratio and structure.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from prunekit.engine.capture import capture_block_calls, capture_block_inputs
from prunekit.engine.progress import ProgressReporter
from prunekit.pruning.statistics import InputMeanVariance
from prunekit.structured.layout import LlamaStructure


@dataclass
class BlockStatistics:
    """What the structured methods know about one block's data."""

    attn: InputMeanVariance  # input of o_proj: heads × head_dim channels
    mlp: InputMeanVariance  # input of down_proj: intermediate channels

    def merge(self, other: BlockStatistics) -> None:
        self.attn.merge(other.attn)
        self.mlp.merge(other.mlp)


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def collect_statistics(model, structure: LlamaStructure, input_ids: torch.Tensor, *, batch_size: int = 16,
                       device: str = "cpu", progress: bool = True) -> tuple[list[BlockStatistics], float]:
    """Statistics of every block over the calibration rows, and the seconds spent."""
    started = time.perf_counter()
    blocks = structure.blocks()
    calls = capture_block_calls(model, blocks, input_ids.shape[1], device)
    activations = capture_block_inputs(model, blocks, input_ids, batch_size, device)
    reporter = ProgressReporter(len(blocks), enabled=progress)
    stats: list[BlockStatistics] = []
    for index, block in enumerate(blocks):
        t0 = time.perf_counter()
        home = next(block.parameters()).device
        block.to(device)
        attn, mlp = structure.attention(block), structure.mlp_module(block)
        entry = BlockStatistics(InputMeanVariance(attn.o_proj.in_features, device),
                                InputMeanVariance(mlp.down_proj.in_features, device))
        handles = [
            attn.o_proj.register_forward_pre_hook(lambda _m, inputs, s=entry.attn: s.update(inputs[0])),
            mlp.down_proj.register_forward_pre_hook(lambda _m, inputs, s=entry.mlp: s.update(inputs[0])),
        ]
        call = calls[index].to(device)
        try:
            for start in range(0, activations.shape[0], batch_size):
                batch = activations[start : start + batch_size]
                activations[start : start + batch.shape[0]] = _first(block(batch, *call.args, **call.kwargs))
        finally:
            for handle in handles:
                handle.remove()
        block.to(home)
        stats.append(entry)
        reporter.block_done(index, {"statistics": time.perf_counter() - t0})
    return stats, time.perf_counter() - started
