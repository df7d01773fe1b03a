"""Calling decoder blocks on cached inputs, for any family, without tracing.

The model's own forward computes what every block receives besides the hidden states (rotary
position embeddings, attention masks per layer type, position ids). We run it once on a one-row
dummy input with each block swapped for a `_Recorder` that stores its call and passes the hidden
states through, so every block later gets exactly the arguments the model would give it. Those
arguments broadcast over the batch. The same swap captures block 0's inputs for calibration data.
Only the stem (embeddings, rotary tables) runs: the forward stops at the last recorder, so the
blocks themselves, the final norm and the head need no weights (a streamed skeleton works).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

_DROPPED_KWARGS = ("cache", "cache_params", "past_key_values", "past_key_value", "layer_past", "use_cache",
                   "output_attentions")  # cache_params: Mamba blocks before transformers 5.x renamed it


class StopForward(Exception):
    """Raised from a hook or recorder to end a forward pass early: later work would be wasted."""


@dataclass
class BlockCall:
    """The non-hidden-state arguments that the model passes to one block."""

    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> BlockCall:
        def move(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                return value.to(device)
            if isinstance(value, (tuple, list)):
                return type(value)(move(v) for v in value)
            if isinstance(value, dict):
                return {k: move(v) for k, v in value.items()}
            return value

        return BlockCall(move(self.args), move(self.kwargs))


class _Recorder(nn.Module):
    """Stands in for block `index`: records the call, returns the hidden states unchanged."""

    def __init__(self, original: nn.Module, index: int, sink: Callable[[int, torch.Tensor, BlockCall], None],
                 stop_at: int | None, tuple_output: bool = False):
        super().__init__()
        object.__setattr__(self, "_original", original)  # not a submodule: .to() must not move it
        self._index = index
        self._sink = sink
        self._stop_at = stop_at
        self._tuple_output = tuple_output

    def __getattr__(self, name: str) -> Any:  # e.g. Gemma's `attention_type`
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_original"), name)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        kept = {k: v for k, v in kwargs.items() if k not in _DROPPED_KWARGS}
        self._sink(self._index, hidden_states, BlockCall(tuple(args), kept))
        if self._index == self._stop_at:
            raise StopForward
        return (hidden_states, None) if self._tuple_output else hidden_states


@contextmanager
def recording_blocks(blocks: nn.ModuleList, sink, stop_at: int | None, tuple_output: bool = False) -> Iterator[None]:
    """Swap every block for a recorder (the stem must already be on the compute device). `tuple_output`: the
    model unpacks (hidden_states, attention weights) from every block (Bamba)."""
    originals = list(blocks)
    try:
        for i, block in enumerate(originals):
            blocks[i] = _Recorder(block, i, sink, stop_at, tuple_output)
        yield
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block


def _run(model: nn.Module, input_ids: torch.Tensor) -> None:
    with suppress(StopForward):
        model(input_ids=input_ids, use_cache=False)


@torch.no_grad()
def capture_block_calls(model: nn.Module, blocks: nn.ModuleList, seqlen: int, device: torch.device | str,
                        tuple_output: bool = False) -> list[BlockCall]:
    """The arguments each block receives for a sequence of `seqlen` tokens (batch of one), kept on the CPU."""
    calls: list[BlockCall | None] = [None] * len(blocks)

    def sink(index: int, hidden: torch.Tensor, call: BlockCall) -> None:
        calls[index] = call.to("cpu") if str(device) != "cpu" else call

    dummy = torch.zeros(1, seqlen, dtype=torch.long, device=device)
    with recording_blocks(blocks, sink, len(blocks) - 1, tuple_output):
        _run(model, dummy)
    missing = [i for i, c in enumerate(calls) if c is None]
    if missing:
        raise RuntimeError(f"blocks {missing} were never called by the model's forward")
    return calls  # type: ignore[return-value]


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor, batch_size: int,
                         device: torch.device | str, on_batch: Callable[[int, torch.Tensor], None] | None = None,
                         tuple_output: bool = False) -> torch.Tensor | None:
    """Block 0's hidden-state inputs for every calibration row: handed to `on_batch(start, hidden)` batch by
    batch, or (without it) returned as one [n, seqlen, hidden] tensor on `device`."""
    outputs: list[torch.Tensor] = []
    start = 0

    def sink(index: int, hidden: torch.Tensor, call: BlockCall) -> None:
        if on_batch is None:
            outputs.append(hidden.detach())
        else:
            on_batch(start, hidden.detach())

    with recording_blocks(blocks, sink, 0, tuple_output):
        for start in range(0, input_ids.shape[0], batch_size):  # `sink` reads `start`
            _run(model, input_ids[start : start + batch_size].to(device))
    return torch.cat(outputs, dim=0) if on_batch is None else None
