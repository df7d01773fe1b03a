"""The structured engine: calibration → statistics → plan(s) → compensated, physically smaller model.

`prunekit.prune` hands structured methods here. The model is pruned in place with the applied plan
(SEAP: the general mask unless another is asked for); every plan of the run is kept in the report so
the CLI can save one model per SEAP task.
"""

from __future__ import annotations

import copy
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from prunekit.errors import PrunekitError
from prunekit.pruning.target import check_sparsity
from prunekit.structured.collect import collect_statistics
from prunekit.structured.layout import get_structure
from prunekit.structured.method import StructuredMethod
from prunekit.structured.shrink import StructurePlan, apply_plan


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (a tied head counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@dataclass
class StructuredReport:
    """What a structured run did; `plans` holds every mask of the run, `applied` the one in the model."""

    method: dict[str, Any]
    target: float
    plans: dict[str, StructurePlan]
    applied: str
    calibration: Any
    params_before: int
    params_after: int
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    memory: dict[str, float] = field(default_factory=dict)
    attn_implementation: str | None = None
    #: dense copies of the blocks, kept only when other plans must be applied later (SEAP).
    dense_blocks: nn.ModuleList | None = None
    structured: bool = True

    @property
    def overall_sparsity(self) -> float:
        return self.plans[self.applied].achieved

    def plan_dict(self, name: str) -> dict[str, Any]:
        plan = self.plans[name]
        layers = [{"heads": len(layer.heads), "kv_heads": len(layer.kv_heads), "channels": len(layer.channels),
                   "sparsity": round(layer.removed_params / layer.total_params, 4)} for layer in plan.layers]
        return {"target": plan.target, "achieved": plan.achieved, "removed_params": plan.removed_params,
                "prunable_params": plan.total_params, **plan.info, "layers": layers}

    def to_dict(self) -> dict[str, Any]:
        from prunekit.api import versions

        return {
            "method": self.method,
            "structured": {"target": self.target, "applied": self.applied,
                           "attn_implementation": self.attn_implementation,
                           "params_before": self.params_before, "params_after": self.params_after,
                           "plans": {name: self.plan_dict(name) for name in self.plans}},
            "overall_sparsity": self.overall_sparsity,
            "calibration": self.calibration,
            "timings_s": {**self.timings, "total": self.seconds},
            "memory": self.memory,
            "versions": versions(),
        }


def prune_structured(model: nn.Module, method: StructuredMethod, *, sparsity: float, pattern: str | None = None,
                     calibration: Any = None, tokenizer: Any = None, nsamples: int = 128, seqlen: int | None = None,
                     seed: int = 0, overrides: dict | None = None, skip: list[str] | None = None,
                     batch_size: int = 8, device: str = "cpu", progress: bool = True) -> StructuredReport:
    """Prune `model` in place by removing heads and channels; see `prunekit.prune` for the arguments."""
    from prunekit.api import peak_memory, prepare_calibration

    started = time.perf_counter()
    if pattern not in (None, "", "unstructured"):
        raise PrunekitError(f"pattern {pattern!r} does not apply to structured method {method.name}; "
                            "structured methods remove whole heads and channels")
    if overrides or skip:
        raise PrunekitError(f"per-layer overrides/skip are not supported by structured method {method.name}; "
                            "use min_keep / the structure option")
    sparsity = check_sparsity(sparsity)
    structure = get_structure(model)
    params_before = count_parameters(model)
    timings: dict[str, float] = {}

    class _Gather:
        def prepare(self, source: Any):
            t0 = time.perf_counter()
            result = prepare_calibration(calibration if source is None else source, tokenizer, model,
                                         nsamples=nsamples, seqlen=seqlen, seed=seed)
            timings["calibration_data"] = timings.get("calibration_data", 0.0) + time.perf_counter() - t0
            return result

        def collect(self, ids):
            stats, seconds = collect_statistics(model, structure, ids, batch_size=batch_size, device=device,
                                                progress=progress)
            timings["statistics"] = timings.get("statistics", 0.0) + seconds
            return stats

    plans, applied, provenance = method.make_plans(structure, sparsity, _Gather())
    dense_blocks = copy.deepcopy(structure.blocks()) if len(plans) > 1 else None
    t0 = time.perf_counter()
    apply_plan(model, structure, plans[applied])
    timings["shrink"] = time.perf_counter() - t0
    return StructuredReport(
        method=method.describe(), target=sparsity, plans=plans, applied=applied, calibration=provenance,
        params_before=params_before, params_after=count_parameters(model), seconds=time.perf_counter() - started,
        timings=timings, memory=peak_memory(),
        attn_implementation=getattr(model.config, "_attn_implementation", None), dense_blocks=dense_blocks,
    )


def model_for_plan(report: StructuredReport, model: nn.Module, name: str) -> nn.Module:
    """The model pruned with plan `name`: `model` itself for the applied plan, else a rebuilt copy."""
    if name == report.applied:
        return model
    if report.dense_blocks is None:
        raise ValueError("the dense blocks were not kept; only the applied plan is available")
    other = copy.deepcopy(model)
    structure = get_structure(other)
    blocks = structure.blocks()
    for i, block in enumerate(report.dense_blocks):
        blocks[i] = copy.deepcopy(block)
    apply_plan(other, structure, report.plans[name])
    return other


def save_outputs(report: StructuredReport, model: nn.Module, tokenizer: Any, out: str | Path,
                 manifest: dict[str, Any], *, overwrite: bool = False, names: list[str] | None = None) -> list[Path]:
    """Save the applied model to OUT; with several plans (SEAP), one model per plan in OUT/NAME."""
    from prunekit.export import check_output_dir, save_model

    if len(report.plans) == 1:
        return [save_model(model, tokenizer, out, manifest, overwrite=overwrite)]
    config = report.method.get("config", {})
    if names is None and "outputs" in config:  # seap: all, tasks or general
        tasks = [name for name in report.plans if name in config.get("tasks", {})]
        names = {"all": list(report.plans), "tasks": tasks, "general": ["general"]}[config["outputs"]]
    from prunekit.files import MANIFEST, atomic_write_json, new_staging_dir, publish_dir

    root = check_output_dir(out, overwrite)
    staging = new_staging_dir(root)  # every task model is written, then the folder appears at once
    try:
        paths = []
        for name in names or list(report.plans):
            pruned = model_for_plan(report, model, name)
            entry = {**manifest, "task_model": name, "overall_sparsity": report.plans[name].achieved}
            save_model(pruned, tokenizer, staging / name, entry)
            paths.append(root / name)
            del pruned
        atomic_write_json(staging / MANIFEST, {**manifest, "task_models": [p.name for p in paths]})
        publish_dir(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return paths
