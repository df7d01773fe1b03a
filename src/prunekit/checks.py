"""Checks of run options that need no model, so a bad value costs one line and no work.

Called by the CLI commands before anything is loaded, and by `prunekit.prune` for API users.
"""

from __future__ import annotations

import torch

from prunekit.errors import PrunekitError

DEVICES = "cpu, cuda, cuda:N (with a visible GPU), mps (on Apple silicon), auto (a GPU when there is one)"


def check_positive(values: dict[str, int | None]) -> None:
    """Every given count (label → value; None = not given) must be an integer >= 1."""
    for label, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PrunekitError(f"{label} {value!r} is invalid; accepted: an integer >= 1")


def check_device(device: str, label: str = "--device") -> str:
    """A device torch can use here: the name is understood and the hardware is present (`auto` is resolved)."""
    if str(device).strip().lower() == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise PrunekitError(f"{label} {device!r} is not a device; accepted: {DEVICES}") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise PrunekitError(f"{label} {device}: CUDA is not available here (torch {torch.__version__} sees no "
                                "GPU); accepted: cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise PrunekitError(f"{label} {device}: only {torch.cuda.device_count()} CUDA device(s) visible; "
                                f"accepted: cuda:0 … cuda:{torch.cuda.device_count() - 1}")
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise PrunekitError(f"{label} {device}: MPS is not available here; accepted: cpu")
    elif parsed.type != "cpu":
        raise PrunekitError(f"{label} {device!r} is not supported; accepted: {DEVICES}")
    return device
