"""Checkpoints of a run, without pickle: tensors in one safetensors file, everything else in JSON.

`state.safetensors` holds the trainable tensors (`param/<name>`) and the optimizer's per-parameter state
(`optim/<index>/<key>`: AdamW's step, exp_avg and exp_avg_sq). `state.json` holds the step, the optimizer's
group settings, the scheduler's scalars, the loss curve, the seconds spent so far, and a fingerprint of the
settings and data that a resume must match. The tensors are written first and carry their step; the JSON
names the step it belongs to, so a crash between the two writes is caught as a mismatch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from prunekit.errors import PrunekitError
from prunekit.files import atomic_save_tensors, atomic_write_json

TENSORS = "state.safetensors"
STATE = "state.json"


def save(folder: Path, step: int, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer | None,
         state: dict[str, Any]) -> None:
    tensors = {f"param/{name}": value.detach().cpu() for name, value in params.items()}
    if optimizer is not None:
        for index, entry in optimizer.state_dict()["state"].items():
            for key, value in entry.items():
                tensors[f"optim/{index}/{key}"] = torch.as_tensor(value).cpu()
    atomic_save_tensors(tensors, folder / TENSORS, metadata={"step": str(step)})
    groups = optimizer.state_dict()["param_groups"] if optimizer is not None else None
    atomic_write_json(folder / STATE, {**state, "step": step, "optimizer_groups": groups})


def exists(folder: Path) -> bool:
    return (folder / STATE).is_file() and (folder / TENSORS).is_file()


def load(folder: Path, fingerprint: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The JSON state and the tensors, after checking they belong together and to these settings."""
    from safetensors import safe_open

    state = json.loads((folder / STATE).read_text())
    with safe_open(str(folder / TENSORS), framework="pt") as handle:
        step = (handle.metadata() or {}).get("step")
    if step != str(state["step"]):
        raise PrunekitError(f"checkpoint in {folder} is inconsistent (tensors of step {step}, state of step "
                            f"{state['step']}); delete {folder} and start again")
    if state.get("fingerprint") != fingerprint:
        changed = sorted(k for k in set(fingerprint) | set(state.get("fingerprint", {}))
                         if fingerprint.get(k) != state.get("fingerprint", {}).get(k))
        raise PrunekitError(f"--resume: the checkpoint in {folder} was made with other settings "
                            f"({', '.join(changed)}); rerun with the same ones or start without --resume")
    return state, load_file(str(folder / TENSORS))


def restore(tensors: dict[str, torch.Tensor], params: dict[str, torch.Tensor],
            optimizer: torch.optim.Optimizer | None = None, groups: list[dict[str, Any]] | None = None) -> None:
    """Copy saved values into the live parameters and (when given) the optimizer: its per-parameter tensors
    and its group settings (the learning rate the schedule had reached)."""
    with torch.no_grad():
        for name, value in params.items():
            value.copy_(tensors[f"param/{name}"])
    if optimizer is None:
        return
    saved: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, index, name = key.split("/", 2)
            saved.setdefault(int(index), {})[name] = value
    state_dict = optimizer.state_dict()
    state_dict["state"] = saved
    if groups is not None:
        state_dict["param_groups"] = [{**group, "betas": tuple(group["betas"])} for group in groups]
    optimizer.load_state_dict(state_dict)
