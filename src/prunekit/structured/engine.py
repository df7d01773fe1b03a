"""Structured runs on the engine: calibration → collect pass(es) → plan(s) → apply pass → smaller model.

`prunekit.prune` hands structured methods here. In memory, the model is pruned in place with the applied
plan (SEAP: the general mask unless another is asked for) and every plan of the run is kept in the report
so the CLI can save one model per SEAP task; streamed (prunekit.streaming), every saved plan gets its own
apply pass and output folder.
"""

from __future__ import annotations

import copy
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from prunekit.engine.passes import ApplyPass, CollectPass
from prunekit.errors import PrunekitError
from prunekit.pruning.target import check_sparsity
from prunekit.structured.collect import StructuredObserver
from prunekit.structured.layout import get_structure
from prunekit.structured.shrink import SPEC_KEY, StructurePlan, apply_block, apply_plan, layer_spec, structure_spec

if TYPE_CHECKING:  # the method module imports prunekit.methods, which imports this package
    from prunekit.structured.method import StructuredMethod


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
        layers = [None if layer is None else layer.summary() if hasattr(layer, "summary") else
                  {"heads": len(layer.heads), "kv_heads": len(layer.kv_heads), "channels": len(layer.channels),
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


class StructuredProgram:
    """The engine passes of a structured method: collect (one pass per calibration set, or a weights-only
    one) → plans → apply (the applied plan in memory; streamed, one pass per saved output)."""

    def __init__(self, method: StructuredMethod, structure, sparsity: float, calibrations: dict[str, Any],
                 *, streamed: bool = False, on_plans: Any = None):
        self.method, self.structure, self.sparsity = method, structure, sparsity
        self.calibrations, self.streamed, self.on_plans = calibrations, streamed, on_plans
        self.plans: dict[str, StructurePlan] = {}
        self.applied = ""
        self.applies: dict[str, ApplyPass] = {}

    def passes(self):
        collected = {}
        ssm = getattr(self.structure, "ssm", False)
        for name, ids in (self.calibrations or {"weights": None}).items():
            if ssm:
                from prunekit.structured.ssm_plan import SsmObserver

                observer = SsmObserver(self.structure, needs_data=ids is not None)
            else:
                observer = StructuredObserver(self.structure, needs_data=ids is not None)
            collect = CollectPass(observer, calibration=ids)
            yield collect
            collected[name] = collect.result
        self.plans, self.applied = self.method.plans(self.structure, collected, self.sparsity)
        if self.on_plans is not None:
            self.on_plans(self.plans)
        names = self.method.saved_names(self.plans) if self.streamed else [self.applied]
        for name in names:
            plan = self.plans[name]

            def shrink(index: int, block: nn.Module, plan: StructurePlan = plan) -> dict[str, Any]:
                if ssm:
                    return self.structure.apply(block, plan.layers[index], index)
                apply_block(self.structure, block, plan.layers[index], index)
                return layer_spec(self.structure, block)

            self.applies[name] = ApplyPass(shrink, output=name if self.streamed else None)
            yield self.applies[name]


def structured_calibrations(method: StructuredMethod, prepare) -> tuple[dict[str, Any], Any]:
    """Token ids of every calibration set the method measures, checked before any forward pass, and their
    provenance (`prepare(source)` turns a SOURCE, or None for the run's own, into (ids, provenance))."""
    sources = method.calibration_sources()
    calibrations, provenance = {}, {}
    for name, source in sources.items():
        try:
            calibrations[name], provenance[name] = prepare(source)
        except PrunekitError as error:
            if source is None:
                raise
            raise PrunekitError(f"task {name!r}: {error}") from None
    if list(sources) == ["model"]:
        return calibrations, provenance["model"]
    return calibrations, provenance or None


def prune_structured(model: nn.Module, method: StructuredMethod, *, sparsity: float, pattern: str | None = None,
                     calibration: Any = None, tokenizer: Any = None, nsamples: int = 128, seqlen: int | None = None,
                     seed: int = 0, overrides: dict | None = None, skip: list[str] | None = None,
                     batch_size: int = 8, device: str = "cpu", progress: bool = True,
                     reducer: Any = None) -> StructuredReport:
    """Prune an in-memory `model` in place by removing heads and channels; see `prunekit.prune`."""
    from prunekit.api import peak_memory, prepare_calibration
    from prunekit.engine import Engine, EngineOptions, InMemoryBlocks

    started = time.perf_counter()
    check_structured_request(method, pattern, overrides, skip)
    sparsity = check_sparsity(sparsity)
    structure = get_structure(model)
    from prunekit.structured.method import check_applies  # not at import time: methods import this package

    check_applies(method, structure, sparsity)
    params_before = count_parameters(model)
    t0 = time.perf_counter()
    calibrations, provenance = structured_calibrations(method, lambda source: prepare_calibration(
        calibration if source is None else source, tokenizer, model, nsamples=nsamples, seqlen=seqlen, seed=seed,
        device=device))
    timings: dict[str, float] = {"calibration_data": time.perf_counter() - t0} if calibrations else {}
    kept: dict[str, Any] = {}

    def keep_dense_blocks(plans: dict[str, StructurePlan]) -> None:
        if len(plans) > 1:  # other plans are applied to copies of the dense blocks later (SEAP)
            kept["blocks"] = copy.deepcopy(structure.blocks())

    program = StructuredProgram(method, structure, sparsity, calibrations, on_plans=keep_dense_blocks)
    engine = Engine(InMemoryBlocks(model, structure.adapter, torch.device(device)),
                    options=EngineOptions(batch_size=batch_size, device=device, progress=progress), reducer=reducer)
    result = engine.run(program, None)
    setattr(model.config, SPEC_KEY, structure_spec(model, structure))
    timings.update(result.timings)
    return StructuredReport(
        method=method.describe(), target=sparsity, plans=program.plans, applied=program.applied,
        calibration=provenance, params_before=params_before, params_after=count_parameters(model),
        seconds=time.perf_counter() - started, timings=timings, memory=peak_memory(),
        attn_implementation=getattr(model.config, "_attn_implementation", None), dense_blocks=kept.get("blocks"),
    )


def check_structured_request(method: StructuredMethod, pattern: str | None, overrides, skip) -> None:
    if pattern not in (None, "", "unstructured"):
        raise PrunekitError(f"pattern {pattern!r} does not apply to structured method {method.name}; "
                            "structured methods remove whole heads and channels")
    if overrides or skip:
        raise PrunekitError(f"per-layer overrides/skip are not supported by structured method {method.name}; "
                            "use min_keep / the structure option")


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
    """Save the applied model to OUT; with several plans (SEAP), one model per plan in OUT/NAME (the whole
    folder staged and renamed into place, like a single model)."""

    from prunekit.export import check_output_dir, save_model
    from prunekit.files import MANIFEST, atomic_write_json, new_staging_dir, publish_dir

    if len(report.plans) == 1:
        return [save_model(model, tokenizer, out, manifest, overwrite=overwrite)]
    config = report.method.get("config", {})
    if names is None and "outputs" in config:  # seap: all, tasks or general
        tasks = [name for name in report.plans if name in config.get("tasks", {})]
        names = {"all": list(report.plans), "tasks": tasks, "general": ["general"]}[config["outputs"]]
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
