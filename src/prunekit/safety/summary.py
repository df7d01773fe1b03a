"""A study's numbers from its stored answers: refusal rates with Wilson intervals per template, category and
severity, McNemar tests against the baseline, the analyses' comparisons, and their table, plot and report.

Everything here is recomputable from `responses.jsonl` and the variants' `info.json`, so re-judging or a
failed plot never needs the models again.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prunekit.errors import PrunekitError
from prunekit.files import atomic_savefig
from prunekit.safety.stats import error_bar, mcnemar_exact, paired_difference, rate


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
    # tab10 repeats its colours after ten lines (the paper has 10 templates plus ORIGINAL): tab20 and a marker
    # per line keep every template distinguishable
    colors = plt.get_cmap("tab20" if len(templates) > 10 else "tab10").colors
    markers = "os^Dv<>PXh"
    for index, template in enumerate([*templates, None]):
        dodge = (index - len(templates) / 2) * span / 150  # keep overlapping error bars apart
        xs, ys, lo, hi = [], [], [], []
        for _, v in variants:
            r = v["refusal"] if template is None else v["refusal_by"]["template"].get(template)
            if r is None or r["rate"] is None:
                continue
            xs.append(100 * (v["sparsity"] or 0.0) + dodge)
            ys.append(r["rate"])
            below, above = error_bar(r)
            lo.append(below)
            hi.append(above)
        if template is None:  # every harmful prompt pooled
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, color="black", linestyle="--", linewidth=2,
                        label="all templates")
        else:
            ax.errorbar(xs, ys, yerr=[lo, hi], marker=markers[index % len(markers)], capsize=3,
                        color=colors[index % len(colors)], label=template)
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


def _fmt_speed(gen: dict[str, Any] | None) -> str:
    speed = (gen or {}).get("prompts_per_s")
    return "–" if speed is None else f"{speed:.2f}"


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
        _fmt_speed(results["variants"].get(n, {}).get("generation")) for n in names) + " |")
    lines += ["", "McNemar exact test vs the baseline (gained = newly refused, lost = no longer); a gain on harmful "
              "prompts without one on benign prompts is specific to harm, not a general rise in refusing:", ""]
    for name, c in summary["vs_baseline"].items():
        for subset in ("harmful", "benign"):
            if h := c.get(subset):
                lines.append(f"- {name}, {subset}: +{h['gained']} / −{h['lost']} of {h['n']}, difference "
                             f"{100 * h['difference']:+.1f} points, p = {h['p_value']:.3g}")
    lines += ["", f"![refusal rate vs sparsity]({plot_name})", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# the study


def format_summary(results: dict[str, Any]) -> str:
    """A terminal summary: rates and p-values only, never a prompt or an answer."""
    summary = results["summary"]
    counts = results["counts"]
    lines = [f"refusal rate ({summary['judge']} judge, 95 % Wilson interval), {counts['tasks']} tasks:"]
    if not counts.get("complete", True):
        lines.insert(0, f"partial run: {counts['answers']} of {counts['expected_answers']} answers; run the same "
                        "command again to continue")
    for name, v in summary["variants"].items():
        gen = results["variants"].get(name, {}).get("generation")
        line = f"  {name:<14} sparsity {v['sparsity'] or 0:.3f}  harmful {_fmt_rate(v['refusal'])}"
        if v["benign_over_refusal"]:
            line += f"  benign over-refusal {_fmt_rate(v['benign_over_refusal'])}"
        lines.append(line + f"  {_fmt_speed(gen)} prompts/s")
        for template, r in v["refusal_by"]["template"].items():
            lines.append(f"      {template:<12} {_fmt_rate(r)}")
    for name, c in summary["vs_baseline"].items():
        h = c.get("harmful")
        if h:
            lines.append(f"  McNemar {name} vs {summary['baseline']}: +{h['gained']}/-{h['lost']} of {h['n']}, "
                         f"p = {h['p_value']:.3g}")
    return "\n".join(lines)
