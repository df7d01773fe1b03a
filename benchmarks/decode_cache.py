"""Which KV cache and runtime the safety study decodes on (issue 14): dynamic vs static cache, eager vs compiled.

One batch of real study prompts (the AIM template, `--batch` tasks of integrated.yaml, the model's chat template,
the template's shared prefix encoded once), greedy, `--new-tokens` steps with no early stop, three ways:

* ``dynamic``: the shared-prefix path on transformers' DynamicCache (keys/values concatenated at every token);
* ``static``: the same path on a preallocated StaticCache written in place, the prefix copied into every row;
* ``shared-prefix``: one copy of the prefix for the batch, read by `prunekit.safety.prefix_attention`, each
  row's static cache holding its own tokens only (what `decode_batches` uses for Llama and Qwen2);
* ``static+compiled``: the one-token forward compiled by `torch.compile` (inductor, fullgraph) over the
  static layout's cache, reused between repeats so that nothing recompiles; the compile time is reported apart
  (`--freezing`: with inductor's weight freezing, which folds the weights into the compiled graph as constants).

Repeats are interleaved and the median kept; tokens are compared with the dynamic path's. Prints a table and
writes benchmarks/results/decode_cache.json.

    python benchmarks/decode_cache.py [--models smollm2-135m qwen2.5-coder-0.5b] [--batch 32] [--repeats 2]
    python benchmarks/decode_cache.py --models smollm2-135m --new-tokens 16 --freezing --out FILE
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PRUNEKIT_SHARED_DATA") or ROOT.parent / "shared" / "data").resolve()
RESULTS = ROOT / "benchmarks" / "results" / "decode_cache.json"


def study_batch(tokenizer: Any, tasks: int, template: str) -> list[list[int]]:
    from prunekit.safety.data import build_prompts, load_suite, select_templates, subset
    from prunekit.safety.generate import encode

    suite, available = load_suite(SHARED / "safety" / "integrated.yaml")
    prompts = build_prompts(subset(suite, tasks), select_templates([template], available))
    return [encode(tokenizer, p.text, "chat").ids for p in prompts]


class _NoStops:
    """The tokenizer with no end-of-sequence token: decoding runs every step (a fixed amount of work)."""

    eos_token_id = None

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)


class CompiledSteps:
    """Greedy steps with the one-token forward compiled; one static cache for every repeat (no recompiles)."""

    def __init__(self, model: Any) -> None:
        self.model, self.cache = model, None
        self.step = torch.compile(model.forward, fullgraph=True, dynamic=None)

    @torch.inference_mode()
    def __call__(self, base: Any, p: int, suffixes: list[list[int]], new_tokens: int, pad_id: int) -> list[list[int]]:
        from prunekit.safety.decode import chunk_cache
        from prunekit.safety.generate import left_pad

        ids, suffix_mask = left_pad(suffixes, pad_id)
        b, width = ids.shape
        if self.cache is None:
            self.cache = chunk_cache(self.model, base, p, b, width + new_tokens, "static").cache
        for layer in self.cache.layers:  # the prefix stays in slots [0, p); later slots are overwritten
            layer.cumulative_length.fill_(p)
        lengths = torch.tensor([len(s) for s in suffixes])
        positions = (p + torch.arange(width).unsqueeze(0) - (width - lengths).unsqueeze(1)).clamp(min=p)
        mask = torch.cat([torch.ones((b, p), dtype=torch.long), suffix_mask,
                          torch.ones((b, new_tokens), dtype=torch.long)], dim=1)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=self.cache,
                         cache_position=torch.arange(p, p + width), use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1)
        produced = [token]
        for step in range(new_tokens - 1):
            position = (p + lengths + step)[:, None]
            logits = self.step(input_ids=token[:, None], attention_mask=mask, position_ids=position,
                               cache_position=torch.tensor([p + width + step]), cache=self.cache,
                               use_cache=True).logits
            token = logits[:, -1].argmax(-1)
            produced.append(token)
        return torch.stack(produced, 1).tolist()


def measure(name: str, args: argparse.Namespace) -> dict[str, Any]:
    from prunekit.models import load_model
    from prunekit.safety.decode import common_prefix_length, decode_chunk, prefix_cache
    from prunekit.safety.generate import decoding_setup

    loaded = load_model(name)
    model, tokenizer = loaded.model, loaded.tokenizer
    prompts = study_batch(tokenizer, args.batch, args.template)
    p = common_prefix_length(prompts)
    suffixes = [row[p:] for row in prompts]
    cpu = torch.device("cpu")
    pad_id = decoding_setup(model, tokenizer, args.new_tokens, len(prompts))[1]
    with torch.inference_mode():
        base = prefix_cache(model, prompts[0][:p], cpu)
    model.generation_config.eos_token_id = None  # every row decodes all --new-tokens steps
    tokenizer = _NoStops(tokenizer)

    def eager(layout: str) -> list[list[int]]:
        with torch.inference_mode():
            return decode_chunk(model, tokenizer, suffixes, base, p, args.new_tokens, layout)[0]

    compiled = CompiledSteps(model)
    ways = {"dynamic": lambda: eager("dynamic"), "static": lambda: eager("static"),
            "shared-prefix": lambda: eager("shared-prefix"),
            "static+compiled": lambda: compiled(base, p, suffixes, args.new_tokens, pad_id)}
    started = time.perf_counter()
    tokens = {way: run() for way, run in ways.items()}  # warm-up; compiles the step
    warmup = time.perf_counter() - started
    seconds: dict[str, list[float]] = {way: [] for way in ways}
    for _ in range(args.repeats):
        for way, run in ways.items():
            started = time.perf_counter()
            tokens[way] = run()
            seconds[way].append(time.perf_counter() - started)
    median = {way: statistics.median(s) for way, s in seconds.items()}
    return {
        "model": name, "batch": len(prompts), "prefix_tokens": p, "suffix_tokens": max(map(len, suffixes)),
        "new_tokens": args.new_tokens, "threads": torch.get_num_threads(), "warmup_and_compile_s": warmup,
        "seconds": seconds, "median_s": median,
        "prompts_per_s": {way: len(prompts) / s for way, s in median.items()},
        "speedup_vs_dynamic": {way: median["dynamic"] / s for way, s in median.items()},
        "same_tokens_as_dynamic": {way: tokens[way] == tokens["dynamic"] for way in ways},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["smollm2-135m", "qwen2.5-coder-0.5b"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--template", default="AIM")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--freezing", action="store_true", help="inductor's weight freezing for the compiled step")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.freezing:
        import torch._inductor.config

        torch._inductor.config.freezing = True
    from prunekit.api import versions
    from prunekit.files import atomic_write_json

    rows = []
    for name in args.models:
        row = measure(name, args)
        rows.append(row)
        print(f"{name}: " + ", ".join(
            f"{way} {row['prompts_per_s'][way]:.2f} prompts/s (x{row['speedup_vs_dynamic'][way]:.2f}, "
            f"same {row['same_tokens_as_dynamic'][way]})" for way in row["median_s"]), file=sys.stderr, flush=True)
    ways = list(rows[0]["median_s"])
    print("| model | batch | prefix tokens | " + " | ".join(ways) + " | same tokens |")
    print("|---|---|---|" + "---|" * len(ways) + "---|")
    for r in rows:
        pps, x = r["prompts_per_s"], r["speedup_vs_dynamic"]
        print(f"| {r['model']} | {r['batch']} | {r['prefix_tokens']} | "
              + " | ".join(f"{pps[w]:.2f} (x{x[w]:.2f})" for w in ways)
              + f" | {all(r['same_tokens_as_dynamic'].values())} |")
    atomic_write_json(args.out, {"kind": "prunekit.decode_cache", "rows": rows, "args": {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "versions": versions()}, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
