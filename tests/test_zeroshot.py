"""Zero-shot through stock lm-eval: offline tasks from local text, hub tasks failing in one line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from prunekit.errors import PrunekitError
from prunekit.evaluation.local_tasks import CHOICE_TASK, CLOZE_TASK, build_local_tasks
from prunekit.evaluation.zeroshot import check_task_names, parse_tasks, task_manager, zeroshot
from tiny import assert_one_line_error, run, save_tiny_llama


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random llama with a long enough context for whole sentences in its toy tokenizer."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="module")
def sotu_text(embedded_sotu) -> Path:
    return embedded_sotu


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_local_task_files_are_well_formed(sotu_text, tmp_path):
    tasks = build_local_tasks(str(sotu_text), tmp_path, n=40, seed=0)
    assert tasks.tasks == [CLOZE_TASK, CHOICE_TASK]
    assert tasks.examples == {CLOZE_TASK: 40, CHOICE_TASK: 40}
    text = " ".join(sotu_text.read_text().split())
    for name, kind in ((CLOZE_TASK, "loglikelihood"), (CHOICE_TASK, "multiple_choice")):
        config = yaml.safe_load((tmp_path / f"{name}.yaml").read_text())
        assert config["task"] == name and config["output_type"] == kind and config["dataset_path"] == "json"
        assert Path(config["dataset_kwargs"]["data_files"]["test"]).exists()
    cloze = _rows(tmp_path / f"{CLOZE_TASK}.jsonl")
    for row in cloze:
        # the target is the word that really ends the passage, and passage = context + target
        assert row["target"].startswith(" ") and re.fullmatch(r"[A-Za-z][A-Za-z'-]+", row["target"][1:])
        assert row["context"] + row["target"] == row["passage"]
        assert row["passage"] in text and len(row["context"].split()) >= 20
    choice = _rows(tmp_path / f"{CHOICE_TASK}.jsonl")
    for row in choice:
        assert len(row["choices"]) == 4 and len(set(row["choices"])) == 4
        # the labelled choice is the sentence that really follows the context in the text
        assert (row["context"] + " " + row["choices"][row["label"]]) in text
        assert all((row["context"] + " " + c) not in text for i, c in enumerate(row["choices"]) if i != row["label"])
    assert len({r["label"] for r in choice}) > 1  # the answer position is shuffled
    again = build_local_tasks(str(sotu_text), tmp_path / "again", n=40, seed=0)
    assert again.provenance["data_sha256"] == tasks.provenance["data_sha256"]  # deterministic


def test_lm_eval_on_tiny_model(sotu_text, tiny_dir, tmp_path):
    result = zeroshot(str(tiny_dir), tasks=None, local_source=str(sotu_text), local_n=12, batch_size=4)
    assert set(result.tasks) == {CLOZE_TASK, CHOICE_TASK}
    cloze, choice = result.tasks[CLOZE_TASK], result.tasks[CHOICE_TASK]
    assert cloze["n"] == 12 and choice["n"] == 12 and result.examples == 24
    assert 0 <= cloze["acc"] <= 1 and cloze["perplexity"] > 1
    assert 0 <= choice["acc"] <= 1 and 0 <= choice["acc_norm"] <= 1 and choice["acc_stderr"] >= 0
    assert choice["version"] == 1.0 and result.lm_eval_version
    assert result.seconds_per_1000 > 0


def test_task_names_checked_with_close_matches():
    assert parse_tasks(" boolq, rte,boolq ") == ["boolq", "rte"]
    with pytest.raises(PrunekitError, match="close matches: boolq"):
        check_task_names(["boolqq"], task_manager())
    with pytest.raises(PrunekitError, match="names no task"):
        parse_tasks(" , ")


def test_hub_task_failure_is_one_line(monkeypatch, tiny_dir):
    import lm_eval

    def offline(*args, **kwargs):  # what datasets raises without network (without waiting for its retries)
        raise ConnectionError("Couldn't reach 'aps/super_glue' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(lm_eval, "simple_evaluate", offline)
    with pytest.raises(PrunekitError, match="not reachable here") as info:
        zeroshot(str(tiny_dir), tasks="boolq")
    assert "\n" not in str(info.value)


def test_cli_tasks_and_local_tasks(capsys, tiny_dir, sotu_text, tmp_path):
    code, out, err = run(capsys, "eval", tiny_dir, "--local-tasks", sotu_text, "--local-n", "10", "--json",
                         "--save-json", tmp_path / "eval.json")
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["zeroshot"]["tasks"][CHOICE_TASK]["n"] == 10
    assert (tmp_path / "eval.json").exists()
    code, _, err = run(capsys, "eval", tiny_dir, "--tasks", "hellaswagg")
    assert_one_line_error(code, err, "close matches: hellaswag")
    code, _, err = run(capsys, "eval", tiny_dir)
    assert_one_line_error(code, err, "nothing to evaluate")
    short = tmp_path / "short.txt"
    short.write_text("One sentence here. Another one there.")
    code, _, err = run(capsys, "eval", tiny_dir, "--local-tasks", short)
    assert_one_line_error(code, err, "too short")
