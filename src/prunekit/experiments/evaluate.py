"""`prunekit eval` beyond perplexity: zero-shot tasks and divergence from a dense reference, in one summary.

Kept out of the CLI so the sweep and the tests drive the same code. The dense reference is loaded and
run first, its log-probs cached on disk and the model freed; only then is the evaluated model loaded.
"""

from __future__ import annotations

import gc
import tempfile
from pathlib import Path
from typing import Any

from prunekit.errors import PrunekitError
from prunekit.files import atomic_write_json, check_output_file

EVAL_KIND = "prunekit.eval"


def check_request(ppl: str | None, tasks: str | None, local_tasks: str | None, reference: str | None,
                  jsd: str | None) -> list[str]:
    """Cheap checks before any model is loaded; returns the parsed task names (validated with lm-eval)."""
    from prunekit.evaluation.zeroshot import check_task_names, parse_tasks, task_manager

    if jsd is not None and reference is None:
        raise PrunekitError("--jsd SOURCE needs --reference DENSE (the model to compare against)")
    if reference is not None and jsd is None:
        raise PrunekitError("--reference DENSE needs --jsd SOURCE (the text to compare on)")
    if not any(x is not None for x in (ppl, tasks, local_tasks, jsd)):
        raise PrunekitError("nothing to evaluate; accepted: --ppl SOURCE, --tasks NAMES, --local-tasks SOURCE, "
                            "--reference DENSE --jsd SOURCE")
    names = parse_tasks(tasks)
    if names:
        check_task_names(names, task_manager())
    return names


def run_evaluation(
    model: str,
    *,
    ppl: str | None = None,
    tasks: str | None = None,
    local_tasks: str | None = None,
    local_n: int = 500,
    limit: int | None = None,
    reference: str | None = None,
    jsd: str | None = None,
    topk: int = 1024,
    seqlen: int | None = None,
    batch_size: int = 8,
    bos: bool = False,
    max_windows: int | None = None,
    trust_remote_code: bool = False,
    log: Any = None,
    stream: bool | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Evaluate MODEL as asked and return one JSON-able summary (perplexity keys at the top level).

    `stream` (default: when the model would not fit comfortably in memory) computes the perplexity block by
    block from disk (prunekit.evaluation.streamed); zero-shot tasks and divergence load the model whole.
    """
    from prunekit.data import resolve_seqlen
    from prunekit.evaluation import perplexity
    from prunekit.evaluation.divergence import cache_reference, divergence
    from prunekit.evaluation.zeroshot import zeroshot
    from prunekit.models import load_model

    say = log or (lambda message: None)
    names = check_request(ppl, tasks, local_tasks, reference, jsd)
    summary: dict[str, Any] = {"kind": EVAL_KIND}
    if stream is None:
        stream = _too_big_for_memory(model, trust_remote_code)
    if stream:
        if names or local_tasks is not None or jsd is not None:
            raise PrunekitError("--stream evaluates perplexity only; zero-shot tasks and --jsd load the model whole "
                                "(pass --no-stream)")
        return _streamed_summary(model, ppl, seqlen=seqlen, batch_size=batch_size, bos=bos,
                                 max_windows=max_windows, device=device, trust_remote_code=trust_remote_code)
    with tempfile.TemporaryDirectory(prefix="prunekit-ref-") as tmp:
        cache = None
        if jsd is not None:
            dense = load_model(reference, trust_remote_code=trust_remote_code)
            length, _ = resolve_seqlen(seqlen, dense.model.config)
            say(f"caching dense log-probs of {reference} on {jsd} ...")
            cache = cache_reference(dense.model, dense.tokenizer, jsd, Path(tmp) / "dense", seqlen=length,
                                    batch_size=batch_size, bos=bos, max_windows=max_windows, topk=topk)
            summary["reference_model"] = dense.provenance
            del dense
            gc.collect()
        loaded = load_model(model, trust_remote_code=trust_remote_code)
        length, note = resolve_seqlen(seqlen, loaded.model.config)
        if ppl is not None:
            result = perplexity(loaded.model, loaded.tokenizer, ppl, seqlen=length, batch_size=batch_size, bos=bos,
                                max_windows=max_windows)
            summary.update(result.to_dict())
        summary.update({"model": loaded.provenance, "seqlen_choice": note})
        if cache is not None:
            say(f"comparing {model} with the dense reference ...")
            summary["divergence"] = divergence(loaded.model, cache, tokenizer=loaded.tokenizer).to_dict()
    if names or local_tasks is not None:
        say("running lm-eval ...")
        summary["zeroshot"] = zeroshot(loaded.model, loaded.tokenizer, names, local_source=local_tasks,
                                       local_n=local_n, batch_size=batch_size, limit=limit).to_dict()
    return summary


def _too_big_for_memory(model: str, trust_remote_code: bool) -> bool:
    """Stream when the model in fp32 would take more than half of the memory available now."""
    import psutil

    from prunekit.structured.io import structured_spec

    if structured_spec(Path(str(model)).expanduser()) is not None:
        return False
    from prunekit.models import open_checkpoint

    try:
        parameters = open_checkpoint(model, trust_remote_code=trust_remote_code).parameter_count()
    except PrunekitError:
        return False  # the in-memory loader gives the one-line error
    return 4 * parameters > psutil.virtual_memory().available / 2


def _streamed_summary(model: str, ppl: str | None, **options: Any) -> dict[str, Any]:
    from prunekit.data import resolve_seqlen
    from prunekit.evaluation.streamed import streamed_perplexity
    from prunekit.models import open_checkpoint

    checkpoint = open_checkpoint(model, trust_remote_code=options.pop("trust_remote_code"))
    length, note = resolve_seqlen(options.pop("seqlen"), checkpoint.config)
    result = streamed_perplexity(checkpoint, checkpoint.tokenizer(), ppl, seqlen=length, **options)
    return {"kind": EVAL_KIND, **result.to_dict(), "model": checkpoint.provenance(), "seqlen_choice": note}


def save_summary(summary: dict[str, Any], path: str | Path, *, overwrite: bool = False) -> Path:
    """Write the summary where `prunekit report` finds it (e.g. RUN_DIR/eval.json), whole or not at all.

    An existing file is replaced only with `overwrite` and only if prunekit wrote it (check it before any work
    with `prunekit.files.check_output_file`)."""
    return atomic_write_json(check_output_file(path, overwrite), summary, indent=1)
