"""The paper's two mechanistic measurements: attention to the task, and prompt perplexity.

Attention to the task: for a templated prompt (after the chat template), the attention row of the final prompt
position — the one that produces the first answer token — is summed over the task's own tokens; that share of
the attention mass is averaged over heads, per layer, and over layers. The paper's claim is that pruned models
put more of it on the task and less on the jailbreak wrapper.

Prompt perplexity: exp(mean NLL) of each prompt's raw text (no chat template), for the task alone and inside
each template — the paper relates the templates' effect to how surprising they are to the model.

Both batch rows with RIGHT padding: under a causal mask real tokens never see the padding on their right, so
no position or mask bookkeeping is needed; each row's last real position is read explicitly.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from prunekit.errors import PrunekitError


def _right_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


@contextlib.contextmanager
def eager_attention(model: Any) -> Iterator[None]:
    """Switch the model to eager attention (the only kind that returns weights) and back."""
    config = model.config
    previous = getattr(config, "_attn_implementation", None)
    if previous in (None, "eager"):
        yield
        return
    try:
        model.set_attn_implementation("eager")
    except (AttributeError, ValueError) as error:
        raise PrunekitError(f"cannot switch this model to eager attention: {error}") from error
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@torch.inference_mode()
def attention_to_span(model: Any, rows: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]], *,
                      pad_id: int = 0, batch_size: int = 4) -> list[dict[str, Any]]:
    """Share of the final position's attention on tokens [start, end) of each row.

    Returns per row ``{"share": mean over layers and heads, "per_layer": [mean over heads, ...]}``.
    """
    if len(rows) != len(spans):
        raise ValueError("one span per row")
    for row, (start, end) in zip(rows, spans, strict=True):
        if not 0 <= start < end <= len(row):
            raise PrunekitError(f"task span [{start}, {end}) lies outside a prompt of {len(row)} tokens")
    device = next(model.parameters()).device
    results: list[dict[str, Any]] = []
    with eager_attention(model):
        for first in range(0, len(rows), batch_size):
            chunk = list(range(first, min(first + batch_size, len(rows))))
            ids, mask = _right_pad([rows[i] for i in chunk], pad_id)
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_attentions=True,
                        use_cache=False)
            if not out.attentions or out.attentions[0] is None:
                raise PrunekitError("the model returned no attention weights (eager attention is required)")
            last = torch.tensor([len(rows[i]) - 1 for i in chunk], device=device)
            per_layer = []
            for layer in out.attentions:  # [B, H, T, T]
                final = layer[torch.arange(len(chunk), device=device), :, last, :].float()  # [B, H, T]
                shares = []
                for b, i in enumerate(chunk):
                    start, end = spans[i]
                    shares.append(final[b, :, start:end].sum(-1).mean())
                per_layer.append(torch.stack(shares))
            table = torch.stack(per_layer, dim=1).cpu()  # [B, L]
            for b in range(len(chunk)):
                values = table[b].tolist()
                results.append({"share": sum(values) / len(values), "per_layer": values})
    return results


@torch.inference_mode()
def prompt_perplexities(model: Any, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 8) -> list[float]:
    """Perplexity of each text on its own (the tokenizer's special tokens included, so a BOS gives context)."""
    device = next(model.parameters()).device
    rows = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    values: list[float] = []
    for first in range(0, len(rows), batch_size):
        chunk = rows[first:first + batch_size]
        ids, mask = _right_pad(chunk, pad_id)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits.float()
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:].to(device), reduction="none")
        weight = mask[:, 1:].to(device).float()
        for b in range(len(chunk)):
            count = weight[b].sum().item()
            values.append(math.exp((nll[b] * weight[b]).sum().item() / count) if count else float("nan"))
    return values
