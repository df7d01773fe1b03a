"""The engine: one loop over the blocks, shared by every method and every pass.

    for each pass the method's program yields (passes.py):
        capture block 0's inputs (if the pass needs data)
        for each block:  load (memory or disk) → pass.process → write (if it changed) → release → save progress
        pass.finish (a collect pass decides here)

Its collaborators each have one job: the `BlockSource` (blocks.py) says where weights come from, the sink
where finished blocks go, the reducer (reduce.py) combines statistics across ranks, the `RunDir` (state.py)
keeps what a resumed run needs, and the `ActivationStore` (activations.py) holds the calibration
activations in their dtype, in memory or spilled to disk. Methods never see any of them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prunekit.engine.activations import ActivationStore, MemoryActivations, SpilledActivations
from prunekit.engine.capture import BlockCall, capture_block_calls, capture_block_inputs
from prunekit.engine.passes import BlockContext, CollectPass, LayerRecord, Pass, Program
from prunekit.engine.progress import ProgressReporter
from prunekit.engine.reduce import LocalReducer
from prunekit.engine.state import PassProgress, RunDir


@dataclass
class EngineOptions:
    batch_size: int = 8
    device: str = "cpu"
    progress: bool = True
    #: dtype of the activations kept between blocks (None: the model's)
    activations_dtype: torch.dtype | None = None
    #: keep activations in memory up to this many bytes, spill them to disk above (None: never spill)
    activations_budget: int | None = None


@dataclass
class EngineResult:
    layers: list[LayerRecord] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    passes: list[dict[str, Any]] = field(default_factory=list)
    resumed_at: list[dict[str, Any]] = field(default_factory=list)
    io: dict[str, int] = field(default_factory=dict)

    def add_time(self, phase: str, seconds: float) -> None:
        self.timings[phase] = self.timings.get(phase, 0.0) + seconds

    @property
    def overall_sparsity(self) -> float:
        numel = sum(r.numel for r in self.layers)
        return sum(r.pruned for r in self.layers) / numel if numel else 0.0


class Engine:
    def __init__(self, source, *, options: EngineOptions | None = None, reducer=None, run_dir: RunDir | None = None,
                 sinks: Mapping[str | None, Any] | None = None, spill_dir: Path | None = None):
        self.source = source
        self.adapter = source.adapter
        self.options = options or EngineOptions()
        self.reducer = reducer or LocalReducer()
        self.run_dir = run_dir
        #: output name → sink (streamed; indexing may create it); None in memory, where blocks are edited in place
        self.sinks = sinks
        self.spill_dir = spill_dir or (run_dir.folder if run_dir else None)
        self.device = torch.device(self.options.device)
        self.result = EngineResult()
        self.activations: ActivationStore | None = None
        self._calls: dict[int, list[BlockCall]] = {}

    @property
    def model(self):
        return self.source.model

    def model_dtype(self) -> torch.dtype:
        checkpoint = getattr(self.source, "checkpoint", None)
        if checkpoint is not None:
            return checkpoint.dtype
        return next(self.model.parameters()).dtype

    # -- the loop ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, program: Program, calibration_ids: torch.Tensor | None = None) -> EngineResult:
        """Walk every pass of `program` over the blocks; `self.activations` holds the last pass's outputs."""
        blocks = self.adapter.blocks()
        self._note_resume()
        for k, current in enumerate(program.passes()):
            progress = self.run_dir.progress(k) if self.run_dir else PassProgress()
            if progress.next_block or progress.complete:
                self._restore(k, current, progress)
            if not progress.complete:
                self._walk(k, current, progress, calibration_ids, len(blocks))
            current.finish()
            self.result.passes.append({"kind": current.kind, "output": current.output})
            if current.kind == "sequential":
                self.result.layers.extend(current.records)
        self.result.io = {"bytes_read": self.source.bytes_read(),
                          "bytes_written": sum(s.bytes_written for s in (self.sinks or {}).values()),
                          "bytes_reduced": self.reducer.bytes_reduced, "bytes_shared": self.reducer.bytes_shared,
                          "world_size": self.reducer.world_size}
        if self.run_dir:
            self.result.resumed_at = list(self.run_dir.resumed_at)
        return self.result

    def _walk(self, k: int, current: Pass, progress: PassProgress, calibration_ids, count: int) -> None:
        store = self.activations = None
        if current.needs_data:
            ids = current.calibration if current.calibration is not None else calibration_ids
            if ids is None:
                raise ValueError(f"the {current.kind} pass needs calibration data")
            ids = ids[self.reducer.rows(ids.shape[0], self.options.batch_size)]
            self._block_calls(ids.shape[1])
            store = self.activations = self._activations(k, progress, ids)
        writes = self.sinks is not None and current.writes_blocks and self.reducer.rank == 0  # one writer
        sink = self.sinks[current.output] if writes else None
        reporter = ProgressReporter(count, enabled=self.options.progress and self.reducer.rank == 0, label=current.kind,
                                    start=progress.next_block)
        for index in range(progress.next_block, count):
            t0 = time.perf_counter()
            block = self.source.load(index)
            timings = {"load": time.perf_counter() - t0}
            try:
                ctx = BlockContext(index=index, prefix=self.adapter.block_prefix(index), block=block,
                                   is_last=index == count - 1,
                                   call=self._calls[store.shape[0]][index].to(self.device) if store else None,
                                   activations=store, batch_size=self.options.batch_size, device=self.device,
                                   compute_dtype=self._compute_dtype(), reduce=self.reducer.reduce,
                                   decides=self.reducer.rank == 0, share=self.reducer.share,
                                   world_size=self.reducer.world_size,
                                   observe=lambda name, module, callback, block=block: self.adapter.observe_input(
                                       block, name, module, callback))
                timings.update(current.process(ctx))
                if sink is not None:
                    t0 = time.perf_counter()
                    sink.write_block(index, block)
                    timings["write"] = time.perf_counter() - t0
            finally:
                self.source.release(index, block)
            for phase, seconds in timings.items():
                self.result.add_time(phase, seconds)
            self._checkpoint(k, current, progress, index, store, count)
            reporter.block_done(index, timings)
        reporter.close()

    def _compute_dtype(self) -> torch.dtype:
        return getattr(self.source, "compute_dtype", None) or next(self.model.parameters()).dtype

    # -- capture -----------------------------------------------------------------------------------------
    def _block_calls(self, seqlen: int) -> list[BlockCall]:
        if seqlen not in self._calls:
            t0 = time.perf_counter()
            with self.source.stem():
                self._calls[seqlen] = capture_block_calls(self.model, self.adapter.blocks(), seqlen, self.device,
                                                          self.adapter.block_returns_tuple)
            self.result.add_time("capture", time.perf_counter() - t0)
        return self._calls[seqlen]

    def _activations(self, k: int, progress: PassProgress, ids: torch.Tensor) -> ActivationStore:
        """Block 0's inputs, freshly captured, or the saved inputs of the block a resumed pass continues at."""
        if progress.next_block:
            return self._saved_activations(progress)
        t0 = time.perf_counter()
        store: ActivationStore | None = None

        def keep(start: int, hidden: torch.Tensor) -> None:
            nonlocal store
            if store is None:
                store = self._new_store(ids.shape[0], tuple(hidden.shape[1:]))
            if isinstance(store, SpilledActivations):
                store.fill(hidden, start)
            else:
                store.update(start, hidden)

        with self.source.stem():
            capture_block_inputs(self.model, self.adapter.blocks(), ids, self.options.batch_size, self.device,
                                 on_batch=keep, tuple_output=self.adapter.block_returns_tuple)
        self.result.add_time("capture", time.perf_counter() - t0)
        assert store is not None
        if self.run_dir and k == 0:
            self.run_dir.extra["activations"] = {"kind": type(store).__name__, "bytes": store.nbytes,
                                                 "dtype": str(store.dtype).removeprefix("torch.")}
        return store

    def _new_store(self, rows: int, shape: tuple[int, ...]) -> ActivationStore:
        dtype = self.options.activations_dtype or self.model_dtype()
        per_row = int(torch.tensor(shape).prod()) * torch.empty((), dtype=dtype).element_size()
        budget = self.options.activations_budget
        if budget is not None and rows * per_row > budget and self.spill_dir is not None:
            return SpilledActivations(self._rank_folder(self.spill_dir), rows, shape, dtype)
        return MemoryActivations(torch.empty(rows, *shape, dtype=dtype, device="cpu"))

    def _rank_folder(self, folder: Path) -> Path:
        """Where this rank keeps its own activations (each rank holds different rows)."""
        mine = folder if self.reducer.world_size == 1 else folder / f"rank-{self.reducer.rank}"
        mine.mkdir(parents=True, exist_ok=True)
        return mine

    def _activation_file(self, base: str) -> str:
        return f"{base}.safetensors" if self.reducer.world_size == 1 else f"rank-{self.reducer.rank}/{base}.safetensors"

    # -- resume ------------------------------------------------------------------------------------------
    def _checkpoint(self, k: int, current: Pass, progress: PassProgress, index: int, store, count: int) -> None:
        """After block `index`: everything the next block needs, then the progress record (last, atomic).

        Each rank writes its own activations; rank 0 writes the record once every rank has written.
        """
        progress.next_block = index + 1
        progress.complete = progress.next_block == count  # recorded with the last block, not after it
        if self.run_dir is None:
            return
        previous = progress.activations
        rank0 = self.reducer.rank == 0
        if isinstance(current, CollectPass) and rank0:
            self.run_dir.save_tensors(f"pass-{k}-block-{index}.safetensors", current.summaries[-1])
        progress.activations = None
        if store is not None and index + 1 < count:
            if isinstance(store, SpilledActivations):
                progress.activations = {"kind": "spilled", "current": store.current, "rows": store.rows,
                                        "shape": list(store.shape), "dtype": str(store.dtype)}
            else:
                base = f"activations-{k}-{index + 1}"
                self._rank_folder(self.run_dir.folder)
                store.save(self.run_dir.folder / self._activation_file(base))
                progress.activations = {"kind": "memory", "file": base}
        progress.state = current.state()
        self.reducer.barrier()
        if rank0:
            self.run_dir.save()
        self.reducer.barrier()
        if previous and previous.get("kind") == "memory":
            self.run_dir.remove(self._activation_file(previous["file"]))

    def _saved_activations(self, progress: PassProgress) -> ActivationStore:
        """The inputs of the block a resumed pass continues at, as this rank left them."""
        assert self.run_dir is not None and progress.activations is not None
        saved = progress.activations
        if saved["kind"] == "spilled":
            dtype = getattr(torch, saved["dtype"].removeprefix("torch."))
            return SpilledActivations(self._rank_folder(self.spill_dir or self.run_dir.folder), saved["rows"],
                                      tuple(saved["shape"]), dtype, current=saved["current"])
        return MemoryActivations(self.run_dir.load_tensors(self._activation_file(saved["file"]))["activations"])

    def _note_resume(self) -> None:
        """Record where an interrupted run continues: the first unfinished block (or only the output)."""
        if self.run_dir is None or self.reducer.rank != 0 or not any(p.next_block for p in self.run_dir.passes):
            return
        passes = self.run_dir.passes
        k = next((i for i, p in enumerate(passes) if not p.complete), len(passes) - 1)
        self.run_dir.mark_resumed({"pass": k, "block": passes[k].next_block,
                                   "at": time.strftime("%Y-%m-%dT%H:%M:%S")})

    def _restore(self, k: int, current: Pass, progress: PassProgress) -> None:
        assert self.run_dir is not None
        current.load_state(progress.state)
        if isinstance(current, CollectPass):
            current.summaries = [self.run_dir.load_tensors(f"pass-{k}-block-{i}.safetensors")
                                 for i in range(progress.next_block)]

