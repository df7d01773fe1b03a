"""Perplexity under one pinned protocol, so numbers before and after pruning are comparable.

Protocol (every choice is stated in the result):
  * documents joined with "\\n\\n" and tokenized once with add_special_tokens=False (no BOS/EOS inserted);
  * the stream cut into non-overlapping windows of `seqlen` tokens from the start; the trailing partial
    window is dropped (its token count is reported);
  * bos=True prepends the tokenizer's BOS to every window (input length seqlen+1), so every window token
    is predicted (seqlen per window); bos=False predicts tokens 2..seqlen (seqlen-1 per window);
  * batched forward under torch.inference_mode, loss from logits upcast to fp32, summed in fp64;
  * perplexity = exp(mean NLL over all predicted tokens of all windows).
This is the Wanda/SparseGPT wikitext2 evaluation except that they let the tokenizer add one BOS at the
very start of the stream (a difference in the first window only).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from prunekit.data.calibration import model_context
from prunekit.data.sources import (
    JOINER,
    TextSource,
    TokenSource,
    resolve_source,
    text_stats,
    tokenize_documents,
)
from prunekit.errors import PrunekitError


@dataclass
class PerplexityResult:
    """Perplexity plus the counts and protocol needed to interpret (and reproduce) it."""

    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token, nats
    tokens: int  # predicted tokens
    windows: int
    seqlen: int
    bos: bool
    source: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    batch_size: int = 8
    dropped_tokens: int = 0  # trailing partial window (text / 1-D streams)
    dtype: str = ""  # the model's parameter dtype; the loss itself is always fp32
    protocol: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _model_device(model: Any) -> torch.device:
    device = getattr(model, "device", None)
    if device is None:
        device = next(model.parameters()).device
    return torch.device(device)


def _embedding_rows(model: Any) -> int | None:
    try:
        return int(model.get_input_embeddings().num_embeddings)
    except (AttributeError, TypeError):
        return None


def _windows(
    source: str | list[str] | TextSource | TokenSource,
    tokenizer: Any,
    *,
    seqlen: int,
    split: str,
    max_windows: int | None,
) -> tuple[torch.Tensor, dict[str, Any], int]:
    """Resolve the source and cut it into [windows, seqlen] ids; returns (windows, provenance, dropped)."""
    if isinstance(source, list):
        if not source or not all(isinstance(d, str) for d in source):
            raise PrunekitError("source list must hold at least one string document; accepted: list[str]")
        resolved: TextSource | TokenSource = TextSource(
            source, {"source": f"<{len(source)} documents>", "kind": "documents", **text_stats(source)}
        )
    elif isinstance(source, (TextSource, TokenSource)):
        resolved = source
    else:
        resolved = resolve_source(source, split=split)
    name = resolved.provenance.get("source", "source")
    prov = dict(resolved.provenance)

    if isinstance(resolved, TokenSource) and resolved.input_ids.dim() == 2:
        ids = resolved.input_ids.to(torch.long)
        if ids.shape[1] != seqlen:
            raise PrunekitError(
                f"input_ids in {name!r} have seqlen {ids.shape[1]}, not the requested {seqlen}; "
                f"accepted: [windows, {seqlen}] or a 1-D token stream"
            )
        available = int(ids.shape[0])
        n = available if max_windows is None else min(max_windows, available)
        prov.update(windowing=f"used as given: first {n} of {available} rows")
        return ids[:n], prov, 0

    if isinstance(resolved, TokenSource):
        stream = resolved.input_ids.to(torch.long).reshape(-1)
    else:
        max_tokens = None if max_windows is None else max_windows * seqlen
        stream, info = tokenize_documents(tokenizer, resolved.documents, max_tokens=max_tokens)
        prov.update(info)
    ntokens = int(stream.numel())
    available = ntokens // seqlen
    if available == 0:
        raise PrunekitError(
            f"{name!r} has {ntokens} tokens, shorter than one window of seqlen {seqlen}; "
            "accepted: more text or a smaller seqlen"
        )
    n = available if max_windows is None else min(max_windows, available)
    dropped = ntokens - available * seqlen
    prov.update(
        windowing=(
            f"non-overlapping windows of {seqlen} from token 0; {available} full windows, trailing "
            f"{dropped} tokens dropped" + (f"; first {n} used (max_windows)" if n < available else "")
        )
    )
    return stream[: n * seqlen].view(n, seqlen), prov, dropped


def prepare_windows(source, tokenizer, *, seqlen: int, batch_size: int, bos: bool, split: str,
                    max_windows: int | None, config: Any, embedding_rows: int | None
                    ) -> tuple[torch.Tensor, dict[str, Any], int, int | None]:
    """Check the request and cut SOURCE into windows (with BOS when asked): (windows, provenance, dropped, bos id)."""
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 2:
        raise PrunekitError(f"seqlen {seqlen!r} is invalid; accepted: an integer >= 2")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise PrunekitError(f"batch_size {batch_size!r} is invalid; accepted: an integer >= 1")
    if max_windows is not None and (not isinstance(max_windows, int) or max_windows < 1):
        raise PrunekitError(f"max_windows {max_windows!r} is invalid; accepted: None or an integer >= 1")
    if isinstance(source, str) and source.strip().lower() == "self":
        raise PrunekitError(
            "source 'self' is for calibration only; accepted for perplexity: "
            + "wikitext2, c4, ptb, .txt, folder, .jsonl[:field], .safetensors, list[str]"
        )
    bos_id = getattr(tokenizer, "bos_token_id", None) if bos else None
    if bos and bos_id is None:
        raise PrunekitError("bos=True but the tokenizer has no BOS token; accepted: bos=False for this model")
    context, _ = model_context(config)
    width = seqlen + (1 if bos else 0)
    if context is not None and width > context:
        extra = " (+1 for BOS)" if bos else ""
        raise PrunekitError(f"seqlen {seqlen}{extra} exceeds the model's context of {context}")

    windows, prov, dropped = _windows(source, tokenizer, seqlen=seqlen, split=split, max_windows=max_windows)
    if embedding_rows is not None and int(windows.max()) >= embedding_rows:
        raise PrunekitError(
            f"token id {int(windows.max())} is beyond the model's {embedding_rows} embeddings; "
            "accepted: ids from this model's tokenizer"
        )
    if bos:
        windows = torch.cat([torch.full((windows.shape[0], 1), int(bos_id)), windows], dim=1)
    return windows, prov, dropped, bos_id


def perplexity_result(nll_sum: float, windows: torch.Tensor, *, seqlen: int, bos: bool, bos_id: int | None,
                      prov: dict[str, Any], dropped: int, dtype: str, seconds: float, batch_size: int,
                      how: str = "") -> PerplexityResult:
    """The result and its protocol string, the same however the forward passes ran."""
    nwin = int(windows.shape[0])
    predicted = nwin * (windows.shape[1] - 1)
    nll = nll_sum / predicted
    ppl = math.exp(nll) if nll < 700 else math.inf
    protocol = (
        f"documents joined with {JOINER!r}, tokenized once with add_special_tokens=False; "
        f"{nwin} non-overlapping windows of {seqlen} tokens, trailing partial window dropped "
        f"({dropped} tokens); "
        + (f"BOS id {bos_id} prepended to every window, " if bos else "no BOS, ")
        + f"{windows.shape[1] - 1} predicted tokens per window; forward in {dtype}{how}, loss in fp32; "
        f"perplexity = exp(mean NLL over {predicted} tokens)"
    )
    return PerplexityResult(perplexity=ppl, nll=nll, tokens=predicted, windows=nwin, seqlen=seqlen, bos=bos,
                            source=prov, seconds=seconds, batch_size=batch_size, dropped_tokens=dropped, dtype=dtype,
                            protocol=protocol)


def perplexity(
    model: Any,
    tokenizer: Any,
    source: str | list[str] | TextSource | TokenSource,
    *,
    seqlen: int,
    batch_size: int = 8,
    bos: bool = False,
    split: str = "test",
    max_windows: int | None = None,
    progress: bool | None = None,
) -> PerplexityResult:
    """Perplexity of `model` on SOURCE under the pinned protocol (module docstring).

    `source` is a SOURCE string (wikitext2, c4, ptb, .txt, folder, .jsonl[:field], .safetensors), a list
    of documents, or an already resolved TextSource/TokenSource. A 2-D .safetensors input_ids is taken as
    the windows themselves (its width must equal seqlen); a 1-D one is a stream windowed like text.
    `progress=None` shows a bar on stderr only when stderr is a terminal. A model on disk larger than
    memory is evaluated block by block with `prunekit.evaluation.streamed.streamed_perplexity`.
    """
    t0 = time.perf_counter()
    windows, prov, dropped, bos_id = prepare_windows(
        source, tokenizer, seqlen=seqlen, batch_size=batch_size, bos=bos, split=split, max_windows=max_windows,
        config=getattr(model, "config", None), embedding_rows=_embedding_rows(model))

    from tqdm.auto import tqdm

    device = _model_device(model)
    nwin = int(windows.shape[0])
    show = sys.stderr.isatty() if progress is None else progress
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    try:
        with (
            torch.inference_mode(),
            tqdm(total=nwin, desc="perplexity", unit="win", file=sys.stderr, disable=not show) as bar,
        ):
            for start in range(0, nwin, batch_size):
                batch = windows[start : start + batch_size].to(device)
                out = model(input_ids=batch, use_cache=False)
                logits = out.logits if hasattr(out, "logits") else out[0]
                # One row at a time keeps the fp32 copy of the logits small (vocab 128k x 2048 = 1 GB).
                for i in range(batch.shape[0]):
                    row = logits[i, :-1].float()
                    nll_sum += F.cross_entropy(row, batch[i, 1:], reduction="sum").double()
                bar.update(batch.shape[0])
    finally:
        model.train(was_training)
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    return perplexity_result(float(nll_sum.item()), windows, seqlen=seqlen, bos=bos, bos_id=bos_id, prov=prov,
                             dropped=dropped, dtype=dtype, seconds=time.perf_counter() - t0, batch_size=batch_size)
