"""Prune a model on disk into an output folder, one block in memory at a time, resumable after a kill.

    open the checkpoint (config, weightless skeleton, tensor table: nothing else is read)
    check everything cheap (method, pattern widths, output folder, disk, memory) → calibration ids (saved)
    plan + timed probe → the engine's passes with `StreamedBlocks` and shard sinks, progress after each block
    write shard 1 (embeddings, norm, head), index, config, tokenizer, manifest → rename into place

The staging folder `.OUT.partial` holds `run/` (the run state, engine/state.py) and `model/` (the output
being written). Re-running the same command continues an interrupted run at its first unfinished block
and produces the same bytes; a different recipe, model or calibration is refused in one line.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from prunekit.errors import PrunekitError
from prunekit.files import (
    MANIFEST,
    atomic_write_json,
    check_output_dir,
    publish_dir,
    remove_own_dir,
    staging_dir,
    write_marker,
)
from prunekit.streaming.budget import (
    check_disk,
    estimate_seconds,
    gib,
    plan_memory,
    probe_block_seconds,
    self_sampling_estimate,
    statistics_bytes,
)

#: `self` calibration is refused when sampling would take longer than this here.
SELF_SAMPLING_LIMIT_S = 30 * 60
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def check_compute_dtype(dtype: torch.dtype | None, device: torch.device) -> torch.dtype:
    """fp32 by default; bf16 anywhere; fp16 only on a GPU (CPU kernels for it are slow or missing)."""
    if dtype is None:
        return torch.float32
    if dtype == torch.float16 and device.type == "cpu":
        raise PrunekitError("--compute-dtype float16 needs a GPU (--device cuda); accepted on CPU: float32, bfloat16")
    return dtype


def parse_dtype(name: str | None, what: str) -> torch.dtype | None:
    if name is None:
        return None
    dtype = DTYPES.get(str(name).strip().lower())
    if dtype is None:
        raise PrunekitError(f"{what} {name!r} is not a dtype prunekit writes; accepted: float32, bfloat16, float16")
    return dtype


@dataclass
class StreamRequest:
    """A streamed pruning run: the recipe plus where the model is and where its output goes."""

    spec: str
    out: str
    method: str = "wanda"
    refine: str | None = None
    sparsity_allocation: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    sparsity: float = 0.5
    pattern: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    skip: list[str] = field(default_factory=list)
    calib: str = "self"
    nsamples: int = 128
    seqlen: int | None = None
    seed: int = 0
    propagate: str = "pruned"
    batch_size: int = 8
    device: str = "cpu"
    prune_head: bool = False
    dtype: str | None = None
    compute_dtype: str | None = None
    activations_dtype: str | None = None
    max_memory: int | None = None
    trust_remote_code: bool = False

    def fingerprint_fields(self) -> dict[str, Any]:
        """What changes the output bytes (the output path and flags about the run itself do not)."""
        fields = asdict(self)
        for name in ("out", "max_memory", "trust_remote_code"):
            fields.pop(name)
        return fields


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def prune_files(request: StreamRequest, *, overwrite: bool = False, resume: bool | None = None,
                progress: bool = True, log: Callable[[str], None] = print, reducer=None) -> dict[str, Any]:
    """Run `request`; returns the manifest written beside the output (on rank 0; {} on other ranks).

    `reducer` is the engine's statistics reducer: a `DistributedReducer` under torchrun (prunekit.distributed),
    where every rank runs this with the same request and only rank 0 writes.
    """
    from prunekit import __version__
    from prunekit.adapters import get_adapter
    from prunekit.adapters.ssm import check_structured_parts, split_ssm_parts, ssm_skip_globs
    from prunekit.api import build_plan, build_program, check_fits, peak_memory, versions
    from prunekit.checks import check_device, check_positive
    from prunekit.distributed import agree, backend_name, check_rows
    from prunekit.engine import Engine, EngineOptions, StreamedBlocks
    from prunekit.engine.reduce import LocalReducer
    from prunekit.engine.state import RunDir
    from prunekit.memory import bound_heap_growth
    from prunekit.methods import build_method
    from prunekit.models import open_checkpoint
    from prunekit.pruning.owl import split_allocation_options

    started = time.perf_counter()
    bound_heap_growth()
    reducer = reducer or LocalReducer()
    rank0 = reducer.rank == 0
    if not rank0:
        log = _silent
    check_positive({"--batch-size": request.batch_size, "--nsamples": request.nsamples, "--seqlen": request.seqlen})
    device = torch.device(check_device(request.device))
    out_dtype_request = parse_dtype(request.dtype, "--dtype")
    compute_dtype = check_compute_dtype(parse_dtype(request.compute_dtype, "--compute-dtype"), device)
    activations_request = parse_dtype(request.activations_dtype, "--activations-dtype")
    method_options, allocation = split_allocation_options(request.sparsity_allocation, request.options)
    method_options, ssm_parts = split_ssm_parts(method_options)
    pruner = build_method(request.method, method_options, refine=request.refine)
    structured = getattr(pruner, "structured", False)
    out = check_output_dir(request.out, overwrite)
    checkpoint = open_checkpoint(request.spec, trust_remote_code=request.trust_remote_code)
    model = checkpoint.skeleton()
    adapter = get_adapter(model)
    out_dtype = out_dtype_request or checkpoint.dtype
    activations_dtype = activations_request or checkpoint.dtype
    if structured:
        from prunekit.structured.engine import check_structured_request
        from prunekit.structured.layout import get_structure

        check_structured_request(pruner, request.pattern, request.overrides, request.skip)
        from prunekit.pruning.target import check_sparsity
        from prunekit.structured.method import check_applies

        check_structured_parts(ssm_parts, pruner.name)
        structure = get_structure(model)
        check_applies(pruner, structure, check_sparsity(request.sparsity))
        plan = None
    else:
        plan = build_plan(request.sparsity, request.pattern, request.overrides, request.skip,
                          prune_head=request.prune_head)
        plan.skip.extend(ssm_skip_globs(adapter, ssm_parts))
        check_fits(model, adapter, plan, pruner, request.prune_head)

    staging = staging_dir(out)
    fingerprint = {"recipe": _sha(request.fingerprint_fields()), "model": checkpoint.fingerprint(),
                   "versions": _sha({"prunekit": __version__, "torch": torch.__version__,
                                     "threads": torch.get_num_threads(), "world_size": reducer.world_size})}
    agree(reducer, fingerprint)
    run_dir = RunDir(staging / "run", fingerprint)
    created = not staging.exists()
    try:
        resuming = _open_run(run_dir, staging, overwrite=overwrite, resume=resume, reducer=reducer)
        tokenizer = checkpoint.tokenizer()
        calibrations, provenance = _calibrations(request, pruner, checkpoint, tokenizer, run_dir, resuming, log,
                                                 reducer)
    except PrunekitError:
        if created and rank0:  # bad calibration input: nothing was done, leave nothing behind
            remove_own_dir(staging)
        raise
    rows = max((ids.shape[0] for ids in calibrations.values()), default=0)
    for ids in calibrations.values():
        check_rows(reducer, ids.shape[0])
    seqlen = max((ids.shape[1] for ids in calibrations.values()), default=0)

    source = StreamedBlocks(checkpoint, adapter, device, compute_dtype)
    memory = plan_memory(source, [statistics_bytes(pruner, adapter)], rows=rows, seqlen=seqlen,
                         batch_size=request.batch_size, activations_dtype=activations_dtype,
                         limit=request.max_memory)
    element = torch.empty((), dtype=out_dtype).element_size()
    check_disk(staging, checkpoint.parameter_count() * element + (2 * memory.activations_bytes if memory.spill else 0),
               f"the output of {checkpoint.where}")
    estimate = _announce(request, checkpoint, source, calibrations, memory, out_dtype, activations_dtype,
                         structured, resuming, run_dir, log)

    options = EngineOptions(batch_size=request.batch_size, device=str(device), progress=progress,
                            activations_dtype=activations_dtype,
                            activations_budget=(request.max_memory - memory.fixed_bytes) if memory.spill else None)
    sinks = _Sinks(staging / "model", source, out_dtype)
    engine = Engine(source, options=options, run_dir=run_dir, sinks=sinks, reducer=reducer)
    if structured:
        from prunekit.structured.engine import StructuredProgram

        program = StructuredProgram(pruner, structure, request.sparsity, calibrations, streamed=True)
    else:
        program = build_program(pruner, plan, adapter, request.propagate, allocation)
    result = engine.run(program, calibrations.get("model"))
    if not rank0:  # rank 0 writes the output; the others are done
        reducer.barrier()
        return {}

    replaced, head_records = {}, []
    if request.prune_head:
        replaced, head_records = _pruned_head(checkpoint, adapter, plan, pruner)
        result.layers.extend(head_records)
    manifest = {
        "model": checkpoint.provenance(),
        "recipe": request.fingerprint_fields(),
        "method": pruner.describe(),
        "calibration": provenance,
        "timings_s": {**result.timings, "total": time.perf_counter() - started},
        "streaming": {"output_dtype": str(out_dtype).removeprefix("torch."),
                      "activations_dtype": str(activations_dtype).removeprefix("torch."),
                      "memory_plan": memory.describe(), "estimate_s": estimate, "io": result.io,
                      "resumed": bool(result.resumed_at), "resumed_at": result.resumed_at},
        "distributed": {"world_size": reducer.world_size, "backend": backend_name(reducer),
                        "bytes_reduced": result.io["bytes_reduced"], "bytes_broadcast": result.io["bytes_shared"]},
        "memory": peak_memory(),
        "versions": versions(),
    }
    if structured:
        outputs = _finish_structured(program, structure, checkpoint, tokenizer, sinks, out_dtype, manifest)
    else:
        manifest.update(plan=plan.describe(), overall_sparsity=result.overall_sparsity,
                        layers=[r.to_dict() for r in result.layers],
                        allocation=program.describe() if hasattr(program, "describe") else None)
        _finish_folder(sinks[None], checkpoint, tokenizer, out_dtype, manifest, replaced)
        outputs = [sinks[None].folder]
    manifest["timings_s"]["total"] = time.perf_counter() - started
    manifest["memory"] = peak_memory()
    for folder in outputs:  # the finished figures: total time and peak memory, writing included
        entry = json.loads((folder / MANIFEST).read_text())
        atomic_write_json(folder / MANIFEST, {**entry, "timings_s": manifest["timings_s"],
                                              "memory": manifest["memory"]})
    publish_dir(staging / "model", out)
    remove_own_dir(staging)
    reducer.barrier()
    return manifest


def _silent(message: str) -> None:
    """Ranks other than 0 say nothing (rank 0 speaks for the run)."""


# -- the run folder -----------------------------------------------------------------------------------------


def _open_run(run_dir, staging: Path, *, overwrite: bool, resume: bool | None, reducer) -> bool:
    """Continue a matching interrupted run; with --overwrite, a different one is discarded (it is ours)."""
    try:
        resuming = run_dir.open(resume=resume)
    except PrunekitError:
        if not overwrite or resume or not (staging / ".prunekit-output").is_file():
            raise
        reducer.barrier()  # every rank has read the old record before rank 0 removes it
        if reducer.rank == 0:
            remove_own_dir(staging)
        reducer.barrier()
        resuming = run_dir.open(resume=None)
    if reducer.rank == 0:
        write_marker(staging, "prune (staging)")
    reducer.barrier()
    return resuming


# -- calibration ------------------------------------------------------------------------------------------


def _calibrations(request: StreamRequest, pruner, checkpoint, tokenizer, run_dir, resuming: bool, log, reducer):
    """Token ids of every calibration set of the run, saved in the run folder (a `self` sample is drawn once).

    On resume a text source is windowed again and must give the same ids: a changed file is refused. Every rank
    windows a text source itself (deterministic); a `self` sample is drawn by rank 0 and broadcast.
    """
    if getattr(pruner, "structured", False):
        sources = pruner.calibration_sources()
    else:
        sources = {"model": None} if pruner.needs_calibration else {}
    calibrations, provenance = {}, {}
    for name, source in sources.items():
        source = request.calib if source is None else source
        saved = run_dir.folder / f"calibration-{name}.safetensors"
        if resuming and saved.is_file():
            ids = run_dir.load_tensors(saved.name)["input_ids"]
            prov = json.loads((run_dir.folder / f"calibration-{name}.json").read_text())
            if str(source).strip().lower() != "self":
                fresh, _ = _build_calibration(source, request, checkpoint, tokenizer, name, log)
                if not torch.equal(fresh, ids):
                    raise PrunekitError(f"the calibration of the interrupted run ({source}) differs from its text "
                                        "now; rerun with the same data, or pass --overwrite to start again")
        elif str(source).strip().lower() == "self" and reducer.world_size > 1:
            ids, prov = _build_calibration(source, request, checkpoint, tokenizer, name, log) if reducer.rank == 0 \
                else (torch.zeros(request.nsamples, _seqlen(request, checkpoint), dtype=torch.long), {})
            reducer.share([ids])
        else:
            ids, prov = _build_calibration(source, request, checkpoint, tokenizer, name, log)
        if reducer.rank == 0 and not (resuming and saved.is_file()):
            run_dir.save_tensors(saved.name, {"input_ids": ids})
            atomic_write_json(run_dir.folder / f"calibration-{name}.json", prov)
        calibrations[name], provenance[name] = ids, prov
    if reducer.rank == 0:
        run_dir.save()
    reducer.barrier()
    if list(sources) == ["model"]:
        return calibrations, provenance["model"]
    return calibrations, provenance or None


def _seqlen(request: StreamRequest, checkpoint) -> int:
    from prunekit.data import resolve_seqlen

    return resolve_seqlen(request.seqlen, checkpoint.config)[0]


def _build_calibration(source: str, request: StreamRequest, checkpoint, tokenizer, name: str, log):
    from prunekit.data import build_calibration, resolve_seqlen

    seqlen, note = resolve_seqlen(request.seqlen, checkpoint.config)
    try:
        if str(source).strip().lower() == "self":
            return _self_calibration(request, checkpoint, tokenizer, seqlen, note, log)
        calib = build_calibration(source, tokenizer, nsamples=request.nsamples, seqlen=seqlen, seed=request.seed)
    except PrunekitError as error:
        if name == "model":
            raise
        raise PrunekitError(f"task {name!r}: {error}") from None
    return calib.input_ids, {**calib.provenance, "seqlen_choice": note}


def _self_calibration(request: StreamRequest, checkpoint, tokenizer, seqlen: int, note: str, log):
    """Text sampled from the model itself, when that is practical here; otherwise one line saying what to pass."""
    from prunekit.data import build_calibration
    from prunekit.models import load_model

    parameters = checkpoint.parameter_count()
    tokens = request.nsamples * seqlen
    seconds = self_sampling_estimate(parameters, tokens, batch_size=8)
    too_big = request.max_memory is not None and 4 * parameters > request.max_memory
    if seconds > SELF_SAMPLING_LIMIT_S or too_big:
        raise PrunekitError(
            f"calibration 'self' would sample {tokens:,} tokens from a {parameters / 1e9:.1f}B-parameter model held "
            f"in memory ({gib(4 * parameters)} in fp32): about {seconds / 3600:.1f} h here; pass a text source "
            f"instead (--calib wikitext2, c4, or a .txt file), or fewer tokens (--nsamples, --seqlen)")
    log(f"sampling calibration text from the model: {tokens:,} tokens, about {seconds / 60:.0f} min")
    from prunekit.checks import check_device

    loaded = load_model(checkpoint.resolved.gguf or checkpoint.resolved.folder,
                        trust_remote_code=request.trust_remote_code)
    loaded.model.to(check_device(request.device))
    calib = build_calibration("self", tokenizer, nsamples=request.nsamples, seqlen=seqlen, seed=request.seed,
                              model=loaded.model)
    del loaded
    return calib.input_ids, {**calib.provenance, "seqlen_choice": note}


# -- the plan printed before work ---------------------------------------------------------------------------


def _announce(request, checkpoint, source, calibrations, memory, out_dtype, activations_dtype, structured,
              resuming, run_dir, log) -> float | None:
    params = checkpoint.parameter_count()
    log(f"model: {checkpoint.where} ({params / 1e9:.2f}B parameters, {checkpoint.dtype} on disk, "
        f"{len(source.adapter.blocks())} blocks); output in {out_dtype}")
    tokens = sum(ids.numel() for ids in calibrations.values())
    log(f"calibration: {tokens:,} tokens; activations in {activations_dtype}: {gib(memory.activations_bytes)} "
        f"{'spilled to disk' if memory.spill else 'in memory'}")
    log(f"memory: one block {gib(memory.block_bytes)} + statistics {gib(memory.statistics_bytes)} + working "
        f"{gib(memory.working_bytes)}" + (f" (limit {gib(memory.limit)})" if memory.limit else ""))
    if resuming:
        done = ", ".join(f"pass {k}: block {p.next_block}" for k, p in enumerate(run_dir.passes))
        log(f"resuming the interrupted run in {run_dir.folder.parent} ({done})")
    if not calibrations:
        return None
    from prunekit.engine.capture import capture_block_calls

    ids = next(iter(calibrations.values()))
    with source.stem():
        calls = capture_block_calls(source.model, source.adapter.blocks(), ids.shape[1], source.device,
                                    source.adapter.block_returns_tuple)
    probe = probe_block_seconds(source, calls, ids, request.batch_size)
    batches = -(-ids.shape[0] // request.batch_size)
    forwards = 1.0 if structured or request.propagate == "dense" else 2.0
    passes = 2 if structured or request.sparsity_allocation else 1
    estimate = estimate_seconds(probe, blocks=len(source.adapter.blocks()), batches=batches,
                                forwards_per_block=forwards, passes=passes)
    log(f"estimate: ~{estimate / 60:.1f} min (probe: block 0 read in {probe['read_s']:.2f}s, one batch in "
        f"{probe['forward_s']:.2f}s; the method's own decision time comes on top)")
    return estimate


# -- output -------------------------------------------------------------------------------------------------


class _Sinks(dict):
    """Output name → shard sink, made on first use (SEAP writes one folder per task)."""

    def __init__(self, root: Path, source, dtype: torch.dtype):
        super().__init__()
        self.root, self.source, self.dtype = root, source, dtype

    def __missing__(self, name: str | None):
        from prunekit.engine import ShardSink

        folder = self.root if name in (None, "model") else self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        self[name] = sink = ShardSink(folder, self.source, self.dtype)
        return sink


def _finish_folder(sink, checkpoint, tokenizer, dtype: torch.dtype, manifest: dict[str, Any],
                   replaced: dict[str, torch.Tensor] | None = None, spec: dict[str, Any] | None = None) -> None:
    """Shard 1 and the index, the config (output dtype, structure), the tokenizer and the manifest."""
    import copy

    sink.finish(replaced)
    config = copy.deepcopy(checkpoint.config)
    config.dtype = dtype
    if spec is not None:
        from prunekit.structured.shrink import SPEC_KEY

        setattr(config, SPEC_KEY, spec)
    config.save_pretrained(sink.folder)
    checkpoint.copy_aux_files(sink.folder, tokenizer)
    atomic_write_json(sink.folder / MANIFEST, manifest)


def _finish_structured(program, structure, checkpoint, tokenizer, sinks, dtype, manifest) -> list[Path]:
    """Every saved plan's folder; several (SEAP) go under one root with their own manifests."""
    from prunekit.structured.shrink import structure_spec

    names = list(program.applies)
    manifest["structured"] = {"target": program.sparsity, "applied": program.applied,
                              "plans": {name: program.plans[name].achieved for name in program.plans}}
    folders = []
    for name in names:
        entry = {**manifest, "task_model": name, "overall_sparsity": program.plans[name].achieved}
        spec = structure_spec(structure.model, structure, layers=program.applies[name].records)
        _finish_folder(sinks[name], checkpoint, tokenizer, dtype, entry, spec=spec)
        entry["structured"] = {**manifest["structured"], "params_before": checkpoint.parameter_count(),
                               "params_after": sinks[name].parameters()}
        atomic_write_json(sinks[name].folder / MANIFEST, entry)
        folders.append(sinks[name].folder)
    manifest["overall_sparsity"] = program.plans[program.applied].achieved
    if len(names) > 1:
        atomic_write_json(sinks.root / MANIFEST, {**manifest, "task_models": names})
    return folders


def _pruned_head(checkpoint, adapter, plan, pruner):
    """The LM head pruned by a data-free method, read once from the checkpoint."""
    from prunekit.engine import LayerRecord

    replaced, records = {}, []
    for name in adapter.head_linears():
        target = plan.target_for(name)
        if target is None:
            continue
        result = pruner.prune_layer(checkpoint.read(f"{name}.weight").float(), None, target)
        replaced[f"{name}.weight"] = result.weight
        pruned = int(result.mask.sum())
        records.append(LayerRecord(name, tuple(result.mask.shape), target.pattern, target.sparsity,
                                   pruned / result.mask.numel(), pruned, result.mask.numel()))
    return replaced, records
