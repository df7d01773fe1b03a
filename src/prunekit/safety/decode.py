"""The fast path of a study: shared prefix, rows that leave the batch, the cheapest KV cache the model allows.

The prompts of one template share the chat header and the template text before the task (hundreds of tokens),
so their common token prefix is encoded ONCE per template; only each task's own tokens are encoded per row.
The padding of the rows' suffixes sits between the prefix and the suffix, masked, with explicit position ids,
which is the same computation as encoding each prompt alone. A row leaves the batch (its cache rows dropped) as
soon as it ends — at a stop token, or when a `stop` callback says its verdict can no longer change.

Where the prefix's keys/values live (`Layout`, chosen by `choose_layout`; `--throughput-study` and
`benchmarks/decode_cache.py` time them side by side):

* ``shared-prefix``: one copy of the prefix for the whole batch, read by `prefix_attention` (Llama, Qwen2);
  each row's static cache holds only its own tokens;
* ``static``: the prefix copied into every row of a preallocated static cache, written in place;
* ``dynamic``: transformers' DynamicCache (concatenates every layer's keys and values at every token); the
  only one for sliding-window models, which also decode without a shared prefix (the padding would shift
  the window).

`torch.compile` of the decode step was measured slower than eager on this CPU (`benchmarks/decode_cache.py`)
and is not used.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from prunekit.errors import PrunekitError
from prunekit.safety import prefix_attention
from prunekit.safety.generate import Generation, decoding_setup, left_pad

Layout = Literal["shared-prefix", "static", "dynamic"]
LAYOUTS: tuple[str, ...] = ("auto", "shared-prefix", "static", "dynamic")

#: `stop(answer_so_far)` → a reason to stop (the verdict can no longer change) or None to go on.
StopRule = Callable[[str], str | None]


@dataclass
class Batch:
    """One finished batch of `decode_batches`: which prompts, their new tokens, why each ended, the cost."""

    indices: list[int]
    token_ids: list[list[int]]
    ended: list[str]  # "eos", "length" or "verdict"
    reasons: list[str | None]  # for "verdict": what fixed it (from the stop rule)
    seconds: float
    prefix_tokens: int
    layout: str = "dynamic"


def common_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix shared by all rows, leaving every row at least one own token
    (the last prompt token must be fed to produce the first answer token)."""
    if not rows:
        return 0
    first, limit = rows[0], min(len(r) for r in rows) - 1
    n = 0
    while n < limit and all(r[n] == first[n] for r in rows):
        n += 1
    return max(n, 0)


def has_sliding_window(model: Any) -> bool:
    """Whether some layer attends to a sliding window of cache slots (Gemma 3, Mistral-style)."""
    config = getattr(model, "config", None)
    types = getattr(config, "layer_types", None) or []
    return any("sliding" in str(t) for t in types) or bool(getattr(config, "use_sliding_window", False))


def static_cache_fits(model: Any) -> bool:
    """Whether the model's KV cache can be a plain static one: full attention in every layer (no sliding window,
    no SSM state), so that tokens can be written into preallocated slots."""
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    if has_sliding_window(model):
        return False
    try:
        layers = StaticCache(config=model.config, max_cache_len=1).layers
    except (TypeError, ValueError, AttributeError):
        return False
    return all(type(layer) is StaticLayer for layer in layers)


def choose_layout(model: Any, requested: str = "auto") -> Layout:
    """The layout `requested` ("auto": the fastest this model allows); one that does not fit is an error."""
    if requested not in LAYOUTS:
        raise PrunekitError(f"unknown KV-cache layout {requested!r}; accepted: {', '.join(LAYOUTS)}")
    static = static_cache_fits(model)
    if requested == "auto":
        return "shared-prefix" if static and prefix_attention.supports(model) else "static" if static else "dynamic"
    if requested == "shared-prefix" and not (static and prefix_attention.supports(model)):
        raise PrunekitError(f"layout 'shared-prefix' needs a full-attention model of the families "
                            f"{', '.join(sorted(prefix_attention.FAMILIES))}; use static or dynamic")
    if requested == "static" and not static:
        raise PrunekitError("layout 'static' needs full attention in every layer; use dynamic")
    return requested  # type: ignore[return-value]


def cache_kwarg(model: Any, cache: Any) -> dict[str, Any]:
    """transformers 5 names the KV-cache argument `cache` (`past_key_values` is deprecated); older: the latter."""
    import inspect

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


def prefix_cache(model: Any, prefix: Sequence[int], device: torch.device) -> Any:
    """Keys/values of the shared prefix (batch of one), computed once per template and variant."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    if prefix:
        ids = torch.tensor([list(prefix)], dtype=torch.long, device=device)
        model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_kwarg(model, cache))
    return cache


@dataclass
class ChunkCache:
    """A batch's KV cache and how to address it: `first_slot` is the cache slot of the rows' first own token
    (the prefix length when the prefix sits in every row, 0 when it is `shared`)."""

    cache: Any
    layout: Layout
    first_slot: int
    shared: prefix_attention.SharedPrefix | None = None


def chunk_cache(model: Any, base: Any, p: int, rows: int, own: int, layout: Layout) -> ChunkCache:
    """The KV cache of one batch of `rows` rows with room for `own` tokens after the `p`-token prefix `base`."""
    from transformers import StaticCache

    if layout == "shared-prefix" and p:
        shared = prefix_attention.SharedPrefix(base)
        cache = StaticCache(config=model.config, max_cache_len=own)
        return ChunkCache(cache, layout, 0, shared)
    if layout in ("static", "shared-prefix"):
        cache = StaticCache(config=model.config, max_cache_len=p + own)
        for layer, prefix in zip(cache.layers, base.layers if p else [], strict=False):
            keys, values = prefix.keys, prefix.values
            layer.lazy_initialization(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1))
            layer.keys[:, :, :p] = keys
            layer.values[:, :, :p] = values
            layer.cumulative_length.fill_(p)
        return ChunkCache(cache, "static", p)
    cache = copy.deepcopy(base)
    if p:
        cache.batch_repeat_interleave(rows)
    return ChunkCache(cache, "dynamic", p)


def _keep_rows(cache: Any, index: torch.Tensor) -> None:
    """Drop the cache rows of finished answers (static layers are re-sliced: no compiled graph holds them)."""
    from transformers import StaticCache

    if not isinstance(cache, StaticCache):
        cache.batch_select_indices(index)
        return
    for layer in cache.layers:
        if layer.is_initialized:
            layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)
            layer.batch_size = len(index)


class _Attention:
    """Switch the model to the shared-prefix attention for one batch, and back."""

    def __init__(self, model: Any, on: bool) -> None:
        self.model, self.on = model, on
        self.previous = getattr(model.config, "_attn_implementation", None)

    def __enter__(self) -> None:
        if self.on:
            prefix_attention.register()
            self.model.set_attn_implementation(prefix_attention.NAME)

    def __exit__(self, *_: object) -> None:
        if self.on:
            self.model.set_attn_implementation(self.previous)


@torch.inference_mode()
def decode_batches(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
                   batch_size: int = 16, groups: Sequence[Sequence[int]] | None = None,
                   stop: StopRule | None = None, layout: str = "auto") -> Iterator[Batch]:
    """Greedy answers, one finished batch at a time (so a caller can store each batch before the next).

    `groups` lists prompt indices that share a prefix (one group per template); each group's common token
    prefix is encoded once. Inside a group the rows are sorted by length (less padding). Without groups all
    prompts form one group. `stop` is asked after every new token of a row; when it returns a reason the row
    ends there (ended = "verdict"). `layout`: where the prefix's keys/values live (module docstring).
    """
    device = decoding_setup(model, tokenizer, max_new_tokens, batch_size)[0]
    chosen = choose_layout(model, layout)
    for group in (groups if groups is not None else [list(range(len(prompts)))]):
        if not group:
            continue
        p = 0 if has_sliding_window(model) else common_prefix_length([prompts[i] for i in group])
        base = prefix_cache(model, prompts[group[0]][:p], device)
        order = sorted(group, key=lambda i: len(prompts[i]))
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            started = time.perf_counter()
            tokens, ended, reasons, used = decode_chunk(model, tokenizer, [prompts[i][p:] for i in chunk], base, p,
                                                        max_new_tokens, chosen, stop)
            if device.type == "cuda":
                torch.cuda.synchronize()
            yield Batch(chunk, tokens, ended, reasons, time.perf_counter() - started, p, used)


Decoded = tuple[list[list[int]], list[str], list[str | None], str]


def decode_chunk(model: Any, tokenizer: Any, suffixes: list[Sequence[int]], base: Any, p: int, max_new_tokens: int,
                 layout: Layout, stop: StopRule | None = None) -> Decoded:
    """One batch: the rows' own tokens `suffixes` after the `p`-token prefix cache `base`, greedy, on `layout`.
    Returns the new tokens, how and why each row ended, and the layout used."""
    device, pad_id, stops = decoding_setup(model, tokenizer, max_new_tokens, max(1, len(suffixes)))
    kv = chunk_cache(model, base, p, len(suffixes), max(map(len, suffixes)) + max_new_tokens, layout)
    with _Attention(model, kv.layout == "shared-prefix"):
        tokens, ended, reasons = _decode_chunk(model, tokenizer, suffixes, kv, p, max_new_tokens, pad_id, stops,
                                               stop, device)
    return tokens, ended, reasons, kv.layout


def _decode_chunk(model: Any, tokenizer: Any, suffixes: list[Sequence[int]], kv: ChunkCache, p: int,
                  max_new_tokens: int, pad_id: int, stops: set[int], stop: StopRule | None,
                  device: torch.device) -> tuple[list[list[int]], list[str], list[str | None]]:
    """Greedy decoding of one batch on its cache `kv`; finished rows leave the batch."""
    b = len(suffixes)
    ids, suffix_mask = left_pad(suffixes, pad_id)
    width = ids.shape[1]
    lengths = torch.tensor([len(s) for s in suffixes])
    # real suffix tokens continue the prefix's positions; the left padding (masked) gets any valid position
    positions = (p + torch.arange(width).unsqueeze(0) - (width - lengths).unsqueeze(1)).clamp(min=p)
    # the mask covers the cache's slots; a static cache sees its whole length from the start (slots not yet
    # written are causally masked), a dynamic one grows by a slot per token
    after = 0 if kv.layout == "dynamic" else max_new_tokens
    mask = torch.cat([torch.ones((b, kv.first_slot), dtype=torch.long), suffix_mask,
                      torch.ones((b, after), dtype=torch.long)], dim=1).to(device)
    slot = kv.first_slot  # the cache slot of the next fed token (the same for every row: left padding)

    def forward(input_ids: torch.Tensor, position_ids: torch.Tensor, **extra: Any) -> torch.Tensor:
        kwargs: dict[str, Any] = {} if kv.shared is None else {"shared_prefix": kv.shared}
        if kv.layout != "dynamic":  # static caches are written at explicit slots
            kwargs["cache_position"] = torch.arange(slot, slot + input_ids.shape[1], device=device)
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                    **extra, **kwargs, **cache_kwarg(model, kv.cache))
        return out.logits[:, -1, :]

    logits = forward(ids.to(device), positions.to(device), logits_to_keep=1)
    if kv.shared is not None and kv.shared.calls != model.config.num_hidden_layers:
        raise PrunekitError(f"{type(model).__name__} bypassed the shared-prefix attention "
                            f"({kv.shared.calls} of {model.config.num_hidden_layers} layers); use layout static")
    next_pos, slot = (p + lengths).to(device), slot + width
    tokens: list[list[int]] = [[] for _ in range(b)]
    ended: list[str] = ["length"] * b
    reasons: list[str | None] = [None] * b
    alive = list(range(b))  # batch row → original row
    for _ in range(max_new_tokens):
        chosen = logits.argmax(dim=-1)
        keep = []
        for row, token in enumerate(chosen.tolist()):
            i = alive[row]
            if token in stops:
                ended[i] = "eos"
                continue
            tokens[i].append(token)
            if stop is not None:
                reason = stop(tokenizer.decode(tokens[i], skip_special_tokens=True))
                if reason is not None:
                    ended[i], reasons[i] = "verdict", reason
                    continue
            keep.append(row)
        if len(keep) < len(alive):
            if not keep:
                break
            index = torch.tensor(keep, device=device)
            _keep_rows(kv.cache, index)
            mask, next_pos, chosen = mask[index], next_pos[index], chosen[index]
            alive = [alive[r] for r in keep]
        if all(len(tokens[i]) >= max_new_tokens for i in alive):
            break
        if kv.layout == "dynamic":
            mask = torch.cat([mask, torch.ones((len(alive), 1), dtype=mask.dtype, device=device)], dim=1)
        logits = forward(chosen.unsqueeze(1), next_pos.unsqueeze(1))
        next_pos, slot = next_pos + 1, slot + 1
    return tokens, ended, reasons


def generate_fast(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
                  batch_size: int = 16, groups: Sequence[Sequence[int]] | None = None,
                  stop: StopRule | None = None, layout: str = "auto") -> Generation:
    """`decode_batches` collected in prompt order, with the same `Generation` record as the plain path."""
    results: list[list[int]] = [[] for _ in prompts]
    ended: list[str] = [""] * len(prompts)
    seconds = 0.0
    prefix: list[int] = []
    layouts: set[str] = set()
    for batch in decode_batches(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                groups=groups, stop=stop, layout=layout):
        seconds += batch.seconds
        prefix.append(batch.prefix_tokens)
        layouts.add(batch.layout)
        for i, toks, end in zip(batch.indices, batch.token_ids, batch.ended, strict=True):
            results[i], ended[i] = toks, end
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in results]
    extra = {"path": "prefix-cache", "ended": {k: ended.count(k) for k in ("eos", "length", "verdict")},
             "mean_prefix_tokens": sum(prefix) / len(prefix) if prefix else 0.0, "layout": "+".join(sorted(layouts))}
    return Generation(texts, results, seconds, batch_size, max_new_tokens, extra)
