"""The Python API: `prune` an in-memory model, get back a report of what was done."""

from __future__ import annotations

import platform
import resource
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from prunekit.adapters import get_adapter
from prunekit.engine import EngineOptions, EngineResult, SequentialEngine
from prunekit.methods import build_method
from prunekit.pruning import SparsityPlan


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
            "versions": versions(),
        }


def prepare_calibration(calibration, tokenizer, model, *, nsamples: int, seqlen: int | None, seed: int):
    """Token ids [n, seqlen] and their provenance from a source string, a CalibrationSet or a tensor."""
    from prunekit.data import CalibrationSet, build_calibration, resolve_seqlen

    if isinstance(calibration, CalibrationSet):
        return calibration.input_ids, calibration.provenance
    if isinstance(calibration, torch.Tensor):
        ids = calibration.long()
        return ids, {"source": "tensor", "nsamples": ids.shape[0], "seqlen": ids.shape[1], "seed": seed}
    if tokenizer is None:
        raise ValueError("a tokenizer is needed to build calibration windows from a text source")
    length, note = resolve_seqlen(seqlen, model.config)
    calib = build_calibration(calibration or "self", tokenizer, nsamples=nsamples, seqlen=length, seed=seed,
                              model=model)
    return calib.input_ids, {**calib.provenance, "seqlen_choice": note}


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
    refine: str | None = None,
) -> PruneReport:
    """Prune `model` in place and return the report.

    `calibration` is a source string (see `prunekit.data`), a `CalibrationSet`, a LongTensor of
    token ids [nsamples, seqlen], or None for the offline default `self` (text sampled from the
    model). The LM head and embeddings are never pruned unless `prune_head=True`.
    """
    started = time.perf_counter()
    pruner = build_method(method, method_options, refine=refine)  # refine: e.g. "dsnot" after the method
    if getattr(pruner, "structured", False):  # heads/channels removed: a physically smaller model
        from prunekit.structured import prune_structured

        return prune_structured(model, pruner, sparsity=sparsity, pattern=pattern, calibration=calibration,
                                tokenizer=tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed,
                                overrides=overrides, skip=skip, batch_size=batch_size, device=device,
                                progress=progress)
    plan = SparsityPlan.build(sparsity, pattern, overrides, skip)
    if not prune_head:
        plan.skip.append("lm_head")
    adapter = get_adapter(model)
    options = EngineOptions(propagate=propagate, batch_size=batch_size, device=device, prune_head=prune_head,
                            progress=progress)
    ids, provenance = None, None
    if pruner.needs_calibration:
        t0 = time.perf_counter()
        ids, provenance = prepare_calibration(calibration, tokenizer, model, nsamples=nsamples, seqlen=seqlen,
                                              seed=seed)
        calib_seconds = time.perf_counter() - t0
    engine = SequentialEngine(model, adapter, pruner, plan, options)
    result = engine.run(ids)
    if ids is not None:
        result.add_time("calibration_data", calib_seconds)
    return PruneReport(
        method=pruner.describe(),
        plan=plan.describe(),
        engine=result,
        calibration=provenance,
        options={"propagate": propagate, "batch_size": batch_size, "device": device, "prune_head": prune_head,
                 "adapter": adapter.family},
        seconds=time.perf_counter() - started,
        memory=peak_memory(),
    )
