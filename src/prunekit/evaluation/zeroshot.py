"""Zero-shot accuracy through the stock lm-evaluation-harness, in process.

The model (in memory, or loaded from a saved folder) is wrapped as lm-eval's own `HFLM` with the batch
size set on the wrapper, and `lm_eval.simple_evaluate` runs the named tasks. Hub tasks (boolq, rte,
hellaswag, winogrande, arc_easy, arc_challenge, openbookqa) download their data from the Hugging Face hub;
where that fails the error becomes one line. Offline tasks come from `local_tasks.build_local_tasks`.
"""

from __future__ import annotations

import difflib
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prunekit.errors import PrunekitError

PAPER_SUITE = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
_METRICS = ("acc", "acc_norm", "perplexity")
_NETWORK_HINTS = ("hub", "connection", "offline", "resolve", "couldn't reach", "not found", "localentrynotfound")


@dataclass
class ZeroShotResult:
    """Per task: acc / acc_norm / perplexity with stderr, task version and number of examples."""

    tasks: dict[str, dict[str, Any]]
    seconds: float
    examples: int
    seconds_per_1000: float
    batch_size: int
    num_fewshot: int
    limit: int | None
    lm_eval_version: str
    local: dict[str, Any] | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_MANAGERS: dict[tuple[str | None, bool], Any] = {}


def task_manager(include_path: str | Path | None = None, *, include_defaults: bool = True) -> Any:
    """lm-eval's TaskManager, cached per process (indexing the built-in tasks takes ~10 s)."""
    from lm_eval.tasks import TaskManager

    key = (None if include_path is None else str(include_path), include_defaults)
    if key not in _MANAGERS:
        _MANAGERS[key] = TaskManager(include_path=key[0], include_defaults=include_defaults)
    return _MANAGERS[key]


def check_task_names(names: list[str], manager: Any) -> None:
    """Unknown task names fail before any model work, listing the close matches."""
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=5, cutoff=0.6)
            hint = f"close matches: {', '.join(close)}" if close else f"e.g. {', '.join(PAPER_SUITE)}"
            raise PrunekitError(f"unknown lm-eval task {name!r}; {hint}")


def parse_tasks(text: str | list[str] | None) -> list[str]:
    """`boolq,rte` or a list -> names, stripped, duplicates dropped in order."""
    if text is None:
        return []
    items = text.split(",") if isinstance(text, str) else list(text)
    names = list(dict.fromkeys(t.strip() for t in items if t and t.strip()))
    if isinstance(text, str) and text.strip() and not names:
        raise PrunekitError(f"--tasks {text!r} names no task; accepted: comma-separated names, e.g. boolq,rte")
    return names


def _one_line(error: BaseException) -> str:
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    return f"{type(error).__name__}: {first[:240]}"


def _summarise(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    versions = raw.get("versions", {})
    counts = raw.get("n-samples", {})
    tasks = {}
    for name, values in raw.get("results", {}).items():
        entry: dict[str, Any] = {"version": versions.get(name)}
        for metric in _METRICS:
            for key, value in values.items():
                base, _, filt = key.partition(",")
                if base == metric:
                    entry[metric] = value
                    entry["filter"] = filt
                elif base == f"{metric}_stderr":
                    entry[f"{metric}_stderr"] = value if isinstance(value, (int, float)) else None
        count = counts.get(name, {})
        entry["n"] = count.get("effective")
        entry["n_original"] = count.get("original")
        tasks[name] = entry
    return tasks


def zeroshot(
    model: Any,
    tokenizer: Any = None,
    tasks: list[str] | str | None = None,
    *,
    local_source: Any = None,
    local_n: int = 500,
    local_dir: str | Path | None = None,
    batch_size: int = 8,
    num_fewshot: int = 0,
    limit: int | None = None,
    seed: int = 0,
    bootstrap_iters: int = 1000,
) -> ZeroShotResult:
    """Run lm-eval `tasks` (and the two offline tasks built from `local_source`) on `model`.

    `model` is an in-memory causal LM (with `tokenizer`) or a model spec that `load_model` accepts.
    `limit` caps the examples per task (lm-eval's limit). Errors are PrunekitError with one line.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from prunekit.evaluation.local_tasks import build_local_tasks

    names = parse_tasks(tasks)
    if not names and local_source is None:
        raise PrunekitError("no zero-shot task given; accepted: task names (e.g. boolq,rte) and/or a local source")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise PrunekitError(f"batch_size {batch_size!r} is invalid; accepted: an integer >= 1")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise PrunekitError(f"limit {limit!r} is invalid; accepted: None or an integer >= 1")
    logging.getLogger("lm_eval").setLevel(logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="prunekit-tasks-") as tmp:
        local = None
        include = None
        if local_source is not None:
            local = build_local_tasks(local_source, local_dir or Path(tmp) / "local", n=local_n, seed=seed)
            include = local.folder
        manager = task_manager(include, include_defaults=bool(names))
        check_task_names(names, manager)
        run_names = names + (local.tasks if local else [])

        if isinstance(model, (str, Path)):
            from prunekit.models import load_model

            loaded = load_model(model)
            model, tokenizer = loaded.model, loaded.tokenizer
        if tokenizer is None:
            raise PrunekitError("zero-shot evaluation needs the model's tokenizer")
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        started = time.perf_counter()
        try:
            raw = lm_eval.simple_evaluate(
                model=lm, tasks=run_names, task_manager=manager, num_fewshot=num_fewshot, limit=limit,
                log_samples=False, bootstrap_iters=bootstrap_iters, random_seed=seed, numpy_random_seed=seed,
                torch_random_seed=seed, fewshot_random_seed=seed)
        except (KeyboardInterrupt, PrunekitError):
            raise
        except Exception as e:  # lm-eval and datasets raise many kinds; the user needs one line
            message = _one_line(e)
            offline = any(h in message.lower() for h in _NETWORK_HINTS) or isinstance(e, (ConnectionError, OSError))
            hint = ("; the task data comes from the Hugging Face hub, which is not reachable here; accepted offline: "
                    "local tasks built from text (--local-tasks SOURCE)") if offline else ""
            raise PrunekitError(f"zero-shot tasks {','.join(run_names)} failed ({message}){hint}") from e
        seconds = time.perf_counter() - started
    if raw is None:
        raise PrunekitError("lm-eval returned no results (not the main process?)")
    summary = _summarise(raw)
    examples = sum(int(v.get("n") or 0) for k, v in summary.items() if k in run_names)
    return ZeroShotResult(
        tasks=summary,
        seconds=seconds,
        examples=examples,
        seconds_per_1000=seconds / examples * 1000 if examples else float("nan"),
        batch_size=batch_size,
        num_fewshot=num_fewshot,
        limit=limit,
        lm_eval_version=lm_eval.__version__,
        local=local.to_dict() if local else None,
        settings={"wrapper": "lm_eval.models.huggingface.HFLM(pretrained=<model>, tokenizer=<tokenizer>)",
                  "seed": seed, "bootstrap_iters": bootstrap_iters},
    )
