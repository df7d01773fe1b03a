"""GBLM-Pruner's gradient statistic: per-weight ℓ2 norm of the language-model loss gradient over windows.

One full fp32 backward per calibration window (the norm is over windows, so windows cannot share a
backward). Only the prunable linears' weights require grad; each weight's gradient is squared into its
accumulator by a post-accumulate hook and freed at once, so at most one weight's gradient exists at a
time: memory is the model, one window's activations, and one fp32 accumulator per prunable weight.
The result, √Σ_n (scale · g_n)², is cached as safetensors keyed by the linears' full names, in
[out, in] layout, reusable across sparsities and patterns.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn

from prunekit.adapters import get_adapter
from prunekit.adapters.base import weight_matrix
from prunekit.errors import PrunekitError
from prunekit.files import atomic_save_tensors

#: The reference multiplies every window's gradient by 100 before squaring (fp16 range).
GRADIENT_SCALE = 100.0


def prunable_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Full name -> module of every prunable linear of the decoder blocks, in execution order."""
    adapter = get_adapter(model)
    found: dict[str, nn.Module] = {}
    for index, block in enumerate(adapter.blocks()):
        for _group, modules in adapter.block_linears(block):
            found.update({f"{adapter.block_prefix(index)}.{name}": module for name, module in modules.items()})
    return found


def compute_gradient_norms(model: nn.Module, calibration_ids: torch.Tensor, *, scale: float = GRADIENT_SCALE,
                           path: str | Path | None = None, metadata: dict | None = None,
                           log=None) -> dict[str, torch.Tensor]:
    """√Σ_windows (scale · ∂loss/∂W)² for every prunable linear, [out, in] fp32; saved to `path` if given.

    `calibration_ids` is [windows, seqlen]; the loss of a window is the model's mean next-token loss.
    The model's parameters keep their values and their requires_grad flags; no .grad is left behind.
    """
    linears = prunable_linears(model)
    sums = {name: torch.zeros_like(weight_matrix(m), dtype=torch.float32) for name, m in linears.items()}
    flags = {p: p.requires_grad for p in model.parameters()}
    handles = []
    was_training = model.training
    model.eval()  # deterministic (no dropout); the gradient does not need train mode
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for name, module in linears.items():
            transposed = type(module).__name__ == "Conv1D"

            def accumulate(param, total=sums[name], transposed=transposed):
                grad = param.grad.float() * scale
                total.add_((grad.t() if transposed else grad).square())
                param.grad = None

            module.weight.requires_grad_(True)
            handles.append(module.weight.register_post_accumulate_grad_hook(accumulate))
        device = next(model.parameters()).device
        for index, window in enumerate(calibration_ids):
            t0 = time.perf_counter()
            ids = window.unsqueeze(0).to(device)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            if log is not None:
                log(f"gradient window {index + 1}/{len(calibration_ids)}: loss {loss.item():.3f}, "
                    f"{time.perf_counter() - t0:.2f}s")
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)
    norms = {name: total.sqrt_() for name, total in sums.items()}
    if path is not None:
        info = {"prunekit": "gblm-gradients", "scale": scale, "windows": int(calibration_ids.shape[0]),
                "seqlen": int(calibration_ids.shape[1]), **(metadata or {})}
        atomic_save_tensors(norms, path, metadata={"prunekit": json.dumps(info, default=str)})
    return norms


def check_gradient_file(path: str | Path) -> Path:
    """A readable safetensors file written by `compute_gradient_norms`, or one line saying what is wrong."""
    from safetensors import safe_open

    file = Path(path)
    if not file.is_file():
        raise PrunekitError(f"gradients file {file} not found; compute it first with "
                            "prunekit.pruning.gradients.compute_gradient_norms (same calibration windows)")
    try:
        with safe_open(str(file), "pt") as handle:
            info = (handle.metadata() or {}).get("prunekit", "")
    except Exception as exc:  # safetensors raises several types for a corrupt header
        raise PrunekitError(f"gradients file {file} is not a readable safetensors file: {exc}") from None
    if "gblm-gradients" not in info:
        raise PrunekitError(f"gradients file {file} was not written by prunekit's gradient pass")
    return file


def load_gradient_norm(path: str | Path, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """One layer's gradient norms, checked against the layer's [out, in] shape."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        if name not in set(handle.keys()):
            raise PrunekitError(f"gradients file {path} has no entry for layer {name}; it was computed for "
                                "another model")
        tensor = handle.get_tensor(name)
    if tuple(tensor.shape) != tuple(shape):
        raise PrunekitError(f"gradients file {path}: layer {name} has shape {tuple(tensor.shape)}, "
                            f"the model's is {tuple(shape)}")
    return tensor.float()
