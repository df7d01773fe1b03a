"""A study folder as the run's state: its identity (what a rerun must share to continue), its progress
marker, and the pruned variants stored once as bit-packed zero masks so that a rerun rebuilds them exactly
instead of pruning again.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from prunekit.errors import PrunekitError
from prunekit.files import (
    append_lines,
    atomic_save_tensors,
    atomic_write_bytes,
    atomic_write_json,
    check_output_dir,
    read_jsonl,
    remove_own_dir,
    write_marker,
)

RUN_FILE = "run.json"
#: What defines a run's answers: a rerun must match on these (batch size, device, analyses may change).
IDENTITY_FIELDS = ("model", "reference", "tasks", "benign", "sparsities", "method", "layers", "limit",
                   "max_new_tokens", "prompt_format", "calib", "nsamples", "seqlen", "seed", "stop_early")
#: What the unpruned variants' answers depend on: runs equal on these (pruning aside) share their dense answers.
DENSE_FIELDS = ("model", "reference", "tasks", "benign", "templates", "judges", "limit", "max_new_tokens",
                "prompt_format", "stop_early")
#: What a variant's measurements (info.json) depend on besides the model.
MEASUREMENT_FIELDS = ("analyses", "analyses_limit", "ppl_source", "ppl_seqlen", "ppl_max_windows")


def record_key(record: dict[str, Any]) -> tuple[str, str, str, str]:
    """What identifies an answer across reruns: variant, prompt set, template, task."""
    return record["variant"], record["set"], record["template"], str(record["task_id"])


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return ",".join(value) or "none"
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "none"
    return repr(value)


def prepare_run_dir(out_dir: str | Path, identity: dict[str, Any], overwrite: bool) -> tuple[Path, bool]:
    """Create, continue or (with `overwrite`) restart the run folder; returns it and whether it resumes.

    A folder holding a run of another definition is refused with one line naming the first difference; a
    folder prunekit did not write is refused as everywhere (`check_output_dir`).
    """
    out = Path(out_dir).expanduser()
    state_file = out / RUN_FILE
    if out.is_dir() and not overwrite and state_file.is_file():
        try:
            stored = json.loads(state_file.read_text(encoding="utf-8"))["identity"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise PrunekitError(f"{state_file} is unreadable ({type(error).__name__}); pass --overwrite to start "
                                "the run again") from error
        for key in ("model", "reference", "templates", "sparsities", "judges", *IDENTITY_FIELDS):
            if stored.get(key) != identity.get(key):
                flag = {"model": "MODEL", "judges": "judge (--judge-model)", "tasks": "--tasks file",
                        "stop_early": "--stop-early/--no-stop-early"}.get(key, f"--{key.replace('_', '-')}")
                raise PrunekitError(
                    f"{out} holds a run with a different {flag} ({_describe(stored.get(key))}, now "
                    f"{_describe(identity.get(key))}); rerun with the same options to continue it, or pass "
                    "--overwrite to start again")
        return out, True
    if out.is_dir() and not overwrite and not any(out.iterdir()):
        pass  # an empty folder: start in it
    else:
        check_output_dir(out, overwrite)
        if out.exists():
            remove_own_dir(out)  # check_output_dir allowed it: prunekit wrote it (or it is empty)
    out.mkdir(parents=True, exist_ok=True)
    write_marker(out, "safety")  # first, so that --overwrite recognises an interrupted run as prunekit's
    atomic_write_json(out / RUN_FILE, {"identity": identity, "state": "running"}, indent=1)
    return out, False


def check_dense_source(source: str | Path, identity: dict[str, Any]) -> Path:
    """The run folder named by ``--dense-from``, checked to hold answers of the same unpruned model to the same
    prompts under the same judges (one line naming the first difference otherwise)."""
    folder = Path(source).expanduser()
    try:
        stored = json.loads((folder / RUN_FILE).read_text(encoding="utf-8"))["identity"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise PrunekitError(f"--dense-from {source}: not a safety run folder (no readable {RUN_FILE}); expected "
                            "the --out folder of an earlier `prunekit safety` run") from error
    for key in DENSE_FIELDS:
        if stored.get(key) != identity.get(key):
            raise PrunekitError(f"--dense-from {source}: its dense answers were generated with a different {key} "
                                f"({_describe(stored.get(key))}, here {_describe(identity.get(key))}); only a run "
                                f"that differs in pruning alone ({', '.join(DENSE_SHARED_OK)}) can share them")
    return folder


#: What may differ between a run and the run it takes its dense answers from.
DENSE_SHARED_OK = ("sparsities", "method", "layers", "calib", "nsamples", "seqlen", "seed")


def copy_dense(source: Path, out: Path, names: list[str], measurements: dict[str, Any]) -> int:
    """Append to ``out`` the answers of the unpruned variants `names` that ``source`` holds and ``out`` lacks
    (each marked ``copied_from``), and their measurements when ``source`` measured them the same way; returns the
    answers copied. Runs that differ only in what is pruned thus generate and measure the dense model once."""
    have = {record_key(r) for r in read_jsonl(out / "responses.jsonl")}
    records = [r for r in read_jsonl(source / "responses.jsonl") if r["variant"] in names and record_key(r) not in have]
    append_lines(out / "responses.jsonl", [json.dumps({**r, "copied_from": str(source)}, ensure_ascii=False)
                                           for r in records])
    results = source / "results.json"
    config = json.loads(results.read_text(encoding="utf-8")).get("config", {}) if results.is_file() else {}
    if all(config.get(k) == v for k, v in measurements.items()):
        for name in names:
            info, mine = source / "variants" / name / "info.json", out / "variants" / name / "info.json"
            if info.is_file() and not mine.is_file():
                atomic_write_json(mine, {**json.loads(info.read_text(encoding="utf-8")), "copied_from": str(source)},
                                  indent=None)
    return len(records)


def mark_state(out: Path, state: str, extra: dict[str, Any] | None = None) -> None:
    record = json.loads((out / RUN_FILE).read_text(encoding="utf-8"))
    record.update(state=state, **(extra or {}))
    atomic_write_json(out / RUN_FILE, record, indent=1)


def save_pruned(dense: torch.nn.Module, pruned: torch.nn.Module, path: Path, meta: dict[str, Any]) -> None:
    """Store what pruning changed: the zero mask of each layer (bit-packed) when pruning only zeroed weights
    (Wanda), the whole weight otherwise; `load_pruned` rebuilds the variant from the dense model exactly."""
    import numpy as np

    dense_params = dict(dense.named_parameters())
    tensors: dict[str, torch.Tensor] = {}
    for name, weight in pruned.named_parameters():
        base = dense_params[name]
        if torch.equal(weight, base):
            continue
        zero = weight == 0
        if torch.equal(base.masked_fill(zero, 0), weight):
            bits = np.packbits(zero.detach().cpu().numpy().reshape(-1))
            tensors[f"mask::{name}"] = torch.from_numpy(bits)
        else:
            tensors[f"weight::{name}"] = weight.detach().cpu()
    atomic_save_tensors(tensors, path, metadata={"prunekit": json.dumps(meta, default=str)})


def load_pruned(dense: torch.nn.Module, path: Path) -> torch.nn.Module:
    """A copy of `dense` with a saved variant's masks (or weights) applied."""
    import numpy as np
    from safetensors.torch import load_file

    pruned = copy.deepcopy(dense)
    params = dict(pruned.named_parameters())
    with torch.no_grad():
        for key, tensor in load_file(str(path)).items():
            kind, name = key.split("::", 1)
            if name not in params:
                raise PrunekitError(f"{path} does not fit the model (no parameter {name}); pass --overwrite")
            target = params[name]
            if kind == "weight":
                target.copy_(tensor.to(target.dtype))
            else:
                bits = np.unpackbits(tensor.numpy())[: target.numel()]
                mask = torch.from_numpy(bits.astype(bool)).reshape(target.shape).to(target.device)
                target.masked_fill_(mask, 0)
    return pruned


# --------------------------------------------------------------------------------------------------
# carrying a run between machines without the answers' text

CARRY_RECORDS = "verdicts.jsonl.gz"
#: The fields of an answer that hold text (the prompt, the answer); everything else (keys, verdicts, token counts,
#: timings) is carried.
TEXT_FIELDS = ("prompt", "response", "token_ids")


#: What a run's last session wrote (partial summaries when it was stopped), carried as its record (never read
#: back: a continued run computes them again).
FINISHED_FILES = ("results.json", "report.md", "refusal_vs_sparsity.png")


def export_carry(out: Path, carry: Path) -> int:
    """Write what continuing `out` elsewhere needs, minus the answers' text, to `carry`: the run's identity, the
    variants' measurements (info.json), every answer's key and verdicts (gzipped JSON lines) and its latest
    results and report (partial when a session was stopped). Returns the
    number of answers carried. The pruned masks are not carried: a continued run prunes again (seeded, the same
    masks)."""
    import gzip

    records = read_jsonl(out / "responses.jsonl")
    lines = [json.dumps({k: v for k, v in r.items() if k not in TEXT_FIELDS}, ensure_ascii=False) for r in records]
    carry.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(carry / CARRY_RECORDS, gzip.compress("".join(f"{line}\n" for line in lines).encode(), mtime=0))
    for info in sorted((out / "variants").glob("*/info.json")):
        atomic_write_bytes(carry / "variants" / info.parent.name / "info.json", info.read_bytes())
    for finished in FINISHED_FILES:  # the results travel as the run's record (they hold no answer text)
        if (out / finished).is_file():
            atomic_write_bytes(carry / finished, (out / finished).read_bytes())
    atomic_write_bytes(carry / RUN_FILE, (out / RUN_FILE).read_bytes())
    return len(records)


def import_carry(carry: Path, out: Path) -> int:
    """Start `out` from a carried state (`export_carry`) when `out` holds no run yet; returns the answers
    restored (0 when there was nothing to do). The restored answers say that their text was not carried, so that
    re-judging refuses them instead of judging an empty answer."""
    import gzip

    if not (carry / RUN_FILE).is_file() or (out.is_dir() and any(out.iterdir())):
        return 0  # nothing carried, or a run (or anything else) is there already: prepare_run_dir decides
    out.mkdir(parents=True, exist_ok=True)
    write_marker(out, "safety")
    records = [json.loads(line) for line in gzip.decompress((carry / CARRY_RECORDS).read_bytes()).decode().splitlines()
               if line.strip()]
    append_lines(out / "responses.jsonl", [json.dumps({**r, "text_not_carried": True}, ensure_ascii=False)
                                           for r in records])
    for info in sorted((carry / "variants").glob("*/info.json")):
        atomic_write_bytes(out / "variants" / info.parent.name / "info.json", info.read_bytes())
    atomic_write_bytes(out / RUN_FILE, (carry / RUN_FILE).read_bytes())  # last: the folder is a run from here on
    return len(records)
