"""Every write goes through prunekit.files: a write failing halfway leaves the old file and no temporary file,
and an output is replaced only when prunekit wrote it."""

from __future__ import annotations

import json

import pytest

from prunekit.errors import PrunekitError
from prunekit.files import MARKER, atomic_write, atomic_write_json, check_output_dir, check_output_file, write_marker
from prunekit.safety.judges import read_records, write_records


def test_a_write_failing_halfway_keeps_the_old_file(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_write(target, "w", encoding="utf-8") as handle:
        handle.write("new, but only half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file behind


def test_rejudged_responses_never_rewrite_the_only_copy_in_place(tmp_path):
    """A record that fails to serialise halfway through the file leaves the earlier responses.jsonl as it was."""
    path = tmp_path / "responses.jsonl"
    write_records([{"variant": "dense", "response": "no"}, {"variant": "dense", "response": "yes"}], path)
    before = path.read_bytes()
    with pytest.raises(TypeError):
        write_records([{"variant": "dense", "response": "no"}, {"variant": "dense", "judge": object()}], path)
    assert path.read_bytes() == before and len(read_records(path)) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["responses.jsonl"]


def test_output_folder_rules(tmp_path):
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(PrunekitError, match="already exists; pass --overwrite"):
        check_output_dir(mine, overwrite=False)
    with pytest.raises(PrunekitError, match=r"refusing to overwrite .*project"):
        check_output_dir(mine, overwrite=True)
    ours = tmp_path / "sweep"
    ours.mkdir()
    (ours / "matrix.json").write_text("{}")
    write_marker(ours, "sweep")
    assert check_output_dir(ours, overwrite=True) == ours
    assert json.loads((ours / MARKER).read_text()) == {"written_by": "prunekit sweep"}
    empty = tmp_path / "empty"
    empty.mkdir()
    assert check_output_dir(empty, overwrite=True) == empty


def test_output_file_rules(tmp_path):
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}')
    with pytest.raises(PrunekitError, match="already exists; pass --overwrite"):
        check_output_file(notes, overwrite=False)
    with pytest.raises(PrunekitError, match=r"refusing to overwrite .*notes\.json"):
        check_output_file(notes, overwrite=True)
    summary = atomic_write_json(tmp_path / "eval.json", {"kind": "prunekit.eval", "perplexity": 3.0})
    assert check_output_file(summary, overwrite=True) == summary
    with pytest.raises(PrunekitError, match="is a folder"):
        check_output_file(tmp_path, overwrite=True)


def test_append_lines_survives_a_torn_tail(tmp_path):
    """A crash mid-append leaves half a line: the reader skips it and the next append cuts it off first."""
    from prunekit.files import append_lines, read_jsonl

    path = tmp_path / "responses.jsonl"
    append_lines(path, [json.dumps({"i": 0}), json.dumps({"i": 1})])
    append_lines(path, [json.dumps({"i": 2})])
    assert read_jsonl(path) == [{"i": 0}, {"i": 1}, {"i": 2}]
    with open(path, "a", encoding="utf-8") as handle:  # what a crash halfway through a write leaves
        handle.write('{"i": 3, "resp')
    assert read_jsonl(path) == [{"i": 0}, {"i": 1}, {"i": 2}]
    append_lines(path, [json.dumps({"i": 4})])
    assert read_jsonl(path) == [{"i": 0}, {"i": 1}, {"i": 2}, {"i": 4}]
    assert path.read_text().count("\n") == 4
    with pytest.raises(ValueError, match="newline"):
        append_lines(path, ["a\nb"])
    assert read_jsonl(tmp_path / "absent.jsonl") == []
