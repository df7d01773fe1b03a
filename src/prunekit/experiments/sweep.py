"""Task-specific calibration: prune with each calibration domain, evaluate on each evaluation domain.

A grid (YAML) names one model, method and sparsity, calibration domains {name: SOURCE} and evaluation
domains {name: SOURCE}. The dense model is loaded once; its log-probs on every evaluation text are cached
once; then for every calibration domain the dense weights are restored, the model pruned, and its
perplexity and JSD to the dense model measured on every evaluation text (one forward pass per text, the
windows of the perplexity protocol). Output folder:

    matrix.json                     perplexity / JSD / KL / top-1 matrices [calibration][evaluation] + setup
    .prunekit-output                the marker that lets a later `--overwrite` replace this folder
    runs/<calibration>/prunekit.json  the pruning manifest of that run (weights too with save_models)
    runs/<calibration>/eval-<evaluation>.json  the evaluation summary per domain (for `prunekit report`)

Calibration and evaluation texts of a domain should be disjoint (e.g. train/test splits); a domain whose
two sources are the same path is flagged `overlap` in matrix.json.
"""

from __future__ import annotations

import math
import re
import shutil
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from prunekit.checks import check_positive
from prunekit.errors import PrunekitError
from prunekit.files import (
    MANIFEST,
    atomic_write_json,
    check_output_dir,
    new_staging_dir,
    publish_dir,
    write_marker,
)

SWEEP_KIND = "prunekit.sweep"


class SweepGrid(BaseModel):
    """The YAML grid of `prunekit sweep`."""

    model_config = ConfigDict(extra="forbid")

    model: str = "smollm2-135m"
    method: str = "wanda"
    sparsity: float = 0.5
    pattern: str | None = None
    calibration: dict[str, str]
    evaluation: dict[str, str]
    nsamples: int = 32
    seqlen: int = 512
    eval_seqlen: int | None = None  # default: seqlen
    max_windows: int | None = 16
    batch_size: int = 8
    seed: int = 0
    topk: int = 1024  # dense log-probs cached per token (see evaluation.divergence)
    options: dict[str, Any] = {}
    save_models: bool = False

    @field_validator("calibration", "evaluation")
    @classmethod
    def _named(cls, value: dict[str, str]) -> dict[str, str]:
        if not value:
            raise ValueError("needs at least one {name: SOURCE}")
        for name in value:
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(name)):
                raise ValueError(f"domain name {name!r} must be letters, digits, '_', '-', '.'")
        return value


def load_grid(path: str | Path) -> SweepGrid:
    """Read and validate a grid; relative source paths are taken relative to the grid file when they exist there."""
    p = Path(path)
    try:
        fields = yaml.safe_load(p.read_text())
    except OSError as exc:
        raise PrunekitError(f"cannot read grid {p}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise PrunekitError(f"grid {p} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(fields, dict):
        raise PrunekitError(f"grid {p} must be a YAML mapping (model, method, sparsity, calibration, evaluation)")
    for key in ("calibration", "evaluation"):
        domains = fields.get(key)
        if isinstance(domains, dict):
            fields[key] = {str(k): _relative(str(v), p.parent) for k, v in domains.items()}
    try:
        return SweepGrid(**fields)
    except ValidationError as exc:
        detail = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise PrunekitError(f"bad grid {p}: {detail}") from None


def _relative(source: str, base: Path) -> str:
    candidate = base / source
    return str(candidate) if not Path(source).is_absolute() and candidate.exists() else source


def diagonal_summary(calib: list[str], evals: list[str], matrix: list[list[float]]) -> dict[str, Any]:
    """For every evaluation domain that is also a calibration domain: does in-domain calibration win, by how much.

    `gain_vs_mean_other` = 1 - diagonal / mean of the other calibrations on that column (lower is better
    for both perplexity and JSD, so a positive gain means in-domain is better).
    """
    columns = {}
    for j, name in enumerate(evals):
        if name not in calib:
            continue
        i = calib.index(name)
        column = [row[j] for row in matrix]
        others = [v for k, v in enumerate(column) if k != i]
        if not others:
            continue
        diag, best_other = column[i], min(others)
        mean_other = sum(others) / len(others)
        columns[name] = {"in_domain": diag, "best_other": best_other, "mean_other": mean_other,
                         "wins": diag < best_other, "gain_vs_mean_other": 1 - diag / mean_other,
                         "gain_vs_best_other": 1 - diag / best_other}
    wins = sum(c["wins"] for c in columns.values())
    gains = [c["gain_vs_mean_other"] for c in columns.values()]
    return {"columns": columns, "wins": wins, "of": len(columns),
            "mean_gain_vs_mean_other": sum(gains) / len(gains) if gains else None}


def _check_sources(grid: SweepGrid) -> None:
    from prunekit.data import resolve_source

    for kind, domains in (("calibration", grid.calibration), ("evaluation", grid.evaluation)):
        for name, source in domains.items():
            try:
                resolve_source(source, split="train" if kind == "calibration" else "test")
            except PrunekitError as exc:
                raise PrunekitError(f"{kind} domain {name!r}: {exc}") from None


def run_sweep(grid: SweepGrid, out_dir: str | Path, *, overwrite: bool = False, log: Any = None) -> dict[str, Any]:
    """Run the grid and write the matrix and the runs into `out_dir`; returns the matrix dict.

    The folder is built under a hidden staging name beside `out_dir` and renamed into place at the end, so an
    interrupted sweep leaves no half-written matrix; `--overwrite` replaces only an earlier prunekit output.
    """
    from prunekit.methods import build_method
    from prunekit.pruning import SparsityPlan

    check_positive({f"grid {key}": getattr(grid, key) for key in
                    ("nsamples", "seqlen", "eval_seqlen", "max_windows", "batch_size", "topk")})
    build_method(grid.method, grid.options)
    SparsityPlan.build(grid.sparsity, grid.pattern, None, None)
    out = check_output_dir(out_dir, overwrite)
    _check_sources(grid)
    staging = new_staging_dir(out)
    try:
        matrix = _sweep_into(grid, staging, out, log or (lambda message: None))
        write_marker(staging, "sweep")
        publish_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return matrix


def _sweep_into(grid: SweepGrid, staging: Path, out: Path, say: Any) -> dict[str, Any]:
    """The sweep itself, written into `staging` (paths recorded as they will be under `out`)."""
    from prunekit.api import prune, versions
    from prunekit.evaluation.divergence import cache_reference, divergence
    from prunekit.export import save_model
    from prunekit.models import load_model

    started = time.perf_counter()
    eval_seqlen = grid.eval_seqlen or grid.seqlen
    loaded = load_model(grid.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    dense_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    caches = {}
    for name, source in grid.evaluation.items():
        say(f"dense log-probs on {name} ...")
        caches[name] = cache_reference(model, tokenizer, source, staging / ".cache" / name, seqlen=eval_seqlen,
                                       batch_size=grid.batch_size, max_windows=grid.max_windows, topk=grid.topk,
                                       progress=False)
    calib_names, eval_names = list(grid.calibration), list(grid.evaluation)
    metrics = {key: [[math.nan] * len(eval_names) for _ in calib_names] for key in ("perplexity", "jsd", "kl", "top1")}
    runs = {}
    for i, (cname, csource) in enumerate(grid.calibration.items()):
        model.load_state_dict(dense_state)
        say(f"[{i + 1}/{len(calib_names)}] {grid.method} {grid.sparsity:.0%} calibrated on {cname} ...")
        report = prune(model, method=grid.method, sparsity=grid.sparsity, pattern=grid.pattern, calibration=csource,
                       tokenizer=tokenizer, nsamples=grid.nsamples, seqlen=grid.seqlen, seed=grid.seed,
                       method_options=grid.options, batch_size=grid.batch_size, progress=False)
        run_dir = Path("runs") / cname
        evaluations, summaries = {}, {}
        for j, ename in enumerate(eval_names):
            d = divergence(model, caches[ename], tokenizer=tokenizer, progress=False)
            evaluations[ename] = {"perplexity": d.perplexity, "dense_perplexity": d.reference_perplexity,
                                  "jsd_mean": d.jsd_mean, "kl_mean": d.kl_mean, "top1_agreement": d.top1_agreement}
            for key, value in (("perplexity", d.perplexity), ("jsd", d.jsd_mean), ("kl", d.kl_mean),
                               ("top1", d.top1_agreement)):
                metrics[key][i][j] = value
            summaries[ename] = {"kind": "prunekit.eval",
                                "model": {"spec": str(out / run_dir), "sweep_calibration": cname},
                                "evaluation_domain": ename, "perplexity": d.perplexity, "tokens": d.tokens,
                                "windows": d.windows, "seqlen": d.seqlen, "bos": d.bos, "source": d.source,
                                "divergence": d.to_dict()}
        manifest = {
            "model": loaded.provenance,
            "recipe": {"model": grid.model, "method": grid.method, "sparsity": grid.sparsity,
                       "pattern": grid.pattern or "unstructured", "calib": csource, "nsamples": grid.nsamples,
                       "seqlen": grid.seqlen, "seed": grid.seed, "options": grid.options},
            **report.to_dict(),
            "evaluation": {"domains": evaluations},
            "sweep": {"calibration_domain": cname, "grid": grid.model_dump()},
            "versions": versions(),
        }
        if grid.save_models:
            save_model(model, tokenizer, staging / run_dir, manifest)
        else:
            atomic_write_json(staging / run_dir / MANIFEST, manifest)
        for ename, summary in summaries.items():
            atomic_write_json(staging / run_dir / f"eval-{ename}.json", summary, indent=1)
        runs[cname] = str(run_dir)
        say("    " + ", ".join(f"{e}: ppl {evaluations[e]['perplexity']:.2f} jsd {evaluations[e]['jsd_mean']:.4f}"
                                 for e in eval_names))
    model.load_state_dict(dense_state)
    shutil.rmtree(staging / ".cache", ignore_errors=True)
    overlap = [n for n in calib_names if n in grid.evaluation and
               Path(grid.calibration[n]).resolve() == Path(grid.evaluation[n]).resolve()]
    matrix = {
        "kind": SWEEP_KIND,
        "grid": grid.model_dump(),
        "calibration": calib_names,
        "evaluation": eval_names,
        **metrics,
        "dense_perplexity": {e: caches[e].meta["perplexity"] for e in eval_names},
        "eval_tokens": {e: caches[e].meta["tokens"] for e in eval_names},
        "diagonal": {"perplexity": diagonal_summary(calib_names, eval_names, metrics["perplexity"]),
                     "jsd": diagonal_summary(calib_names, eval_names, metrics["jsd"])},
        "overlap": overlap,
        "runs": runs,
        "model": loaded.provenance,
        "seconds": time.perf_counter() - started,
        "versions": versions(),
        "note": "rows: calibration domain, columns: evaluation domain; perplexity under the pinned protocol, "
                "JSD/KL in nats (dense top-k cache, tails lumped), top-1 = arg-max agreement with the dense model",
    }
    atomic_write_json(staging / "matrix.json", matrix, indent=1)
    return matrix


def format_matrix(matrix: dict[str, Any], key: str = "perplexity", digits: int = 3) -> str:
    """A plain-text table: rows calibration, columns evaluation; the column best is marked with *."""
    evals, calib = matrix["evaluation"], matrix["calibration"]
    width = max(12, *(len(e) + 2 for e in evals))
    lines = [f"{key} (rows: calibration, columns: evaluation)",
             f"{'':<14}" + "".join(f"{e:>{width}}" for e in evals)]
    if key == "perplexity":
        lines.append(f"{'dense':<14}" + "".join(f"{matrix['dense_perplexity'][e]:>{width}.{digits}f}" for e in evals))
    best = [min(row[j] for row in matrix[key]) if key != "top1" else max(row[j] for row in matrix[key])
            for j in range(len(evals))]
    for name, row in zip(calib, matrix[key], strict=True):
        cells = "".join(f"{(f'{v:.{digits}f}' + ('*' if v == best[j] else ' ')):>{width}}" for j, v in enumerate(row))
        lines.append(f"{name:<14}" + cells)
    return "\n".join(lines)
