"""What survives a kill: a run's progress, kept in its staging folder and written after every block.

Layout of the staging folder (beside the output, `.OUT.partial`):

    run.json                     fingerprint (recipe, model, calibration) and progress, written last, atomically
    calibration.safetensors      the calibration ids (a `self` sample is never drawn twice)
    pass-K/block-I.safetensors   what pass K kept of block I (a collect pass's statistics)
    activations-K-I.safetensors  the inputs of block I of pass K, when activations live in memory
    activations-{0,1}.bin        the two sides of spilled activations (run.json says which one is current)
    model-*.safetensors          finished output shards, one per block

Every file is complete before `run.json` names it, so a kill at any moment leaves a consistent state:
the resumed run redoes at most the block that was in progress, from the same inputs, to the same bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prunekit.errors import PrunekitError
from prunekit.files import atomic_save_tensors, atomic_write_json

RUN_FILE = "run.json"
FORMAT = 1


@dataclass
class PassProgress:
    next_block: int = 0
    complete: bool = False
    #: JSON-able state of the pass (e.g. the layer records of a sequential pass)
    state: dict[str, Any] = field(default_factory=dict)
    #: where the inputs of `next_block` are: {"kind": "memory", "file": ...} or {"kind": "spilled", "current": 0|1}
    activations: dict[str, Any] | None = None


class RunDir:
    """The staging folder of one resumable run."""

    def __init__(self, folder: Path, fingerprint: dict[str, Any]):
        self.folder = folder
        self.fingerprint = fingerprint
        self.passes: list[PassProgress] = []
        self.resumed_at: list[dict[str, Any]] = []
        self.extra: dict[str, Any] = {}

    # -- opening ---------------------------------------------------------------------------------------
    def open(self, *, resume: bool | None) -> bool:
        """Create the folder, or continue the run it holds. Returns True when resuming.

        `resume=None` (the default of the CLI) continues a matching run and starts a missing one;
        `resume=True` requires a run to continue; either refuses a run whose fingerprint differs.
        """
        record = self.folder / RUN_FILE
        if not record.is_file():
            if resume:
                raise PrunekitError(f"--resume: there is no interrupted run in {self.folder}")
            self.folder.mkdir(parents=True, exist_ok=True)
            return False
        try:
            saved = json.loads(record.read_text())
        except (OSError, ValueError) as error:
            raise PrunekitError(f"the interrupted run in {self.folder} has an unreadable {RUN_FILE} ({error}); "
                                "pass --overwrite to start again") from None
        differing = [key for key in sorted(set(saved.get("fingerprint", {})) | set(self.fingerprint))
                     if saved.get("fingerprint", {}).get(key) != self.fingerprint.get(key)]
        if differing:
            raise PrunekitError(f"the interrupted run in {self.folder} had a different {', '.join(differing)}; "
                                "rerun it unchanged to continue, or pass --overwrite to start again")
        self.passes = [PassProgress(**p) for p in saved.get("passes", [])]
        self.resumed_at = list(saved.get("resumed_at", []))
        self.extra = dict(saved.get("extra", {}))
        return True

    # -- progress --------------------------------------------------------------------------------------
    def progress(self, index: int) -> PassProgress:
        while len(self.passes) <= index:
            self.passes.append(PassProgress())
        return self.passes[index]

    def save(self) -> None:
        atomic_write_json(self.folder / RUN_FILE, {
            "format": FORMAT, "fingerprint": self.fingerprint, "resumed_at": self.resumed_at, "extra": self.extra,
            "passes": [p.__dict__ for p in self.passes],
        })

    def mark_resumed(self, where: dict[str, Any]) -> None:
        self.resumed_at.append(where)

    # -- files -----------------------------------------------------------------------------------------
    def save_tensors(self, relative: str, tensors: dict[str, torch.Tensor]) -> None:
        atomic_save_tensors({k: v.detach().cpu() for k, v in tensors.items()}, self.folder / relative)

    def load_tensors(self, relative: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.folder / relative))

    def remove(self, relative: str) -> None:
        path = (self.folder / relative).resolve()
        if path.is_relative_to(self.folder.resolve()):  # only files of this run
            path.unlink(missing_ok=True)
