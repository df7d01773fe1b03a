"""Calibration windows: the inputs whose activations the pruning methods measure.

Protocol (recorded in the provenance): documents joined with "\\n\\n", tokenized once with no special
tokens, `nsamples` windows of `seqlen` tokens at offsets drawn uniformly from [0, ntokens - seqlen] by
`random.Random(seed)`. This is the Wanda/SparseGPT loader idea applied to the joined stream, so the
windows can straddle document boundaries and a short document is never skipped.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch

from prunekit.data.sources import (
    TextSource,
    TokenSource,
    resolve_source,
    sample_from_model,
    sha256_ids,
    tokenize_documents,
)
from prunekit.errors import PrunekitError

DEFAULT_SEQLEN = 2048


@dataclass
class CalibrationSet:
    """[nsamples, seqlen] token ids plus everything needed to rebuild them."""

    input_ids: torch.Tensor
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def nsamples(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seqlen(self) -> int:
        return int(self.input_ids.shape[1])

    def __len__(self) -> int:
        return self.nsamples


def model_context(model_config: Any) -> tuple[int | None, str | None]:
    """The model's context length and the config field it came from (None if the config has none)."""
    if model_config is None:
        return None, None
    configs = [model_config, getattr(model_config, "text_config", None)]
    for cfg in configs:
        if cfg is None:
            continue
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = cfg.get(name) if isinstance(cfg, dict) else getattr(cfg, name, None)
            if isinstance(value, int) and value > 0:
                return value, name
    return None, None


def resolve_seqlen(requested: int | None, model_config: Any) -> tuple[int, str]:
    """Pick the window length: the request, else 2048 capped by the model's context; say which in a note.

    The model's full context is never used silently (for a 128k-context model that would be a
    64x slower calibration than the papers' 2048); an explicit request beyond the context is an error.
    """
    context, where = model_context(model_config)
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 2:
            raise PrunekitError(f"seqlen {requested!r} is invalid; accepted: an integer >= 2")
        if context is not None and requested > context:
            raise PrunekitError(f"seqlen {requested} exceeds the model's context of {context}")
        return requested, f"seqlen {requested} (requested)"
    if context is None:
        return DEFAULT_SEQLEN, f"seqlen {DEFAULT_SEQLEN} (default; the model config states no context length)"
    if context < DEFAULT_SEQLEN:
        return context, (
            f"seqlen {context} (default {DEFAULT_SEQLEN} capped by the model's context of {context}, {where})"
        )
    return DEFAULT_SEQLEN, f"seqlen {DEFAULT_SEQLEN} (default; the model's context is {context}, {where})"


def _check_sizes(nsamples: int, seqlen: int) -> None:
    if isinstance(nsamples, bool) or not isinstance(nsamples, int) or nsamples < 1:
        raise PrunekitError(f"nsamples {nsamples!r} is invalid; accepted: an integer >= 1")
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 2:
        raise PrunekitError(f"seqlen {seqlen!r} is invalid; accepted: an integer >= 2")


def draw_offsets(ntokens: int, *, nsamples: int, seqlen: int, seed: int) -> list[int]:
    """Window starts uniform in [0, ntokens - seqlen], drawn with replacement (as the papers' loaders)."""
    rng = random.Random(seed)
    return [rng.randint(0, ntokens - seqlen) for _ in range(nsamples)]


def _windows_from_stream(
    stream: torch.Tensor, *, nsamples: int, seqlen: int, seed: int, what: str
) -> tuple[torch.Tensor, list[int]]:
    ntokens = int(stream.numel())
    if ntokens < seqlen:
        raise PrunekitError(
            f"{what} has {ntokens} tokens, shorter than one window of seqlen {seqlen}; "
            "accepted: more text or a smaller seqlen"
        )
    offsets = draw_offsets(ntokens, nsamples=nsamples, seqlen=seqlen, seed=seed)
    windows = torch.stack([stream[o : o + seqlen] for o in offsets])
    return windows, offsets


def _vocab_size(tokenizer: Any) -> int | None:
    try:
        return len(tokenizer)
    except TypeError:
        return getattr(tokenizer, "vocab_size", None)


def build_calibration(
    source: str,
    tokenizer: Any,
    *,
    nsamples: int,
    seqlen: int,
    seed: int,
    model: Any = None,
    split: str = "train",
    self_batch_size: int = 8,
) -> CalibrationSet:
    """Build `nsamples` x `seqlen` calibration ids from SOURCE (see prunekit.data.sources).

    Text sources are windowed at seeded random offsets (recorded). A .safetensors [rows, seqlen] file is
    used as given (the first `nsamples` rows; seqlen must match); a 1-D one is a token stream windowed like
    text. `self` samples from `model` (required then), seeded by `seed`.
    """
    _check_sizes(nsamples, seqlen)
    base: dict[str, Any] = {"source": source, "nsamples": nsamples, "seqlen": seqlen, "seed": seed}

    if isinstance(source, str) and source.strip().lower() == "self":
        if model is None:
            raise PrunekitError("source 'self' needs the model to sample from; accepted: pass model=")
        ts = sample_from_model(
            model, tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed, batch_size=self_batch_size
        )
        return CalibrationSet(ts.input_ids, {**ts.provenance, **base})

    resolved = resolve_source(source, split=split)
    if isinstance(resolved, TextSource):
        stream, tok_info = tokenize_documents(tokenizer, resolved.documents)
        windows, offsets = _windows_from_stream(
            stream, nsamples=nsamples, seqlen=seqlen, seed=seed, what=f"source {source!r}"
        )
        prov = {
            **resolved.provenance,
            **base,
            **tok_info,
            "sampling": "uniform offsets in [0, tokens - seqlen], random.Random(seed), with replacement",
            "offsets": offsets,
            "ids_sha256": sha256_ids(windows),
        }
        return CalibrationSet(windows, prov)

    assert isinstance(resolved, TokenSource)
    ids = resolved.input_ids
    vocab = _vocab_size(tokenizer)
    if vocab is not None and int(ids.max()) >= vocab:
        raise PrunekitError(
            f"input_ids in {source!r} hold id {int(ids.max())}, beyond the tokenizer's {vocab} tokens; "
            "accepted: ids from this model's tokenizer"
        )
    if ids.dim() == 1:
        windows, offsets = _windows_from_stream(
            ids, nsamples=nsamples, seqlen=seqlen, seed=seed, what=f"token stream {source!r}"
        )
        prov = {
            **resolved.provenance,
            **base,
            "sampling": "uniform offsets in [0, tokens - seqlen], random.Random(seed), with replacement",
            "offsets": offsets,
            "ids_sha256": sha256_ids(windows),
        }
        return CalibrationSet(windows, prov)

    rows, width = ids.shape
    if width != seqlen:
        raise PrunekitError(
            f"input_ids in {source!r} have seqlen {width}, not the requested {seqlen}; accepted: [nsamples, {seqlen}]"
        )
    if rows < nsamples:
        raise PrunekitError(
            f"input_ids in {source!r} have {rows} rows, fewer than nsamples {nsamples}; "
            f"accepted: at least {nsamples} rows"
        )
    windows = ids[:nsamples].clone()
    prov = {
        **resolved.provenance,
        **base,
        "sampling": f"used as given: first {nsamples} of {rows} rows",
        "ids_sha256": sha256_ids(windows),
    }
    return CalibrationSet(windows, prov)
