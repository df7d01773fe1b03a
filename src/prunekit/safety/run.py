"""The safety study end to end: (prune) → generate → judge → rates with intervals, paired tests, plot, report.

Variants: the dense MODEL (or `reference` as the dense baseline and MODEL as given), plus MODEL pruned at each
requested sparsity. Every variant answers the same prompts, so dense-vs-pruned differences are paired (McNemar).

A full study is hours of CPU, so a run is resumable: the output folder is the run's state.

* ``run.json`` — what defines the run (model, templates, sparsities, judges, ...): a rerun of the same command
  continues the run; a rerun with a different definition is refused with one line (``--overwrite`` starts
  again). The folder carries prunekit's marker from its first second, so ``--overwrite`` still refuses
  folders prunekit did not write.
* ``responses.jsonl`` — every prompt and answer with its verdicts (the only place harmful text is written),
  appended and fsynced batch by batch; prompts already answered (keyed by variant, set, template, task) are
  skipped by a rerun;
* ``variants/<name>/`` — a pruned variant's masks (saved once, reused by a rerun instead of pruning again) and
  its measurements (``info.json``: throughput, analyses, perplexity);
* ``results.json``, ``refusal_vs_sparsity.png``, ``report.md`` — recomputed from the above at the end of every
  run (each through a temporary file and rename); a failing plot or report is reported and never loses the
  answers, which are already on disk.
Nothing written to the terminal contains a prompt or an answer.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from prunekit.checks import check_device, check_positive
from prunekit.errors import PrunekitError
from prunekit.files import (
    append_lines,
    atomic_write_json,
    check_output_dir,
    read_jsonl,
    write_marker,
)
from prunekit.safety.config import GENERATIONS, LAYER_SKIPS, Log, SafetyConfig, check_layers, check_sparsities
from prunekit.safety.data import (
    Prompt,
    Task,
    Template,
    build_prompts,
    load_suite,
    read_tasks,
    select_templates,
    subset,
)
from prunekit.safety.decode import Batch, decode_batches
from prunekit.safety.generate import Encoded, encode, generate, resolve_mode
from prunekit.safety.judges import Judge, PrefixJudge, apply_judges, stop_rule
from prunekit.safety.results import finish_run
from prunekit.safety.state import (
    IDENTITY_FIELDS,
    MEASUREMENT_FIELDS,
    check_dense_source,
    copy_dense,
    load_pruned,
    prepare_run_dir,
    record_key,
    save_pruned,
)


def measured_sparsity(model: torch.nn.Module) -> float:
    """Share of zeros over the 2-D weights of the Linear layers except the LM head (what pruning targets)."""
    zeros = total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    return zeros / total if total else 0.0


# --------------------------------------------------------------------------------------------------
# one variant


def _encode_all(tokenizer: Any, prompts: Sequence[Prompt], mode: str) -> list[Encoded]:
    return [encode(tokenizer, p.text, mode, p.span) for p in prompts]  # type: ignore[arg-type]


def generate_variant(name: str, sparsity: float, model: Any, tokenizer: Any, prompts: Sequence[tuple[str, Prompt]],
                     done: set[tuple[str, str, str, str]], config: SafetyConfig, judges: Sequence[Judge],
                     responses: Path, log: Log) -> dict[str, Any]:
    """Answer the prompts of `prompts` ((set, prompt) pairs) not yet in `done`, appending each finished batch
    (judged) to `responses`; returns this session's generation counts."""
    mode = resolve_mode(tokenizer, config.prompt_format)  # type: ignore[arg-type]
    todo = [(kind, p) for kind, p in prompts if (name, kind, p.template, str(p.task.id)) not in done]
    if not todo:
        return {"prompts": 0, "seconds": 0.0}
    log(f"{name}: generating {len(todo)} answers ({len(prompts) - len(todo)} already on disk; max "
        f"{config.max_new_tokens} new tokens, {mode} format, {config.generation} path)")
    ids = [e.ids for e in _encode_all(tokenizer, [p for _, p in todo], mode)]
    stop = stop_rule(judges) if config.stop_early else None
    total_seconds, total_prompts, next_log = 0.0, 0, time.perf_counter() + 60
    for batch in _batches(model, tokenizer, ids, _by_template([p for _, p in todo]), config, stop):
        records = []
        for i, token_ids, ended, reason in zip(batch.indices, batch.token_ids, batch.ended, batch.reasons,
                                               strict=True):
            kind, prompt = todo[i]
            record = {"variant": name, "sparsity": sparsity, "set": kind, **prompt.meta(), "prompt": prompt.text,
                      "response": tokenizer.decode(token_ids, skip_special_tokens=True),
                      "new_tokens": len(token_ids), "ended": ended, "decoding": batch.layout,
                      "seconds": batch.seconds / len(batch.indices)}
            if ended == "verdict":
                record["cut"] = f"answer cut after {len(token_ids)} tokens: {reason}"
            if config.keep_token_ids:
                record["token_ids"] = token_ids
            records.append(record)
        apply_judges(records, judges)
        append_lines(responses, [json.dumps(r, ensure_ascii=False) for r in records])
        total_seconds += batch.seconds
        total_prompts += len(records)
        if time.perf_counter() > next_log:
            log(f"{name}: {total_prompts}/{len(todo)} answered, {total_prompts / total_seconds:.2f} prompts/s")
            next_log = time.perf_counter() + 60
    log(f"{name}: {total_prompts / total_seconds:.2f} prompts/s")
    return {"prompts": total_prompts, "seconds": total_seconds}


def _batches(model: Any, tokenizer: Any, ids: list[list[int]], groups: list[list[int]], config: SafetyConfig,
             stop: Any) -> Any:
    """Finished batches from the fast path, or from the plain path (model.generate) batch by batch."""
    if config.generation == "prefix":
        yield from decode_batches(model, tokenizer, ids, max_new_tokens=config.max_new_tokens,
                                  batch_size=config.batch_size, groups=groups, stop=stop)
        return
    for group in groups:
        order = sorted(group, key=lambda i: len(ids[i]))
        for start in range(0, len(order), config.batch_size):
            chunk = order[start:start + config.batch_size]
            gen = generate(model, tokenizer, [ids[i] for i in chunk], max_new_tokens=config.max_new_tokens,
                           batch_size=config.batch_size)
            ended = ["length" if len(t) >= config.max_new_tokens else "eos" for t in gen.token_ids]
            yield Batch(chunk, gen.token_ids, ended, [None] * len(chunk), gen.seconds, 0, "model.generate")


def variant_measurements(model: Any, tokenizer: Any, harmful: Sequence[Prompt], tasks: Sequence[Task],
                         config: SafetyConfig, info: dict[str, Any], log: Log = print) -> dict[str, Any]:
    """Analyses and perplexity a variant still lacks (an earlier session may have stored some); their cost goes
    into ``info["measurement_seconds"]``."""
    mode = resolve_mode(tokenizer, config.prompt_format)  # type: ignore[arg-type]
    seconds = info.setdefault("measurement_seconds", {})
    if config.analyses and "analyses" not in info:
        chosen = subset(tasks, config.analyses_limit)  # a prefill per prompt (after its template's prefix)
        ids = {t.id for t in chosen}
        some = [p for p in harmful if p.task.id in ids]
        log(f"measuring attention to the task and prompt perplexity on {len(some)} prompts ({len(chosen)} tasks)")
        started = time.perf_counter()
        encoded = _encode_all(tokenizer, some, mode)
        info["analyses"] = run_analyses(model, tokenizer, some, encoded, chosen, config)
        seconds["analyses"] = time.perf_counter() - started
    if config.ppl_source and "perplexity" not in info:
        from prunekit.evaluation import perplexity

        log(f"measuring perplexity on {config.ppl_source}")
        started = time.perf_counter()
        info["perplexity"] = perplexity(model, tokenizer, config.ppl_source, seqlen=config.ppl_seqlen,
                                        batch_size=min(config.batch_size, 8), max_windows=config.ppl_max_windows,
                                        progress=False).to_dict()
        seconds["perplexity"] = time.perf_counter() - started
    return info


def _by_template(prompts: Sequence[Prompt]) -> list[list[int]]:
    """Indices of the prompts of each template: they share a token prefix, encoded once (analysis.py)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, prompt in enumerate(prompts):
        groups[prompt.template].append(i)
    return list(groups.values())


def run_analyses(model: Any, tokenizer: Any, harmful: Sequence[Prompt], encoded: Sequence[Encoded],
                 tasks: Sequence[Task], config: SafetyConfig) -> dict[str, Any]:
    """Attention share on the task (per prompt) and prompt perplexity (task alone and per template)."""
    from prunekit.safety.analysis import attention_to_span, prompt_perplexities

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    usable = [i for i, e in enumerate(encoded) if e.span is not None]
    shares = attention_to_span(model, [encoded[i].ids for i in usable], [encoded[i].span for i in usable],
                               pad_id=pad, batch_size=max(1, config.batch_size // 4),
                               groups=_by_template([harmful[i] for i in usable]))
    attention = [{"template": harmful[i].template, "task_id": harmful[i].task.id, **s}
                 for i, s in zip(usable, shares, strict=True)]
    alone = prompt_perplexities(model, tokenizer, [t.text for t in tasks], batch_size=config.batch_size)
    templated = prompt_perplexities(model, tokenizer, [p.text for p in harmful], batch_size=config.batch_size,
                                    groups=_by_template(harmful))
    ppl = {"task_alone": {t.id: v for t, v in zip(tasks, alone, strict=True)},
           "templated": [{"template": p.template, "task_id": p.task.id, "perplexity": v}
                         for p, v in zip(harmful, templated, strict=True)]}
    return {"attention": attention, "prompt_perplexity": ppl}


# --------------------------------------------------------------------------------------------------
# models


def _load(spec: str, log: Log) -> Any:
    from prunekit.models import load_model

    log(f"loading {spec}")
    return load_model(spec)


# --------------------------------------------------------------------------------------------------
# the run folder: identity, resume, saved variants


def run_identity(config: SafetyConfig, templates: Sequence[Template], judges: Sequence[Judge]) -> dict[str, Any]:
    """What a rerun must share with the stored run to continue it (the templates by name and text)."""
    identity = {k: getattr(config, k) for k in IDENTITY_FIELDS}
    identity["sparsities"] = [float(x) for x in config.sparsities]
    identity["templates"] = {t.name: hashlib.sha256(t.text.encode()).hexdigest()[:16] for t in templates}
    identity["judges"] = [j.name for j in judges] + ([f"chat:{config.judge_model}"] if config.judge_model else [])
    return identity


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM (a scheduler's or `kill`'s stop) stops a study as Ctrl-C does: cleanly, after
    writing the partial summaries. The previous handler comes back after the block (a process that forks
    workers later must not hand them this one); outside the main thread nothing is changed."""
    import signal
    import threading

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_study(config: SafetyConfig, out_dir: str | Path, *, overwrite: bool = False, log: Log = print,
              loader: Callable[[str], Any] | None = None, judges: Sequence[Judge] | None = None) -> dict[str, Any]:
    """Run (or continue) the whole study in `out_dir`; returns results.json's content.

    `loader` maps a model spec to a LoadedModel (default: prunekit.models.load_model) — tests pass tiny models.
    Every input is checked before any work; a rerun of the same command continues where the last one stopped.
    """
    started = time.perf_counter()
    sparsities = check_sparsities(config.sparsities)
    if config.method != "wanda" and not sparsities:
        raise PrunekitError("--method needs --sparsities")
    check_positive({"--max-new-tokens": config.max_new_tokens, "--batch-size": config.batch_size,
                    "--nsamples": config.nsamples, "--seqlen": config.seqlen, "--limit": config.limit,
                    "--analyses-limit": config.analyses_limit})
    check_device(config.device)
    check_layers(config.layers)
    if config.generation not in GENERATIONS:
        raise PrunekitError(f"unknown --generation {config.generation!r}; expected {' or '.join(GENERATIONS)}")
    if config.prompt_format not in ("auto", "chat", "plain"):
        raise PrunekitError(f"unknown --format {config.prompt_format!r}; expected auto, chat or plain")
    tasks, available = load_suite(config.tasks, config.template_files)
    templates = select_templates(config.templates, available)
    tasks = subset(tasks, config.limit)
    harmful = build_prompts(tasks, templates)
    benign: list[Prompt] = []
    if config.benign:
        benign = build_prompts(subset(read_tasks(config.benign), config.limit), templates)
    if sparsities:
        from prunekit.methods import build_method

        build_method(config.method, None)
    judge_list: list[Judge] = list(judges) if judges is not None else [PrefixJudge()]
    identity = run_identity(config, templates, judge_list)
    dense_source = check_dense_source(config.dense_from, identity) if config.dense_from else None
    out, resumed = prepare_run_dir(out_dir, identity, overwrite)
    if resumed:
        log(f"continuing the run in {out}")
    load = loader or (lambda spec: _load(spec, log))
    if config.judge_model:
        from prunekit.safety.judges import ChatJudge

        judged = load(config.judge_model)
        judge_list.append(ChatJudge(judged.model.to(config.device), judged.tokenizer, batch_size=config.batch_size))

    baseline = "reference" if config.reference else "dense"
    plan: list[tuple[str, float | None]] = []
    if config.reference:
        plan.append(("reference", None))
    plan.append(("model" if config.reference else "dense", None))
    plan += [(f"{config.method}-{s:g}", s) for s in sparsities]
    if dense_source is not None:
        unpruned = [name for name, target in plan if target is None]
        copied = copy_dense(dense_source, out, unpruned, {k: getattr(config, k) for k in MEASUREMENT_FIELDS})
        log(f"{'/'.join(unpruned)}: {copied} answers copied from {dense_source}")
    responses = out / "responses.jsonl"
    done = {record_key(r) for r in read_jsonl(responses)}
    prompts = [*(("harmful", p) for p in harmful), *(("benign", p) for p in benign)]
    loaded_cache: dict[str, Any] = {}

    def dense_model(spec: str) -> Any:
        if spec not in loaded_cache:
            loaded_cache.clear()  # one model in memory at a time
            item = load(spec)
            item.model.to(config.device)
            loaded_cache[spec] = item
        return loaded_cache[spec]

    # a variant skipped as complete keeps the provenance recorded when it was generated
    earlier = out / "results.json"
    provenance: dict[str, Any] = dict(json.loads(earlier.read_text(encoding="utf-8")).get("provenance") or {}
                                      if earlier.is_file() else {})
    changed = False
    try:
        for name, target in plan:
            folder = out / "variants" / name
            info_path = folder / "info.json"
            info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else {}
            missing = any((name, kind, p.template, str(p.task.id)) not in done for kind, p in prompts)
            wants = (config.analyses and "analyses" not in info) or (config.ppl_source and "perplexity" not in info)
            if not missing and not wants and info:
                log(f"{name}: complete on disk, skipped")
                if info.get("provenance"):
                    provenance.setdefault(name, info["provenance"])
                continue
            changed = True
            spec = config.reference if name == "reference" else config.model
            loaded = dense_model(spec)
            provenance[name] = getattr(loaded, "provenance", {})
            model = loaded.model
            if target is not None:
                model = _pruned_variant(name, target, loaded, folder, config, log)
                info["prune"] = json.loads((folder / "prune.json").read_text(encoding="utf-8"))
                sparsity = float(target)
            else:
                sparsity = measured_sparsity(model) if name == "model" else 0.0
            session = generate_variant(name, sparsity, model, loaded.tokenizer, prompts, done, config, judge_list,
                                       responses, log)
            info.setdefault("sessions", []).append(session)
            info.update(sparsity=sparsity, format=resolve_mode(loaded.tokenizer, config.prompt_format),  # type: ignore[arg-type]
                        provenance=provenance[name])
            variant_measurements(model, loaded.tokenizer, harmful, tasks, config, info,
                                 lambda m, variant=name: log(f"{variant}: {m}"))
            atomic_write_json(info_path, info, indent=None)
            if model is not loaded.model:
                del model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    except KeyboardInterrupt:  # a stop (Ctrl-C, or SIGTERM where the caller maps it): summarize what is on disk
        loaded_cache.clear()
        log("stopped: every finished batch is on disk; writing the partial summaries (the same command continues)")
        if read_jsonl(responses):
            try:
                finish_run(out, config, templates, tasks, harmful, benign, baseline, [n for n, _ in plan], log,
                           seconds=time.perf_counter() - started, provenance=provenance)
            except Exception as error:  # the stop goes on; the answers are on disk already
                log(f"warning: partial summaries not written: {type(error).__name__}: {error}")
        raise
    loaded_cache.clear()
    if not changed and earlier.is_file():  # nothing new: the summary of the sessions that did the work stands
        log("every variant complete: results.json kept as it is")
        return json.loads(earlier.read_text(encoding="utf-8"))
    results = finish_run(out, config, templates, tasks, harmful, benign, baseline, [n for n, _ in plan], log,
                         seconds=time.perf_counter() - started, provenance=provenance)
    return results


def _pruned_variant(name: str, target: float, loaded: Any, folder: Path, config: SafetyConfig, log: Log) -> Any:
    """The pruned copy of the dense model: from the run folder when an earlier session saved it, else pruned
    now (and saved once)."""
    masks = folder / "pruned.safetensors"
    if masks.is_file() and (folder / "prune.json").is_file():
        log(f"{name}: reusing the saved pruned variant")
        return load_pruned(loaded.model, masks)
    from prunekit.api import prune

    log(f"{name}: pruning a copy of the model ({config.layers} layers)")
    pruned = copy.deepcopy(loaded.model)
    report = prune(pruned, method=config.method, sparsity=target, calibration=config.calib or "self",
                   tokenizer=loaded.tokenizer, nsamples=config.nsamples, seqlen=config.seqlen, seed=config.seed,
                   skip=list(LAYER_SKIPS[config.layers]) or None, device=config.device, progress=False)
    pruned_layers = [r.name for r in report.engine.layers if r.pruned]
    meta = {"overall_sparsity": report.overall_sparsity, "all_linear_sparsity": measured_sparsity(pruned),
            "seconds": report.seconds, "calibration": report.calibration, "method": report.method,
            "layers": config.layers, "pruned_layers": len(pruned_layers),
            "pruned_layer_kinds": sorted({n.rsplit(".", 1)[-1] for n in pruned_layers})}
    save_pruned(loaded.model, pruned, masks, {"variant": name, "sparsity": target})
    atomic_write_json(folder / "prune.json", meta, indent=1)
    return pruned


def run_throughput(config: SafetyConfig, out_dir: str | Path, *, overwrite: bool = False, log: Log = print,
                   loader: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """`--throughput-study`: old vs new generation path on the same prompts; writes ``throughput.json``."""
    from prunekit.safety.throughput import throughput_study

    check_positive({"--max-new-tokens": config.max_new_tokens, "--batch-size": config.batch_size,
                    "--limit": config.limit})
    check_device(config.device)
    _, available = load_suite(config.tasks, config.template_files)
    select_templates(config.templates, available)
    out = check_output_dir(out_dir, overwrite)
    loaded = (loader or (lambda spec: _load(spec, log)))(config.model)
    loaded.model.to(config.device)
    study = throughput_study(loaded, config, log)
    out.mkdir(parents=True, exist_ok=True)
    write_marker(out, "safety")
    atomic_write_json(out / "throughput.json", study, indent=1)
    return study
