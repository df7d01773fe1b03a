"""The paper's two mechanistic measurements: attention to the task, and prompt perplexity.

Attention to the task: for a templated prompt (after the chat template), the attention row of the final prompt
position — the one that produces the first answer token — is summed over the task's own tokens; that share of
the attention mass is averaged over heads, per layer, and over layers. The paper's claim is that pruned models
put more of it on the task and less on the jailbreak wrapper.

Prompt perplexity: exp(mean NLL) of each prompt's raw text (no chat template), for the task alone and inside
each template — the paper relates the templates' effect to how surprising they are to the model.

Both batch rows with RIGHT padding: under a causal mask real tokens never see the padding on their right, so
no position or mask bookkeeping is needed; each row's last real position is read explicitly. Given `groups`
(the prompts of one template), each group's common token prefix (the chat header and the template text before
the task, ~400 tokens) is encoded once and only each row's own tokens are run after its keys and values: the
same computation as encoding every prompt whole (tested), for a sixth to a tenth of the tokens.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from prunekit.errors import PrunekitError
from prunekit.safety.decode import cache_kwarg, chunk_cache, common_prefix_length, has_sliding_window

Groups = Iterable[Sequence[int]] | None


def _right_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def _grouped(model: Any, rows: Sequence[Sequence[int]], groups: Groups) -> Iterator[tuple[int, list[int]]]:
    """(shared prefix length, row indices) per group; without groups, or on a sliding-window model (whose cache
    keeps only the window: the key positions would no longer be the prompt's), rows are encoded whole."""
    if groups is None:
        yield 0, list(range(len(rows)))
        return
    whole = has_sliding_window(model)
    for group in groups:
        if group:
            yield 0 if whole else common_prefix_length([rows[i] for i in group]), list(group)


def _encode_prefix(model: Any, prefix: Sequence[int], device: torch.device) -> tuple[Any, torch.Tensor]:
    """The prefix's keys/values (batch of one) and its logits at every position."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    ids = torch.tensor([list(prefix)], dtype=torch.long, device=device)
    logits = model(input_ids=ids, use_cache=True, **cache_kwarg(model, cache)).logits[0].float()
    return cache, logits


def _after_prefix(model: Any, prefix: Any, p: int, suffixes: Sequence[Sequence[int]], pad_id: int,
                  device: torch.device, **kwargs: Any) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """Forward of the right-padded `suffixes`, each continuing the `p`-token prefix whose cache is `prefix`
    (None when p is 0); returns the output and the suffixes' ids and mask. Positions and key slots continue the
    prefix's, so attention weights come out over [prefix; suffix] in whole-prompt coordinates."""
    ids, mask = _right_pad(suffixes, pad_id)
    if not p:
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, **kwargs)
        return out, ids, mask
    cache = chunk_cache(model, prefix, p, len(suffixes), 0, "dynamic").cache  # the prefix in every row
    full_mask = torch.cat([torch.ones((len(suffixes), p), dtype=mask.dtype), mask], dim=1)
    positions = p + torch.arange(ids.shape[1]).unsqueeze(0).expand(len(suffixes), -1)
    out = model(input_ids=ids.to(device), attention_mask=full_mask.to(device), position_ids=positions.to(device),
                use_cache=True, **kwargs, **cache_kwarg(model, cache))
    return out, ids, mask


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


#: Bytes the attention weights of one batch may take (every layer's are returned at once).
ATTENTION_BUDGET = 1 << 30


def _attention_chunks(model: Any, rows: Sequence[Sequence[int]], group: list[int], p: int,
                      batch_size: int) -> Iterator[list[int]]:
    """Batches of at most `batch_size` rows (by length) whose attention weights, [rows, heads, own tokens,
    prefix + own tokens] per layer, fit ATTENTION_BUDGET: long prompts go in smaller batches, alone if need be."""
    config = model.config
    per_cell = 4 * config.num_attention_heads * config.num_hidden_layers
    chunk: list[int] = []
    for i in sorted(group, key=lambda i: len(rows[i])):
        own = len(rows[i]) - p
        if chunk and (len(chunk) + 1 > batch_size or (len(chunk) + 1) * own * (p + own) * per_cell > ATTENTION_BUDGET):
            yield chunk
            chunk = []
        chunk.append(i)
    if chunk:
        yield chunk


@torch.inference_mode()
def attention_to_span(model: Any, rows: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]], *,
                      pad_id: int = 0, batch_size: int = 4, groups: Groups = None) -> list[dict[str, Any]]:
    """Share of the final position's attention on tokens [start, end) of each row (`groups`: module docstring).

    Returns per row ``{"share": mean over layers and heads, "per_layer": [mean over heads, ...]}``.
    """
    if len(rows) != len(spans):
        raise ValueError("one span per row")
    for row, (start, end) in zip(rows, spans, strict=True):
        if not 0 <= start < end <= len(row):
            raise PrunekitError(f"task span [{start}, {end}) lies outside a prompt of {len(row)} tokens")
    device = next(model.parameters()).device
    results: dict[int, dict[str, Any]] = {}
    with eager_attention(model):
        for p, group in _grouped(model, rows, groups):
            prefix = _encode_prefix(model, rows[group[0]][:p], device)[0] if p else None
            for chunk in _attention_chunks(model, rows, group, p, batch_size):
                out, _, _ = _after_prefix(model, prefix, p, [rows[i][p:] for i in chunk], pad_id, device,
                                          output_attentions=True)
                if not out.attentions or out.attentions[0] is None:
                    raise PrunekitError("the model returned no attention weights (eager attention is required)")
                last = torch.tensor([len(rows[i]) - 1 - p for i in chunk], device=device)
                per_layer = []
                for layer in out.attentions:  # [B, H, T_own, p + T_own]
                    final = layer[torch.arange(len(chunk), device=device), :, last, :].float()  # [B, H, p + T_own]
                    per_layer.append(torch.stack([final[b, :, start:end].sum(-1).mean()
                                                  for b, (start, end) in enumerate(spans[i] for i in chunk)]))
                table = torch.stack(per_layer, dim=1).cpu()  # [B, L]
                for b, i in enumerate(chunk):
                    values = table[b].tolist()
                    results[i] = {"share": sum(values) / len(values), "per_layer": values}
    return [results[i] for i in range(len(rows))]


@torch.inference_mode()
def prompt_perplexities(model: Any, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 8,
                        groups: Groups = None) -> list[float]:
    """Perplexity of each text on its own (the tokenizer's special tokens included, so a BOS gives context);
    `groups`: module docstring (the shared prefix's own token losses are computed once)."""
    device = next(model.parameters()).device
    rows = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    values: dict[int, float] = {}
    for p, group in _grouped(model, rows, groups):
        prefix, prefix_nll, last_logits = None, 0.0, None
        if p:
            prefix, logits = _encode_prefix(model, rows[group[0]][:p], device)
            target = torch.tensor(rows[group[0]][1:p], dtype=torch.long, device=device)
            prefix_nll = F.cross_entropy(logits[:-1], target, reduction="sum").item() if p > 1 else 0.0
            last_logits = logits[-1]
        for first in range(0, len(group), batch_size):
            chunk = group[first:first + batch_size]
            out, ids, mask = _after_prefix(model, prefix, p, [rows[i][p:] for i in chunk], pad_id, device)
            logits, ids = out.logits.float(), ids.to(device)
            # per-token losses over (rows x positions, vocabulary): the (batch, vocabulary, positions) form of
            # cross_entropy is off by up to 1e-3 per token in fp32 on CPU (measured on Qwen2.5 against fp64)
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                  reduction="none").view(len(chunk), -1)
            weight = mask[:, 1:].to(device).float()
            for b, i in enumerate(chunk):
                total, count = (nll[b] * weight[b]).sum().item(), weight[b].sum().item()
                if last_logits is not None:  # the first own token, predicted from the prefix's last position
                    total += prefix_nll + F.cross_entropy(last_logits, ids[b, 0]).item()
                    count += p
                values[i] = math.exp(total / count) if count else float("nan")
    return [values[i] for i in range(len(rows))]
