"""Read run folders (prunekit.json manifests, eval JSONs, sweep matrices) and write REPORT_DIR.

REPORT_DIR/index.html and REPORT_DIR/report.md reference PNG files in REPORT_DIR/plots/ by relative
path, and the HTML has its style inline: the folder is viewable offline, anywhere it is copied. It is
staged and renamed into place, with a marker that lets a later `--overwrite` replace it.

A RUN_DIR is either a `prunekit prune` output (prunekit.json, optionally eval JSONs written with
`prunekit eval ... --save-json RUN_DIR/eval.json`) or a `prunekit sweep` output (matrix.json plus runs/).
"""

from __future__ import annotations

import html
import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunekit.errors import PrunekitError
from prunekit.files import (
    atomic_savefig,
    atomic_write_text,
    check_output_dir,
    new_staging_dir,
    publish_dir,
    write_marker,
)

MANIFEST = "prunekit.json"
MATRIX = "matrix.json"
EVAL_KIND = "prunekit.eval"
SWEEP_KIND = "prunekit.sweep"


@dataclass
class Run:
    """One pruned model: its manifest and every evaluation summary found beside it."""

    name: str
    folder: Path
    manifest: dict[str, Any]
    evals: list[dict[str, Any]] = field(default_factory=list)

    @property
    def method(self) -> str:
        method = (self.manifest.get("method") or {}).get("name", "?")
        pattern = ((self.manifest.get("plan") or {}).get("default") or {}).get("pattern", "unstructured")
        return method if pattern in (None, "unstructured") else f"{method} {pattern}"

    @property
    def sparsity(self) -> float | None:
        value = self.manifest.get("overall_sparsity")
        return float(value) if isinstance(value, (int, float)) else None

    def perplexities(self) -> list[tuple[str, float, float | None]]:
        """(source, pruned perplexity, dense perplexity or None) from eval JSONs, else from the manifest."""
        out = []
        for ev in self.evals:
            ppl = ev.get("perplexity")
            if isinstance(ppl, (int, float)):
                dense = (ev.get("divergence") or {}).get("reference_perplexity")
                out.append((_source_name(ev.get("source")), float(ppl), dense))
        evaluation = self.manifest.get("evaluation") or {}
        after, before = evaluation.get("after"), evaluation.get("before")
        if not out and isinstance(after, dict) and isinstance(after.get("perplexity"), (int, float)):
            out.append((_source_name(after.get("source")), float(after["perplexity"]),
                        before.get("perplexity") if isinstance(before, dict) else None))
        return out


@dataclass
class Sweep:
    name: str
    folder: Path
    matrix: dict[str, Any]


def _source_name(source: Any) -> str:
    if isinstance(source, dict):
        source = source.get("source", "?")
    return Path(str(source)).name or str(source)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PrunekitError(f"cannot read {path}: {exc}") from None


def _eval_files(folder: Path) -> list[dict[str, Any]]:
    found = []
    for path in sorted(folder.glob("*.json")):
        if path.name in (MANIFEST, MATRIX) or path.name.startswith(("config", "tokenizer", "generation", "special")):
            continue
        data = _read_json(path)
        if isinstance(data, dict) and data.get("kind") == EVAL_KIND:
            found.append({**data, "_file": path.name})
    return found


def _read_run(folder: Path, name: str) -> Run:
    manifest = folder / MANIFEST
    if not manifest.exists():
        raise PrunekitError(f"run folder {folder} has no {MANIFEST} manifest (nor {MATRIX}); "
                            "accepted: a `prunekit prune` or `prunekit sweep` output folder")
    return Run(name, folder, _read_json(manifest), _eval_files(folder))


def collect_runs(folders: list[str | Path]) -> tuple[list[Run], list[Sweep]]:
    """Runs and sweeps from the given folders; a folder without a manifest is an error."""
    if not folders:
        raise PrunekitError("no run folder given; accepted: one or more prunekit output folders")
    runs, sweeps = [], []
    names: set[str] = set()

    def unique(name: str) -> str:
        base, k = name, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.add(name)
        return name

    for entry in folders:
        folder = Path(entry)
        if not folder.is_dir():
            raise PrunekitError(f"run folder {folder} does not exist or is not a folder")
        if (folder / MATRIX).exists():
            matrix = _read_json(folder / MATRIX)
            if matrix.get("kind") != SWEEP_KIND:
                raise PrunekitError(f"{folder / MATRIX} is not a prunekit sweep matrix")
            sweep = Sweep(unique(folder.name), folder, matrix)
            sweeps.append(sweep)
            for cname, rel in matrix.get("runs", {}).items():
                if (folder / rel / MANIFEST).exists():
                    runs.append(_read_run(folder / rel, unique(f"{sweep.name}/{cname}")))
            continue
        runs.append(_read_run(folder, unique(folder.name)))
    return runs, sweeps


# --------------------------------------------------------------------------------------------------
# plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> str:
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    _plt().close(fig)
    return f"plots/{path.name}"


def plot_perplexity_vs_sparsity(runs: list[Run], path: Path) -> str | None:
    """One line per (method, evaluation text), starting from the dense model at sparsity 0 when known."""
    plt = _plt()
    series: dict[tuple[str, str], list[tuple[float, float]]] = {}
    dense: dict[str, float] = {}
    for run in runs:
        if run.sparsity is None:
            continue
        for source, ppl, dense_ppl in run.perplexities():
            if math.isfinite(ppl):
                series.setdefault((run.method, source), []).append((run.sparsity, ppl))
            if isinstance(dense_ppl, (int, float)) and math.isfinite(dense_ppl):
                dense[source] = float(dense_ppl)
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for (method, source), points in sorted(series.items()):
        points = sorted(set(points))
        if source in dense:
            points = [(0.0, dense[source]), *points]
        label = method if len({s for _, s in series}) == 1 else f"{method} on {source}"
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xlabel("achieved sparsity")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_yscale("log")
    sources = sorted({s for _, s in series})
    ax.set_title("Perplexity vs sparsity per method" + (f" ({sources[0]})" if len(sources) == 1 else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def block_sparsity(layers: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """Achieved sparsity per transformer block (pruned / total weights of its linears)."""
    blocks: dict[int, list[int]] = {}
    for layer in layers:
        match = re.search(r"(?:layers|h|layer|blocks)\.(\d+)\.", layer.get("name", ""))
        if not match or not layer.get("numel"):
            continue
        acc = blocks.setdefault(int(match.group(1)), [0, 0])
        acc[0] += int(layer.get("pruned", 0))
        acc[1] += int(layer["numel"])
    return [(k, v[0] / v[1]) for k, v in sorted(blocks.items()) if v[1]]


def plot_layer_sparsity(runs: list[Run], path: Path) -> str | None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    drawn = 0
    for run in runs:
        points = block_sparsity(run.manifest.get("layers") or [])
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=run.name)
            drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("block")
    ax.set_ylabel("achieved sparsity")
    ax.set_ylim(0, 1)
    ax.set_title("Per-layer (block) achieved sparsity")
    ax.grid(alpha=0.3)
    if drawn <= 12:
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_jsd_histograms(runs: list[Run], path: Path) -> str | None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    drawn = 0
    for run in runs:
        for ev in run.evals:
            hist = (ev.get("divergence") or {}).get("histogram") or {}
            edges, counts = hist.get("edges"), hist.get("counts")
            if not edges or not counts or not sum(counts):
                continue
            total = sum(counts)
            label = f"{run.name} on {_source_name(ev.get('source'))}"
            ax.stairs([c / total for c in counts], edges, label=label)
            drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_yscale("log")
    ax.set_xlabel("per-token JSD to the dense model (nats; max ln 2)")
    ax.set_ylabel("fraction of tokens (log scale)")
    ax.set_title("Distribution of per-token Jensen–Shannon divergence")
    if drawn <= 12:
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_calibration_matrix(sweep: Sweep, path: Path) -> str:
    plt = _plt()
    m = sweep.matrix
    calib, evals = m["calibration"], m["evaluation"]
    fig, axes = plt.subplots(1, 2, figsize=(4.0 + 1.6 * len(evals) * 2, 1.2 + 0.7 * len(calib)))
    for ax, key, title in ((axes[0], "perplexity", "perplexity"), (axes[1], "jsd", "mean JSD (nats)")):
        values = m[key]
        # colour by the ratio to the column's best, so columns of different scale compare
        rel = [[values[i][j] / min(row[j] for row in values) for j in range(len(evals))] for i in range(len(calib))]
        image = ax.imshow(rel, cmap="viridis_r", aspect="auto")
        for i in range(len(calib)):
            for j in range(len(evals)):
                text = f"{values[i][j]:.2f}" if key == "perplexity" else f"{values[i][j]:.3g}"
                ax.text(j, i, text, ha="center", va="center", fontsize=8,
                        color="white" if rel[i][j] > 1 + 0.5 * (max(map(max, rel)) - 1) else "black")
        ax.set_xticks(range(len(evals)), evals, rotation=30, ha="right")
        ax.set_yticks(range(len(calib)), calib)
        ax.set_xlabel("evaluation domain")
        ax.set_ylabel("calibration domain")
        ax.set_title(title)
        fig.colorbar(image, ax=ax, label="÷ best in column")
    grid = m.get("grid", {})
    fig.suptitle(f"{grid.get('method', '')} {grid.get('sparsity', '')}: calibration × evaluation")
    return _save(fig, path)


# --------------------------------------------------------------------------------------------------
# tables


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    return str(value)


def _sig(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else _fmt(value)


def _summary_rows(runs: list[Run]) -> list[list[str]]:
    rows = []
    for run in runs:
        perplexities = run.perplexities() or [("", math.nan, None)]
        for source, ppl, dense in perplexities:
            div = next((ev.get("divergence") for ev in run.evals
                        if ev.get("divergence") and _source_name(ev.get("source")) == source), None) or {}
            rows.append([run.name, run.method, _fmt(run.sparsity), source, _fmt(dense, 3), _fmt(ppl, 3),
                         _sig(div.get("jsd_mean")), _fmt(div.get("top1_agreement"))])
    return rows


def _zeroshot_rows(runs: list[Run]) -> list[list[str]]:
    rows = []
    for run in runs:
        for ev in run.evals:
            for task, t in ((ev.get("zeroshot") or {}).get("tasks") or {}).items():
                rows.append([run.name, task, str(t.get("version")), _fmt(t.get("n")),
                             _fmt(t.get("acc")) + (f" ± {t['acc_stderr']:.4f}" if t.get("acc_stderr") else ""),
                             _fmt(t.get("acc_norm")) + (f" ± {t['acc_norm_stderr']:.4f}"
                                                        if t.get("acc_norm_stderr") else ""),
                             _fmt(t.get("perplexity"), 3)])
    return rows


def _provenance_rows(runs: list[Run]) -> list[list[str]]:
    rows = []
    for run in runs:
        m = run.manifest
        model = m.get("model") or {}
        calib = m.get("calibration") or {}
        versions = m.get("versions") or {}
        timings = m.get("timings_s") or {}
        rows.append([
            run.name, str(run.folder), str(model.get("spec") or model.get("source") or ""),
            f"{run.method}, target {((m.get('plan') or {}).get('default') or {}).get('sparsity', '')}",
            f"{calib.get('source', '')} ({calib.get('nsamples', '')}×{calib.get('seqlen', '')}, "
            f"seed {calib.get('seed', '')})" if calib else "none",
            str(calib.get("ids_sha256") or calib.get("text_sha256") or "")[:16],
            ", ".join(f"{k} {v}" for k, v in versions.items()),
            _fmt(timings.get("total"), 1),
            ", ".join(ev["_file"] for ev in run.evals),
        ])
    return rows


PROVENANCE_HEAD = ["run", "folder", "model", "method", "calibration", "calib sha256", "versions", "prune s",
                   "eval files"]
SUMMARY_HEAD = ["run", "method", "sparsity", "eval text", "dense ppl", "ppl", "JSD mean", "top-1 agree"]
ZEROSHOT_HEAD = ["run", "task", "version", "n", "acc ± se", "acc_norm ± se", "perplexity"]


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    clean = [[c.replace("|", "/") for c in row] for row in rows]
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(r) + " |" for r in clean])


def _html_table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def _sweep_text(sweep: Sweep) -> str:
    from prunekit.experiments.sweep import format_matrix

    m = sweep.matrix
    lines = [format_matrix(m, "perplexity", 3), "", format_matrix(m, "jsd", 5)]
    for key in ("perplexity", "jsd"):
        d = (m.get("diagonal") or {}).get(key) or {}
        if d.get("of"):
            lines.append(f"in-domain calibration best on {d['wins']}/{d['of']} evaluation domains by {key}; "
                         f"mean gain vs the other calibrations {100 * d['mean_gain_vs_mean_other']:.2f} %")
    return "\n".join(lines)


CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
       "table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;"
       "text-align:left}th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}"
       "pre{background:#f7f7f7;padding:8px;overflow-x:auto;font-size:12px}")


def build_report(folders: list[str | Path], out_dir: str | Path, *, title: str = "prunekit report",
                 overwrite: bool = False) -> Path:
    """Write index.html, report.md and plots/*.png into `out_dir`; returns the HTML path.

    The folder is staged beside `out_dir` and renamed into place; `overwrite` replaces only an earlier prunekit
    output, never one of the folders the report reads.
    """
    out = check_output_dir(out_dir, overwrite)
    target = out.resolve()
    for folder in folders:
        source = Path(folder).resolve()
        if source == target or target in source.parents:
            raise PrunekitError(f"--out {out} would replace {folder}, which the report reads; choose another --out")
    runs, sweeps = collect_runs(folders)
    staging = new_staging_dir(out)
    try:
        _write_report(runs, sweeps, staging, title)
        write_marker(staging, "report")
        publish_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out / "index.html"


def _write_report(runs: list[Run], sweeps: list[Sweep], out: Path, title: str) -> None:
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    sections: list[tuple[str, str | None, str | None, list[str] | None, list[list[str]] | None, str | None]] = []
    # (heading, image, text, table head, table rows, preformatted)
    sections.append(("Summary", None, f"{len(runs)} runs, {len(sweeps)} calibration sweeps.",
                     SUMMARY_HEAD, _summary_rows(runs), None))
    image = plot_perplexity_vs_sparsity(runs, plots / "perplexity_vs_sparsity.png")
    sections.append(("Perplexity vs sparsity", image, None if image else "No run has a perplexity.",
                     None, None, None))
    image = plot_layer_sparsity(runs, plots / "layer_sparsity.png")
    sections.append(("Per-layer achieved sparsity", image, None if image else "No run lists its layers.",
                     None, None, None))
    image = plot_jsd_histograms(runs, plots / "jsd_histograms.png")
    sections.append(("Jensen–Shannon divergence to the dense model", image,
                     None if image else "No divergence measured (prunekit eval --reference --jsd).", None, None, None))
    zs = _zeroshot_rows(runs)
    sections.append(("Zero-shot (lm-evaluation-harness)", None, None if zs else "No zero-shot results.",
                     ZEROSHOT_HEAD if zs else None, zs or None, None))
    for k, sweep in enumerate(sweeps):
        image = plot_calibration_matrix(sweep, plots / f"calibration_matrix_{k}.png")
        sections.append((f"Calibration domains: {sweep.name}", image, None, None, None, _sweep_text(sweep)))
    sections.append(("Provenance", None, None, PROVENANCE_HEAD, _provenance_rows(runs), None))

    md = [f"# {title}", ""]
    body = [f"<h1>{html.escape(title)}</h1>"]
    for heading, img, text, head, rows, pre in sections:
        md += [f"## {heading}", ""]
        body.append(f"<h2>{html.escape(heading)}</h2>")
        if text:
            md += [text, ""]
            body.append(f"<p>{html.escape(text)}</p>")
        if img:
            md += [f"![{heading}]({img})", ""]
            body.append(f'<img src="{html.escape(img)}" alt="{html.escape(heading)}">')
        if pre:
            md += ["```", pre, "```", ""]
            body.append(f"<pre>{html.escape(pre)}</pre>")
        if head and rows:
            md += [_md_table(head, rows), ""]
            body.append(_html_table(head, rows))
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")
    page = (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>\n")
    atomic_write_text(out / "index.html", page)
