"""Reconstruct mode: block by block, train the block's small parameters to reproduce the dense block.

As the reference code: the calibration rows enter block 0 through the pruned model's embeddings; for each
block i the target is the *dense* block i applied to the current inputs, the pruned block i (its biases,
norms and adapters) is fitted to it with a mean-squared error for `steps` steps over the rows in order, and
the fitted block's outputs become block i+1's inputs. One block's activations live in memory at a time, so
the cost is that of one block, not of the whole model. A checkpoint follows every finished block; a resume
recomputes the inputs of the next block from the restored ones (the same batches, so the same numbers).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.adapters import get_adapter
from prunekit.engine.capture import BlockCall, capture_block_calls, capture_block_inputs
from prunekit.errors import PrunekitError
from prunekit.retrain.config import RetrainConfig
from prunekit.retrain.train import optimize

#: Called with (blocks done, per-block loss curves) after each block.
OnBlock = Callable[[int, list[list[float]]], None]


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def _run_block(block: nn.Module, inputs: torch.Tensor, call: BlockCall, batch_size: int) -> torch.Tensor:
    outputs = torch.empty_like(inputs)
    for start in range(0, inputs.shape[0], batch_size):
        outputs[start : start + batch_size] = _first(block(inputs[start : start + batch_size], *call.args,
                                                          **call.kwargs))
    return outputs


def check_reference(model: nn.Module, dense: nn.Module) -> None:
    """The dense model must have the pruned one's blocks and hidden size (heads and channels may differ)."""
    ours, theirs = get_adapter(model), get_adapter(dense)
    if ours.family != theirs.family or len(ours.blocks()) != len(theirs.blocks()) or \
            model.config.hidden_size != dense.config.hidden_size:
        raise PrunekitError(f"--reference is a {theirs.family} model with {len(theirs.blocks())} blocks of width "
                            f"{dense.config.hidden_size}, the pruned model a {ours.family} one with "
                            f"{len(ours.blocks())} of width {model.config.hidden_size}; accepted: its dense model")


def reconstruct(model: nn.Module, dense: nn.Module, ids: torch.Tensor, params: dict[str, nn.Parameter],
                config: RetrainConfig, *, start_block: int = 0, curves: list[list[float]] | None = None,
                progress: bool = True, on_block: OnBlock | None = None) -> dict[str, Any]:
    """Fit every block from `start_block` on; returns the per-block loss curves."""
    adapter, dense_adapter = get_adapter(model), get_adapter(dense)
    blocks, dense_blocks = adapter.blocks(), dense_adapter.blocks()
    seqlen, batch_size = ids.shape[1], config.batch_size
    calls = capture_block_calls(model, blocks, seqlen, "cpu")
    dense_calls = capture_block_calls(dense, dense_blocks, seqlen, "cpu")
    inputs = capture_block_inputs(model, blocks, ids, batch_size, "cpu")
    curves = list(curves or [])
    model.eval()  # no dropout anywhere: the fit sees the block as it will run
    for index in range(start_block):  # a resume: these blocks are already fitted
        inputs = _run_block(blocks[index], inputs, calls[index], batch_size)
    nbatches = -(-inputs.shape[0] // batch_size)
    for index in range(start_block, len(blocks)):
        block, call = blocks[index], calls[index]
        targets = _run_block(dense_blocks[index], inputs, dense_calls[index], batch_size)
        prefix = f"{adapter.block_prefix(index)}."
        own = {name: p for name, p in params.items() if name.startswith(prefix)}

        def loss_at(step: int, block=block, call=call, inputs=inputs, targets=targets) -> torch.Tensor:
            rows = slice((step % nbatches) * batch_size, (step % nbatches + 1) * batch_size)
            return F.mse_loss(_first(block(inputs[rows], *call.args, **call.kwargs)), targets[rows])

        curve = optimize(own, loss_at, config, tokens_per_step=batch_size * seqlen,
                         desc=f"block {index + 1}/{len(blocks)}", progress=progress) if own else []
        curves.append(curve)
        inputs = _run_block(block, inputs, call, batch_size)
        if on_block is not None:
            on_block(index + 1, curves)
    return {"block_loss_curves": curves,
            "first_step_block_losses": [c[0] if c else None for c in curves],
            "last_step_block_losses": [c[-1] if c else None for c in curves]}
