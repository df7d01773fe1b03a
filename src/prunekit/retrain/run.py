"""`retrain`: PERP on a pruned prunekit folder, from inputs checked up front to a published output folder.

Order of work: every cheap check (manifest, settings, output folder, training text) before the model is
loaded; then the parameter groups and adapters; the loop (retrain: next-token loss on the training windows;
reconstruct: block-wise against `reference`), checkpointing into the staging folder beside OUT; then the
merge, a check that the pruning mask survived it, and the folder (weights, tokenizer, prunekit.json with the
pruning record kept and a `retraining` record added), renamed into place.
"""

from __future__ import annotations

import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.files import MANIFEST, atomic_write_json, check_output_dir, publish_dir, staging_dir
from prunekit.retrain import checkpoint
from prunekit.retrain.config import RetrainConfig, build_config
from prunekit.retrain.lora import attach, check_rank, detach_all, export_peft
from prunekit.retrain.params import (
    add_biases,
    block_linears,
    count_parameters,
    norm_modules,
    record_biases,
    select_trainable,
)
from prunekit.retrain.train import Resume, optimize

ADAPTER_DIR = "adapter"


@dataclass
class RetrainReport:
    """Where the retrained model went and what was done (the manifest's `retraining` record)."""

    out: Path
    record: dict[str, Any]

    @property
    def trainable_fraction(self) -> float:
        return self.record["parameters"]["trainable_fraction"]


def _input_manifest(folder: Path) -> dict[str, Any]:
    import json

    path = folder / MANIFEST
    if not folder.is_dir() or not path.is_file():
        raise PrunekitError(f"{folder} is not a prunekit output (no {MANIFEST}); accepted: a folder written by "
                            "prunekit prune (or retrain)")
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise PrunekitError(f"{path} is not valid JSON ({error})") from None


def _check_held_out(calib: str, ppl: str | None) -> None:
    """Evaluating on the training text would measure memorisation, not recovery."""
    if ppl is None:
        return
    same = calib.strip() == ppl.strip()
    if Path(calib).expanduser().exists() and Path(ppl).expanduser().exists():
        same = Path(calib).expanduser().resolve() == Path(ppl).expanduser().resolve()
    from prunekit.data import DATASETS

    if same and calib.strip().lower() not in DATASETS:  # a named data set is split into train and test
        raise PrunekitError(f"--ppl {ppl} is the training text; accepted: held-out text (e.g. its test split)")


def _training_windows(calib: str, tokenizer, config: RetrainConfig, seqlen: int, model=None):
    """Retrain: a fresh window per row of every step; reconstruct: `nsamples` windows, cycled."""
    from prunekit.data import build_calibration, sha256_ids

    rows = config.steps * config.batch_size if config.mode == "retrain" else config.nsamples
    calib_set = build_calibration(calib, tokenizer, nsamples=rows, seqlen=seqlen, seed=config.seed, model=model)
    tokens = calib_set.provenance.get("tokens", calib_set.nsamples * seqlen)
    need = config.batch_size * seqlen
    if tokens < need or calib_set.nsamples < config.batch_size:
        raise PrunekitError(f"training text {calib!r} has {tokens} tokens, shorter than one batch of "
                            f"{config.batch_size} x {seqlen} = {need}; accepted: "
                            "more text or a smaller --batch-size / --seqlen")
    provenance = {**calib_set.provenance, "ids_sha256": sha256_ids(calib_set.input_ids)}
    return calib_set.input_ids, provenance


def _head_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The LM head, plus the input embedding when the two share one matrix (the update must stay tied)."""
    from prunekit.adapters import get_adapter

    adapter = get_adapter(model)
    modules = {adapter.head_path: adapter.head()}
    for path in adapter.embeddings_paths:
        if adapter._has(path) and model.get_submodule(path).weight is adapter.head().weight:
            modules[path] = model.get_submodule(path)
    return modules


def _zero_fraction(masks: dict[str, torch.Tensor]) -> float:
    total = sum(m.numel() for m in masks.values())
    return sum(int(m.sum()) for m in masks.values()) / total if total else 0.0


def retrain(pruned: str | Path, out: str | Path, *, calib: str | None, reference: str | None = None,
            overwrite: bool = False, resume: bool = False, ppl: str | None = None, ppl_seqlen: int = 512,
            progress: bool = True, log: Callable[[str], None] | None = None, **settings: Any) -> RetrainReport:
    """Retrain the small parameter groups of the pruned model in folder `pruned` and save it to `out`.

    `settings` are the fields of `RetrainConfig` (params, lora_kind, lora_rank, mode, steps, lr, batch_size,
    seqlen, seed, save_every, ...). `calib` is the training text (any SOURCE); `ppl`, held-out text to
    measure perplexity on before and after. With `resume`, an interrupted run with the same settings
    continues from its last checkpoint and ends with the same bytes as an uninterrupted one.
    """
    from transformers import AutoConfig, AutoTokenizer

    from prunekit.api import peak_memory, versions
    from prunekit.data import resolve_seqlen

    say = log or (lambda _message: None)
    started = time.perf_counter()
    config = build_config(**settings)
    source = Path(pruned).expanduser()
    manifest = _input_manifest(source)
    if config.mode == "reconstruct" and reference is None:
        raise PrunekitError("--mode reconstruct needs --reference DENSE, the unpruned model whose block outputs "
                            "are the targets")
    if config.mode == "reconstruct" and not {"bias", "norm", "lora"} & set(config.params):
        raise PrunekitError("--mode reconstruct fits block parameters; accepted --params: bias, norm or lora")
    if calib is None:
        raise PrunekitError("no training text: pass --calib SOURCE (e.g. a .txt file or wikitext2)")
    _check_held_out(calib, ppl)
    out_dir = check_output_dir(out, overwrite)
    staging = staging_dir(out_dir)
    if staging.exists() and not resume:
        raise PrunekitError(f"an interrupted run left {staging}; pass --resume to continue it, or delete it")
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    seqlen, _note = resolve_seqlen(config.seqlen, AutoConfig.from_pretrained(str(source)))
    self_sampled = calib.strip().lower() == "self"
    if not self_sampled:
        ids, data = _training_windows(calib, tokenizer, config, seqlen)

    from prunekit.structured.io import load

    loaded = load(str(source))
    model = loaded.model.float()
    if self_sampled:
        ids, data = _training_windows(calib, tokenizer, config, seqlen, model=model)
    dense = load(reference).model.float() if config.mode == "reconstruct" else None
    if dense is not None:
        from prunekit.retrain.reconstruct import check_reference

        check_reference(model, dense)

    # -- parameter groups and adapters (every check before any change) --
    base_params = count_parameters(model)
    linears = block_linears(model)
    input_zeros = {name: module.weight.detach() == 0 for name, module in linears.items()}
    sparse = any(bool(z.any()) for z in input_zeros.values())
    if config.uses_lora:
        if config.lora_kind == "mask_lora" and not sparse:
            raise PrunekitError(f"--lora-kind mask_lora needs pruned weights to mask, but {source} has none "
                                "(dense or structurally pruned); accepted: lora or scale_lora")
        check_rank(linears, config.lora_rank)
    train_head = "head" in config.params and config.mode == "retrain"
    head_modules = _head_modules(model) if train_head else {}
    check_rank(head_modules, config.lora_rank)
    before = _perplexity(model, tokenizer, ppl, ppl_seqlen) if ppl else None

    biases = add_biases(model) if "bias" in config.params else None
    trainable = select_trainable(model, config.params, biases)
    norms = set(norm_modules(model))
    norm_tensors = [name for name in trainable if name.rsplit(".", 1)[0] in norms]
    torch.manual_seed(config.seed)
    adapters = attach(linears, config.lora_rank, config.lora_alpha, config.lora_kind) if config.uses_lora else {}
    head_zeros = any(bool((m.weight == 0).any()) for m in head_modules.values())
    head_adapters = attach(head_modules, config.lora_rank, config.lora_alpha,
                           "mask_lora" if head_zeros else "lora")
    for name, adapter in {**adapters, **head_adapters}.items():
        trainable[f"{name}.lora_A"], trainable[f"{name}.lora_B"] = adapter.lora_A, adapter.lora_B
    n_trainable = sum(p.numel() for p in trainable.values())
    say(f"training {n_trainable:,} of {base_params:,} parameters ({n_trainable / base_params:.4%}): "
        f"{', '.join(config.params)}" + (f" ({config.lora_kind}, rank {config.lora_rank})" if adapters else ""))

    # -- the loop, checkpointed into the staging folder --
    fingerprint = {"settings": config.model_dump(exclude={"save_every"}), "data": data["ids_sha256"],
                   "input": str(source.resolve()), "reference": str(reference)}
    ckpt = staging / "checkpoint"
    state = tensors = None
    if resume and checkpoint.exists(ckpt):
        state, tensors = checkpoint.load(ckpt, fingerprint)
        say(f"resuming from {ckpt} at step {state['step']}")
    staging.mkdir(parents=True, exist_ok=True)
    ckpt.mkdir(exist_ok=True)
    prior_seconds = state["seconds"] if state else 0.0
    t_train = time.perf_counter()

    def elapsed() -> float:
        return prior_seconds + time.perf_counter() - t_train

    if config.mode == "retrain":
        model.eval()  # no dropout: a step depends only on its index, so a resume repeats it exactly
        bs = config.batch_size

        def loss_at(step: int) -> torch.Tensor:
            batch = ids[step * bs : (step + 1) * bs]
            return model(input_ids=batch, labels=batch, use_cache=False).loss

        def save_step(done: int, optimizer, scheduler, losses: list[float]) -> None:
            checkpoint.save(ckpt, done, trainable, optimizer, {
                "fingerprint": fingerprint, "scheduler": scheduler.state_dict(), "losses": losses,
                "seconds": elapsed()})

        resumed = None
        if state:
            resumed = Resume(state["step"], state["scheduler"], state["optimizer_groups"], state["losses"], tensors)
        losses = optimize(trainable, loss_at, config, tokens_per_step=bs * seqlen, desc="retrain",
                          progress=progress, resume=resumed, on_checkpoint=save_step)
        curves: dict[str, Any] = {"loss_curve": losses}
    else:
        from prunekit.retrain.reconstruct import reconstruct

        if state:
            checkpoint.restore(tensors, trainable)

        def save_block(done: int, block_curves: list[list[float]]) -> None:
            checkpoint.save(ckpt, done, trainable, None, {
                "fingerprint": fingerprint, "curves": block_curves, "seconds": elapsed()})

        curves = reconstruct(model, dense, ids, trainable, config, start_block=state["step"] if state else 0,
                             curves=state["curves"] if state else None, progress=progress, on_block=save_block)
    train_seconds = elapsed()

    # -- merge, check the mask, save --
    detach_all(head_modules, merge=True)
    merge = bool(adapters) and (config.lora_kind != "lora" or not sparse or config.merge_lora)
    if adapters and merge and config.lora_kind == "lora" and sparse:
        warnings.warn("merging plain LoRA fills the pruned weights: the saved model is no longer sparse "
                      "(use mask_lora or scale_lora, or leave the adapter unmerged)", stacklevel=2)
    detach_all(linears, merge=merge)
    if adapters and not merge:
        export_peft(model, adapters, config.lora_rank, config.lora_alpha, staging / ADAPTER_DIR)
    output_zeros = {name: module.weight.detach() == 0 for name, module in linears.items()}
    mask_kept = all(torch.equal(input_zeros[n], output_zeros[n]) for n in linears)
    if config.uses_lora and config.lora_kind != "lora" and not mask_kept:
        raise RuntimeError(f"{config.lora_kind} changed the pruning mask; this is a bug")
    if biases is not None:
        record_biases(model, biases)
    after = _perplexity(model, tokenizer, ppl, ppl_seqlen) if ppl else None

    record = {
        "method": "PERP (parameter-efficient retraining after pruning)",
        "input": str(source.resolve()), "mode": config.mode, "reference": reference,
        "settings": config.model_dump(),
        "parameters": {
            "sets": config.params, "model": base_params, "trainable": n_trainable,
            "trainable_fraction": n_trainable / base_params,
            "biases": None if biases is None else {"trained": len(biases.trained), "added": len(biases.added),
                                                   "not_storable": biases.not_storable},
            "norm_tensors": len(norm_tensors),
            "head": {"modules": sorted(head_modules), "rank": config.lora_rank} if head_modules else
            ("skipped: reconstruct mode fits blocks only" if "head" in config.params else None),
            "lora": {"kind": config.lora_kind, "rank": config.lora_rank, "alpha": config.lora_alpha,
                     "layers": len(adapters), "merged": merge,
                     "adapter_folder": None if merge else ADAPTER_DIR} if adapters else None,
        },
        "data": {**data, "seqlen": seqlen, "tokens_per_step": config.batch_size * seqlen},
        "steps": config.steps, **curves,
        "mask": {"zero_fraction_before": _zero_fraction(input_zeros),
                 "zero_fraction_after": _zero_fraction(output_zeros), "kept": mask_kept},
        "evaluation": {"before": before, "after": after} if ppl else None,
        "resumed_at_step": state["step"] if state else None,
        "seconds": {"train": train_seconds, "total": time.perf_counter() - started},
        "memory": peak_memory(), "versions": versions(),
    }
    if "retraining" in manifest:
        record["previous"] = manifest["retraining"]
    model.save_pretrained(str(staging), safe_serialization=True)
    tokenizer.save_pretrained(str(staging))
    atomic_write_json(staging / MANIFEST, {**manifest, "retraining": record})
    shutil.rmtree(ckpt)
    publish_dir(staging, out_dir)
    return RetrainReport(out_dir, record)


def _perplexity(model: nn.Module, tokenizer, source: str, seqlen: int) -> dict[str, Any]:
    from prunekit.evaluation import perplexity

    return perplexity(model, tokenizer, source, seqlen=seqlen).to_dict()
