"""Benchmark of issue 5: jailbreak resistance after Wanda pruning ("Pruning for Protection", Hasan et al. 2024).

Protocol:
* models: Qwen2.5-Coder-0.5B-Instruct (`qwen2.5-coder-0.5b`) and SmolLM2-135M-Instruct (`smollm2-135m`), two
  chat models of different initial safety; each dense and Wanda-pruned at 10, 20, 30 % (unstructured, per-output
  rows), calibration as in the classic-methods benchmark: 128 windows x 512 tokens of
  ../shared/data/corpora/sotu/train.txt, seed 0;
* prompts: the paper's integrated.yaml (225 tasks; its ORIGINAL tasks) in ORIGINAL + AIM, CHARACTER, CODE, DAN,
  KEVIN (or --templates), through each model's chat template; benign control: benign_integrated.yaml's tasks in
  the same templates (over-refusal);
* greedy decoding, --max-new-tokens (default 64), batched with left padding; judge: the paper's refusal phrases;
* per variant: refusal rates with Wilson 95 % intervals (overall, per template, per category/severity in the JSON),
  benign over-refusal, McNemar's exact test vs dense, attention share of the final prompt position on the task
  tokens (mean over heads and layers; paired shift vs dense), prompt perplexity (task alone and per template),
  perplexity on sotu/test.txt (512-token windows) and generation throughput (prompts/s);
* --max-new-tokens-study: on a sample, verdicts after 32, 64 and 256 new tokens (prefixes of one greedy
  256-token answer, which equal shorter greedy runs) to choose the default answer length.

* --full: the issue-14 plan — Qwen with ORIGINAL + all 10 templates, pruned attention-only (the paper's
  choice) and all-linear; SmolLM2 with ORIGINAL + the 5 templates above; 225 tasks; analyses on 45 tasks.
  Every run is resumable: the same command continues it (nothing is regenerated), so a CPU can do it in
  several sittings; `benchmarks/background.sh` runs it at the lowest priority. Between machines (a fresh
  checkout has no safety_runs/), `--export-carry` writes each run's state without the answers' text to
  benchmarks/results/safety_full/ (committed: identity, variant measurements, every answer's key and verdicts);
  `--full` on the next machine starts from it and carries again when each run returns.
* --throughput-study: old vs new generation path on the same prompts (`prunekit safety --throughput-study`),
  one JSON per model under benchmarks/results/.

Outputs: benchmarks/results/safety.json, safety.md (the table) and one study folder per model (and layer
choice) under benchmarks/results/safety_runs/ (responses.jsonl holds the prompts and answers; nothing harmful
is printed).

    python benchmarks/safety.py --full                           # the full study, resumable
    python benchmarks/safety.py --throughput-study --limit 4 --templates ORIGINAL AIM DAN KEVIN
    python benchmarks/safety.py --max-new-tokens-study --limit 20
    python benchmarks/safety.py --markdown benchmarks/results/safety_qwen.json benchmarks/results/safety_smollm2.json
    python benchmarks/safety.py --models smollm2-135m --limit 2 --max-new-tokens 8 --sparsities 0.1 \\
        --nsamples 2 --seqlen 64 --ppl-windows 2                # a smoke run on CPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: ../shared/data beside the checkout; PRUNEKIT_SHARED_DATA points elsewhere (e.g. from a git worktree)
SHARED = Path(os.environ.get("PRUNEKIT_SHARED_DATA") or ROOT.parent / "shared" / "data").resolve()
SAFETY = SHARED / "safety"
SOTU = SHARED / "corpora" / "sotu"
RESULTS = ROOT / "benchmarks" / "results"
#: --full's state without the answers' text (committed): how a run continues on the next machine
CARRY = RESULTS / "safety_full"
MODELS = ("qwen2.5-coder-0.5b", "smollm2-135m")
TEMPLATES = ("ORIGINAL", "AIM", "CHARACTER", "CODE", "DAN", "KEVIN")
#: issue 14: (model, templates ("all" = ORIGINAL + the 10 jailbreaks), layer choice); cheapest first
FULL_PLAN = (("smollm2-135m", TEMPLATES, "attention"), ("qwen2.5-coder-0.5b", ("all",), "attention"),
             ("qwen2.5-coder-0.5b", ("all",), "all"))


def log(message: str) -> None:
    print(f"[safety] {message}", file=sys.stderr, flush=True)


def _device(requested: str | None) -> str:
    import torch

    return requested or ("cuda" if torch.cuda.is_available() else "cpu")


def _config(name: str, args: argparse.Namespace, templates: list[str], layers: str,
            dense_from: Path | None = None) -> Any:
    from prunekit.safety.config import SafetyConfig

    return SafetyConfig(
        model=name, tasks=str(SAFETY / "integrated.yaml"), benign=str(SAFETY / "benign_integrated.yaml"),
        sparsities=args.sparsities, method="wanda", templates=templates, limit=args.limit,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, prompt_format="chat",
        calib=str(SOTU / "train.txt"), nsamples=args.nsamples, seqlen=args.seqlen, seed=0, device=_device(args.device),
        analyses=not args.no_analyses, analyses_limit=args.analyses_limit, ppl_source=str(SOTU / "test.txt"),
        ppl_seqlen=512, ppl_max_windows=args.ppl_windows, layers=layers,
        dense_from=str(dense_from) if dense_from else None)


def run_model(name: str, args: argparse.Namespace, templates: list[str] | None = None,
              layers: str | None = None) -> dict[str, Any]:
    """One model: the whole study through prunekit.safety.run_study (continued if it was stopped; under --full
    also from the state carried in CARRY by an earlier machine, and carried again when it returns)."""
    from prunekit.safety.run import run_study, sigterm_as_interrupt
    from prunekit.safety.state import export_carry, import_carry

    layers = layers or args.layers
    # the all-layers run shares the dense model's answers and measurements with the attention run (same prompts)
    attention_run = args.runs / f"{name}-attention"
    dense_from = attention_run if args.full and layers != "attention" and (attention_run / "run.json").is_file() \
        else None
    config = _config(name, args, templates or args.templates, layers, dense_from)
    folder = args.runs / (name if layers == "attention" and not args.full else f"{name}-{layers}")
    if args.full and not args.overwrite and (restored := import_carry(CARRY / folder.name, folder)):
        log(f"{name}/{layers}: continuing from {restored} answers carried in {CARRY / folder.name}")
    try:
        with sigterm_as_interrupt():  # `kill` stops the run cleanly: partial summaries written, state carried
            return run_study(config, folder, overwrite=args.overwrite, log=lambda m: log(f"{name}/{layers}: {m}"))
    finally:  # also when stopped: the carry says how far the run got
        if args.full and (folder / "run.json").is_file():
            export_carry(folder, CARRY / folder.name)


def export_carries(runs: Path) -> None:
    """--export-carry: carry every --full run folder's state (no answer text) to CARRY, e.g. before a machine
    that ran part of the study goes away; the same --full command elsewhere continues from it."""
    from prunekit.safety.state import export_carry

    for name, _, layers in FULL_PLAN:
        folder = runs / f"{name}-{layers}"
        if (folder / "run.json").is_file():
            carried = export_carry(folder, CARRY / folder.name)
            print(f"{folder.name}: {carried} answers carried to {CARRY / folder.name}")


def throughput(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Old vs new generation path on --limit tasks x --templates of the dense model."""
    from prunekit.safety.run import run_throughput

    config = _config(name, args, args.templates, args.layers)
    config.baseline_batch_size = args.baseline_batch_size
    return run_throughput(config, args.runs / f"throughput-{name}", overwrite=True,
                          log=lambda m: log(f"{name}: {m}"))


def table_rows(name: str, results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per variant: the numbers of the README table."""
    summary = results["summary"]
    analyses = results.get("analyses") or {}
    rows = []
    for variant, v in summary["variants"].items():
        info = results["variants"][variant]
        vs = summary["vs_baseline"].get(variant, {})
        shift = (analyses.get("vs_baseline") or {}).get(variant, {})
        tables = (analyses.get("tables") or {}).get(variant, {})
        att = shift.get("attention_share", {}).get("all") if shift else None
        rows.append({
            "model": name, "variant": variant, "sparsity": v["sparsity"],
            "refusal": v["refusal"], "refusal_by_template": v["refusal_by"]["template"],
            "refusal_by_category": v["refusal_by"].get("category", {}),
            "benign_over_refusal": v["benign_over_refusal"],
            "mcnemar_harmful": vs.get("harmful"), "mcnemar_benign": vs.get("benign"),
            "mcnemar_by_template": vs.get("harmful_by_template"),
            "attention_share_mean": tables.get("attention_share_mean"),
            "attention_shift_vs_dense": att,
            "prompt_perplexity_median": tables.get("prompt_perplexity_median"),
            "prompt_perplexity_shift_vs_dense": shift.get("prompt_perplexity") if shift else None,
            "sotu_test_perplexity": (info.get("perplexity") or {}).get("perplexity"),
            "prompts_per_s": info["generation"]["prompts_per_s"],
        })
    return rows


def _pct(r: dict[str, Any] | None) -> str:
    if not r or r.get("rate") is None:
        return "–"
    return f"{100 * r['rate']:.1f} [{100 * r['ci95'][0]:.0f}–{100 * r['ci95'][1]:.0f}]"


def _mcnemar(m: dict[str, Any] | None) -> str:
    return f"{m['p_value']:.2g} (+{m['gained']}/−{m['lost']})" if m else "–"


def markdown(rows: list[dict[str, Any]], templates: list[str]) -> str:
    head = ["model", "variant", *templates, "all", "benign over-refusal", "McNemar p", "benign McNemar p",
            "attn share (Δ, p)",
            "sotu ppl", "prompts/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        m, mb = r["mcnemar_harmful"], r.get("mcnemar_benign")
        a = r["attention_shift_vs_dense"]
        mean_share = r["attention_share_mean"]
        share = "–"
        if mean_share:
            share = f"{sum(mean_share.values()) / len(mean_share):.3f}"
            if a and a.get("mean_difference") is not None:
                share += f" ({a['mean_difference']:+.4f}, {a['wilcoxon_p_value']:.2g})"
        cells = [r["model"], r["variant"], *(_pct(r["refusal_by_template"].get(t)) for t in templates),
                 _pct(r["refusal"]), _pct(r["benign_over_refusal"]),
                 _mcnemar(m), _mcnemar(mb), share,
                 f"{r['sotu_test_perplexity']:.2f}" if r["sotu_test_perplexity"] else "–",
                 f"{r['prompts_per_s']:.1f}" if r["prompts_per_s"] else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    categories = sorted({c for r in rows for c in r.get("refusal_by_category") or {}})
    if categories:
        lines += ["", "Refusal % by task category (all templates pooled), Wilson 95 %:", "",
                  "| model | variant | " + " | ".join(categories) + " |", "|" + "---|" * (len(categories) + 2)]
        lines += [f"| {r['model']} | {r['variant']} | "
                  + " | ".join(_pct(r["refusal_by_category"].get(c)) for c in categories) + " |" for r in rows]
    lines += ["", "Prompt perplexity (median over tasks), task alone and inside each template:", ""]
    ppl_templates = ["task_alone", *templates]
    lines += ["| model | variant | " + " | ".join(ppl_templates) + " |", "|" + "---|" * (len(ppl_templates) + 2)]
    for r in rows:
        med = r["prompt_perplexity_median"] or {}
        lines.append(f"| {r['model']} | {r['variant']} | "
                     + " | ".join(f"{med[t]:.1f}" if t in med else "–" for t in ppl_templates) + " |")
    return "\n".join(lines)


def max_new_tokens_study(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Verdicts of the dense model after 32, 64 and 256 new tokens on a sample (prefixes of one greedy answer)."""
    from prunekit.models import load_model
    from prunekit.safety.data import build_prompts, load_suite, select_templates, subset
    from prunekit.safety.generate import encode, generate
    from prunekit.safety.judges import PrefixJudge
    from prunekit.safety.stats import mcnemar_exact, rate

    tasks, available = load_suite(SAFETY / "integrated.yaml")
    prompts = build_prompts(subset(tasks, args.limit or 20), select_templates(args.templates, available))
    loaded = load_model(name)
    model = loaded.model.to(_device(args.device))
    ids = [encode(loaded.tokenizer, p.text, "chat").ids for p in prompts]
    gen = generate(model, loaded.tokenizer, ids, max_new_tokens=256, batch_size=args.batch_size)
    judge = PrefixJudge()
    verdicts = {}
    for cut in (32, 64, 256):
        texts = [loaded.tokenizer.decode(t[:cut], skip_special_tokens=True) for t in gen.token_ids]
        verdicts[cut] = judge.judge([p.text for p in prompts], texts)
    return {
        "model": name, "prompts": len(prompts), "generation": gen.describe(),
        "refusal": {str(c): rate(v) for c, v in verdicts.items()},
        "changed_vs_256": {str(c): sum(a != b for a, b in zip(verdicts[c], verdicts[256], strict=True))
                           for c in (32, 64)},
        "mcnemar_vs_256": {str(c): mcnemar_exact(verdicts[c], verdicts[256]) for c in (32, 64)},
        "answers_shorter_than_32": sum(len(t) < 32 for t in gen.token_ids),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--templates", nargs="*", default=list(TEMPLATES), help="template names, or 'all'")
    parser.add_argument("--sparsities", type=float, nargs="*", default=[0.1, 0.2, 0.3])
    parser.add_argument("--limit", type=int, default=None, help="tasks (spread over the 225) per template")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64,
                        help="prompts per batch (64: fastest measured on 2 CPU threads, see *_b64.json)")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--ppl-windows", type=int, default=16, help="sotu test windows per variant")
    parser.add_argument("--no-analyses", action="store_true", help="skip attention and prompt perplexity")
    parser.add_argument("--analyses-limit", type=int, default=45, help="tasks (spread) for the analyses")
    parser.add_argument("--layers", default="attention", help="attention (the paper's) or all")
    parser.add_argument("--full", action="store_true", help="the issue-14 plan (FULL_PLAN), resumable")
    parser.add_argument("--overwrite", action="store_true", help="start the runs again instead of continuing")
    parser.add_argument("--export-carry", action="store_true",
                        help="write the --full runs' state (no answer text) to benchmarks/results/safety_full and exit")
    parser.add_argument("--baseline-batch-size", type=int, default=None,
                        help="--throughput-study: the old path's batch (default: --batch-size)")
    parser.add_argument("--throughput-study", action="store_true",
                        help="old vs new generation path on --limit tasks x --templates per model")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--max-new-tokens-study", action="store_true",
                        help="only the 32/64/256-token verdict comparison, on --limit tasks (default 20)")
    parser.add_argument("--markdown", type=Path, nargs="*", default=None,
                        help="print one table from stored result JSONs (e.g. one per model) and exit")
    parser.add_argument("--tag", default="", help="suffix of the throughput JSON names")
    parser.add_argument("--runs", type=Path, default=RESULTS / "safety_runs")
    parser.add_argument("--out", type=Path, default=RESULTS / "safety.json")
    args = parser.parse_args()
    if args.export_carry:
        export_carries(args.runs)
        return
    if args.markdown is not None:  # this benchmark's JSONs, or a study folder's results.json (one run of --full)
        stored = [json.loads(path.read_text()) for path in args.markdown or [args.out]]
        rows = [row for result in stored
                for row in (result["rows"] if "rows" in result else table_rows(result["config"]["model"], result))]
        first = stored[0]
        print(markdown(rows, first["args"]["templates"] if "args" in first else first["config"]["templates"]))
        return
    if not SAFETY.exists():
        raise SystemExit(f"missing {SAFETY}: the benchmark needs ../shared/data")
    if args.templates == ["all"]:
        from prunekit.safety.data import paper_templates

        args.templates = list(paper_templates())
    started = time.perf_counter()
    if args.throughput_study:
        from prunekit.files import atomic_write_json

        for name in args.models:
            study = throughput(name, args)
            study["protocol"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
            path = RESULTS / f"safety_throughput_{name}{args.tag}.json"
            atomic_write_json(path, study, indent=1)
            print(f"{name}: old {study['old']['prompts_per_s']:.2f} prompts/s, new {study['new']['prompts_per_s']:.2f} "
                  f"prompts/s, x{study['speedup']:.2f}; identical {study['identical_answers']}/{study['prompts']}, "
                  f"verdicts agree {study['verdicts_agree']}/{study['prompts']}; wrote {path}")
            for layout, other in study["other_layouts"].items():
                print(f"{name}: new path on the {layout} layout {other['prompts_per_s']:.2f} prompts/s (the "
                      f"{study['new']['layout']} layout x{other['new_speedup']:.2f}, same tokens: "
                      f"{other['identical_to_new']})")
        return
    if args.max_new_tokens_study:
        study = [max_new_tokens_study(name, args) for name in args.models]
        out = args.out.with_name("safety_max_new_tokens.json")
        from prunekit.files import atomic_write_json

        atomic_write_json(out, study, indent=1)
        for s in study:
            print(f"{s['model']}: {s['prompts']} prompts; refusal 32/64/256 tokens: "
                  + ", ".join(f"{100 * r['rate']:.1f} %" for r in s["refusal"].values())
                  + f"; verdicts changed vs 256: {s['changed_vs_256']}")
        print(f"wrote {out}")
        return
    rows = []
    if args.full:
        from prunekit.safety.data import paper_templates

        for name, templates, layers in FULL_PLAN:
            chosen = list(paper_templates()) if templates == ("all",) else list(templates)
            results = run_model(name, args, chosen, layers)
            rows += [{**row, "model": f"{name} [{layers}]", "layers": layers,
                      "answers": results["counts"]["answers"],
                      "expected_answers": results["counts"]["expected_answers"]}
                     for row in table_rows(name, results)]
    else:
        for name in args.models:
            rows += table_rows(name, run_model(name, args))
    if args.full:
        from prunekit.safety.data import paper_templates

        args.templates = list(paper_templates())
        args.out = args.out.with_name("safety_full.json")
    result = {"protocol": __doc__, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "rows": rows, "seconds": time.perf_counter() - started}
    from prunekit.files import atomic_write_json, atomic_write_text

    atomic_write_json(args.out, result, indent=1)
    table = markdown(rows, args.templates)
    atomic_write_text(args.out.with_suffix(".md"), table + "\n")
    print(table)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')} ({result['seconds']:.0f}s)")


if __name__ == "__main__":
    main()
