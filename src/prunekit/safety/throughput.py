"""`prunekit safety --throughput-study`: the old and the new generation path side by side on the same prompts.

Old: `generate` — `model.generate` on whole prompts, batches of the length-sorted prompt list (what a study
ran before the shared-prefix cache). New: `generate_fast` — one shared prefix per template, rows sorted by
length inside their template, rows leave the batch when they end, (with the prefix judge) an answer stops
once it holds a refusal phrase, and the fastest KV-cache layout the model allows (`prunekit.safety.decode`);
that path is timed again on the other layouts, to show what each buys. All run in one process on one model,
new path first and then old (a warm-up batch on each before timing), so the ratio is what the machine gives now.

The tokens are compared: an uncut answer of the new path must equal the old one; a cut answer must be a prefix
of it, and the prefix judge's verdicts on both must agree. Only counts are written, never the text.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from prunekit.safety.data import build_prompts, load_suite, select_templates, subset
from prunekit.safety.decode import generate_fast, static_cache_fits
from prunekit.safety.generate import encode, generate, resolve_mode
from prunekit.safety.judges import PrefixJudge, stop_rule


def throughput_study(loaded: Any, config: Any, log: Callable[[str], None]) -> dict[str, Any]:
    """Prompts/s of the old and new path on the study's prompts (harmful set, `--limit` tasks × templates)."""
    model, tokenizer = loaded.model, loaded.tokenizer
    tasks, available = load_suite(config.tasks, config.template_files)
    templates = select_templates(config.templates, available)
    prompts = build_prompts(subset(tasks, config.limit), templates)
    mode = resolve_mode(tokenizer, config.prompt_format)
    ids = [encode(tokenizer, p.text, mode, p.span).ids for p in prompts]
    groups: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        groups[p.template].append(i)
    judge = PrefixJudge()
    stop = stop_rule([judge]) if config.stop_early else None
    old_batch = config.baseline_batch_size or config.batch_size
    log(f"throughput study: {len(prompts)} prompts ({len(templates)} templates), {config.max_new_tokens} new "
        f"tokens, batch {config.batch_size} (old path {old_batch}), {torch.get_num_threads()} threads")
    warm = ids[: min(2, len(ids))]
    generate_fast(model, tokenizer, warm, max_new_tokens=4, batch_size=2)
    generate(model, tokenizer, warm, max_new_tokens=4, batch_size=2)

    def fast(layout: str) -> Any:
        started = time.perf_counter()
        out = generate_fast(model, tokenizer, ids, groups=list(groups.values()), stop=stop, layout=layout,
                            max_new_tokens=config.max_new_tokens, batch_size=config.batch_size)
        log(f"new path, {out.extra['layout']} layout: {out.prompts_per_second:.2f} prompts/s "
            f"({time.perf_counter() - started:.0f}s)")
        return out

    new = fast("auto")
    # the same path on the other KV-cache layouts: what each one buys
    others = {layout: fast(layout) for layout in ("static", "dynamic")
              if layout != new.extra["layout"] and (layout == "dynamic" or static_cache_fits(model))}
    started = time.perf_counter()
    old = generate(model, tokenizer, ids, max_new_tokens=config.max_new_tokens, batch_size=old_batch)
    log(f"old path: {old.prompts_per_second:.2f} prompts/s ({time.perf_counter() - started:.0f}s)")
    same = prefix_ok = 0
    for a, b in zip(old.token_ids, new.token_ids, strict=True):
        same += a == b
        prefix_ok += a[: len(b)] == b
    v_old = judge.judge([p.text for p in prompts], old.texts)
    v_new = judge.judge([p.text for p in prompts], new.texts)
    cut = new.extra["ended"]["verdict"]
    return {
        "kind": "prunekit.safety_throughput",
        "model": config.model, "prompts": len(prompts), "templates": [t.name for t in templates],
        "tasks": len(prompts) // max(1, len(templates)), "max_new_tokens": config.max_new_tokens,
        "batch_size": config.batch_size, "baseline_batch_size": old_batch, "threads": torch.get_num_threads(),
        "device": str(config.device),
        "stop_early": config.stop_early,
        "old": {"path": "model.generate on whole prompts", **old.describe()},
        "new": {**new.describe(), "path": f"shared prefix ({new.extra['layout']} layout)"
                + (", stop at final verdict" if stop else "")},
        "speedup": new.prompts_per_second / old.prompts_per_second,
        "other_layouts": {layout: {**g.describe(), "identical_to_new": g.token_ids == new.token_ids,
                                   "new_speedup": new.prompts_per_second / g.prompts_per_second}
                          for layout, g in others.items()},
        "identical_answers": same, "new_is_prefix_of_old": prefix_ok, "cut_answers": cut,
        "verdicts_agree": sum(a == b for a, b in zip(v_old, v_new, strict=True)),
        "refusals_old": sum(bool(v) for v in v_old), "refusals_new": sum(bool(v) for v in v_new),
    }
