"""A study's results from its stored answers: results.json, the plot and the report at the end of every run, and
re-judging (``resummarize``). Everything is computed from responses.jsonl and the variants' info.json, so a
re-judged or carried run gives its results without generating; every file is replaced whole.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prunekit.errors import PrunekitError
from prunekit.files import atomic_write_json, atomic_write_text, read_jsonl
from prunekit.safety.config import Log, SafetyConfig
from prunekit.safety.data import Prompt, Task, Template
from prunekit.safety.judges import Judge, apply_judges, write_records
from prunekit.safety.state import mark_state
from prunekit.safety.summary import (
    analysis_tables,
    compare_analyses,
    plot_refusal,
    report_section,
    summarize_records,
)


def _variant_infos(out: Path, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    infos = {}
    for name in names:
        path = out / "variants" / name / "info.json"
        if path.is_file():
            infos[name] = json.loads(path.read_text(encoding="utf-8"))
    return infos


def _generation_stats(records: Sequence[dict[str, Any]], name: str, config: SafetyConfig) -> dict[str, Any]:
    """Throughput of a variant from its stored answers (summed over every session of the run)."""
    rows = [r for r in records if r["variant"] == name]
    seconds = sum(r.get("seconds", 0.0) for r in rows)
    ended = defaultdict(int)
    for r in rows:
        ended[r.get("ended", "?")] += 1
    return {"prompts": len(rows), "seconds": seconds, "prompts_per_s": len(rows) / seconds if seconds else None,
            "new_tokens": sum(r.get("new_tokens", 0) for r in rows), "ended": dict(ended),
            "batch_size": config.batch_size, "max_new_tokens": config.max_new_tokens, "path": config.generation}


def finish_run(out: Path, config: SafetyConfig, templates: Sequence[Template], tasks: Sequence[Task],
               harmful: Sequence[Prompt], benign: Sequence[Prompt], baseline: str, names: Sequence[str], log: Log,
               *, seconds: float, provenance: dict[str, Any]) -> dict[str, Any]:
    """Summaries from the stored answers: results.json first, then the plot and the report, each written whole;
    a failing plot or report is logged and recorded, never fatal (the answers are on disk already)."""
    records = read_jsonl(out / "responses.jsonl")
    names_present = [n for n in names if any(r["variant"] == n for r in records)]
    judge_names = list(dict.fromkeys(k for r in records for k in r["verdicts"]))
    summaries = {j: summarize_records(records, j, baseline) for j in judge_names}
    main_summary = summaries[judge_names[0]]
    infos = _variant_infos(out, names_present)
    variants = {}
    for name in names_present:
        info = infos.get(name, {})
        variants[name] = {"sparsity": info.get("sparsity"), "format": info.get("format"),
                          "generation": _generation_stats(records, name, config),
                          **{k: info[k] for k in ("prune", "perplexity") if k in info}}
    expected = len(harmful) + len(benign)
    results: dict[str, Any] = {
        "config": asdict(config),
        "counts": {"tasks": len(tasks), "templates": [t.name for t in templates], "harmful_prompts": len(harmful),
                   "benign_prompts": len(benign), "answers": len(records), "expected_answers": expected * len(names),
                   "complete": len(records) >= expected * len(names)},
        "provenance": provenance,
        "prune": {n: v["prune"] for n, v in variants.items() if "prune" in v},
        "variants": variants,
        "summary": main_summary,
        "summaries_by_judge": summaries,
        "analyses": {"tables": analysis_tables(infos), "vs_baseline": compare_analyses(infos, baseline)}
        if config.analyses else None,
        "seconds": seconds,
    }
    if config.analyses:
        atomic_write_json(out / "analyses.json", {n: i.get("analyses") for n, i in infos.items()}, indent=None)
    atomic_write_json(out / "results.json", results, indent=1)
    problems = []
    try:
        plot_refusal(main_summary, out / "refusal_vs_sparsity.png", f"{config.model}: refusal rate vs sparsity")
    except Exception as error:
        problems.append(f"plot: {type(error).__name__}: {error}")
    try:
        atomic_write_text(out / "report.md", report_section(results))
    except Exception as error:
        problems.append(f"report: {type(error).__name__}: {error}")
    for problem in problems:
        log(f"warning: {problem} (the answers and results.json are saved)")
    if problems:
        results["problems"] = problems
        atomic_write_json(out / "results.json", results, indent=1)
    mark_state(out, "complete" if results["counts"]["complete"] else "partial",
          {"answers": len(records), "expected_answers": expected * len(names)})
    return results


def resummarize(out_dir: str | Path, judges: Sequence[Judge] | None = None) -> dict[str, Any]:
    """Re-judge a run's responses.jsonl (optionally with new judges) and rewrite its summaries; every file is
    replaced whole through a temporary file (never rewritten in place)."""
    from prunekit.safety.judges import read_records

    out = Path(out_dir)
    records = read_records(out / "responses.jsonl")
    if judges:
        carried = sum(bool(r.get("text_not_carried")) for r in records)
        if carried:
            raise PrunekitError(f"{out}: {carried} answers were carried from another machine without their text "
                                "(benchmarks/safety.py --export-carry); re-judging needs the answers: re-judge "
                                "where they were generated, or summarize without new judges")
        apply_judges(records, judges)
        write_records(records, out / "responses.jsonl")
    results = json.loads((out / "results.json").read_text())
    baseline = results["summary"]["baseline"]
    names = list(dict.fromkeys(k for r in records for k in r["verdicts"]))
    results["summaries_by_judge"] = {n: summarize_records(records, n, baseline) for n in names}
    results["summary"] = results["summaries_by_judge"][names[0]]
    atomic_write_json(out / "results.json", results, indent=1)
    return results
