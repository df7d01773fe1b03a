"""The three kinds of pass over the blocks, and what a method hands the engine to run them.

* `SequentialPass` — per block: statistics of each shared-input group → the method prunes → propagate
  (the block's pruned outputs, or with `propagate="dense"` its dense ones). Magnitude, Wanda, SparseGPT and
  every per-layer method; a method that decides on the whole block at once (BESA) overrides `prune_block`.
* `CollectPass` — per block: statistics of the inputs an observer names, over the dense model (dense
  propagation), summarised while the block is loaded; after the last block the observer decides on all of
  them at once. FLAP, SEAP, OWL's outlier ratios; without data (magnitude-sp) it only reads weights.
* `ApplyPass` — per block: apply a decision already taken (a structured plan), no data.

A pass never touches files, devices or ranks: the engine (loop.py) gives it a `BlockContext` with the
loaded block, its call arguments and the calibration activations, and saves whatever `state()` returns.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import nn

from prunekit.adapters.base import Adapter, set_weight_matrix, weight_matrix
from prunekit.engine.activations import ActivationStore
from prunekit.engine.capture import BlockCall, StopForward
from prunekit.pruning.statistics import Statistic
from prunekit.pruning.target import SparsityPlan


@dataclass
class LayerRecord:
    name: str
    shape: tuple[int, int]
    pattern: str
    target_sparsity: float
    achieved_sparsity: float
    pruned: int
    numel: int
    #: RIA's N:M channel permutation: the pattern holds on `mask[:, column_order]` (None: natural order).
    column_order: list[int] | None = None

    def to_dict(self) -> dict:
        record = self.__dict__ | {"shape": list(self.shape)}
        if self.column_order is None:
            del record["column_order"]
        return record


def _first_output(output):
    return output[0] if isinstance(output, (tuple, list)) else output


@dataclass
class BlockContext:
    """Everything a pass may use for one block; the engine builds it."""

    index: int
    prefix: str
    block: nn.Module
    is_last: bool
    call: BlockCall | None
    activations: ActivationStore | None
    batch_size: int
    device: torch.device
    compute_dtype: torch.dtype
    reduce: Callable[..., None]
    #: False on data-parallel ranks other than 0: they receive the decision instead of taking it
    decides: bool = True
    #: send these tensors from the deciding rank to every other (in place); nothing to do in one process
    share: Callable[[list[torch.Tensor]], None] = lambda tensors: None
    world_size: int = 1
    #: feed the input of linear `name` (relative to the block) to a callback on every forward (the adapter's tap)
    observe: Callable[[str, nn.Module, Callable[[torch.Tensor], None]], Any] | None = None

    def run_block(self, batch: torch.Tensor) -> torch.Tensor:
        """The block's output hidden states for a batch of its inputs."""
        assert self.call is not None
        return _first_output(self.block(batch, *self.call.args, **self.call.kwargs))

    def gather(self, observed: dict[Any, tuple[str, nn.Module, Statistic]], *, update_outputs: bool,
               only_deciding_rank: bool = False) -> None:
        """One batched forward of the block with each observed linear's input (name relative to the block,
        module, statistic) fed to its statistic.

        Without `update_outputs` the forward stops as soon as the last observed input has been seen (later
        work would be wasted); with it, each batch's outputs replace its inputs (dense propagation).
        """
        if self.activations is None or self.call is None:
            raise RuntimeError("this pass needs calibration activations")
        handles = []
        entries = list(observed.values())
        for position, (name, module, statistic) in enumerate(entries):
            stops = position == len(entries) - 1 and not update_outputs

            def feed(inputs: torch.Tensor, statistic: Statistic = statistic, stops: bool = stops) -> None:
                statistic.update(inputs)
                if stops:
                    raise StopForward

            if self.observe is not None:
                handles.append(self.observe(name, module, feed))
            else:
                handles.append(module.register_forward_pre_hook(lambda _m, inputs, feed=feed: feed(inputs[0])))
        try:
            if observed or update_outputs:
                self._forward(update_outputs)
        finally:
            for handle in handles:
                handle.remove()
        self.reduce([statistic for _name, _module, statistic in entries], only_rank0=only_deciding_rank)

    def propagate(self) -> None:
        """Run the block (as it now is) on every row; its outputs become the next block's inputs."""
        self._forward(update=True)

    def _forward(self, update: bool) -> None:
        assert self.activations is not None and self.call is not None
        for start, batch in self.activations.batches(self.batch_size, self.device, self.compute_dtype):
            try:
                out = _first_output(self.block(batch, *self.call.args, **self.call.kwargs))
            except StopForward:
                continue
            if update:
                self.activations.update(start, out)
        if update:
            self.activations.commit()


class Pass(Protocol):
    """One walk over the blocks."""

    kind: str
    #: whether the blocks need calibration activations (capture + forward passes)
    needs_data: bool
    #: whether the block changes, so the sink must write it
    writes_blocks: bool
    #: calibration ids for this pass only (SEAP's tasks); None = the run's
    calibration: torch.Tensor | None
    #: which output this pass writes (several for SEAP); None = the run's
    output: str | None

    def process(self, ctx: BlockContext) -> dict[str, float]: ...

    def state(self) -> dict[str, Any]: ...

    def load_state(self, state: dict[str, Any]) -> None: ...

    def finish(self) -> None: ...


class Program(Protocol):
    """What a method asks of the engine: the passes, produced one after another (a later pass may depend on
    the result of an earlier one, e.g. OWL's allocation on its collect pass)."""

    def passes(self) -> Iterator[Pass]: ...


# -- sequential ------------------------------------------------------------------------------------------


@dataclass
class SequentialPass:
    """statistics → prune → propagate, block by block (`methods.base.PruningMethod` decides)."""

    method: Any  # PruningMethod
    plan: SparsityPlan
    adapter: Adapter
    propagate: Literal["pruned", "dense"] = "pruned"
    calibration: torch.Tensor | None = None
    output: str | None = None
    kind: str = "sequential"
    writes_blocks: bool = True
    records: list[LayerRecord] = field(default_factory=list)

    @property
    def needs_data(self) -> bool:
        return self.method.needs_calibration

    def _targets(self, prefix: str, modules: dict[str, nn.Module]):
        return {f"{prefix}.{name}": self.plan.target_for(f"{prefix}.{name}") for name in modules}

    def process(self, ctx: BlockContext) -> dict[str, float]:
        timings: dict[str, float] = {}
        wanted = [(group, modules) for group, modules in self.adapter.block_linears(ctx.block)
                  if any(t is not None for t in self._targets(ctx.prefix, modules).values())]
        if self.method.block_level:
            return self._process_block_level(ctx, wanted)
        stats: dict[tuple[str, ...], Statistic] = {}
        if self.needs_data:
            t0 = time.perf_counter()
            observed = {}
            for group, modules in wanted:
                first_name, first = next(iter(modules.items()))
                stats[group] = self.method.statistic(weight_matrix(first).shape[1], device=ctx.device)
                observed[group] = (first_name, first, stats[group])
            keep = self.propagate == "dense" and not ctx.is_last
            # rank 0 alone decides for a method that updates weights (below): only it needs the sums
            ctx.gather(observed, update_outputs=keep, only_deciding_rank=self.method.updates_weights)
            timings["statistics"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        # A mask-only method decides identically on every rank from the same all-reduced statistics (nothing to
        # send); a method that updates weights decides on rank 0, which alone received the summed statistics, and
        # its weights are broadcast, since OBS-style updates on GPUs are not bitwise reproducible across devices.
        broadcast = self.method.updates_weights
        if ctx.decides or not broadcast:
            for group, modules in wanted:
                self._prune_group(ctx.prefix, modules, stats.pop(group, None))  # pop: free XᵀX early
        stats.clear()
        if broadcast:
            ctx.share([weight_matrix(m) for _g, modules in wanted for m in modules.values()])
        timings["prune"] = time.perf_counter() - t0
        if self.needs_data and self.propagate == "pruned" and not ctx.is_last:
            t0 = time.perf_counter()
            ctx.propagate()
            timings["propagate"] = time.perf_counter() - t0
        return timings

    def _process_block_level(self, ctx: BlockContext, wanted) -> dict[str, float]:
        """A method that decides on the whole block (BESA): it runs the block on the calibration inputs itself."""
        from prunekit.errors import PrunekitError

        if ctx.world_size > 1:
            raise PrunekitError(f"{self.method.name} learns on the whole block's inputs and does not support "
                                "data-parallel calibration; run it in one process")
        t0 = time.perf_counter()
        linears = {f"{ctx.prefix}.{n}": m for _g, modules in wanted for n, m in modules.items()
                   if self.plan.target_for(f"{ctx.prefix}.{n}") is not None}
        targets = {name: self.plan.target_for(name) for name in linears}
        assert ctx.activations is not None
        inputs = [batch for _start, batch in ctx.activations.batches(ctx.batch_size, ctx.device, ctx.compute_dtype)]
        results = self.method.prune_block(linears, ctx.run_block, inputs, None, targets)
        self._record(linears, results, targets)
        timings = {"prune": time.perf_counter() - t0}
        if self.propagate == "pruned" and not ctx.is_last:
            t0 = time.perf_counter()
            ctx.propagate()
            timings["propagate"] = time.perf_counter() - t0
        return timings

    def _prune_group(self, prefix: str, modules: dict[str, nn.Module], statistic: Statistic | None) -> None:
        targets = self._targets(prefix, modules)
        active = {f"{prefix}.{n}": m for n, m in modules.items() if targets[f"{prefix}.{n}"] is not None}
        if not active:
            return
        weights = {name: weight_matrix(module).float() for name, module in active.items()}
        results = self.method.prune_group(weights, statistic, {n: targets[n] for n in active})
        self._record(active, results, targets)

    def _record(self, active: dict[str, nn.Module], results: dict, targets: dict) -> None:
        """Write the pruned weights into the block and note what each layer lost."""
        for name, module in active.items():
            result, target = results[name], targets[name]
            set_weight_matrix(module, result.weight)
            pruned = int(result.mask.sum().item())
            self.records.append(LayerRecord(
                name=name, shape=tuple(result.mask.shape), pattern=target.pattern,
                target_sparsity=target.sparsity, achieved_sparsity=pruned / result.mask.numel(),
                pruned=pruned, numel=result.mask.numel(),
                column_order=None if result.column_order is None else result.column_order.tolist()))

    def state(self) -> dict[str, Any]:
        return {"records": [r.to_dict() for r in self.records]}

    def load_state(self, state: dict[str, Any]) -> None:
        self.records = [LayerRecord(**{**r, "shape": tuple(r["shape"])}) for r in state.get("records", [])]

    def finish(self) -> None:
        return None


# -- collect ---------------------------------------------------------------------------------------------


class Observer(Protocol):
    """What a collect pass is for: which inputs to measure, what to keep of each block, and the decision."""

    #: False: only the weights are read (no calibration forward)
    needs_data: bool

    def observed(self, index: int, block: nn.Module) -> dict[str, tuple[str, nn.Module, Statistic]]:
        """Linears whose inputs are measured (name relative to the block, module, a fresh statistic), in
        execution order."""

    def summarize(self, index: int, block: nn.Module, stats: dict[str, Statistic]) -> dict[str, torch.Tensor]:
        """What is kept of this block for the decision (small tensors; saved for resume)."""

    def decide(self, summaries: list[dict[str, torch.Tensor]]) -> Any:
        """The decision over all blocks (a structured plan, per-block sparsities)."""


@dataclass
class CollectPass:
    observer: Observer
    calibration: torch.Tensor | None = None
    output: str | None = None
    kind: str = "collect"
    writes_blocks: bool = False
    summaries: list[dict[str, torch.Tensor]] = field(default_factory=list)
    result: Any = None

    @property
    def needs_data(self) -> bool:
        return self.observer.needs_data

    def process(self, ctx: BlockContext) -> dict[str, float]:
        t0 = time.perf_counter()
        stats: dict[str, Statistic] = {}
        if self.needs_data:
            observed = self.observer.observed(ctx.index, ctx.block)
            stats = {key: statistic for key, (_name, _module, statistic) in observed.items()}
            ctx.gather(observed, update_outputs=not ctx.is_last)  # dense propagation
        self.summaries.append(self.observer.summarize(ctx.index, ctx.block, stats))
        return {"statistics": time.perf_counter() - t0}

    def state(self) -> dict[str, Any]:
        return {"blocks": len(self.summaries)}

    def load_state(self, state: dict[str, Any]) -> None:  # the summaries come back through `restore_summaries`
        return None

    def finish(self) -> None:
        self.result = self.observer.decide(self.summaries)


# -- apply -----------------------------------------------------------------------------------------------


@dataclass
class ApplyPass:
    """Apply `apply(index, block)` to every block (a structured plan's shrink): no data, blocks written.

    What `apply` returns for a block (JSON-able, e.g. the block's new sizes) is kept in `records`.
    """

    apply: Callable[[int, nn.Module], Any]
    output: str | None = None
    calibration: torch.Tensor | None = None
    kind: str = "apply"
    needs_data: bool = False
    writes_blocks: bool = True
    records: list[Any] = field(default_factory=list)

    def process(self, ctx: BlockContext) -> dict[str, float]:
        t0 = time.perf_counter()
        self.records.append(self.apply(ctx.index, ctx.block))
        return {"apply": time.perf_counter() - t0}

    def state(self) -> dict[str, Any]:
        return {"records": self.records}

    def load_state(self, state: dict[str, Any]) -> None:
        self.records = list(state.get("records", []))

    def finish(self) -> None:
        return None


@dataclass
class ForwardPass:
    """Only run each block on the activations, the last one included (streamed evaluation)."""

    calibration: torch.Tensor | None = None
    output: str | None = None
    kind: str = "forward"
    needs_data: bool = True
    writes_blocks: bool = False

    def process(self, ctx: BlockContext) -> dict[str, float]:
        t0 = time.perf_counter()
        ctx.propagate()
        return {"forward": time.perf_counter() - t0}

    def state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        return None

    def finish(self) -> None:
        return None


class Passes:
    """A program of passes fixed in advance (most methods: one sequential pass)."""

    def __init__(self, *passes: Pass):
        self._passes = passes

    def passes(self) -> Iterator[Pass]:
        yield from self._passes
