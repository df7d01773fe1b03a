"""Calibration sweep and comparison report on tiny models: the matrix, the runs, the page and its images."""

from __future__ import annotations

import json
import math
import random
import re
import shutil
from pathlib import Path

import pytest
import yaml

from prunekit.experiments.sweep import diagonal_summary, format_matrix, load_grid, run_sweep
from prunekit.files import MARKER
from tiny import WORDS, assert_one_line_error, run, save_tiny_llama

# two "domains": different halves of the toy vocabulary
DOMAINS = {"alpha": WORDS[: len(WORDS) // 2], "beta": WORDS[len(WORDS) // 2:]}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("texts")
    for name, words in DOMAINS.items():
        for split, seed in (("train", 1), ("test", 2)):
            rng = random.Random(f"{name}{seed}")
            docs = [" ".join(rng.choice(words) for _ in range(200)) for _ in range(6)]
            (folder / f"{name}_{split}.txt").write_text("\n\n".join(docs))
    return folder


@pytest.fixture(scope="module")
def sweep_dir(tiny_dir, texts, tmp_path_factory) -> Path:
    grid = {
        "model": str(tiny_dir), "method": "wanda", "sparsity": 0.5, "nsamples": 4, "seqlen": 32,
        "max_windows": 4, "batch_size": 4, "topk": 16,
        "calibration": {"alpha": "alpha_train.txt", "beta": "beta_train.txt"},  # relative to the grid file
        "evaluation": {"alpha": "alpha_test.txt", "beta": "beta_test.txt"},
    }
    path = texts / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    out = tmp_path_factory.mktemp("sweep") / "sweep"
    from prunekit.cli import main

    try:
        main(["sweep", str(path), "--out", str(out)])
    except SystemExit as exc:
        assert not exc.code
    return out


def test_sweep_writes_matrix_and_runs(sweep_dir):
    matrix = json.loads((sweep_dir / "matrix.json").read_text())
    assert matrix["calibration"] == ["alpha", "beta"] and matrix["evaluation"] == ["alpha", "beta"]
    for key in ("perplexity", "jsd", "kl", "top1"):
        assert len(matrix[key]) == 2 and all(len(row) == 2 for row in matrix[key])
        assert all(math.isfinite(v) for row in matrix[key] for v in row)
    assert all(0 < v <= math.log(2) for row in matrix["jsd"] for v in row)
    assert matrix["overlap"] == []
    assert matrix["diagonal"]["perplexity"]["of"] == 2
    for name in ("alpha", "beta"):
        run_dir = sweep_dir / matrix["runs"][name]
        manifest = json.loads((run_dir / "prunekit.json").read_text())
        assert manifest["calibration"]["source"].endswith(f"{name}_train.txt")
        assert abs(manifest["overall_sparsity"] - 0.5) < 1e-3
        ev = json.loads((run_dir / "eval-beta.json").read_text())
        assert ev["perplexity"] == pytest.approx(matrix["perplexity"][matrix["calibration"].index(name)][1])
    # different calibration text, different pruned model
    assert matrix["perplexity"][0] != matrix["perplexity"][1]
    assert "alpha" in format_matrix(matrix, "jsd")


def test_diagonal_summary():
    summary = diagonal_summary(["a", "b", "c"], ["a", "b", "x"], [[10, 22, 1], [12, 20, 1], [11, 21, 1]])
    assert summary["of"] == 2 and summary["wins"] == 2
    assert summary["columns"]["a"]["gain_vs_mean_other"] == pytest.approx(1 - 10 / 11.5)
    assert summary["columns"]["b"]["best_other"] == 21
    losing = diagonal_summary(["a", "b"], ["a", "b"], [[12, 10], [10, 12]])
    assert losing["wins"] == 0 and losing["mean_gain_vs_mean_other"] < 0


def test_sweep_bad_grid(capsys, tmp_path, texts):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"method": "wanda", "calibration": {}, "evaluation": {"a": "x.txt"}}))
    code, _, err = run(capsys, "sweep", path, "--out", tmp_path / "out")
    assert_one_line_error(code, err, "calibration")
    path.write_text(yaml.safe_dump({"calibration": {"a": str(texts / "alpha_train.txt")},
                                    "evaluation": {"a": "missing.txt"}}))
    code, _, err = run(capsys, "sweep", path, "--out", tmp_path / "out")
    assert_one_line_error(code, err, "evaluation domain 'a'")


def _referenced(page: str, pattern: str) -> list[str]:
    return re.findall(pattern, page)


def test_sweep_overwrite_replaces_only_prunekit_outputs(capsys, tmp_path, texts, sweep_dir):
    assert (sweep_dir / MARKER).is_file()
    grid = texts / "grid.yaml"
    project = tmp_path / "project"
    project.mkdir()
    (project / "thesis.tex").write_text("years of work")
    code, _, err = run(capsys, "sweep", grid, "--out", project, "--overwrite")
    assert_one_line_error(code, err, "refusing to overwrite")
    assert (project / "thesis.tex").read_text() == "years of work"
    earlier = tmp_path / "earlier"
    shutil.copytree(sweep_dir, earlier)
    (earlier / "matrix.json").write_text("stale")
    code, _, err = run(capsys, "sweep", grid, "--out", earlier)
    assert_one_line_error(code, err, "already exists; pass --overwrite")
    code, _, err = run(capsys, "sweep", grid, "--out", earlier, "--overwrite")
    assert code == 0, err
    assert json.loads((earlier / "matrix.json").read_text())["kind"] == "prunekit.sweep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier", "project"]  # no staging folder left


def test_interrupted_sweep_leaves_nothing(tmp_path, texts, sweep_dir, monkeypatch):
    import prunekit.api

    real, calls = prunekit.api.prune, []

    def second_run_dies(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(prunekit.api, "prune", second_run_dies)
    with pytest.raises(RuntimeError, match="killed"):
        run_sweep(load_grid(texts / "grid.yaml"), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # neither a half-written sweep nor its staging folder


def test_report_page_and_images(capsys, tmp_path, tiny_dir, texts, sweep_dir, embedded_sotu):
    runs = []
    for method, sparsity in (("magnitude", "0.3"), ("magnitude", "0.6"), ("wanda", "0.5")):
        out = tmp_path / f"{method}-{sparsity}"
        code, _, err = run(capsys, "prune", tiny_dir, "--method", method, "--sparsity", sparsity, "--calib",
                           texts / "alpha_train.txt", "--nsamples", "4", "--seqlen", "32", "--out", out,
                           "--ppl", texts / "alpha_test.txt", "--ppl-seqlen", "32")
        assert code == 0, err
        runs.append(out)
    code, _, err = run(capsys, "eval", runs[-1], "--reference", tiny_dir, "--jsd", texts / "alpha_test.txt",
                       "--seqlen", "32", "--ppl", texts / "alpha_test.txt", "--local-tasks", embedded_sotu,
                       "--local-n", "10",
                       "--save-json", runs[-1] / "eval.json")
    assert code == 0, err
    report = tmp_path / "report"
    code, out, err = run(capsys, "report", *runs, sweep_dir, "--out", report)
    assert code == 0, err
    assert "index.html" in out
    page = (report / "index.html").read_text()
    md = (report / "report.md").read_text()
    images = _referenced(page, r'<img src="([^"]+)"')
    assert images == _referenced(md, r"!\[[^\]]*\]\(([^)]+)\)")
    expected = {"plots/perplexity_vs_sparsity.png", "plots/layer_sparsity.png", "plots/jsd_histograms.png",
                "plots/calibration_matrix_0.png"}
    assert expected <= set(images)
    for image in images:
        path = report / image
        assert path.exists() and path.stat().st_size > 1000
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "http" not in page.replace("http-equiv", "")  # nothing fetched from the network
    for needle in ("prunekit_cloze", "prunekit_nextsent", "Provenance", "magnitude", "wanda", "sweep/alpha"):
        assert needle in page and needle in md
    # an existing report is replaced only with --overwrite; a folder prunekit did not write, or a run, never
    assert (report / MARKER).is_file()
    code, _, err = run(capsys, "report", *runs, "--out", report)
    assert_one_line_error(code, err, "already exists; pass --overwrite")
    code, _, err = run(capsys, "report", *runs, "--out", report, "--overwrite")
    assert code == 0, err
    project = tmp_path / "project"
    project.mkdir()
    (project / "index.html").write_text("my homepage")
    code, _, err = run(capsys, "report", *runs, "--out", project, "--overwrite")
    assert_one_line_error(code, err, "refusing to overwrite")
    assert (project / "index.html").read_text() == "my homepage"
    code, _, err = run(capsys, "report", *runs, "--out", runs[0], "--overwrite")
    assert_one_line_error(code, err, "which the report reads")
    assert (runs[0] / "prunekit.json").is_file()
    # bad input: a folder that is no run
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run(capsys, "report", empty, "--out", tmp_path / "r2")
    assert_one_line_error(code, err, "no prunekit.json manifest")
