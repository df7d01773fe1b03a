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
from prunekit.retrain.setup import Trainables
from prunekit.retrain.train import Resume, optimize


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

    trainables = Trainables.inspect(model, config, source)
    before = _perplexity(model, tokenizer, ppl, ppl_seqlen) if ppl else None
    trainables.attach(model)
    say(f"training {trainables.count:,} of {trainables.base_params:,} parameters "
        f"({trainables.count / trainables.base_params:.4%}): {', '.join(config.params)}"
        + (f" ({config.lora_kind}, rank {config.lora_rank})" if trainables.adapters else ""))
    fingerprint = {"settings": config.model_dump(exclude={"save_every"}), "data": data["ids_sha256"],
                   "input": str(source.resolve()), "reference": str(reference)}
    curves, resumed_at, train_seconds = _loop(model, dense, ids, trainables.params, config, staging / "checkpoint",
                                              fingerprint, resume=resume, progress=progress, say=say)
    merged = trainables.detach(model, staging)
    after = _perplexity(model, tokenizer, ppl, ppl_seqlen) if ppl else None

    record = {
        "method": "PERP (parameter-efficient retraining after pruning)",
        "input": str(source.resolve()), "mode": config.mode, "reference": reference,
        "settings": config.model_dump(), **merged,
        "data": {**data, "seqlen": seqlen, "tokens_per_step": config.batch_size * seqlen},
        "steps": config.steps, **curves,
        "evaluation": {"before": before, "after": after} if ppl else None,
        "resumed_at_step": resumed_at,
        "seconds": {"train": train_seconds, "total": time.perf_counter() - started},
        "memory": peak_memory(), "versions": versions(),
    }
    if "retraining" in manifest:
        record["previous"] = manifest["retraining"]
    model.save_pretrained(str(staging), safe_serialization=True)
    tokenizer.save_pretrained(str(staging))
    atomic_write_json(staging / MANIFEST, {**manifest, "retraining": record})
    shutil.rmtree(staging / "checkpoint")
    publish_dir(staging, out_dir)
    return RetrainReport(out_dir, record)


def _perplexity(model: nn.Module, tokenizer, source: str, seqlen: int) -> dict[str, Any]:
    from prunekit.evaluation import perplexity

    return perplexity(model, tokenizer, source, seqlen=seqlen).to_dict()


def _loop(model: nn.Module, dense: nn.Module | None, ids: torch.Tensor, params: dict[str, nn.Parameter],
          config: RetrainConfig, ckpt: Path, fingerprint: dict[str, Any], *, resume: bool, progress: bool,
          say: Callable[[str], None]) -> tuple[dict[str, Any], int | None, float]:
    """Train in the chosen mode, checkpointing into `ckpt`; returns the loss curves, the step resumed at and
    the training seconds (those of the interrupted run included)."""
    state = tensors = None
    if resume and checkpoint.exists(ckpt):
        state, tensors = checkpoint.load(ckpt, fingerprint)
        say(f"resuming from {ckpt} at step {state['step']}")
    ckpt.mkdir(parents=True, exist_ok=True)
    prior_seconds = state["seconds"] if state else 0.0
    t0 = time.perf_counter()

    def elapsed() -> float:
        return prior_seconds + time.perf_counter() - t0

    if config.mode == "retrain":
        model.eval()  # no dropout: a step depends only on its index, so a resume repeats it exactly
        bs = config.batch_size

        def loss_at(step: int) -> torch.Tensor:
            batch = ids[step * bs : (step + 1) * bs]
            return model(input_ids=batch, labels=batch, use_cache=False).loss

        def save_step(done: int, optimizer, scheduler, losses: list[float]) -> None:
            checkpoint.save(ckpt, done, params, optimizer, {
                "fingerprint": fingerprint, "scheduler": scheduler.state_dict(), "losses": losses,
                "seconds": elapsed()})

        resumed = None
        if state:
            resumed = Resume(state["step"], state["scheduler"], state["optimizer_groups"], state["losses"], tensors)
        losses = optimize(params, loss_at, config, tokens_per_step=bs * ids.shape[1], desc="retrain",
                          progress=progress, resume=resumed, on_checkpoint=save_step)
        curves: dict[str, Any] = {"loss_curve": losses}
    else:
        from prunekit.retrain.reconstruct import reconstruct

        if state:
            checkpoint.restore(tensors, params)

        def save_block(done: int, block_curves: list[list[float]]) -> None:
            checkpoint.save(ckpt, done, params, None, {
                "fingerprint": fingerprint, "curves": block_curves, "seconds": elapsed()})

        curves = reconstruct(model, dense, ids, params, config, start_block=state["step"] if state else 0,
                             curves=state["curves"] if state else None, progress=progress, on_block=save_block)
    return curves, state["step"] if state else None, elapsed()
