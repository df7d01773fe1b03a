"""Perplexity of a model on disk, block by block: memory bounded by a block and the activations, never the model.

The pinned protocol of perplexity.py, computed differently: every window's hidden states go through block
after block (the engine's forward pass, activations in memory or spilled), then through the final norm and
the head, whose logits are made for a few hundred tokens at a time, so a full-vocabulary logits tensor for a
whole batch never exists.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from prunekit.evaluation.perplexity import PerplexityResult, perplexity_result, prepare_windows

#: Tokens of one window whose logits are computed at once (vocab 128k x 256 tokens x 4 bytes = 128 MB).
LOSS_CHUNK = 256


@torch.no_grad()
def streamed_perplexity(checkpoint, tokenizer, source: Any, *, seqlen: int, batch_size: int = 8, bos: bool = False,
                        split: str = "test", max_windows: int | None = None, device: str = "cpu",
                        activations_dtype: torch.dtype | None = None, activations_budget: int | None = None,
                        spill_dir: Path | None = None, progress: bool = False) -> PerplexityResult:
    """Perplexity of `checkpoint` (models.open_checkpoint) on SOURCE under the pinned protocol."""
    from prunekit.adapters import get_adapter
    from prunekit.engine import Engine, EngineOptions, StreamedBlocks
    from prunekit.engine.passes import ForwardPass, Passes
    from prunekit.memory import bound_heap_growth

    bound_heap_growth()
    t0 = time.perf_counter()
    model = checkpoint.skeleton()
    rows = model.get_input_embeddings().num_embeddings
    windows, prov, dropped, bos_id = prepare_windows(
        source, tokenizer, seqlen=seqlen, batch_size=batch_size, bos=bos, split=split, max_windows=max_windows,
        config=checkpoint.config, embedding_rows=rows)
    adapter = get_adapter(model)
    blocks = StreamedBlocks(checkpoint, adapter, torch.device(device))
    engine = Engine(blocks, options=EngineOptions(batch_size=batch_size, device=device, progress=progress,
                                                  activations_dtype=activations_dtype or torch.float32,
                                                  activations_budget=activations_budget), spill_dir=spill_dir)
    engine.run(Passes(ForwardPass()), windows)
    store = engine.activations
    assert store is not None
    nll_sum = torch.zeros((), dtype=torch.float64)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    with blocks.tail():
        norm, head = adapter.final_norm(), adapter.head()
        for start, hidden in store.batches(batch_size, blocks.device, blocks.compute_dtype):
            hidden = norm(hidden) if norm is not None else hidden
            targets = windows[start : start + hidden.shape[0], 1:].to(blocks.device)
            for row in range(hidden.shape[0]):  # one row's tokens at a time: the logits stay small
                for first in range(0, hidden.shape[1] - 1, LOSS_CHUNK):
                    last = min(first + LOSS_CHUNK, hidden.shape[1] - 1)
                    logits = head(hidden[row, first:last]).float()
                    if softcap:
                        logits = torch.tanh(logits / softcap) * softcap
                    nll_sum += F.cross_entropy(logits, targets[row, first:last], reduction="sum").double().cpu()
    return perplexity_result(float(nll_sum), windows, seqlen=seqlen, bos=bos, bos_id=bos_id, prov=prov,
                             dropped=dropped, dtype=str(blocks.compute_dtype).removeprefix("torch."),
                             seconds=time.perf_counter() - t0, batch_size=batch_size,
                             how=f" block by block from disk (activations in {store.dtype}), logits "
                                 f"{LOSS_CHUNK} tokens at a time")
