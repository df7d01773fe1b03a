"""The engine: prune one decoder block at a time on calibration activations.

For each block: (1) statistics — forward hooks on the first linear of every shared-input group feed
the method's `Statistic` over batched forwards of the block (the pass stops as soon as the last
group's input is seen); (2) prune — the method rewrites each linear's weight; (3) propagate — the
block is re-run with its pruned weights and its outputs become the next block's inputs
(`propagate="pruned"`, the reference; with `"dense"` the outputs of pass 1 are passed on instead).

Everything that survives from one block to the next is in `EngineState`: the activations and the
index of the next block. Only the current block and the activations live on the compute device.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from prunekit.adapters.base import Adapter, set_weight_matrix, weight_matrix
from prunekit.engine.capture import BlockCall, StopForward, capture_block_calls, capture_block_inputs
from prunekit.engine.progress import ProgressReporter
from prunekit.methods.base import PruningMethod
from prunekit.pruning.statistics import Statistic
from prunekit.pruning.target import SparsityPlan


@dataclass
class EngineOptions:
    propagate: Literal["pruned", "dense"] = "pruned"
    batch_size: int = 8
    device: str = "cpu"
    prune_head: bool = False
    progress: bool = True


@dataclass
class LayerRecord:
    name: str
    shape: tuple[int, int]
    pattern: str
    target_sparsity: float
    achieved_sparsity: float
    pruned: int
    numel: int

    def to_dict(self) -> dict:
        return self.__dict__ | {"shape": list(self.shape)}


@dataclass
class EngineState:
    """What one block hands to the next: nothing else is carried between blocks."""

    next_block: int
    activations: torch.Tensor | None


@dataclass
class EngineResult:
    layers: list[LayerRecord] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def add_time(self, phase: str, seconds: float) -> None:
        self.timings[phase] = self.timings.get(phase, 0.0) + seconds

    @property
    def overall_sparsity(self) -> float:
        numel = sum(r.numel for r in self.layers)
        return sum(r.pruned for r in self.layers) / numel if numel else 0.0


def _batches(activations: torch.Tensor, batch_size: int):
    for start in range(0, activations.shape[0], batch_size):
        yield start, activations[start : start + batch_size]


def _first_output(output):
    return output[0] if isinstance(output, (tuple, list)) else output


class SequentialEngine:
    def __init__(self, model: nn.Module, adapter: Adapter, method: PruningMethod, plan: SparsityPlan,
                 options: EngineOptions | None = None,
                 on_block_done: Callable[[EngineState], None] | None = None):
        self.model = model
        self.adapter = adapter
        self.method = method
        self.plan = plan
        self.options = options or EngineOptions()
        self.on_block_done = on_block_done
        self.result = EngineResult()
        self.device = torch.device(self.options.device)

    # -- public -------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, calibration_ids: torch.Tensor | None) -> EngineResult:
        blocks = self.adapter.blocks()
        self._check_widths(blocks)
        progress = ProgressReporter(len(blocks), enabled=self.options.progress)
        if self.method.needs_calibration:
            if calibration_ids is None:
                raise ValueError(f"method {self.method.name} needs calibration data")
            state, calls = self._start(blocks, calibration_ids)
        else:
            state, calls = EngineState(0, None), None
        for index in range(state.next_block, len(blocks)):
            timings = self._process_block(index, blocks[index], state, calls)
            state.next_block = index + 1
            progress.block_done(index, timings)
            if self.on_block_done:
                self.on_block_done(state)
        if self.options.prune_head:
            self._prune_head()
        progress.close()
        return self.result

    # -- steps --------------------------------------------------------------------------------
    def _start(self, blocks: nn.ModuleList, calibration_ids: torch.Tensor) -> tuple[EngineState, list[BlockCall]]:
        """Block 0's inputs for the calibration rows and every block's call arguments."""
        t0 = time.perf_counter()
        seqlen = calibration_ids.shape[1]
        calls = capture_block_calls(self.model, blocks, seqlen, self.device)
        activations = capture_block_inputs(self.model, blocks, calibration_ids, self.options.batch_size,
                                           self.device)
        self.result.add_time("capture", time.perf_counter() - t0)
        return EngineState(0, activations), calls

    def _process_block(self, index: int, block: nn.Module, state: EngineState,
                       calls: list[BlockCall] | None) -> dict[str, float]:
        home = next(block.parameters()).device
        block.to(self.device)
        prefix = self.adapter.block_prefix(index)
        groups = [(g, mods) for g, mods in self.adapter.block_linears(block)]
        timings: dict[str, float] = {}

        stats: dict[tuple[str, ...], Statistic] = {}
        dense_outputs = None
        is_last = index == len(self.adapter.blocks()) - 1
        if self.method.needs_calibration:
            t0 = time.perf_counter()
            call = calls[index].to(self.device)  # type: ignore[index]
            keep_outputs = self.options.propagate == "dense" and not is_last
            stats, dense_outputs = self._gather(block, prefix, groups, state.activations, call, keep_outputs)
            timings["statistics"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        for group, modules in groups:
            self._prune_group({f"{prefix}.{name}": module for name, module in modules.items()}, stats.get(group))
            stats.pop(group, None)  # free XᵀX early
        timings["prune"] = time.perf_counter() - t0

        if self.method.needs_calibration:
            t0 = time.perf_counter()
            if is_last:  # nothing reads the last block's outputs
                state.activations = None
            elif self.options.propagate == "dense":
                state.activations = dense_outputs
            else:
                call = calls[index].to(self.device)  # type: ignore[index]
                state.activations = self._forward(block, state.activations, call)
            timings["propagate"] = time.perf_counter() - t0
        block.to(home)
        for phase, seconds in timings.items():
            self.result.add_time(phase, seconds)
        return timings

    def _gather(self, block: nn.Module, prefix: str, groups, activations: torch.Tensor, call: BlockCall,
                keep_outputs: bool):
        """One batched pass of the unpruned block with hooks feeding the statistics.

        Unless the outputs are kept (dense propagation), the pass stops at the input of the last group
        (skipping e.g. the down projection).
        """
        stats: dict[tuple[str, ...], Statistic] = {}
        handles = []
        stop_early = not keep_outputs
        wanted = [(g, mods) for g, mods in groups
                  if any(self.plan.target_for(f"{prefix}.{name}") is not None for name in mods)]
        for position, (group, modules) in enumerate(wanted):
            first = next(iter(modules.values()))
            statistic = self.method.statistic(weight_matrix(first).shape[1], device=self.device)  # type: ignore[misc]
            stats[group] = statistic
            is_last = position == len(wanted) - 1

            def hook(_module, inputs, statistic=statistic, is_last=is_last):
                statistic.update(inputs[0])
                if is_last and stop_early:
                    raise StopForward

            handles.append(first.register_forward_pre_hook(hook))
        outputs = None if stop_early else torch.empty_like(activations)
        try:
            for start, batch in _batches(activations, self.options.batch_size):
                try:
                    out = _first_output(block(batch, *call.args, **call.kwargs))
                except StopForward:
                    continue
                if outputs is not None:
                    outputs[start : start + batch.shape[0]] = out
        finally:
            for handle in handles:
                handle.remove()
        return stats, outputs

    def _forward(self, block: nn.Module, activations: torch.Tensor, call: BlockCall) -> torch.Tensor:
        """Outputs of the (pruned) block, written in place of its inputs to bound memory."""
        for start, batch in _batches(activations, self.options.batch_size):
            activations[start : start + batch.shape[0]] = _first_output(block(batch, *call.args, **call.kwargs))
        return activations

    def _prune_group(self, modules: dict[str, nn.Module], statistic: Statistic | None) -> None:
        """Prune the linears of one shared-input group (those the plan does not skip)."""
        targets = {name: self.plan.target_for(name) for name in modules}
        active = {name: module for name, module in modules.items() if targets[name] is not None}
        if not active:
            return
        weights = {name: weight_matrix(module).float() for name, module in active.items()}
        results = self.method.prune_group(weights, statistic, {n: targets[n] for n in active})  # type: ignore[misc]
        for name, module in active.items():
            result, target = results[name], targets[name]
            set_weight_matrix(module, result.weight)
            pruned = int(result.mask.sum().item())
            numel = result.mask.numel()
            self.result.layers.append(LayerRecord(
                name=name, shape=tuple(result.mask.shape), pattern=target.pattern,  # type: ignore[union-attr]
                target_sparsity=target.sparsity, achieved_sparsity=pruned / numel,  # type: ignore[union-attr]
                pruned=pruned, numel=numel,
            ))

    def _check_widths(self, blocks: nn.ModuleList) -> None:
        """Fail before any work if an N:M pattern does not fit some layer."""
        for index, block in enumerate(blocks):
            prefix = self.adapter.block_prefix(index)
            for _group, modules in self.adapter.block_linears(block):
                for name, module in modules.items():
                    target = self.plan.target_for(f"{prefix}.{name}")
                    if target is not None:
                        target.check_width(weight_matrix(module).shape[1], f"{prefix}.{name}")

    def _prune_head(self) -> None:
        """The LM head is pruned by magnitude-free rules only when asked (no calibration statistics)."""
        for name, module in self.adapter.head_linears().items():
            target = self.plan.target_for(name)
            if target is None:
                continue
            if self.method.needs_calibration:
                raise ValueError("pruning the LM head is only supported with data-free methods (magnitude)")
            self._prune_group({name: module}, None)
