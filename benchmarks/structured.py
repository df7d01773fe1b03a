"""Benchmark of structured pruning on SmolLM2-135M-Instruct: FLAP vs wanda-sp vs magnitude-sp, and SEAP.

Protocol (stated in the JSON):
  * calibration: FLAP's own, 1024 windows x 128 tokens from ../shared/data/corpora/sotu/train.txt, seed 0;
    one dense statistics pass serves every configuration (cached under benchmarks/results/cache/);
  * FLAP (WIFV, AL-AM, bias compensation), wanda-sp and magnitude-sp (UL-UM, no compensation) at 20/30/50 %
    of the block parameters; GQA rule `query-heads` (SmolLM2: 9 query heads over 3 KV heads);
  * every pruned model is saved, reloaded with prunekit.load (its logits checked against the in-memory model)
    and evaluated from the reloaded copy: perplexity on sotu/test.txt in non-overlapping 512-token windows
    (pinned protocol, no BOS; `--eval-windows N` keeps the first N windows), parameters, safetensors size;
  * speed on this CPU, fp32, torch.set_num_threads(--threads), default 1: when other jobs share the 2 cores,
    2 OpenMP threads spend their time waiting for each other (a 512-token prefill took 8.5 s with 2 threads and
    1.1 s with 1); on an idle machine `--threads 2` is faster and is reported as well. Prefill = one
    forward of 1 x 512 tokens building the KV cache, logits of the last position only (what generate() does);
    decode = 128 greedy tokens after a 32-token prompt, in two runtimes (prunekit.evaluation.speed): eager
    (transformers' generate(), dynamic cache) and compiled (static KV cache, one-token forward compiled by
    torch.compile/inductor, plain greedy loop; its tokens are checked equal to eager's). The compiled runtime
    strips the per-operator Python cost every model pays alike, so it shows what a served model gains.
    Dense and pruned are measured interleaved in the same process (median of `--repeats`), because absolute
    numbers drift; ratios are what to read.
  * SEAP (`--seap`): three Brown genres as tasks (first 80 % of each file = task prompts, last 20 % = its
    evaluation text); one model per task and the general one at 30 %; each evaluated on every genre.

    python benchmarks/structured.py                        # everything, then the table
    python benchmarks/structured.py --only flap-0.5        # one configuration (dense numbers are reused)
    python benchmarks/structured.py --decode-study         # only dense vs the three 50 % models, speed
    python benchmarks/structured.py --table                # print the table from the JSON
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
CORPORA = ROOT.parent / "shared" / "data" / "corpora"
SOTU = CORPORA / "sotu"
RESULTS = ROOT / "benchmarks" / "results" / "structured.json"
TABLE = ROOT / "benchmarks" / "results" / "structured.md"
CACHE = ROOT / "benchmarks" / "results" / "cache"
METHODS = {"flap": {"metric": "WIFV", "structure": "AL-AM"}, "wanda-sp": {}, "magnitude-sp": {}}
RATIOS = (0.2, 0.3, 0.5)
CONFIGS = [f"{m}-{r}" for m in METHODS for r in RATIOS]
SEAP_TASKS = ("h_government", "j_learned", "n_fiction_adventure")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- statistics (cached) -------------------------------------------------------------------------


def save_stats(stats, path: Path, meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for i, block in enumerate(stats):
        for kind in ("attn", "mlp"):
            stat = getattr(block, kind)
            tensors[f"{i}.{kind}.sum"] = stat.sum.cpu()
            tensors[f"{i}.{kind}.sum_squares"] = stat.sum_squares.cpu()
            tensors[f"{i}.{kind}.tokens"] = torch.tensor([stat.tokens])
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"meta": json.dumps(meta)})


def load_stats(path: Path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from prunekit.pruning.statistics import InputMeanVariance
    from prunekit.structured import BlockStatistics

    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as handle:
        meta = json.loads(handle.metadata()["meta"])
    blocks = []
    for i in range(len({k.split(".")[0] for k in tensors})):
        parts = []
        for kind in ("attn", "mlp"):
            total = tensors[f"{i}.{kind}.sum"]
            stat = InputMeanVariance(total.numel())
            stat.sum, stat.sum_squares = total, tensors[f"{i}.{kind}.sum_squares"]
            stat.tokens = int(tensors[f"{i}.{kind}.tokens"].item())
            parts.append(stat)
        blocks.append(BlockStatistics(*parts))
    return blocks, meta


def calibration_stats(loaded, nsamples: int, seqlen: int, batch_size: int):
    from prunekit.data import build_calibration
    from prunekit.structured import collect_statistics, get_structure

    path = CACHE / f"stats-sotu-{nsamples}x{seqlen}-seed0.safetensors"
    if path.exists():
        log(f"statistics from cache {path.name}")
        return load_stats(path)
    calib = build_calibration(str(SOTU / "train.txt"), loaded.tokenizer, nsamples=nsamples, seqlen=seqlen, seed=0)
    log(f"statistics pass over {nsamples} x {seqlen} calibration tokens ...")
    stats, seconds = collect_statistics(loaded.model, get_structure(loaded.model), calib.input_ids,
                                        batch_size=batch_size, progress=False)
    meta = {"source": str(SOTU / "train.txt"), "nsamples": nsamples, "seqlen": seqlen, "seed": 0,
            "ids_sha256": calib.provenance.get("ids_sha256"), "seconds": seconds}
    save_stats(stats, path, meta)
    log(f"statistics done in {seconds:.0f}s")
    return stats, meta


# -- measurements --------------------------------------------------------------------------------


def file_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def timings(models: dict[str, Any], tokenizer, args) -> dict[str, dict[str, Any]]:
    """Interleaved prefill and decode timings (prunekit.evaluation.speed), the first model as baseline."""
    from prunekit.evaluation.speed import measure_speed

    report = measure_speed(models, speed_ids(tokenizer), new_tokens=args.decode_tokens, repeats=args.repeats,
                           runtimes=tuple(args.runtimes.split(",")), log=log)
    rows = {}
    for name, row in report.models.items():
        rows[name] = {"prefill_tok_s": row.prefill_tok_s, "prefill_speedup": row.prefill_speedup,
                      "compiled_same_tokens": row.same_tokens_as_eager}
        for runtime, suffix in (("eager", ""), ("compiled", "_compiled")):
            if runtime in row.decode_tok_s:
                rows[name][f"decode{suffix}_tok_s"] = row.decode_tok_s[runtime]
                rows[name][f"decode{suffix}_speedup"] = row.decode_speedup[runtime]
    return rows


def decode_study(loaded, stats, args) -> dict[str, Any]:
    """Speed at 50 %: dense and each method's 50 % model timed interleaved, eager and compiled decode."""
    from prunekit.evaluation.speed import measure_speed
    from prunekit.methods import build_method
    from prunekit.structured import apply_plan, get_structure

    models = {"dense": loaded.model}
    for method_name in METHODS:
        model = copy.deepcopy(loaded.model)
        structure = get_structure(model)
        apply_plan(model, structure, build_method(method_name, METHODS[method_name]).plan(structure, stats, 0.5))
        models[f"{method_name}-0.5"] = model
    report = measure_speed(models, speed_ids(loaded.tokenizer), new_tokens=args.decode_tokens,
                           repeats=args.repeats, runtimes=tuple(args.runtimes.split(",")), log=log)
    return report.to_dict()


def ppl(model, tokenizer, source: str, windows: int | None) -> float:
    from prunekit.evaluation import perplexity

    return perplexity(model, tokenizer, source, seqlen=512, batch_size=8, max_windows=windows,
                      progress=False).perplexity


# -- configurations ------------------------------------------------------------------------------


def run_config(name: str, loaded, stats, args, results: dict) -> dict:
    import prunekit
    from prunekit.export import save_model
    from prunekit.methods import build_method
    from prunekit.structured import apply_plan, count_parameters, get_structure

    method_name, ratio = name.rsplit("-", 1)
    sparsity = float(ratio)
    method = build_method(method_name, METHODS[method_name])
    model = copy.deepcopy(loaded.model)
    t0 = time.perf_counter()
    structure = get_structure(model)
    plan = method.plan(structure, stats if method.needs_calibration else None, sparsity)
    apply_plan(model, structure, plan)
    plan_seconds = time.perf_counter() - t0
    probe = loaded.tokenizer("The President said that the nation", return_tensors="pt").input_ids
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_model(model, loaded.tokenizer, Path(tmp) / name, {"benchmark": name})
        size = file_size(folder)
        reloaded = prunekit.load(folder)
    with torch.inference_mode():
        identical = torch.equal(model(probe).logits, reloaded.model(probe).logits)
    del model
    log(f"{name}: achieved {plan.achieved:.4f}, evaluating ...")
    perplexity = ppl(reloaded.model, reloaded.tokenizer, str(SOTU / "test.txt"), args.eval_windows)
    timing = timings({"dense": loaded.model, name: reloaded.model}, loaded.tokenizer, args)
    row = {
        "method": method_name, "target": sparsity, "achieved": plan.achieved, "options": METHODS[method_name],
        "perplexity": perplexity, "parameters": count_parameters(reloaded.model), "file_bytes": size,
        "reload_identical_logits": identical, "plan_seconds": plan_seconds,
        "layers": [{"heads": len(layer.heads), "channels": len(layer.channels)} for layer in plan.layers],
        **timing[name],
        "dense_in_same_run": timing["dense"],
    }
    log(f"{name}: ppl {perplexity:.3f}, prefill x{row['prefill_speedup']:.2f}, decode x{row['decode_speedup']:.2f} "
        f"(compiled x{row.get('decode_compiled_speedup', float('nan')):.2f})")
    return row


def speed_ids(tokenizer) -> torch.Tensor:
    text = (SOTU / "test.txt").read_text()[:20000]
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[:, :512]


def run_dense(loaded, args) -> dict:
    from prunekit.export import save_model
    from prunekit.structured import count_parameters

    with tempfile.TemporaryDirectory() as tmp:
        folder = save_model(loaded.model, loaded.tokenizer, Path(tmp) / "dense", {"benchmark": "dense"})
        size = file_size(folder)
    log("dense: evaluating ...")
    perplexity = ppl(loaded.model, loaded.tokenizer, str(SOTU / "test.txt"), args.eval_windows)
    timing = timings({"dense": loaded.model}, loaded.tokenizer, args)
    return {"perplexity": perplexity, "parameters": count_parameters(loaded.model), "file_bytes": size,
            **timing["dense"]}


def run_seap(loaded, args) -> dict:
    """Brown genres as tasks: does each task model beat the general model on its own genre?"""
    import prunekit
    from prunekit.structured import model_for_plan

    tmp = Path(tempfile.mkdtemp(prefix="seap-"))
    tasks, held_out = {}, {}
    for genre in SEAP_TASKS:
        text = (CORPORA / "brown" / f"{genre}.txt").read_text()
        cut = int(len(text) * 0.8)
        (tmp / f"{genre}-prompts.txt").write_text(text[:cut])
        (tmp / f"{genre}-eval.txt").write_text(text[cut:])
        tasks[genre] = str(tmp / f"{genre}-prompts.txt")
        held_out[genre] = str(tmp / f"{genre}-eval.txt")
    model = copy.deepcopy(loaded.model)
    log(f"seap: statistics for {len(tasks)} tasks ({args.seap_nsamples} x 128 tokens each) ...")
    report = prunekit.prune(model, method="seap", sparsity=args.seap_sparsity, tokenizer=loaded.tokenizer,
                            nsamples=args.seap_nsamples, seqlen=128, batch_size=args.batch_size, progress=False,
                            method_options={"tasks": tasks})
    table: dict[str, dict[str, float]] = {}
    dense = {genre: ppl(loaded.model, loaded.tokenizer, held_out[genre], args.seap_eval_windows) for genre in tasks}
    for name in [*tasks, "general"]:
        pruned = model_for_plan(report, model, name)
        table[name] = {genre: ppl(pruned, loaded.tokenizer, held_out[genre], args.seap_eval_windows)
                       for genre in tasks}
        log(f"seap {name}: " + ", ".join(f"{g} {v:.2f}" for g, v in table[name].items()))
        del pruned
    wins = {genre: table[genre][genre] < table["general"][genre] for genre in tasks}
    return {"sparsity": args.seap_sparsity, "achieved": {n: p.achieved for n, p in report.plans.items()},
            "tasks": list(tasks), "protocol": f"task prompts = first 80 % of each Brown genre file, "
            f"{args.seap_nsamples} x 128-token windows; evaluation = last 20 %, 512-token windows "
            f"(at most {args.seap_eval_windows})", "dense": dense, "perplexity": table,
            "task_model_beats_general": wins,
            "layer_ratios": report.plans["general"].info.get("layer_ratios")}


# -- table ---------------------------------------------------------------------------------------


def table(results: dict) -> str:
    dense = results.get("dense")
    lines = ["| model | target | achieved | perplexity | parameters | file MB | prefill tok/s | decode tok/s "
             "(eager / compiled) | prefill × | decode × (eager / compiled) |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def decode(row: dict, key: str, digits: int) -> str:
        compiled = row.get(f"decode_compiled_{key}")
        return f"{row[f'decode_{key}']:.{digits}f} / " + ("–" if compiled is None else f"{compiled:.{digits}f}")

    if dense:
        lines.append(f"| dense | 0 | 0 | {dense['perplexity']:.2f} | {dense['parameters'] / 1e6:.1f} M "
                     f"| {dense['file_bytes'] / 2**20:.0f} | {dense['prefill_tok_s']:.0f} "
                     f"| {decode(dense, 'tok_s', 1)} | 1.00 | 1.00 |")
    for name in CONFIGS:
        row = results.get("configs", {}).get(name)
        if row is None:
            continue
        lines.append(f"| {name} | {row['target']:.2f} | {row['achieved']:.4f} | {row['perplexity']:.2f} "
                     f"| {row['parameters'] / 1e6:.1f} M | {row['file_bytes'] / 2**20:.0f} "
                     f"| {row['prefill_tok_s']:.0f} | {decode(row, 'tok_s', 1)} | {row['prefill_speedup']:.2f} "
                     f"| {decode(row, 'speedup', 2)} |")
    seap = results.get("seap")
    if seap:
        genres = seap["tasks"]
        lines += ["", f"SEAP at {seap['sparsity']:.0%} (perplexity on each genre's held-out text):", "",
                  "| model | " + " | ".join(genres) + " |", "|---|" + "---|" * len(genres)]
        lines.append("| dense | " + " | ".join(f"{seap['dense'][g]:.2f}" for g in genres) + " |")
        for name, row in seap["perplexity"].items():
            lines.append(f"| {name} | " + " | ".join(f"{row[g]:.2f}" for g in genres) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", help="comma-separated configurations (e.g. flap-0.5,dense,seap)")
    parser.add_argument("--nsamples", type=int, default=1024)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-windows", type=int, default=None, help="first N 512-token windows of sotu/test")
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (2 on an idle 2-core machine)")
    parser.add_argument("--runtimes", default="eager,compiled",
                        help="decode runtimes: eager (generate()), compiled (static cache + torch.compile)")
    parser.add_argument("--seap", action="store_true", help="also run the SEAP demonstration")
    parser.add_argument("--seap-sparsity", type=float, default=0.3)
    parser.add_argument("--seap-nsamples", type=int, default=128)
    parser.add_argument("--seap-eval-windows", type=int, default=24)
    parser.add_argument("--decode-study", action="store_true",
                        help="only the 50 %% speed comparison, all methods against dense, both runtimes")
    parser.add_argument("--stats-only", action="store_true", help="only compute (and cache) the statistics")
    parser.add_argument("--table", action="store_true", help="print the table from the JSON and exit")
    args = parser.parse_args()

    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if args.table:
        print(table(results))
        return
    torch.set_num_threads(args.threads)
    from prunekit.api import versions
    from prunekit.models import load_model

    loaded = load_model("smollm2-135m")
    wanted = args.only.split(",") if args.only else ["dense", *CONFIGS, *(["seap"] if args.seap else [])]
    stats, meta = calibration_stats(loaded, args.nsamples, args.seqlen, args.batch_size)
    if args.stats_only:
        return
    if args.decode_study:
        study = decode_study(loaded, stats, args)
        out = RESULTS.with_name(f"structured_decode_t{args.threads}.json")
        out.write_text(json.dumps(study, indent=2) + "\n")
        for name, row in study["models"].items():
            print(f"{name}: {row['parameters'] / 1e6:.1f} M params; prefill {row['prefill_tok_s']:.0f} tok/s "
                  f"(x{row['prefill_speedup']:.2f}); decode " + ", ".join(
                      f"{r} {row['decode_tok_s'][r]:.1f} tok/s (x{row['decode_speedup'][r]:.2f})"
                      for r in row["decode_tok_s"]))
        print(f"wrote {out}")
        return
    results["protocol"] = {
        "model": loaded.provenance.get("spec"), "calibration": meta, "evaluation": str(SOTU / "test.txt"),
        "eval_windows": args.eval_windows or "all", "seqlen": 512, "threads": torch.get_num_threads(),
        "dtype": "float32", "decode_tokens": args.decode_tokens, "repeats": args.repeats,
        "runtimes": args.runtimes.split(","), "versions": versions(),
    }
    for name in wanted:
        if name == "dense":
            results["dense"] = run_dense(loaded, args)
        elif name == "seap":
            results["seap"] = run_seap(loaded, args)
        elif name in CONFIGS:
            results.setdefault("configs", {})[name] = run_config(name, loaded, stats, args, results)
        else:
            raise SystemExit(f"unknown configuration {name!r}; known: dense, seap, {', '.join(CONFIGS)}")
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    text = table(results)
    TABLE.write_text(f"{__doc__.split(chr(10) + chr(10))[1]}\n\n{text}\n")
    print(text)


if __name__ == "__main__":
    main()
