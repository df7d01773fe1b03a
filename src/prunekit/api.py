"""The Python API: `prune` an in-memory model, get back a report of what was done."""

from __future__ import annotations

import contextlib
import platform
import resource
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from prunekit.adapters import Adapter, get_adapter, weight_matrix
from prunekit.adapters.ssm import check_structured_parts, resolved_parts, split_ssm_parts, ssm_skip_globs
from prunekit.checks import check_device, check_positive
from prunekit.engine import Engine, EngineOptions, EngineResult, InMemoryBlocks
from prunekit.errors import PrunekitError
from prunekit.methods import build_method
from prunekit.methods.base import PruningMethod
from prunekit.pruning import SparsityPlan
from prunekit.pruning.owl import OwlProgram, split_allocation_options


def versions() -> dict[str, str]:
    import transformers

    from prunekit import __version__

    return {"prunekit": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def peak_memory() -> dict[str, float]:
    """Peak resident memory of this process (and of the GPU, when one was used), in MiB."""
    peak = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return peak


@dataclass
class PruneReport:
    """What a pruning run did: method, targets, per-layer results, data provenance, cost."""

    method: dict[str, Any]
    plan: dict[str, Any]
    engine: EngineResult
    calibration: dict[str, Any] | None
    options: dict[str, Any]
    seconds: float
    memory: dict[str, float] = field(default_factory=dict)
    #: per-block sparsities of a sparsity allocation (OWL), when one was used
    allocation: dict[str, Any] | None = None

    @property
    def overall_sparsity(self) -> float:
        return self.engine.overall_sparsity

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "plan": self.plan,
            "overall_sparsity": self.overall_sparsity,
            "layers": [r.to_dict() for r in self.engine.layers],
            "calibration": self.calibration,
            "options": self.options,
            "timings_s": {**self.engine.timings, "total": self.seconds},
            "memory": self.memory,
            "allocation": self.allocation,
            "versions": versions(),
        }


def prepare_calibration(calibration, tokenizer, model, *, nsamples: int, seqlen: int | None, seed: int,
                        device: str = "cpu"):
    """Token ids [n, seqlen] and their provenance from a source string, a CalibrationSet or a tensor.

    `self` samples with the model on `device` (moved there for the sampling, then back).
    """
    from prunekit.data import CalibrationSet, build_calibration, resolve_seqlen

    if isinstance(calibration, CalibrationSet):
        return calibration.input_ids, calibration.provenance
    if isinstance(calibration, torch.Tensor):
        ids = calibration.long()
        return ids, {"source": "tensor", "nsamples": ids.shape[0], "seqlen": ids.shape[1], "seed": seed}
    if tokenizer is None:
        raise ValueError("a tokenizer is needed to build calibration windows from a text source")
    length, note = resolve_seqlen(seqlen, model.config)
    with on_device(model, device if str(calibration or "self").strip().lower() == "self" else None):
        calib = build_calibration(calibration or "self", tokenizer, nsamples=nsamples, seqlen=length, seed=seed,
                                  model=model)
    return calib.input_ids, {**calib.provenance, "seqlen_choice": note, "device": str(device)}


@contextlib.contextmanager
def on_device(model: nn.Module, device: str | None):
    """The whole model on `device` for a while (self-sampling on a GPU), then back where it was."""
    home = next(model.parameters()).device
    if device is None or torch.device(device) == home:
        yield
        return
    model.to(device)
    try:
        yield
    finally:
        model.to(home)


def check_fits(model: nn.Module, adapter: Adapter, plan: SparsityPlan, pruner: PruningMethod, prune_head: bool
               ) -> None:
    """What the model's shapes decide, checked before any calibration: every N:M target divides its layer's
    input width, and the LM head is prunable when asked (a data-free method, and not tied to the embeddings,
    which would be pruned with it)."""
    for index, block in enumerate(adapter.blocks()):
        prefix = adapter.block_prefix(index)
        for _group, modules in adapter.block_linears(block):
            for name, module in modules.items():
                target = plan.target_for(f"{prefix}.{name}")
                if target is not None:
                    target.check_width(weight_matrix(module).shape[1], f"{prefix}.{name}")
    if not prune_head:
        return
    heads = {name: module for name, module in adapter.head_linears().items() if plan.target_for(name) is not None}
    if heads and pruner.needs_calibration:
        raise PrunekitError(f"prune_head: the LM head can only be pruned by a data-free method (magnitude), "
                            f"not {pruner.name}; drop prune_head or use method magnitude")
    embeddings = [module.weight for module in adapter.embeddings() if hasattr(module, "weight")]
    for name, module in heads.items():
        shared = any(module.weight is weight for weight in embeddings)
        if shared or getattr(model.config, "tie_word_embeddings", False):
            raise PrunekitError(f"prune_head: {name} shares its weights with the input embeddings "
                                "(tie_word_embeddings), so pruning it would prune the embeddings too; "
                                "leave the head unpruned for this model")


def prune(
    model: nn.Module,
    *,
    method: str = "wanda",
    sparsity: float = 0.5,
    pattern: str | None = None,
    calibration: Any = None,
    tokenizer: Any = None,
    nsamples: int = 128,
    seqlen: int | None = None,
    seed: int = 0,
    method_options: dict[str, Any] | None = None,
    overrides: dict[str, float | str] | None = None,
    skip: list[str] | None = None,
    propagate: Literal["pruned", "dense"] = "pruned",
    batch_size: int = 8,
    device: str = "cpu",
    prune_head: bool = False,
    progress: bool = True,
    activations_dtype: torch.dtype | None = None,
    reducer: Any = None,
    refine: str | None = None,
    sparsity_allocation: str | None = None,
) -> PruneReport:
    """Prune an in-memory `model` in place and return the report.

    `calibration` is a source string (see `prunekit.data`), a `CalibrationSet`, a LongTensor of
    token ids [nsamples, seqlen], or None for the offline default `self` (text sampled from the
    model). The LM head and embeddings are never pruned unless `prune_head=True`. Under torchrun, pass
    `reducer=prunekit.distributed.start(device)`: each rank calibrates on its share of the rows. A model on disk
    larger than memory is pruned with `prunekit.streaming.prune_files` (what the CLI does for folders
    and GGUF files): the same engine and methods, one block in memory at a time.
    """
    started = time.perf_counter()
    check_positive({"batch_size": batch_size, "nsamples": nsamples, "seqlen": seqlen})
    device = check_device(device, "device")
    method_options, allocation = split_allocation_options(sparsity_allocation, method_options)
    method_options, ssm_parts = split_ssm_parts(method_options)
    pruner = build_method(method, method_options, refine=refine)  # refine: e.g. "dsnot" after the method
    if getattr(pruner, "structured", False):  # heads/channels removed: a physically smaller model
        from prunekit.structured import prune_structured

        check_structured_parts(ssm_parts, pruner.name)

        return prune_structured(model, pruner, sparsity=sparsity, pattern=pattern, calibration=calibration,
                                tokenizer=tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed,
                                overrides=overrides, skip=skip, batch_size=batch_size, device=device,
                                progress=progress, reducer=reducer)
    adapter = get_adapter(model)
    plan = build_plan(sparsity, pattern, overrides, skip, prune_head=prune_head)
    plan.skip.extend(ssm_skip_globs(adapter, ssm_parts))
    check_fits(model, adapter, plan, pruner, prune_head)
    ids, provenance, calib_seconds = None, None, 0.0
    if pruner.needs_calibration:
        t0 = time.perf_counter()
        ids, provenance = prepare_calibration(calibration, tokenizer, model, nsamples=nsamples, seqlen=seqlen,
                                              seed=seed, device=device)
        calib_seconds = time.perf_counter() - t0
        if reducer is not None:
            from prunekit.distributed import check_rows

            check_rows(reducer, ids.shape[0])
    options = EngineOptions(batch_size=batch_size, device=device, progress=progress,
                            activations_dtype=activations_dtype)
    engine = Engine(InMemoryBlocks(model, adapter, torch.device(device)), options=options, reducer=reducer)
    program = build_program(pruner, plan, adapter, propagate, allocation)
    result = engine.run(program, ids)
    if prune_head:
        result.layers.extend(prune_head_layers(adapter, plan, pruner))
    if ids is not None:
        result.add_time("calibration_data", calib_seconds)
    return PruneReport(
        method=pruner.describe(),
        plan=plan.describe(),
        engine=result,
        calibration=provenance,
        options={"propagate": propagate, "batch_size": batch_size, "device": device, "prune_head": prune_head,
                 "adapter": adapter.family, "world_size": getattr(reducer, "world_size", 1),
                 "ssm_parts": resolved_parts(adapter, ssm_parts)},
        seconds=time.perf_counter() - started,
        memory=peak_memory(),
        allocation=program.describe() if hasattr(program, "describe") else None,
    )


def build_program(pruner, plan: SparsityPlan, adapter, propagate: str, allocation):
    """The engine passes of a per-layer method, under a sparsity allocation (OWL) when one is asked for."""
    if allocation is None:
        return pruner.program(plan, adapter, propagate=propagate)
    if getattr(pruner, "structured", False):
        raise PrunekitError(f"--sparsity-allocation owl allocates per-layer sparsities; {pruner.name} plans its own")
    return OwlProgram(pruner, plan, adapter, propagate=propagate, config=allocation)


def build_plan(sparsity, pattern, overrides, skip, *, prune_head: bool) -> SparsityPlan:
    """The sparsity plan; the LM head is skipped unless asked for (`check_fits` says whether it may be)."""
    plan = SparsityPlan.build(sparsity, pattern, overrides, skip)
    if not prune_head:
        plan.skip.append("lm_head")
    return plan


def prune_head_layers(adapter, plan: SparsityPlan, method) -> list:
    """Prune the LM head in memory with a data-free method; returns its layer records."""
    from prunekit.adapters import set_weight_matrix, weight_matrix
    from prunekit.engine import LayerRecord

    records = []
    for name, module in adapter.head_linears().items():
        target = plan.target_for(name)
        if target is None:
            continue
        result = method.prune_layer(weight_matrix(module).float(), None, target)
        set_weight_matrix(module, result.weight)
        pruned = int(result.mask.sum())
        records.append(LayerRecord(name, tuple(result.mask.shape), target.pattern, target.sparsity,
                                   pruned / result.mask.numel(), pruned, result.mask.numel()))
    return records
