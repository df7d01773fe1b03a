"""Benchmark: pruning the small trained Mamba, Mamba-2 and same-size LLaMA (benchmarks/ssm_models.py).

Protocol (stated in the JSON):
  * models: the three trained by benchmarks/ssm_models.py (cached under ~/.cache/prunekit/ssm-models);
  * calibration: 32 windows x 128 tokens of ../shared/data sotu/train.txt at seeded offsets (seed 0);
  * unstructured magnitude, Wanda, SparseGPT at 10-50 % on every SSM linear (`ssm_parts=all`; Mamba-1:
    in_proj, x_proj, dt_proj, out_proj; Mamba-2: in_proj, out_proj) and on every LLaMA block linear; Wanda
    also with the paper's default, in_proj only (`wanda-inproj`);
  * structured ssm-state, ssm-headdim, flap (SSM-FLAP on the SSM models, FLAP on LLaMA) at 10/20/30 %, and
    ssm-headmerge at 50/75 % (Mamba-2, 4 B/C groups: the ratios that merge equal sets); structured models are
    saved, reloaded with prunekit.load (logits checked against the in-memory model) and evaluated reloaded;
  * perplexity on sotu/test.txt (2000-2021, held out; the models trained on 1790-1979 and Brown) under the
    pinned protocol: the first `--eval-windows` non-overlapping windows of 256 tokens, no BOS; and on Brown
    (the first 1,500 characters of the held-out documents of each of the 15 genres, the last 20 % of each
    genre, which the models never saw; all windows);
  * parameters (all, distinct) and nonzero ones, safetensors bytes of the saved structured models; speed of the
    structured models against dense (prunekit.evaluation.speed, as `prunekit speed`: interleaved, median of 3,
    prefill of 256 tokens, greedy eager decode of 32 new tokens after a 32-token prompt (64 in the first Mamba
    rows; recorded per row), 1 thread, CPU; the machine was shared, so read ratios, not absolute speeds).

Rows are appended to benchmarks/results/ssm.json as they finish; a rerun skips the finished ones. Speed needs the
machine to itself, perplexity does not: `--speed skip` runs the rows without it, and `--speed only` (under
benchmarks/quiet.sh) later prunes the structured rows again (seeded: the same models) and adds their speed.

    python benchmarks/ssm.py [--eval-windows 24] [--only mamba2]      # then prints the table
    python benchmarks/ssm.py --speed skip && benchmarks/quiet.sh python benchmarks/ssm.py --speed only
    python benchmarks/ssm.py --table
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
SOTU = Path(os.environ.get("PRUNEKIT_SHARED_DATA", "/work/shared/data")) / "corpora" / "sotu"
RESULTS = ROOT / "benchmarks" / "results" / "ssm.json"
MODELS = ("mamba", "mamba2", "llama")
UNSTRUCTURED = ("magnitude", "wanda", "sparsegpt")
RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5)
STRUCTURED_RATIOS = (0.1, 0.2, 0.3)
SEQLEN = 256
#: Characters of each Brown genre's held-out documents evaluated (15 genres, about 5,000 tokens in all).
BROWN_CHARS = 1500


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def configs(model: str) -> list[tuple[str, str, float, dict[str, Any]]]:
    """(row name, method, ratio, options) in the order they run."""
    rows: list[tuple[str, str, float, dict[str, Any]]] = [("dense", "dense", 0.0, {})]
    ssm = model != "llama"
    for method in UNSTRUCTURED:
        for ratio in RATIOS:
            rows.append((f"{method}-{ratio}", method, ratio, {"ssm_parts": "all"} if ssm else {}))
    if ssm:
        rows += [(f"wanda-inproj-{r}", "wanda", r, {}) for r in RATIOS]
    structured = ["flap", "ssm-state", "ssm-headdim"] if ssm else ["flap"]
    for method in structured:
        for ratio in STRUCTURED_RATIOS:
            rows.append((f"{method}-{ratio}", method, ratio, {}))
    if model == "mamba2":
        rows += [(f"ssm-headmerge-{r}", "ssm-headmerge", r, {}) for r in (0.5, 0.75)]
    return rows


def load_results() -> dict[str, Any]:
    if RESULTS.is_file():
        return json.loads(RESULTS.read_text())
    return {"kind": "prunekit.benchmark.ssm", "protocol": __doc__, "rows": {}}


def save_results(results: dict[str, Any]) -> None:
    from prunekit.files import atomic_write_json

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS, results)


def shrink(dense: Any, tokenizer: Any, method: str, ratio: float, options: dict[str, Any], calib: Any,
           probe: torch.Tensor) -> tuple[Any, dict[str, Any]]:
    """A pruned copy of `dense` (seeded: the same model every time); a structured one is saved, reloaded with
    prunekit.load and checked against the in-memory model, and the reloaded copy is returned."""
    import prunekit
    from prunekit.structured import save_outputs

    t0 = time.perf_counter()
    model = copy.deepcopy(dense)
    report = prunekit.prune(model, method=method, sparsity=ratio, calibration=calib, method_options=options,
                            progress=False)
    entry: dict[str, Any] = {"prune_s": round(time.perf_counter() - t0, 2),
                             "achieved": round(report.overall_sparsity, 4)}
    if not getattr(report, "structured", False):
        return model, entry
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        save_outputs(report, model, tokenizer, out, {"method": report.method})
        entry["file_bytes"] = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        reloaded = prunekit.load(out).model.eval()
    with torch.inference_mode():
        same = torch.allclose(reloaded(input_ids=probe).logits, model(input_ids=probe).logits, rtol=1e-4, atol=1e-5)
    entry["reload_equal"] = bool(same)
    return reloaded, entry


def measure(dense: Any, model: Any, probe: torch.Tensor) -> dict[str, Any]:
    """Prefill and eager decode of `model` against `dense`, interleaved (prunekit.evaluation.speed)."""
    from prunekit.evaluation.speed import measure_speed

    new_tokens = int(os.environ.get("SSM_BENCH_NEW_TOKENS", "32"))
    speed = measure_speed({"dense": dense, "pruned": model}, probe, prompt_tokens=32, new_tokens=new_tokens,
                          repeats=3, runtimes=("eager",))
    fast, base = speed.models["pruned"], speed.models["dense"]
    return {"prefill_tok_s": round(fast.prefill_tok_s, 1), "prefill_tok_s_dense": round(base.prefill_tok_s, 1),
            "prefill_speedup": round(fast.prefill_speedup, 3), "decode_tok_s": round(fast.decode_tok_s["eager"], 1),
            "decode_tok_s_dense": round(base.decode_tok_s["eager"], 1),
            "decode_speedup": round(fast.decode_speedup["eager"], 3), "new_tokens": new_tokens}


#: Speed needs real widths: the trained ~1 M-parameter models are all per-token overhead. These are the shapes of
#: state-spaces/mamba-130m-hf and mamba2-130m (random init, seeded): only their speed is measured, never quality.
REAL_SHAPES = {
    "mamba-130m-shape": ("MambaConfig", dict(hidden_size=768, num_hidden_layers=24, vocab_size=50280, state_size=16,
                                              expand=2, conv_kernel=4, time_step_rank=48)),
    "mamba2-130m-shape": ("Mamba2Config", dict(hidden_size=768, num_hidden_layers=24, vocab_size=50288,
                                                state_size=128, expand=2, head_dim=64, num_heads=24, n_groups=1,
                                                conv_kernel=4, tie_word_embeddings=True)),
}
SHAPE_CONFIGS = (("ssm-state", 0.3), ("ssm-state", 0.5), ("ssm-headdim", 0.3), ("ssm-headdim", 0.5),
                 ("flap", 0.3), ("flap", 0.5))


def real_shape_speed(results: dict[str, Any]) -> None:
    """--speed-shapes: prefill and decode of the structured methods on 130M-shaped Mamba and Mamba-2 (random
    weights, seeded; calibration 8 x 128 random tokens), against dense, interleaved, 1 thread."""
    import transformers

    import prunekit

    shapes = results.setdefault("speed_shapes", {})
    for shape, (config_name, kwargs) in REAL_SHAPES.items():
        torch.manual_seed(0)
        config = getattr(transformers, config_name)(**kwargs)
        dense = transformers.AutoModelForCausalLM.from_config(config).eval()
        generator = torch.Generator().manual_seed(0)
        calib = torch.randint(0, kwargs["vocab_size"], (8, 128), generator=generator)
        probe = torch.randint(0, kwargs["vocab_size"], (1, SEQLEN), generator=generator)
        for method, ratio in SHAPE_CONFIGS:
            key = f"{shape}/{method}-{ratio}"
            if key in shapes:
                continue
            model = copy.deepcopy(dense)
            report = prunekit.prune(model, method=method, sparsity=ratio, calibration=calib, progress=False)
            entry = {"params_dense": sum(p.numel() for p in dense.parameters()),
                     "params": sum(p.numel() for p in model.parameters()),
                     "achieved": round(report.overall_sparsity, 4), **measure(dense, model, probe)}
            shapes[key] = entry
            save_results(results)
            log(f"{key}: params {entry['params']:,} of {entry['params_dense']:,}, "
                f"prefill x{entry['prefill_speedup']:.2f}, decode x{entry['decode_speedup']:.2f}")


def run_model(name: str, results: dict[str, Any], eval_windows: int, match: str | None = None,
              speed: str = "inline") -> None:
    from prunekit.evaluation.perplexity import perplexity
    from prunekit.models import load_model
    from prunekit.models.cache import model_cache_dir
    from prunekit.structured.engine import count_parameters

    folder = model_cache_dir() / "ssm-models" / name
    if not (folder / "training.json").is_file():
        log(f"{name}: not trained yet (python benchmarks/ssm_models.py --model {name}); skipped")
        return
    loaded = load_model(str(folder))
    dense, tokenizer = loaded.model.eval(), loaded.tokenizer
    from prunekit.data import build_calibration
    from ssm_models import brown_split

    brown_texts = ["\n\n".join(docs)[:BROWN_CHARS] for docs in brown_split()[1].values()]
    calib = build_calibration(str(SOTU / "train.txt"), tokenizer, nsamples=32, seqlen=128, seed=0)
    probe = torch.tensor([tokenizer((SOTU / "test.txt").read_text()[:20000])["input_ids"][:SEQLEN]])
    for row, method, ratio, options in configs(name):
        key = f"{name}/{row}"
        if match and match not in row and row != "dense":
            continue
        if key in results["rows"]:
            entry = results["rows"][key]
            if speed == "only" and "reload_equal" in entry and "speed" not in entry:
                model, _ = shrink(dense, tokenizer, method, ratio, options, calib, probe)
                entry["speed"] = measure(dense, model, probe)
                save_results(results)
                log(f"{key}: prefill x{entry['speed']['prefill_speedup']:.2f}, "
                    f"decode x{entry['speed']['decode_speedup']:.2f}")
            continue
        if speed == "only":
            continue
        t0 = time.perf_counter()
        entry = {"model": name, "config": row, "method": method, "ratio": ratio, "options": options}
        model = dense
        if method != "dense":
            model, pruned = shrink(dense, tokenizer, method, ratio, options, calib, probe)
            entry.update(pruned)
            if "reload_equal" in entry and speed == "inline":
                entry["speed"] = measure(dense, model, probe)
        entry["params"] = count_parameters(model)
        entry["nonzero"] = int(sum(int((p != 0).sum()) for p in {id(p): p for p in model.parameters()}.values()))
        result = perplexity(model, tokenizer, str(SOTU / "test.txt"), seqlen=SEQLEN, batch_size=8,
                            max_windows=eval_windows, progress=False)
        entry["ppl_sotu_test"] = round(result.perplexity, 3)
        entry["eval_tokens"] = result.tokens
        brown = perplexity(model, tokenizer, brown_texts, seqlen=SEQLEN, batch_size=8, progress=False)
        entry["ppl_brown"], entry["brown_tokens"] = round(brown.perplexity, 3), brown.tokens
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        results["rows"][key] = entry
        results["eval_protocol"] = result.protocol
        save_results(results)
        log(f"{key}: ppl {entry['ppl_sotu_test']:.2f} params {entry['params']:,} ({entry['seconds']} s)")


def table(results: dict[str, Any]) -> str:
    lines = ["| model | config | achieved | SOTU test ppl | Brown ppl | params | nonzero | file KiB | prefill × | "
             "decode × |", "|---|---|---|---|---|---|---|---|---|---|"]
    for entry in results["rows"].values():
        size = f"{entry['file_bytes'] / 1024:.0f}" if "file_bytes" in entry else "–"
        speed = entry.get("speed")
        prefill = f"{speed['prefill_speedup']:.2f}" if speed else "–"
        decode = f"{speed['decode_speedup']:.2f}" if speed else "–"
        brown = f"{entry['ppl_brown']:.2f}" if "ppl_brown" in entry else "–"
        lines.append(f"| {entry['model']} | {entry['config']} | {entry.get('achieved', 0):.3f} | "
                     f"{entry['ppl_sotu_test']:.2f} | {brown} | {entry['params']:,} | {entry['nonzero']:,} | {size} | "
                     f"{prefill} | {decode} |")
    return "\n".join(lines)


def pivot(results: dict[str, Any]) -> str:
    """Perplexity (SOTU test / held-out Brown) by configuration (rows) and model (columns)."""
    rows: dict[str, dict[str, str]] = {}
    for entry in results["rows"].values():
        brown = f" / {entry['ppl_brown']:.1f}" if "ppl_brown" in entry else ""
        rows.setdefault(entry["config"], {})[entry["model"]] = f"{entry['ppl_sotu_test']:.1f}{brown}"
    models = [m for m in MODELS if any(m in r for r in rows.values())]
    lines = ["| config | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for config, values in rows.items():
        cells = [values.get(m, "–") for m in models]
        lines.append(f"| {config} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    global RESULTS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-windows", type=int, default=24)
    parser.add_argument("--only", choices=MODELS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--match", help="only the configurations whose name contains this (and dense)")
    parser.add_argument("--speed", choices=("inline", "skip", "only"), default="inline",
                        help="structured rows' speed: in the row (inline), not at all (skip: perplexity rows can then "
                             "run beside other jobs), or only the missing speed of finished rows (run it quietly)")
    parser.add_argument("--speed-shapes", action="store_true",
                        help="only the structured methods' speed on 130M-shaped random Mamba / Mamba-2 (run quietly)")
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON file of the rows (default: %(default)s)")
    args = parser.parse_args()
    RESULTS = args.results
    results = load_results()
    if not args.table:
        torch.set_num_threads(args.threads)
        results["eval_windows"], results["threads"] = args.eval_windows, args.threads
        if args.speed_shapes:
            real_shape_speed(results)
        for name in [] if args.speed_shapes else [args.only] if args.only else MODELS:
            run_model(name, results, args.eval_windows, args.match, args.speed)
    print(table(results))
    print()
    print(pivot(results))


if __name__ == "__main__":
    main()
