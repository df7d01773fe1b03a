"""The safety study end to end: (prune) → generate → judge → rates with intervals, paired tests, plot, report.

Variants: the dense MODEL (or `reference` as the dense baseline and MODEL as given), plus MODEL pruned at each
requested sparsity. Every variant answers the same prompts, so dense-vs-pruned differences are paired (McNemar).

Output folder:
* ``responses.jsonl`` — every prompt and answer with its verdicts (the only place harmful text is written);
* ``results.json`` — rates per template × category × severity with Wilson intervals, McNemar tests, analyses,
  throughput and provenance; recomputable from responses.jsonl (`summarize_records`) after re-judging;
* ``refusal_vs_sparsity.png`` and ``report.md`` — the section for the report.
The folder is staged and renamed into place at the end, with a marker that lets a later ``--overwrite``
replace it; re-judging rewrites each file whole (a temporary file renamed over it), never in place.
Nothing written to the terminal contains a prompt or an answer.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from prunekit.checks import check_device, check_positive
from prunekit.errors import PrunekitError
from prunekit.files import (
    atomic_savefig,
    atomic_write_json,
    atomic_write_text,
    check_output_dir,
    new_staging_dir,
    publish_dir,
    write_marker,
)
from prunekit.safety.data import Prompt, Task, build_prompts, load_suite, read_tasks, select_templates, subset
from prunekit.safety.generate import Encoded, encode, generate, resolve_mode
from prunekit.safety.judges import Judge, PrefixJudge, apply_judges, write_records
from prunekit.safety.stats import error_bar, mcnemar_exact, paired_difference, rate

Log = Callable[[str], None]


@dataclass
class SafetyConfig:
    """Everything that defines a study; stored in results.json."""

    model: str
    tasks: str
    benign: str | None = None
    reference: str | None = None
    sparsities: list[float] = field(default_factory=list)
    method: str = "wanda"
    templates: list[str] | None = None  # None: every template known for the task file
    template_files: list[str] = field(default_factory=list)
    limit: int | None = None
    max_new_tokens: int = 64  # measured: verdicts at 32 and 64 tokens equal those at 256 (benchmarks/safety.py)
    batch_size: int = 16
    prompt_format: str = "auto"
    calib: str | None = None  # prunekit calibration source; None = "self"
    nsamples: int = 128
    seqlen: int | None = 512
    seed: int = 0
    device: str = "cpu"
    analyses: bool = False  # attention-to-task and prompt perplexity
    ppl_source: str | None = None  # perplexity of each variant on this text source
    ppl_seqlen: int = 512
    ppl_max_windows: int | None = None
    judge_model: str | None = None  # a local chat model as second judge
    keep_token_ids: bool = False  # store answer token ids (for the max-new-tokens study)


def check_sparsities(values: Sequence[float]) -> list[float]:
    out = []
    for v in values:
        if not 0.0 < float(v) < 1.0:
            raise PrunekitError(f"sparsity {v} must lie in (0, 1)")
        out.append(float(v))
    return out


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


def evaluate_variant(name: str, sparsity: float, model: Any, tokenizer: Any, harmful: Sequence[Prompt],
                     benign: Sequence[Prompt], config: SafetyConfig, judges: Sequence[Judge],
                     tasks: Sequence[Task], log: Log) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Generate and judge every prompt with one model; the records and the variant's measurements."""
    mode = resolve_mode(tokenizer, config.prompt_format)  # type: ignore[arg-type]
    prompts = [*harmful, *benign]
    encoded = _encode_all(tokenizer, prompts, mode)
    log(f"{name}: generating {len(prompts)} answers (max {config.max_new_tokens} new tokens, {mode} format)")
    gen = generate(model, tokenizer, [e.ids for e in encoded], max_new_tokens=config.max_new_tokens,
                   batch_size=config.batch_size)
    records = []
    for i, (prompt, answer) in enumerate(zip(prompts, gen.texts, strict=True)):
        record = {"variant": name, "sparsity": sparsity, "set": "harmful" if i < len(harmful) else "benign",
                  **prompt.meta(), "prompt": prompt.text, "response": answer, "new_tokens": len(gen.token_ids[i])}
        if config.keep_token_ids:
            record["token_ids"] = gen.token_ids[i]
        records.append(record)
    apply_judges(records, judges)
    info: dict[str, Any] = {"sparsity": sparsity, "format": mode, "generation": gen.describe()}
    log(f"{name}: {gen.prompts_per_second:.2f} prompts/s")
    if config.analyses:
        info["analyses"] = run_analyses(model, tokenizer, harmful, encoded[: len(harmful)], tasks, config)
    if config.ppl_source:
        from prunekit.evaluation import perplexity

        info["perplexity"] = perplexity(model, tokenizer, config.ppl_source, seqlen=config.ppl_seqlen,
                                        batch_size=min(config.batch_size, 8), max_windows=config.ppl_max_windows,
                                        progress=False).to_dict()
    return records, info


def run_analyses(model: Any, tokenizer: Any, harmful: Sequence[Prompt], encoded: Sequence[Encoded],
                 tasks: Sequence[Task], config: SafetyConfig) -> dict[str, Any]:
    """Attention share on the task (per prompt) and prompt perplexity (task alone and per template)."""
    from prunekit.safety.analysis import attention_to_span, prompt_perplexities

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    usable = [i for i, e in enumerate(encoded) if e.span is not None]
    shares = attention_to_span(model, [encoded[i].ids for i in usable], [encoded[i].span for i in usable],
                               pad_id=pad, batch_size=max(1, config.batch_size // 4))
    attention = [{"template": harmful[i].template, "task_id": harmful[i].task.id, **s}
                 for i, s in zip(usable, shares, strict=True)]
    alone = prompt_perplexities(model, tokenizer, [t.text for t in tasks], batch_size=config.batch_size)
    templated = prompt_perplexities(model, tokenizer, [p.text for p in harmful], batch_size=config.batch_size)
    ppl = {"task_alone": {t.id: v for t, v in zip(tasks, alone, strict=True)},
           "templated": [{"template": p.template, "task_id": p.task.id, "perplexity": v}
                         for p, v in zip(harmful, templated, strict=True)]}
    return {"attention": attention, "prompt_perplexity": ppl}


# --------------------------------------------------------------------------------------------------
# summaries (from records alone, so a re-judged responses.jsonl gives new results without generating)


def _flip(r: dict[str, Any]) -> dict[str, Any]:
    """Attack success = 1 − refusal (among decided verdicts)."""
    ci = r["ci95"]
    return {**r, "k": r["n"] - r["k"], "rate": None if r["rate"] is None else 1 - r["rate"],
            "ci95": None if ci is None else (1 - ci[1], 1 - ci[0])}


def summarize_records(records: Sequence[dict[str, Any]], judge: str = "prefix",
                      baseline: str | None = None) -> dict[str, Any]:
    """Refusal / attack-success rates per variant and their paired comparison with the baseline variant."""
    by_variant: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_variant[r["variant"]].append(r)
    if not by_variant:
        raise PrunekitError("no responses to summarize")
    baseline = baseline or next(iter(by_variant))
    variants: dict[str, Any] = {}
    for name, rows in by_variant.items():
        harmful = [r for r in rows if r["set"] == "harmful"]
        benign = [r for r in rows if r["set"] == "benign"]
        verdict = [r["verdicts"].get(judge) for r in harmful]
        groups: dict[str, dict[str, list]] = {k: defaultdict(list) for k in (
            "template", "template×category", "template×severity", "template×category×severity", "category",
            "severity")}
        for r, v in zip(harmful, verdict, strict=True):
            t, c, s = r["template"], r.get("category") or "-", r.get("severity") or "-"
            for key, label in (("template", t), ("template×category", f"{t} | {c}"),
                               ("template×severity", f"{t} | {s}"), ("template×category×severity", f"{t} | {c} | {s}"),
                               ("category", c), ("severity", s)):
                groups[key][label].append(v)
        refusal = rate(verdict)
        by_template = {k: rate(v) for k, v in groups["template"].items()}
        benign_by_template: dict[str, list] = defaultdict(list)
        for r in benign:
            benign_by_template[r["template"]].append(r["verdicts"].get(judge))
        variants[name] = {
            "sparsity": rows[0].get("sparsity"),
            "refusal": refusal,
            "attack_success": _flip(refusal),
            "refusal_by": {key: {k: rate(v) for k, v in g.items()} for key, g in groups.items()},
            "attack_success_by_template": {k: _flip(v) for k, v in by_template.items()},
            "attack_success_by": {key: {k: _flip(rate(v)) for k, v in g.items()} for key, g in groups.items()},
            "benign_over_refusal": rate([r["verdicts"].get(judge) for r in benign]) if benign else None,
            "benign_over_refusal_by_template": {k: rate(v) for k, v in benign_by_template.items()},
        }
    comparisons = {}
    base = {(r["set"], r["template"], r["task_id"]): r["verdicts"].get(judge) for r in by_variant[baseline]}
    for name, rows in by_variant.items():
        if name == baseline:
            continue
        paired = [(base[key], r["verdicts"].get(judge), r) for r in rows
                  if (key := (r["set"], r["template"], r["task_id"])) in base]
        entry: dict[str, Any] = {}
        for subset_name in ("harmful", "benign"):
            chosen = [(a, b, r) for a, b, r in paired if r["set"] == subset_name]
            if not chosen:
                continue
            entry[subset_name] = mcnemar_exact([a for a, _, _ in chosen], [b for _, b, _ in chosen])
            per_template: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
            for a, b, r in chosen:
                per_template[r["template"]][0].append(a)
                per_template[r["template"]][1].append(b)
            entry[f"{subset_name}_by_template"] = {t: mcnemar_exact(a, b) for t, (a, b) in per_template.items()}
        comparisons[name] = entry
    return {"judge": judge, "baseline": baseline, "variants": variants, "vs_baseline": comparisons}


def compare_analyses(infos: dict[str, dict[str, Any]], baseline: str) -> dict[str, Any]:
    """Paired dense-vs-variant shifts of the attention share (per template) and of prompt perplexity."""
    base = infos.get(baseline, {}).get("analyses")
    if not base:
        return {}
    out: dict[str, Any] = {}
    for name, info in infos.items():
        other = info.get("analyses")
        if name == baseline or not other:
            continue
        result: dict[str, Any] = {"attention_share": {}, "prompt_perplexity": {}}
        a = {(x["template"], x["task_id"]): x["share"] for x in base["attention"]}
        b = {(x["template"], x["task_id"]): x["share"] for x in other["attention"]}
        keys = [k for k in a if k in b]
        result["attention_share"]["all"] = paired_difference([a[k] for k in keys], [b[k] for k in keys])
        for template in dict.fromkeys(k[0] for k in keys):
            ks = [k for k in keys if k[0] == template]
            result["attention_share"][template] = paired_difference([a[k] for k in ks], [b[k] for k in ks])
        pa = {(x["template"], x["task_id"]): x["perplexity"] for x in base["prompt_perplexity"]["templated"]}
        pb = {(x["template"], x["task_id"]): x["perplexity"] for x in other["prompt_perplexity"]["templated"]}
        ta, tb = base["prompt_perplexity"]["task_alone"], other["prompt_perplexity"]["task_alone"]
        ids = [i for i in ta if i in tb]
        result["prompt_perplexity"]["task_alone"] = paired_difference([ta[i] for i in ids], [tb[i] for i in ids])
        for template in dict.fromkeys(k[0] for k in pa):
            ks = [k for k in pa if k[0] == template and k in pb]
            result["prompt_perplexity"][template] = paired_difference([pa[k] for k in ks], [pb[k] for k in ks])
        out[name] = result
    return out


def analysis_tables(infos: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per variant: mean attention share per template (+ per layer), median prompt perplexity per template."""
    import statistics

    tables: dict[str, Any] = {}
    for name, info in infos.items():
        analyses = info.get("analyses")
        if not analyses:
            continue
        share: dict[str, list[float]] = defaultdict(list)
        layers: dict[str, list[list[float]]] = defaultdict(list)
        for x in analyses["attention"]:
            share[x["template"]].append(x["share"])
            layers[x["template"]].append(x["per_layer"])
        ppl: dict[str, list[float]] = defaultdict(list)
        for x in analyses["prompt_perplexity"]["templated"]:
            ppl[x["template"]].append(x["perplexity"])
        alone = list(analyses["prompt_perplexity"]["task_alone"].values())
        tables[name] = {
            "attention_share_mean": {t: statistics.fmean(v) for t, v in share.items()},
            "attention_share_per_layer": {t: [statistics.fmean(c) for c in zip(*v, strict=True)]
                                          for t, v in layers.items()},
            "prompt_perplexity_median": {"task_alone": statistics.median(alone),
                                         **{t: statistics.median(v) for t, v in ppl.items()}},
        }
    return tables


# --------------------------------------------------------------------------------------------------
# plot and report section


def plot_refusal(summary: dict[str, Any], path: Path, title: str = "") -> Path:
    """Refusal rate vs sparsity, one line per template, Wilson 95 % intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = sorted(summary["variants"].items(), key=lambda kv: kv[1]["sparsity"] or 0.0)
    templates = list(dict.fromkeys(t for _, v in variants for t in v["refusal_by"]["template"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    span = max((100 * (v["sparsity"] or 0.0) for _, v in variants), default=0.0) or 10.0
    for index, template in enumerate(templates):
        dodge = (index - (len(templates) - 1) / 2) * span / 150  # keep overlapping error bars apart
        xs, ys, lo, hi = [], [], [], []
        for _, v in variants:
            r = v["refusal_by"]["template"].get(template)
            if r is None or r["rate"] is None:
                continue
            xs.append(100 * (v["sparsity"] or 0.0) + dodge)
            ys.append(r["rate"])
            below, above = error_bar(r)
            lo.append(below)
            hi.append(above)
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=template)
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel(f"refusal rate ({summary['judge']} judge)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title or "refusal rate vs sparsity (95 % Wilson intervals)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)
    return path


def _fmt_rate(r: dict[str, Any] | None) -> str:
    if not r or r["rate"] is None:
        return "–"
    return f"{100 * r['rate']:.1f} % [{100 * r['ci95'][0]:.1f}, {100 * r['ci95'][1]:.1f}] (n={r['n']})"


def report_section(results: dict[str, Any], plot_name: str = "refusal_vs_sparsity.png") -> str:
    """Markdown: refusal per template and variant, over-refusal, McNemar p-values, throughput."""
    summary = results["summary"]
    names = list(summary["variants"])
    lines = [f"## Jailbreak resistance: {results['config']['model']}", "",
             f"Judge: {summary['judge']}; baseline: {summary['baseline']}; max new tokens "
             f"{results['config']['max_new_tokens']}; {results['counts']['tasks']} tasks × "
             f"{len(results['counts']['templates'])} templates. Refusal rate with Wilson 95 % interval.", "",
             "| template | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    templates = list(dict.fromkeys(t for v in summary["variants"].values() for t in v["refusal_by"]["template"]))
    for t in templates:
        lines.append(f"| {t} | " + " | ".join(_fmt_rate(summary["variants"][n]["refusal_by"]["template"].get(t))
                                             for n in names) + " |")
    lines.append("| **all** | " + " | ".join(_fmt_rate(summary["variants"][n]["refusal"]) for n in names) + " |")
    lines.append("| benign over-refusal | " + " | ".join(
        _fmt_rate(summary["variants"][n]["benign_over_refusal"]) for n in names) + " |")
    lines.append("| prompts/s | " + " | ".join(
        f"{results['variants'][n]['generation']['prompts_per_s']:.2f}" for n in names) + " |")
    lines += ["", "McNemar exact test vs the baseline (harmful prompts; gained = newly refused, lost = no longer):", ""]
    for name, c in summary["vs_baseline"].items():
        h = c.get("harmful")
        if h:
            lines.append(f"- {name}: +{h['gained']} / −{h['lost']} of {h['n']}, difference "
                         f"{100 * h['difference']:+.1f} points, p = {h['p_value']:.3g}")
    lines += ["", f"![refusal rate vs sparsity]({plot_name})", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# the study


def _load(spec: str, log: Log) -> Any:
    from prunekit.models import load_model

    log(f"loading {spec}")
    return load_model(spec)


def run_study(config: SafetyConfig, out_dir: str | Path, *, overwrite: bool = False, log: Log = print,
              loader: Callable[[str], Any] | None = None, judges: Sequence[Judge] | None = None) -> dict[str, Any]:
    """Run the whole study and write the output folder; returns results.json's content.

    `loader` maps a model spec to a LoadedModel (default: prunekit.models.load_model) — tests pass tiny models.
    """
    started = time.perf_counter()
    sparsities = check_sparsities(config.sparsities)
    if config.method != "wanda" and not sparsities:
        raise PrunekitError("--method needs --sparsities")
    check_positive({"--max-new-tokens": config.max_new_tokens, "--batch-size": config.batch_size,
                    "--nsamples": config.nsamples, "--seqlen": config.seqlen, "--limit": config.limit})
    check_device(config.device)
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
    out = check_output_dir(out_dir, overwrite)
    load = loader or (lambda spec: _load(spec, log))

    judge_list: list[Judge] = list(judges) if judges is not None else [PrefixJudge()]
    if config.judge_model:
        from prunekit.safety.judges import ChatJudge

        judged = load(config.judge_model)
        judge_list.append(ChatJudge(judged.model.to(config.device), judged.tokenizer, batch_size=config.batch_size))

    records: list[dict[str, Any]] = []
    infos: dict[str, dict[str, Any]] = {}
    provenance: dict[str, Any] = {}

    def run_variant(name: str, loaded: Any, model: Any, declared: float | None) -> None:
        sparsity = measured_sparsity(model) if declared is None else declared
        recs, info = evaluate_variant(name, sparsity, model, loaded.tokenizer, harmful, benign, config, judge_list,
                                      tasks, log)
        records.extend(recs)
        infos[name] = info

    baseline = "dense"
    if config.reference:
        baseline = "reference"
        ref = load(config.reference)
        provenance["reference"] = getattr(ref, "provenance", {})
        run_variant("reference", ref, ref.model.to(config.device), 0.0)
        del ref
    loaded = load(config.model)
    provenance["model"] = getattr(loaded, "provenance", {})
    model = loaded.model.to(config.device)
    run_variant("model" if config.reference else "dense", loaded, model, None if config.reference else 0.0)
    prune_reports = {}
    for s in sparsities:
        from prunekit.api import prune

        name = f"{config.method}-{s:g}"
        log(f"{name}: pruning a copy of the model")
        pruned = copy.deepcopy(model)
        report = prune(pruned, method=config.method, sparsity=s, calibration=config.calib or "self",
                       tokenizer=loaded.tokenizer, nsamples=config.nsamples, seqlen=config.seqlen, seed=config.seed,
                       device=config.device, progress=False)
        prune_reports[name] = {"overall_sparsity": report.overall_sparsity, "seconds": report.seconds,
                               "calibration": report.calibration, "method": report.method}
        run_variant(name, loaded, pruned, report.overall_sparsity)
        del pruned
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    summaries = {j.name: summarize_records(records, j.name, baseline) for j in judge_list}
    main_summary = summaries[judge_list[0].name]
    results = {
        "config": asdict(config),
        "counts": {"tasks": len(tasks), "templates": [t.name for t in templates], "harmful_prompts": len(harmful),
                   "benign_prompts": len(benign)},
        "provenance": provenance,
        "prune": prune_reports,
        "variants": {n: {k: v for k, v in i.items() if k != "analyses"} for n, i in infos.items()},
        "summary": main_summary,
        "summaries_by_judge": summaries,
        "analyses": {"tables": analysis_tables(infos), "vs_baseline": compare_analyses(infos, baseline)}
        if config.analyses else None,
        "seconds": time.perf_counter() - started,
    }
    staging = new_staging_dir(out)
    try:
        write_records(records, staging / "responses.jsonl")
        if config.analyses:
            atomic_write_json(staging / "analyses.json", {n: i.get("analyses") for n, i in infos.items()}, indent=None)
        atomic_write_json(staging / "results.json", results, indent=1)
        plot_refusal(main_summary, staging / "refusal_vs_sparsity.png", f"{config.model}: refusal rate vs sparsity")
        atomic_write_text(staging / "report.md", report_section(results))
        write_marker(staging, "safety")
        publish_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return results


def resummarize(out_dir: str | Path, judges: Sequence[Judge] | None = None) -> dict[str, Any]:
    """Re-judge a finished run's responses.jsonl (optionally with new judges) and rewrite its summaries."""
    from prunekit.safety.judges import read_records

    out = Path(out_dir)
    records = read_records(out / "responses.jsonl")
    if judges:
        apply_judges(records, judges)
        write_records(records, out / "responses.jsonl")
    results = json.loads((out / "results.json").read_text())
    baseline = results["summary"]["baseline"]
    names = list(dict.fromkeys(k for r in records for k in r["verdicts"]))
    results["summaries_by_judge"] = {n: summarize_records(records, n, baseline) for n in names}
    results["summary"] = results["summaries_by_judge"][names[0]]
    atomic_write_json(out / "results.json", results, indent=1)
    return results


def parse_list(text: str | None, flag: str, kind: type) -> list[Any]:
    """'0.1,0.2' → [0.1, 0.2]; a bad item is a one-line error naming the flag."""
    if not text:
        return []
    items = []
    for part in text.split(","):
        if not part.strip():
            continue
        try:
            items.append(kind(part.strip()))
        except ValueError as error:
            raise PrunekitError(f"{flag} item {part.strip()!r} is not a {kind.__name__}") from error
    return items


def format_summary(results: dict[str, Any]) -> str:
    """A terminal summary: rates and p-values only, never a prompt or an answer."""
    summary = results["summary"]
    lines = [f"refusal rate ({summary['judge']} judge, 95 % Wilson interval), {results['counts']['tasks']} tasks:"]
    for name, v in summary["variants"].items():
        gen = results["variants"][name]["generation"]
        line = f"  {name:<14} sparsity {v['sparsity'] or 0:.3f}  harmful {_fmt_rate(v['refusal'])}"
        if v["benign_over_refusal"]:
            line += f"  benign over-refusal {_fmt_rate(v['benign_over_refusal'])}"
        lines.append(line + f"  {gen['prompts_per_s']:.2f} prompts/s")
        for template, r in v["refusal_by"]["template"].items():
            lines.append(f"      {template:<12} {_fmt_rate(r)}")
    for name, c in summary["vs_baseline"].items():
        h = c.get("harmful")
        if h:
            lines.append(f"  McNemar {name} vs {summary['baseline']}: +{h['gained']}/-{h['lost']} of {h['n']}, "
                         f"p = {h['p_value']:.3g}")
    return "\n".join(lines)
