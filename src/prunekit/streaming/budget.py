"""Before a streamed run does any work: will it fit (memory, disk), and how long will it take?

Memory is planned, not hoped for: one block in the compute dtype, its statistics, the working memory of a
batched forward and of the mask rules, and the calibration activations, which spill to disk when they do
not fit in what `--max-memory` leaves. The time estimate comes from a probe: block 0 read from disk and run
on one batch, extrapolated to every block and pass.
"""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prunekit.errors import PrunekitError

GIB = 2**30
#: Python, torch, transformers and the tokenizer, resident before any weight (measured: ~0.5 GiB).
BASELINE_BYTES = int(0.6 * GIB)
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_size(text: str | int | None, what: str = "--max-memory") -> int | None:
    """'3GB', '2.5GiB', '800MB' or a byte count."""
    if text is None or isinstance(text, int):
        return text
    match = _SIZE.match(str(text))
    unit = (match.group(2) or "").lower() if match else None
    if match is None or unit not in _UNITS:
        raise PrunekitError(f"{what} {text!r} is not a size; accepted: e.g. 3GB, 2.5GiB, 800MB")
    return int(float(match.group(1)) * _UNITS[unit])


def gib(value: float) -> str:
    return f"{value / GIB:.2f} GiB"


@dataclass
class MemoryPlan:
    block_bytes: int
    stem_bytes: int
    statistics_bytes: int
    working_bytes: int
    activations_bytes: int
    limit: int | None
    spill: bool = False

    @property
    def fixed_bytes(self) -> int:
        """What a block's turn needs besides the activations."""
        return BASELINE_BYTES + max(self.block_bytes + self.statistics_bytes + self.working_bytes, self.stem_bytes)

    def describe(self) -> dict[str, Any]:
        return {"block_gib": self.block_bytes / GIB, "stem_gib": self.stem_bytes / GIB,
                "statistics_gib": self.statistics_bytes / GIB, "working_gib": self.working_bytes / GIB,
                "activations_gib": self.activations_bytes / GIB, "limit_gib": None if self.limit is None else
                self.limit / GIB, "activations_spilled": self.spill}


def plan_memory(source, method_statistics: list[Any], *, rows: int, seqlen: int, batch_size: int,
                activations_dtype: torch.dtype, limit: int | None) -> MemoryPlan:
    """Size the run from shapes alone (the skeleton): refuse a `limit` below one block's need."""
    adapter, model = source.adapter, source.model
    compute = torch.empty((), dtype=source.compute_dtype).element_size()
    block_params = max(sum(p.numel() for p in b.parameters()) for b in adapter.blocks())
    stem_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(adapter.blocks_path + ".")
                      and not n.startswith(adapter.head_path))
    config = model.config
    hidden = getattr(config, "hidden_size", 0) or 0
    inter = getattr(config, "intermediate_size", None) or 4 * hidden
    heads = getattr(config, "num_attention_heads", 1) or 1
    largest_linear = max((p.numel() for b in adapter.blocks() for p in b.parameters() if p.dim() == 2), default=0)
    # a batch through the block (residual, attention, MLP intermediates) and the mask rules' scratch
    forward = batch_size * seqlen * (6 * hidden + 3 * inter) * 4 + batch_size * heads * seqlen * seqlen * 4
    working = forward + 3 * largest_linear * 4
    element = torch.empty((), dtype=activations_dtype).element_size()
    plan = MemoryPlan(block_params * compute, stem_params * compute, sum(method_statistics), working,
                      rows * seqlen * hidden * element, limit)
    if limit is not None:
        if limit < plan.fixed_bytes:
            raise PrunekitError(f"--max-memory {gib(limit)} is below what one block needs: at least "
                                f"{gib(plan.fixed_bytes)} (block {gib(plan.block_bytes)}, statistics "
                                f"{gib(plan.statistics_bytes)}, working memory {gib(plan.working_bytes)})")
        plan.spill = plan.fixed_bytes + plan.activations_bytes > limit
    return plan


def statistics_bytes(method, adapter) -> int:
    """One block's statistics for `method` (sizes from a meta-device instance: nothing allocated)."""
    statistic = getattr(method, "statistic", None)
    if statistic is None:
        return 0
    from prunekit.adapters import weight_matrix

    total = 0
    for _group, modules in adapter.block_linears(adapter.blocks()[0]):
        first = next(iter(modules.values()))
        total += statistic(weight_matrix(first).shape[1], device="meta").nbytes
    return total


def check_disk(folder: Path, needed: int, what: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise PrunekitError(f"not enough disk for {what}: {gib(needed)} needed, {gib(free)} free in {folder}")


def probe_block_seconds(source, calls, ids: torch.Tensor, batch_size: int) -> dict[str, float]:
    """Read block 0 and run it on one batch: the unit the estimate multiplies."""
    from prunekit.engine.capture import capture_block_inputs

    with torch.no_grad():
        with source.stem():
            hidden = capture_block_inputs(source.model, source.adapter.blocks(), ids[:batch_size], batch_size,
                                          source.device, tuple_output=source.adapter.block_returns_tuple)
        t0 = time.perf_counter()
        block = source.load(0)
        read = time.perf_counter() - t0
        try:
            call = calls[0].to(source.device)
            t0 = time.perf_counter()
            block(hidden.to(source.compute_dtype), *call.args, **call.kwargs)
            forward = time.perf_counter() - t0
        finally:
            source.release(0, block)
    return {"read_s": read, "forward_s": forward}


def estimate_seconds(probe: dict[str, float], *, blocks: int, batches: int, forwards_per_block: float,
                     passes: int = 1) -> float:
    per_block = 2 * probe["read_s"] + batches * probe["forward_s"] * forwards_per_block  # read + write
    return passes * blocks * per_block


def self_sampling_estimate(parameters: int, tokens: int, batch_size: int) -> float:
    """Seconds to sample `tokens` from the model on this machine: every decode step reads all weights (fp32);
    the bandwidth is measured with a 256 MB copy."""
    buffer = torch.ones(64 * 2**20)
    t0 = time.perf_counter()
    buffer.clone()
    bandwidth = 2 * buffer.numel() * 4 / max(time.perf_counter() - t0, 1e-6)
    steps = tokens / batch_size
    return steps * parameters * 4 / bandwidth
